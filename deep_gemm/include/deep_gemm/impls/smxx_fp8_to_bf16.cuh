#pragma once
// FP8 E4M3 tokens x per-token block scales -> BF16 tokens for the register-dequant GEMMs
// (exactness: common/fp8.cuh).
#include <cstdint>
#include <cuda_bf16.h>

#include <deep_gemm/common/fp8.cuh>

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
    uint4 res[2];
    e4m3x16_to_bf16x16(*reinterpret_cast<const uint4*>(x + (size_t)row * k + col),
                       __ldg(sf + (size_t)row * (k / kGranK) + col / kGranK), res);
    uint4* dst = reinterpret_cast<uint4*>(out + (size_t)row * k + col);
    dst[0] = res[0];
    dst[1] = res[1];
}

}  // namespace deep_gemm
