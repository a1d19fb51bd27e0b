#pragma once
// Combine: y[t] = sum over slots j in increasing order of o[pair_row[t, j]], in FP32, rounded
// once to BF16 (masked slots skipped) -- the reference's order, so y is bit-stable.
#include <cstdint>
#include <cuda_bf16.h>

namespace deep_gemm {

template <int kNumThreads, int kMaxTopk>
__global__ void __launch_bounds__(kNumThreads)
smxx_moe_combine(const __nv_bfloat16* __restrict__ o, const int* __restrict__ pair_row, int topk, int hidden,
                 __nv_bfloat16* __restrict__ y) {
    const int token = blockIdx.x;
    int rows[kMaxTopk];
    #pragma unroll
    for (int j = 0; j < kMaxTopk; ++j) rows[j] = j < topk ? __ldg(pair_row + size_t(token) * topk + j) : -1;
    for (int v = threadIdx.x; v < hidden / 8; v += kNumThreads) {
        float acc[8] = {};
        #pragma unroll
        for (int j = 0; j < kMaxTopk; ++j) {
            if (rows[j] < 0) continue;
            const uint4 w = __ldg(reinterpret_cast<const uint4*>(o + size_t(rows[j]) * hidden) + v);
            const uint32_t words[4] = {w.x, w.y, w.z, w.w};
            #pragma unroll
            for (int i = 0; i < 4; ++i) {
                const float2 f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&words[i]));
                acc[2 * i] += f.x;
                acc[2 * i + 1] += f.y;
            }
        }
        uint32_t res[4];
        #pragma unroll
        for (int i = 0; i < 4; ++i) {
            const __nv_bfloat162 b = __floats2bfloat162_rn(acc[2 * i], acc[2 * i + 1]);
            res[i] = *reinterpret_cast<const uint32_t*>(&b);
        }
        reinterpret_cast<uint4*>(y + size_t(token) * hidden)[v] = make_uint4(res[0], res[1], res[2], res[3]);
    }
}

}  // namespace deep_gemm
