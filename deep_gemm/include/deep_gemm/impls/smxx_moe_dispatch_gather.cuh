#pragma once
// Dispatch, step 2: each dispatched row pulls its token from the source rank's buffer (NVLink for
// peers) and stores FP8 x block scale as BF16 (the register-dequant GEMMs take BF16 tokens;
// exactness: common/fp8.cuh).  One CTA per row slot; slots past the last expert's rows exit (the
// grid is sized for the worst case, no host sync).
#include <cstdint>
#include <cuda_bf16.h>

#include <deep_gemm/comm/routing.cuh>
#include <deep_gemm/comm/rows.cuh>
#include <deep_gemm/comm/symm.cuh>

namespace deep_gemm {

template <int kGranK, int kNumThreads>
__global__ void __launch_bounds__(kNumThreads)
smxx_moe_dispatch_gather(const uint64_t* bases, uint64_t x_offset, uint64_t x_sf_offset,
                         const comm::RowSource* __restrict__ row_src, const int* __restrict__ expert_offsets,
                         int num_local_experts, int hidden, __nv_bfloat16* __restrict__ out) {
    const int row = blockIdx.x;
    if (row >= __ldg(expert_offsets + num_local_experts)) return;
    const comm::RowSource src = row_src[row];
    const comm::PeerBuffers peers{bases};
    const uint4* x = peers.at<const uint4>(src.rank, x_offset + uint64_t(src.token) * hidden);
    const float* sf = peers.at<const float>(src.rank, x_sf_offset + uint64_t(src.token) * (hidden / kGranK) * 4);
    uint4* dst = reinterpret_cast<uint4*>(out + size_t(row) * hidden);
    comm::gather_fp8_row<kGranK, kNumThreads, 1>(x, sf, dst, hidden / 16, threadIdx.x);
}

}  // namespace deep_gemm
