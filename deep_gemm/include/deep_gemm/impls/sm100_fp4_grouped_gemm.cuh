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
//   SwiGLUQuant: the SwiGLU activations quantized into the NEXT GEMM's token format (epilogue/
//           moe_l2_input.cuh): per token and channel, g = bf16(acc_g * alpha_g), u = bf16(acc_u * alpha_u),
//           a = f32(f32(swiglu(g, u, bf16(clamp))) * w) (sm90 SwiGLUFP8's rounding points), staged as
//           float [64 channels][kBlockN tokens] in shared memory (named barrier 1, the 128 epilogue
//           threads); then per (token, block) one thread takes the block's amax and writes
//             MXFP4_FP8 recipe: E4M3 codes (uint8 [rows, N / 2]) and UE8M0 = fp8_pow2_sf_biased per 32
//             NVFP4 recipe:     packed E2M1 codes (uint8 [rows, N / 4]) and UE4M3 = nvfp4_block(amax,
//                               l2_inv_global) per 16
//           the scales in the 512-byte atom layout over token rows (sf_global_offset), i.e. kTensorB and
//           kTensorSFB of the L2 GEMM.
#include <cstdint>
#include <cuda.h>
#include <cuda_bf16.h>

#include <deep_gemm/common/sm100_tcgen05.cuh>
#include <deep_gemm/epilogue/moe_l2_input.cuh>
#include <deep_gemm/epilogue/moe_math.cuh>
#include <deep_gemm/epilogue/sm100_moe_epilogue.cuh>
#include <deep_gemm/scheduler/grouped_tiles.cuh>
#include <deep_gemm/scheduler/sm100_gemm_plan.cuh>

namespace deep_gemm::sm100 {

enum class Epilogue : int { Plain = 0, SwiGLU = 1, SwiGLUQuant = 2 };

// Shared memory of the SwiGLUQuant staging (after GemmPlan::kSmemBytes, before the tile prefix).
template <Epilogue kEpilogue, int kBlockN>
constexpr int kEpilogueScratchBytes = kEpilogue == Epilogue::SwiGLUQuant ? 64 * kBlockN * 4 : 0;
constexpr int kBarEpilogue = 1;   // named barrier of the 128 epilogue threads

__device__ __forceinline__ void epilogue_barrier() { asm volatile("bar.sync %0, 128;" :: "n"(kBarEpilogue) : "memory"); }

template <Recipe kRecipe, int kBlockN, int kStages, Epilogue kEpilogue, GroupMode kMode, bool kFastMath>
__global__ void __launch_bounds__(256, 1)
sm100_fp4_grouped_gemm(const __grid_constant__ CUtensorMap a_map, const __grid_constant__ CUtensorMap b_map,
                       const uint8_t* sfa, const uint8_t* sfb, const float* alpha, float b_scale, const int* layout,
                       __nv_bfloat16* out, const float* route_weights, float clamp,
                       int num_experts, int n, int k, int max_rows, int alpha_stride, int token_group,
                       uint8_t* out_sf, float l2_inv_global) {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 1000)
    using Plan = GemmPlan<kRecipe, kBlockN, kStages>;
    using Ops = DeviceOps<kBlockN>;

    extern __shared__ __align__(1024) uint8_t smem_raw[];
    uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
    float* epi_scratch = reinterpret_cast<float*>(smem + Plan::kSmemBytes);
    int* smem_prefix = reinterpret_cast<int*>(smem + Plan::kSmemBytes + kEpilogueScratchBytes<kEpilogue, kBlockN>);
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
                    store_rows_chunk<false>(regs, col, l, tile.num_tokens, a, nullptr, out, size_t(tile.row_start),
                                            size_t(n), tile.row_tile * Plan::kBlockM + int(lane_base) + l);
                });
        } else if constexpr (kEpilogue == Epilogue::SwiGLUQuant) {
            const float cb = __bfloat162float(__float2bfloat16_rn(clamp));
            plan.template epilogue<TmemLdShape::K16x256B>(
                ops, tiles, first, num_tiles, stride, warp, lane,
                [&](const PlanTile& tile, uint32_t lane_base, uint32_t col, int l, const uint32_t (&regs)[16]) {
                    const float ag = __ldg(alpha + tile.expert * alpha_stride) * b_scale;
                    const float au = __ldg(alpha + tile.expert * alpha_stride + 1) * b_scale;
                    swiglu_stage_chunk<kBlockN, kFastMath>(
                        regs, lane_base, col, l, tile.num_tokens, ag, au, cb,
                        route_weights != nullptr ? route_weights + tile.row_start : nullptr, epi_scratch);
                },
                [&](const PlanTile& tile) {
                    epilogue_barrier();
                    quantize_l2_input<kRecipe, kBlockN>(epi_scratch, tile.num_tokens, size_t(tile.row_start),
                                                        tile.row_tile, n / 2, reinterpret_cast<uint8_t*>(out), out_sf,
                                                        l2_inv_global, int(threadIdx.x) % 128);
                    epilogue_barrier();
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
