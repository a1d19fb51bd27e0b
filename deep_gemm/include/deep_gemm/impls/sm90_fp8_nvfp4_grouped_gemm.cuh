#pragma once
// Hopper grouped GEMM: NVFP4/MXFP4 expert weights x BF16 tokens -> BF16, swap-AB.
//
//   out[token, n] = alpha[e] * sum_k W_e[n, k] * x[token, k]
//
// Weight rows are the M side of wgmma and come from registers: they are dequantized exactly
// (E2M1 x UE4M3 is exact in BF16) right before the MMA, so HBM carries 4.5 bits per weight.
// Tokens are the N side, loaded by TMA into 128B-swizzled shared memory (the token side is
// FP8 x power-of-two scale upstream of this kernel, exact in BF16 too).
//
// Warp roles: warpgroup 0 = producer (one thread issues bulk copies and TMA), warpgroups 1..2 =
// consumers, each owning 64 of the tile's 128 weight rows and sharing the token tile
// (common/sm90_fp4_pipeline.cuh, shared with the fused Mega MoE kernel).  Persistent grid over
// GroupedTiles.  Weights: NVFP4, MXFP4 or BF16 (upstream's bf16_mega_moe and the shared experts,
// stored in fragment order: loaded, not dequantized).  Epilogues (epilogue/sm90_moe_epilogue.cuh):
//   Plain        alpha -> BF16;
//   SwiGLU       our exact L1 (gate/up rows interleaved by the transform so one thread holds both;
//                routing weight applied; the L2 input written in BF16);
//   SwiGLUFP8    upstream's fp8xfp4 L1: gate/up rounded to BF16, the weighted SwiGLU output
//                requantized to FP8 E4M3 with a power-of-two scale per 32 channels, written as q x scale;
//   SwiGLUBF16   upstream's bf16xbf16 L1 (and the shared experts'): gate/up rounded to BF16, the
//                (weighted, if route_weights) SwiGLU output rounded to BF16;
//   SwiGLUNVFP4  upstream's fp4xfp4 L1: gate/up = bf16(acc x alpha), the unweighted SwiGLU output
//                quantized to NVFP4 per 16 channels with the expert's global scale 1 / epi_scales[e],
//                written as e2m1 x sf8;
//   Weighted     fp4xfp4's L2: bf16(acc x alpha), then x route_weights[row] (the top-k weight after L2).
//
// Shared memory (from the 1 KB-aligned base): the pipeline (FP4Pipeline::kBytes), then for the
// quantizing epilogues (SwiGLUFP8, SwiGLUNVFP4) the amax scratch (kRequantScratchBytes per consumer
// warpgroup), then the tile prefix (int [E + 1]); gemm.py's _smem_bytes / _stages count the same.
// Named barriers: 0 is __syncthreads; the quantizing epilogues use 1 + cw (the consumer warpgroup's
// 128 threads), nothing else here does.
#include <cstdint>
#include <cuda.h>
#include <cuda_bf16.h>
#include <cutlass/arch/reg_reconfig.h>

#include <deep_gemm/common/sm90_fp4_pipeline.cuh>
#include <deep_gemm/epilogue/sm90_moe_epilogue.cuh>
#include <deep_gemm/scheduler/grouped_tiles.cuh>

namespace deep_gemm {

enum class Epilogue : int { Plain = 0, SwiGLU = 1, SwiGLUFP8 = 2, SwiGLUBF16 = 3, SwiGLUNVFP4 = 4, Weighted = 5 };

// The L2 input each upstream L1 epilogue produces.
template <Epilogue kE>
constexpr sm90::L2Input kEpilogueL2Input = kE == Epilogue::SwiGLUFP8 ? sm90::L2Input::FP8Pow2
                                          : (kE == Epilogue::SwiGLUNVFP4 ? sm90::L2Input::NVFP4 : sm90::L2Input::BF16);
template <Epilogue kE>
constexpr bool kEpilogueRequant = kE == Epilogue::SwiGLUFP8 || kE == Epilogue::SwiGLUNVFP4;

// Named barrier of consumer warpgroup cw in the quantizing epilogues: kBarRequant + cw.
constexpr int kBarRequant = 1;

// kCTAsPerSM = 2 (small token tiles): two CTAs share an SM so that four consumer warpgroups hide
// the latency of the dequant chains; each gets half the shared memory; consumers run at 96 registers.
template <sm90::WeightFormat kFmt, int kBlockT, int kNumStages, Epilogue kEpilogue, GroupMode kMode,
          bool kFastMath, int kCTAsPerSM>
__global__ void __launch_bounds__(384, kCTAsPerSM)
sm90_fp8_nvfp4_grouped_gemm(const __grid_constant__ CUtensorMap tokens_map,
                            const uint8_t* codes, const uint8_t* scales, const float* alpha, const int* layout,
                            __nv_bfloat16* out, const float* route_weights, const float* epi_scales, float clamp,
                            int num_experts, int n, int k, int max_rows, int alpha_stride, int token_group) {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900)
    using Pipe = sm90::FP4Pipeline<kFmt, kBlockT, kNumStages>;
    using Regs = sm90::RegisterSplit<kCTAsPerSM, 40>;
    static_assert(kCTAsPerSM != 1 || Regs::kConsumer >= 232, "consumers of 1-CTA tiles need 232 registers");

