#pragma once
// Dispatch, step 2: each dispatched row pulls its token from the source rank's buffer (NVLink for
// peers) and stores it as BF16 (the register-dequant GEMMs take BF16 tokens).  The tokens travel in
// the buffer's activation format, kFormat:
//   0  FP8 E4M3 x float32 block scale per kGranK (exact for power-of-two scales: common/fp8.cuh);
//   1  NVFP4: packed E2M1 x UE4M3 per 16 (fp4_fp4_mega_moe; exact, comm/rows.cuh gather_nvfp4_row);
//   2  BF16 (bf16_mega_moe): copied.
// One CTA per row slot; slots past the last expert's rows exit (the grid is sized for the worst
// case, no host sync).
#include <cstdint>
#include <cuda_bf16.h>

#include <deep_gemm/comm/routing.cuh>
#include <deep_gemm/comm/rows.cuh>
#include <deep_gemm/comm/symm.cuh>

namespace deep_gemm {

template <int kGranK, int kNumThreads, int kFormat = 0>
__global__ void __launch_bounds__(kNumThreads)
smxx_moe_dispatch_gather(const uint64_t* bases, uint64_t x_offset, uint64_t x_sf_offset,
                         const comm::RowSource* __restrict__ row_src, const int* __restrict__ expert_offsets,
                         int num_local_experts, int hidden, __nv_bfloat16* __restrict__ out) {
    static_assert(kFormat >= 0 && kFormat <= 2, "activation format: 0 FP8, 1 NVFP4, 2 BF16");
    const int row = blockIdx.x;
    if (row >= __ldg(expert_offsets + num_local_experts)) return;
    const comm::RowSource src = row_src[row];
    const comm::PeerBuffers peers{bases};
    uint4* dst = reinterpret_cast<uint4*>(out + size_t(row) * hidden);
    if constexpr (kFormat == 0) {
        const uint4* x = peers.at<const uint4>(src.rank, x_offset + uint64_t(src.token) * hidden);
        const float* sf = peers.at<const float>(src.rank, x_sf_offset + uint64_t(src.token) * (hidden / kGranK) * 4);
        comm::gather_fp8_row<kGranK, kNumThreads, 1>(x, sf, dst, hidden / 16, threadIdx.x);
    } else if constexpr (kFormat == 1) {
        const uint4* x = peers.at<const uint4>(src.rank, x_offset + uint64_t(src.token) * (hidden / 2));
        const uint16_t* sf = peers.at<const uint16_t>(src.rank, x_sf_offset + uint64_t(src.token) * (hidden / 16));
        comm::gather_nvfp4_row<kNumThreads>(x, sf, dst, hidden / 32, threadIdx.x);
    } else {
        const uint4* x = peers.at<const uint4>(src.rank, x_offset + uint64_t(src.token) * hidden * 2);
        comm::copy_row<kNumThreads, 4>(x, dst, hidden / 8, threadIdx.x);
    }
}

}  // namespace deep_gemm
