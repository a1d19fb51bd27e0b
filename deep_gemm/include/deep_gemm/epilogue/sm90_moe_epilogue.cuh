#pragma once
// The epilogues of the Hopper expert GEMMs (grouped GEMM and fused Mega MoE), on the
// accumulator layout of FP4Consumer::mma_tile:
//   acc[4j + {0,1}] = (row r0, tokens 8j + 2q + {0,1}), acc[4j + {2,3}] = (row r0 + 8, same tokens).
// Output rows are tokens; `col` is the thread's first output column.
#include <cuda_bf16.h>

#include <deep_gemm/epilogue/moe_l2_input.cuh>
#include <deep_gemm/epilogue/moe_math.cuh>

namespace deep_gemm::sm90 {

// f(token, i) for the thread's tokens below num_tokens, i = the accumulator of (row r0, token);
// (row r0 + 8, token) is acc[i + 2].
template <int kBlockT, class F>
__device__ __forceinline__ void for_each_token(int num_tokens, int q, F&& f) {
    #pragma unroll
    for (int j = 0; j < kBlockT / 8; ++j) {
        #pragma unroll
        for (int c = 0; c < 2; ++c) {
            const int tok = 8 * j + 2 * q + c;
            if (tok < num_tokens) f(tok, 4 * j + c);
        }
    }
}

// Plain: out[token, col] and out[token, col + 8] = alpha x acc (alpha includes the dequant's
// compensation factor).
template <int kBlockT>
__device__ __forceinline__ void epilogue_plain(const float (&acc)[kBlockT / 2], float alpha, __nv_bfloat16* out,
                                               size_t ld, int token_row, int num_tokens, int col, int q) {
    for_each_token<kBlockT>(num_tokens, q, [&](int tok, int i) {
        __nv_bfloat16* dst = out + (size_t(token_row) + tok) * ld + col;
        dst[0] = __float2bfloat16_rn(acc[i] * alpha);
        dst[8] = __float2bfloat16_rn(acc[i + 2] * alpha);
    });
}

// L1: the transform interleaves gate and up rows so that a thread holds gate (row r0) and up
// (row r0 + 8) of one channel: out[token, chan] = swiglu(gate, up) x route_weights[token].  The
// routing weights are read with plain loads: in the fused kernel they are written during the launch.
template <int kBlockT, bool kFastMath>
__device__ __forceinline__ void epilogue_swiglu(const float (&acc)[kBlockT / 2], float alpha_gate, float alpha_up,
                                                const float* route_weights, float clamp, __nv_bfloat16* out,
                                                size_t ld, int token_row, int num_tokens, int chan, int q) {
    for_each_token<kBlockT>(num_tokens, q, [&](int tok, int i) {
        const size_t row = size_t(token_row) + tok;
        float h = swiglu<kFastMath>(acc[i] * alpha_gate, acc[i + 2] * alpha_up, clamp);
        if (route_weights != nullptr) h *= route_weights[row];
        out[row * ld + chan] = __float2bfloat16_rn(h);
    });
}

// bar.sync on a named barrier (id 0 is __syncthreads') of `threads` threads (a multiple of 32).
__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
    asm volatile("bar.sync %0, %1;" :: "r"(id), "r"(threads) : "memory");
}

// Shared memory of epilogue_swiglu_fp8 per consumer warpgroup: one float per (warp, token).
template <int kBlockT>
constexpr int kSwiGLUFP8ScratchBytes = 4 * kBlockT * int(sizeof(float));

// L1 of upstream's fp8_fp4_mega_moe (docs/design.md, "Upstream's entry points", fp8xfp4): the L2 input
// is FP8 E4M3 with one power-of-two scale per 32 intermediate channels, written as BF16 (q x scale,
// exact).  Per (token, channel), with the channel's gate in row r0 and its up in row r0 + 8 (the
// transform's interleave, as epilogue_swiglu):
//   g = bf16(acc_gate * alpha_gate), u = bf16(acc_up * alpha_up)   (alpha x kCompensation: with MXFP4
//       weights alpha = 1 and the compensation 1, so g = bf16(acc), one rounding of the accumulator;
//       NVFP4: the compensation 2^7 is exact, so g = bf16(f32(acc x alpha)))
//   cb = bf16(clamp), g = min(g, cb), u = clamp(u, -cb, cb); a = f32(f32(silu(g) * u) * w)
//   (swiglu<kFastMath>: __expf or expf; w = route_weights[row], or 1 without them)
// then per token the amax of |a| over the block's 32 channels and l2_input::fp8_pow2_*.  The 32
// channels of a block are the consumer warpgroup's (chan = 32-aligned base + 8 warp + g): the amax is
// reduced over a warp's 8 g-lanes by shuffles (lanes with the same q hold the same tokens), over the
// 4 warps through `scratch` (kSwiGLUFP8ScratchBytes, this warpgroup's own) and bar.sync `bar_id` of
// the warpgroup's 128 threads: once before the reads, once after them (the next tile rewrites the
// scratch).  Token rows past num_tokens are neither read (routing weights) nor written; their
// accumulators may be stale, but they only ever meet their own token's amax.
template <int kBlockT, bool kFastMath>
__device__ __forceinline__ void epilogue_swiglu_fp8(float (&acc)[kBlockT / 2], float alpha_gate, float alpha_up,
                                                    const float* route_weights, float clamp, __nv_bfloat16* out,
                                                    size_t ld, int token_row, int num_tokens, int chan, int q,
                                                    int warp, int lane, float* scratch, int bar_id) {
    const float cb = __bfloat162float(__float2bfloat16_rn(clamp));
    #pragma unroll
    for (int j = 0; j < kBlockT / 8; ++j) {
        if (8 * j >= num_tokens) break;                      // warp-uniform: the shuffles below are full-warp
        #pragma unroll
        for (int c = 0; c < 2; ++c) {
            const int tok = 8 * j + 2 * q + c, i = 4 * j + c;
            const float g = __bfloat162float(__float2bfloat16_rn(acc[i] * alpha_gate));
            const float u = __bfloat162float(__float2bfloat16_rn(acc[i + 2] * alpha_up));
            float a = swiglu<kFastMath>(g, u, cb);
            if (route_weights != nullptr && tok < num_tokens) a *= route_weights[size_t(token_row) + tok];
            acc[i] = a;
            float m = fabsf(a);
            m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 4));
            m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 8));
            m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 16));
            if (lane < 4) scratch[warp * kBlockT + tok] = m;
        }
    }
    named_barrier_sync(bar_id, 128);
    for_each_token<kBlockT>(num_tokens, q, [&](int tok, int i) {
        const float amax = fmaxf(fmaxf(scratch[tok], scratch[kBlockT + tok]),
                                 fmaxf(scratch[2 * kBlockT + tok], scratch[3 * kBlockT + tok]));
        const l2_input::Fp8Pow2Block blk = l2_input::fp8_pow2_block(amax);
        out[(size_t(token_row) + tok) * ld + chan] = __float2bfloat16_rn(l2_input::fp8_pow2_value(acc[i], blk));
    });
    named_barrier_sync(bar_id, 128);
}

}  // namespace deep_gemm::sm90
