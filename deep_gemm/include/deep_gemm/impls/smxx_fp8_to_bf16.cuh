#pragma once
// FP8 E4M3 tokens x per-token block scales -> BF16 tokens for the register-dequant GEMMs.
// Exact when the scales are powers of two (UE8M0): E4M3 has 4 significant bits, BF16 8, and
// the exponent range of BF16 covers any E4M3 x 2^e.  Other FP32 scales round once (RN).
#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp8.h>

namespace deep_gemm {

template <int kGranK>
__global__ void __launch_bounds__(256)
smxx_fp8_to_bf16(const uint8_t* __restrict__ x, const float* __restrict__ sf, __nv_bfloat16* __restrict__ out,
                 int rows, int k) {
    static_assert(kGranK % 16 == 0, "a thread's 16 elements must share one scale");
    const int vec_per_row = k / 16;
    const long long idx = blockIdx.x * 256ll + threadIdx.x;
    if (idx >= (long long)rows * vec_per_row) return;
    const int row = int(idx / vec_per_row), col = int(idx % vec_per_row) * 16;
    const uint4 v = *reinterpret_cast<const uint4*>(x + (size_t)row * k + col);
    const float s = __ldg(sf + (size_t)row * (k / kGranK) + col / kGranK);
    const uint32_t words[4] = {v.x, v.y, v.z, v.w};
    uint32_t res[8];
    #pragma unroll
    for (int i = 0; i < 8; ++i) {
        const __nv_fp8x2_storage_t pair = static_cast<__nv_fp8x2_storage_t>(words[i / 2] >> (16 * (i % 2)));
        const float2 f = __half22float2(__half2(__nv_cvt_fp8x2_to_halfraw2(pair, __NV_E4M3)));
        const __nv_bfloat162 b = __floats2bfloat162_rn(f.x * s, f.y * s);
        res[i] = *reinterpret_cast<const uint32_t*>(&b);
    }
    uint4* dst = reinterpret_cast<uint4*>(out + (size_t)row * k + col);
    dst[0] = make_uint4(res[0], res[1], res[2], res[3]);
    dst[1] = make_uint4(res[4], res[5], res[6], res[7]);
}

}  // namespace deep_gemm