    extern __shared__ uint8_t smem_raw[];
    uint8_t* smem = Pipe::align(smem_raw);
    const Pipe pipe(smem);
    constexpr int kEpiScratchBytes =
        kEpilogueRequant<kEpilogue> ? sm90::kNumConsumerWarpgroups * sm90::kRequantScratchBytes<kBlockT> : 0;
    [[maybe_unused]] float* epi_scratch = reinterpret_cast<float*>(smem + Pipe::kBytes);
    int* smem_prefix = reinterpret_cast<int*>(smem + Pipe::kBytes + kEpiScratchBytes);

    // The role and the tile count are warp-uniform, but ptxas cannot prove it for threadIdx or a
    // shared-memory load; through a shuffle it can, and then the consumer k loop (stage, phase,
    // barrier addresses, wgmma descriptors) runs on the uniform datapath: no R2UR per wgmma and no
    // vector ALU slots for loop control.
    const int warpgroup = __shfl_sync(0xffffffffu, threadIdx.x / 128, 0);
    const int wg_tid = threadIdx.x % 128;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

    GroupedTiles<kMode, kBlockT> sched{layout, num_experts, max_rows, n / sm90::kTileRows, smem_prefix, token_group};
    if (warp == 0) sched.build_prefix(lane);
    if (threadIdx.x == 32) pipe.init();
    if (threadIdx.x == 64) cute::prefetch_tma_descriptor(&tokens_map);
    __syncthreads();

    const int num_tiles = __shfl_sync(0xffffffffu, sched.num_tiles(), 0);
    const int num_k_blocks = k / sm90::kTileK;
    const int num_row_tiles = n / sm90::kTileRows;

    if (warpgroup == 0) {
        // ---------------- producer ----------------
        cutlass::arch::warpgroup_reg_dealloc<Regs::kProducer>();
        if (threadIdx.x != 0) return;
        sm90::FP4Producer<Pipe> producer(pipe);
        for (int t = blockIdx.x; t < num_tiles; t += gridDim.x) {
            const auto tile = sched.get(t);
            producer.load_tile(&tokens_map, codes, scales,
                               (size_t(tile.expert) * num_row_tiles + tile.row_tile) * num_k_blocks,
                               num_k_blocks, tile.row_start);
        }
    } else {
        // ---------------- consumers ----------------
        cutlass::arch::warpgroup_reg_alloc<Regs::kConsumer>();
        const int cw = warpgroup - 1;
        sm90::FP4Consumer<Pipe, kCTAsPerSM> consumer(pipe, cw, wg_tid);
        const int wg_warp = wg_tid / 32, g = lane / 4, q = lane % 4;
        float acc[Pipe::MMA::kNumAccum];
        for (int t = blockIdx.x; t < num_tiles; t += gridDim.x) {
            const auto tile = sched.get(t);
            consumer.mma_tile(acc, num_k_blocks, wg_tid, tile.num_tokens);
            const float* a = alpha + tile.expert * alpha_stride;
            constexpr float kComp = Pipe::Block::kCompensation;
            if constexpr (kEpilogue == Epilogue::Plain) {
                sm90::epilogue_plain<kBlockT>(acc, __ldg(a) * kComp, out, n, tile.row_start, tile.num_tokens,
                                              tile.row_tile * sm90::kTileRows + cw * 64 + wg_warp * 16 + g, q);
            } else if constexpr (kEpilogue == Epilogue::SwiGLU) {
                sm90::epilogue_swiglu<kBlockT, kFastMath>(acc, __ldg(a) * kComp, __ldg(a + 1) * kComp, route_weights,
                                                          clamp, out, n / 2, tile.row_start, tile.num_tokens,
                                                          tile.row_tile * (sm90::kTileRows / 2) + cw * 32 + wg_warp * 8 + g, q);
            } else if constexpr (kEpilogue == Epilogue::Weighted) {
                sm90::epilogue_weighted<kBlockT>(acc, __ldg(a) * kComp, route_weights, out, n, tile.row_start,
                                                 tile.num_tokens, tile.row_tile * sm90::kTileRows + cw * 64 + wg_warp * 16 + g, q);
            } else {
                static_assert(kEpilogue == Epilogue::SwiGLUFP8 || kEpilogue == Epilogue::SwiGLUBF16 ||
                              kEpilogue == Epilogue::SwiGLUNVFP4, "unknown epilogue");
                const float inv_global = kEpilogue == Epilogue::SwiGLUNVFP4 ? __ldg(epi_scales + tile.expert) : 1.0f;
                sm90::epilogue_swiglu_requant<kBlockT, kFastMath, kEpilogueL2Input<kEpilogue>>(
                    acc, __ldg(a) * kComp, __ldg(a + 1) * kComp, route_weights, clamp, inv_global, out, n / 2,
                    tile.row_start, tile.num_tokens, tile.row_tile * (sm90::kTileRows / 2) + cw * 32 + wg_warp * 8 + g, q,
                    wg_warp, lane, epi_scratch + cw * (sm90::kRequantScratchBytes<kBlockT> / int(sizeof(float))),
                    kBarRequant + cw);
            }
        }
    }
#endif
}

}  // namespace deep_gemm
