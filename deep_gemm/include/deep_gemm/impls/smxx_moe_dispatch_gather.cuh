#pragma once
// Dispatch, step 2: each dispatched row gets its source token, FP8 x block scale -> BF16 (the
// register-dequant GEMMs take BF16 tokens; exactness: common/fp8.cuh).  One CTA per row slot;
// slots past the last expert's rows exit (the grid is sized for the worst case, no host sync).
#include <cstdint>
#include <cuda_bf16.h>

#include <deep_gemm/comm/routing.cuh>
#include <deep_gemm/common/fp8.cuh>

namespace deep_gemm {

template <int kGranK, int kNumThreads>
__global__ void __launch_bounds__(kNumThreads)
smxx_moe_dispatch_gather(const uint8_t* __restrict__ x, const float* __restrict__ x_sf,
                         const comm::RowSource* __restrict__ row_src, const int* __restrict__ expert_offsets,
                         int num_local_experts, int hidden, __nv_bfloat16* __restrict__ out) {
    static_assert(kGranK % 16 == 0, "a thread's 16 elements must share one scale");
    const int row = blockIdx.x;
    if (row >= __ldg(expert_offsets + num_local_experts)) return;
    const int token = row_src[row].token;
    const uint8_t* src = x + size_t(token) * hidden;
    const float* sf = x_sf + size_t(token) * (hidden / kGranK);
    uint4* dst = reinterpret_cast<uint4*>(out + size_t(row) * hidden);
    for (int v = threadIdx.x; v < hidden / 16; v += kNumThreads) {
        uint4 res[2];
        e4m3x16_to_bf16x16(__ldg(reinterpret_cast<const uint4*>(src) + v), __ldg(sf + v * 16 / kGranK), res);
        dst[2 * v] = res[0];
        dst[2 * v + 1] = res[1];
    }
}

}  // namespace deep_gemm
