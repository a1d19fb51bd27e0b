#pragma once
// The two epilogues of the Hopper expert GEMMs (grouped GEMM and fused Mega MoE), on the
// accumulator layout of FP4Consumer::mma_tile:
//   acc[4j + {0,1}] = (row r0, tokens 8j + 2q + {0,1}), acc[4j + {2,3}] = (row r0 + 8, same tokens).
// Output rows are tokens; `col` is the thread's first output column.
#include <cuda_bf16.h>

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

}  // namespace deep_gemm::sm90
