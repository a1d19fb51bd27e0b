#pragma once
// Blackwell (sm_100a / sm_103a) grouped expert GEMM on tcgen05, swap-AB: weights are the UMMA M side
// (128 rows per tile), tokens the N side (kBlockN per tile).
//
//   out[token, row] = alpha[e] * b_scale * sum_k W_e[row, k] * x[token, k]
//
// Recipes (sm100::Recipe, template parameter): NVFP4 weights x NVFP4 tokens (kind::mxf4nvf4
// .block_scale.block16, UE4M3 per 16), or MXFP4 weights x FP8 E4M3 tokens (kind::mxf8f6f4
// .block_scale.block32, UE8M0 per 32).  Block scales are staged through shared memory into TMEM by
// tcgen05.cp 32x128b.warpx4 and applied by the MMA; the global scales (alpha, b_scale) in the epilogue.
//
// All addressing and issue order is scheduler/sm100_gemm_plan.cuh's GemmPlan (host-checkable, plain
// C++), run here with the device policy sm100::DeviceOps (common/sm100_tcgen05.cuh).  Warp roles
// (256 threads): warp 0 lane 0 the TMA producer, warp 1 the MMA issuer (and TMEM allocator), warps 4-7
// the epilogue (warp w reads TMEM lanes 32 (w % 4) ..); warps 2-3 idle.  Accumulators double-buffered in
// TMEM, so the MMAs of tile i + 1 run while the epilogue drains tile i.  Persistent grid over
// GroupedTiles (contiguous: expert_offsets [E + 1], each a multiple of 128; masked: masked_m [E], with
// max_rows a multiple of 128).
//
// Epilogues (the arch-neutral math of epilogue/moe_math.cuh):
//   Plain : out[token, row] = bf16(acc * alpha * b_scale)              (tcgen05.ld 32x32b: thread = row)
//   SwiGLU: L1 with gate/up interleaved by 8 rows (deep_gemm.weights_sm100, as the sm90 transform):
//           out[token, chan] = bf16(swiglu(gate * alpha_g, up * alpha_u, clamp) * route_weights[token])
//           (tcgen05.ld 16x256b: a thread holds lanes l and l + 8, i.e. gate and up of one channel)
#include <cstdint>
#include <cuda.h>
#include <cuda_bf16.h>

#include <deep_gemm/common/sm100_tcgen05.cuh>
#include <deep_gemm/epilogue/moe_math.cuh>
#include <deep_gemm/scheduler/grouped_tiles.cuh>
#include <deep_gemm/scheduler/sm100_gemm_plan.cuh>

namespace deep_gemm::sm100 {

enum class Epilogue : int { Plain = 0, SwiGLU = 1 };

template <Recipe kRecipe, int kBlockN, int kStages, Epilogue kEpilogue, GroupMode kMode, bool kFastMath>
__global__ void __launch_bounds__(256, 1)
sm100_fp4_grouped_gemm(const __grid_constant__ CUtensorMap a_map, const __grid_constant__ CUtensorMap b_map,
                       const uint8_t* sfa, const uint8_t* sfb, const float* alpha, float b_scale, const int* layout,
                       __nv_bfloat16* out, const float* route_weights, float clamp,
                       int num_experts, int n, int k, int max_rows, int alpha_stride, int token_group) {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 1000)
    using Plan = GemmPlan<kRecipe, kBlockN, kStages>;
    using Ops = DeviceOps<kBlockN>;

    extern __shared__ __align__(1024) uint8_t smem_raw[];
    uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
    int* smem_prefix = reinterpret_cast<int*>(smem + Plan::kSmemBytes);
    uint32_t* tmem_slot = reinterpret_cast<uint32_t*>(smem + Plan::kTmemSlotOff);

    Plan plan{n, k, static_cast<uint32_t>(__cvta_generic_to_shared(smem)), 0u};
    const Ops ops{smem, plan.smem_base, reinterpret_cast<uint64_t*>(smem + Plan::kBarOff), &a_map, &b_map, sfa, sfb};

    const int warp = __shfl_sync(0xffffffffu, int(threadIdx.x) / 32, 0);
    const int lane = int(threadIdx.x) % 32;

