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
// Two kind::f16 recipes (BF16 x BF16 -> FP32; scheduler/sm100_gemm_plan.cuh "THE kind::f16 RECIPES"):
// NVFP4_EXACT (NVFP4 weights dequantized exactly to BF16 by a dequant warpgroup, warps 8-11, into TMEM:
// the TS form, tokens BF16 in shared memory; the 2^7 of the dequant's bias and the global scales in the
// epilogue) and BF16 (both operands BF16 in shared memory: the SS form).
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
#include <deep_gemm/epilogue/sm100_epilogue.cuh>
#include <deep_gemm/scheduler/grouped_tiles.cuh>
#include <deep_gemm/scheduler/sm100_gemm_plan.cuh>

namespace deep_gemm::sm100 {

enum class Epilogue : int { Plain = 0, SwiGLU = 1, SwiGLUQuant = 2 };

// Shared memory of the SwiGLUQuant staging (after GemmPlan::kSmemBytes, before the tile prefix).
template <Epilogue kEpilogue, int kBlockN>
constexpr int kEpilogueScratchBytes = kEpilogue == Epilogue::SwiGLUQuant ? 64 * kBlockN * 4 : 0;
constexpr int kBarEpilogue = 1;   // named barrier of the 128 epilogue threads

__device__ __forceinline__ void epilogue_barrier() { asm volatile("bar.sync %0, 128;" :: "n"(kBarEpilogue) : "memory"); }

// Threads per CTA: 256; the exact recipe adds a dequant warpgroup (warps 8-11): 384.
template <Recipe kRecipe>
constexpr int kGemmThreads = GemmPlan<kRecipe, 64, 2>::kNumThreads;
// The epilogue's factor on top of alpha * b_scale: the exact recipe's A is code * scale * 2^-7.
template <Recipe kRecipe>
constexpr float kAccumCompensation = kRecipe == Recipe::NVFP4_EXACT ? fp4::kNvfp4Compensation : 1.0f;

template <Recipe kRecipe, int kBlockN, int kStages, Epilogue kEpilogue, GroupMode kMode, bool kFastMath>
__global__ void __launch_bounds__(kGemmThreads<kRecipe>, 1)
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
    } else if (warp >= 8) {
        if constexpr (Plan::kATmem) plan.dequant(ops, tiles, first, num_tiles, stride, warp, lane);
    } else if (warp >= 4) {
        // The callbacks are epilogue/sm100_epilogue.cuh's (index maps GemmPlan::plain_out / swiglu_out /
        // l2_block_out): host-callable, the CPU model and tests/cpp/sm100_epilogue_check.cpp run the same code.
        uint16_t* out_bits = reinterpret_cast<uint16_t*>(out);
        // alpha x this scale is the tile's FP32 multiplier (the token side's global scale, the exact
        // recipe's 2^7); the SwiGLU epilogues index the tile's own route weights by token in the tile
        const float alpha_scale = b_scale * kAccumCompensation<kRecipe>;
        const auto tile_route = [&](const PlanTile& tile) -> const float* {
            return route_weights != nullptr ? route_weights + tile.row_start : nullptr;
        };
        if constexpr (kEpilogue == Epilogue::Plain) {
            plan.template epilogue<TmemLdShape::K32x32B>(
                ops, tiles, first, num_tiles, stride, warp, lane,
                [&](const PlanTile& tile, uint32_t lane_base, uint32_t col, int l, const uint32_t (&regs)[16]) {
                    const float a = epi::tile_alpha(alpha, alpha_stride, tile.expert, 0, alpha_scale);
                    epi::plain_chunk<Plan>(tile, lane_base, col, l, regs, a, n, [&](size_t i, uint16_t v) { out_bits[i] = v; });
                });
        } else if constexpr (kEpilogue == Epilogue::SwiGLUQuant) {
            const float cb = epi::clamp_bf16(clamp);
            plan.template epilogue<TmemLdShape::K16x256B>(
                ops, tiles, first, num_tiles, stride, warp, lane,
                [&](const PlanTile& tile, uint32_t lane_base, uint32_t col, int l, const uint32_t (&regs)[16]) {
                    const float ag = epi::tile_alpha(alpha, alpha_stride, tile.expert, 0, alpha_scale);
                    const float au = epi::tile_alpha(alpha, alpha_stride, tile.expert, 1, alpha_scale);
                    epi::swiglu_quant_chunk<Plan, kFastMath>(tile, lane_base, col, l, regs, ag, au, cb,
                                                             tile_route(tile),
                                                             epi_scratch);
                },
                [&](const PlanTile& tile) {
                    epilogue_barrier();
                    epi::quantize_l2_input<Plan>(tile, int(threadIdx.x) % 128, 128, epi_scratch, n / 2, l2_inv_global,
                                                 reinterpret_cast<uint8_t*>(out), out_sf);
                    epilogue_barrier();
                });
        } else {
            static_assert(kEpilogue == Epilogue::SwiGLU, "unknown epilogue");
            plan.template epilogue<TmemLdShape::K16x256B>(
                ops, tiles, first, num_tiles, stride, warp, lane,
                [&](const PlanTile& tile, uint32_t lane_base, uint32_t col, int l, const uint32_t (&regs)[16]) {
                    const float ag = epi::tile_alpha(alpha, alpha_stride, tile.expert, 0, alpha_scale);
                    const float au = epi::tile_alpha(alpha, alpha_stride, tile.expert, 1, alpha_scale);
                    epi::swiglu_chunk<Plan, kFastMath>(tile, lane_base, col, l, regs, ag, au, clamp,
                                                       tile_route(tile), n,
                                                       [&](size_t i, uint16_t v) { out_bits[i] = v; });
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
