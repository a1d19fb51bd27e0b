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

// Plain, then the routing weight (fp4_fp4_mega_moe's L2: the top-k weight after L2, on the BF16
// partial): p = bf16(acc x alpha), out = bf16(f32(p x route_weights[token])).
template <int kBlockT>
__device__ __forceinline__ void epilogue_weighted(const float (&acc)[kBlockT / 2], float alpha, const float* route_weights,
                                                  __nv_bfloat16* out, size_t ld, int token_row, int num_tokens, int col,
                                                  int q) {
    for_each_token<kBlockT>(num_tokens, q, [&](int tok, int i) {
        const size_t row = size_t(token_row) + tok;
        const float w = route_weights[row];
        __nv_bfloat16* dst = out + row * ld + col;
        dst[0] = __float2bfloat16_rn(__bfloat162float(__float2bfloat16_rn(acc[i] * alpha)) * w);
        dst[8] = __float2bfloat16_rn(__bfloat162float(__float2bfloat16_rn(acc[i + 2] * alpha)) * w);
    });
}

// The L2 input of an upstream recipe (docs/design.md, "Upstream's entry points").
enum class L2Input : int {
    BF16 = 0,       // bf16_mega_moe (and every recipe's BF16 shared expert): h = bf16(a)
    FP8Pow2 = 1,    // fp8_fp4_mega_moe: FP8 E4M3, one power-of-two scale per 32 channels
    NVFP4 = 2,      // fp4_fp4_mega_moe: NVFP4, UE4M3 per 16 channels, global scale 1 / inv_global
};

// Channels per quantization block of each L2-input format.
template <L2Input kQ>
constexpr int kL2InputBlock = kQ == L2Input::FP8Pow2 ? 32 : (kQ == L2Input::NVFP4 ? 16 : 1);

// Shared memory of epilogue_swiglu_requant per consumer warpgroup: one float per (warp, token).
template <int kBlockT>
constexpr int kRequantScratchBytes = 4 * kBlockT * int(sizeof(float));

// L1 of upstream's recipes.  Per (token, channel), with the channel's gate in row r0 and its up in
// row r0 + 8 (the transform's interleave, as epilogue_swiglu):
//   g = bf16(acc_gate * alpha_gate), u = bf16(acc_up * alpha_up)   (alpha x kCompensation: with MXFP4
//       or BF16 weights alpha = 1 and the compensation 1, so g = bf16(acc), one rounding of the
//       accumulator; NVFP4: the compensation 2^7 is exact, so g = bf16(f32(acc x alpha)))
//   cb = bf16(clamp), g = min(g, cb), u = clamp(u, -cb, cb); a = f32(f32(silu(g) * u) * w)
//   (swiglu<kFastMath>: __expf or expf; w = route_weights[row]; without them (NVFP4's unweighted L2
//   input, the shared experts) a = f32(silu(g) * u))
// then the L2 input in the recipe's format (epilogue/moe_l2_input.cuh), written as BF16 (exact):
//   BF16: bf16(a);  FP8Pow2: q x scale;  NVFP4: e2m1(code) x sf8 (the global scale goes into L2's alpha).
// Quantized formats need each block's amax per token.  A consumer warpgroup's 32 channels are
// 32-aligned base + 8 warp + g: the amax is reduced over a warp's 8 g-lanes by shuffles (lanes with
// the same q hold the same tokens), then over the block's warps (4 for FP8's 32 channels, the warp
// pair for NVFP4's 16) through `scratch` (kRequantScratchBytes, this warpgroup's own) and bar.sync
// `bar_id` of the warpgroup's 128 threads: once before the reads, once after them (the next tile
// rewrites the scratch).  Token rows past num_tokens are neither read (routing weights) nor written;
// their accumulators may be stale, but they only ever meet their own token's amax.
template <int kBlockT, bool kFastMath, L2Input kQ>
__device__ __forceinline__ void epilogue_swiglu_requant(float (&acc)[kBlockT / 2], float alpha_gate, float alpha_up,
                                                        const float* route_weights, float clamp, float inv_global,
                                                        __nv_bfloat16* out, size_t ld, int token_row, int num_tokens,
                                                        int chan, int q, int warp, int lane, float* scratch, int bar_id) {
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
            if constexpr (kQ != L2Input::BF16) {
                float m = fabsf(a);
                m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 4));
                m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 8));
                m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 16));
                if (lane < 4) scratch[warp * kBlockT + tok] = m;
            }
        }
    }
    if constexpr (kQ == L2Input::BF16) {
        for_each_token<kBlockT>(num_tokens, q, [&](int tok, int i) {
            out[(size_t(token_row) + tok) * ld + chan] = __float2bfloat16_rn(acc[i]);
        });
        return;
    }
    named_barrier_sync(bar_id, 128);
    for_each_token<kBlockT>(num_tokens, q, [&](int tok, int i) {
        float v;
        if constexpr (kQ == L2Input::FP8Pow2) {
            const float amax = fmaxf(fmaxf(scratch[tok], scratch[kBlockT + tok]),
                                     fmaxf(scratch[2 * kBlockT + tok], scratch[3 * kBlockT + tok]));
            v = l2_input::fp8_pow2_value(acc[i], l2_input::fp8_pow2_block(amax));
        } else {
            const int w0 = warp & ~1;                        // channels 8 w0 .. 8 w0 + 15 of the warpgroup
            const float amax = fmaxf(scratch[w0 * kBlockT + tok], scratch[(w0 + 1) * kBlockT + tok]);
            const l2_input::Nvfp4Block blk = l2_input::nvfp4_block(amax, inv_global);
            v = l2_input::e2m1_to_float(l2_input::nvfp4_code(acc[i], blk)) * l2_input::e4m3_to_float(blk.sf8);
        }
        out[(size_t(token_row) + tok) * ld + chan] = __float2bfloat16_rn(v);
    });
    named_barrier_sync(bar_id, 128);
}

}  // namespace deep_gemm::sm90