    GroupedTiles<kMode, kBlockN> sched{layout, num_experts, max_rows, n / Plan::kBlockM, smem_prefix, token_group};
    if (warp == 0) sched.build_prefix(lane);
    if (warp == 1) {
        tmem_alloc(tmem_slot, int(Plan::Tmem::kAlloc));
        tmem_relinquish();
    }
    if (threadIdx.x == 64) {
        plan.init_barriers(ops);
        cutlass::arch::fence_barrier_init();
    }
    if (threadIdx.x == 96) {
        cute::prefetch_tma_descriptor(&a_map);
        cute::prefetch_tma_descriptor(&b_map);
    }
    tcgen05_fence_before_thread_sync();
    __syncthreads();
    tcgen05_fence_after_thread_sync();
    plan.tmem_base = *tmem_slot;

    const int num_tiles = __shfl_sync(0xffffffffu, sched.num_tiles(), 0);
    const auto tiles = [&](int t) {
        const auto x = sched.get(t);
        return PlanTile{x.expert, x.row_tile, x.token_tile, x.row_start, x.num_tokens};
    };
    const int first = int(blockIdx.x), stride = int(gridDim.x);

    if (warp == 0) {
        if (lane == 0) plan.producer(ops, tiles, first, num_tiles, stride);
    } else if (warp == 1) {
        plan.mma(ops, tiles, first, num_tiles, stride);
    } else if (warp >= 4) {
        if constexpr (kEpilogue == Epilogue::Plain) {
            plan.template epilogue<TmemLdShape::K32x32B>(
                ops, tiles, first, num_tiles, stride, warp, lane,
                [&](const PlanTile& tile, uint32_t lane_base, uint32_t col, int l, const uint32_t (&regs)[16]) {
                    const float a = __ldg(alpha + tile.expert * alpha_stride) * b_scale;
                    const int row = tile.row_tile * Plan::kBlockM + int(lane_base) + l;
                    #pragma unroll
                    for (int j = 0; j < 16; ++j) {
                        const TmemCoord c = tmem_ld_coord(TmemLdShape::K32x32B, uint32_t(l), uint32_t(j));
                        const int tok = int(col + c.column);
                        if (tok < tile.num_tokens)
                            out[size_t(tile.row_start + tok) * size_t(n) + row] = __float2bfloat16_rn(__uint_as_float(regs[j]) * a);
                    }
                });
        } else {
            static_assert(kEpilogue == Epilogue::SwiGLU, "unknown epilogue");
            plan.template epilogue<TmemLdShape::K16x256B>(
                ops, tiles, first, num_tiles, stride, warp, lane,
                [&](const PlanTile& tile, uint32_t lane_base, uint32_t col, int l, const uint32_t (&regs)[16]) {
                    const float ag = __ldg(alpha + tile.expert * alpha_stride) * b_scale;
                    const float au = __ldg(alpha + tile.expert * alpha_stride + 1) * b_scale;
                    // kernel rows 16 G + [0, 8) are gate rows of channels 8 G + [0, 8), 16 G + [8, 16) their up rows
                    #pragma unroll
                    for (int j = 0; j < 16; ++j) {
                        if ((j % 4) >= 2) continue;                      // registers r = 2, 3: the up rows
                        const TmemCoord c = tmem_ld_coord(TmemLdShape::K16x256B, uint32_t(l), uint32_t(j));
                        const int tok = int(col + c.column);
                        const int kernel_row = int(lane_base + c.lane);  // within the tile; a gate row
                        const int chan = tile.row_tile * (Plan::kBlockM / 2) + (kernel_row / 16) * 8 + kernel_row % 8;
                        if (tok < tile.num_tokens) {
                            const size_t row = size_t(tile.row_start + tok);
                            float h = swiglu<kFastMath>(__uint_as_float(regs[j]) * ag, __uint_as_float(regs[j + 2]) * au, clamp);
                            if (route_weights != nullptr) h *= route_weights[row];
                            out[row * size_t(n / 2) + chan] = __float2bfloat16_rn(h);
                        }
                    }
                });
        }
    }

    tcgen05_fence_before_thread_sync();
    __syncthreads();
    if (warp == 1) {
        tcgen05_fence_after_thread_sync();
        tmem_dealloc(plan.tmem_base, int(Plan::Tmem::kAlloc));
    }
#endif
}

}  // namespace deep_gemm::sm100
