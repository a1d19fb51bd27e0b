#pragma once
// FP8 E4M3 x FP32 block scale -> BF16, 16 elements at a time (one 16-byte load, two 16-byte stores).
// Exact when the scale is a power of two (UE8M0): E4M3 has 4 significant bits, BF16 8, and BF16's
// exponent range covers any E4M3 x 2^e.  Other FP32 scales round once (RN).
#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp8.h>

namespace deep_gemm {

__device__ __forceinline__ void e4m3x16_to_bf16x16(const uint4 v, const float s, uint4 (&out)[2]) {
    const uint32_t words[4] = {v.x, v.y, v.z, v.w};
    uint32_t res[8];
    #pragma unroll
    for (int i = 0; i < 8; ++i) {
        const __nv_fp8x2_storage_t pair = static_cast<__nv_fp8x2_storage_t>(words[i / 2] >> (16 * (i % 2)));
        const float2 f = __half22float2(__half2(__nv_cvt_fp8x2_to_halfraw2(pair, __NV_E4M3)));
        const __nv_bfloat162 b = __floats2bfloat162_rn(f.x * s, f.y * s);
        res[i] = *reinterpret_cast<const uint32_t*>(&b);
    }
    out[0] = make_uint4(res[0], res[1], res[2], res[3]);
    out[1] = make_uint4(res[4], res[5], res[6], res[7]);
}

}  // namespace deep_gemm
