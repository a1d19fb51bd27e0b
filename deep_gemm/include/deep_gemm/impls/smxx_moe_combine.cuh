#pragma once
// Combine, on the source rank: y[t] = sum over slots j in increasing order of the expert output of
// pair (t, j), pulled from the `combine` rows of the rank owning expert topk_idx[t, j] (NVLink for
// peers) at the row that rank wrote into pair_row[t, j]; FP32 accumulation, one BF16 rounding
// (the reference's order, so y is bit-stable).  Masked, out-of-range and overflowed slots are
// skipped.  A call whose barrier timed out writes NaN.  Grid: (tokens, hidden chunks): a decode
// batch of a few tokens splits each row so that it still fills the GPU; a prefill batch keeps one
// CTA per token (the per-CTA slot lookups are then paid once per row).
//
// Upstream's recipes add two optional steps (docs/design.md, "Upstream's entry points"):
//   shared != nullptr: the token's BF16 shared-expert row (local, [tokens, hidden]) is added;
//   nvfp4 (fp4_fp4_mega_moe): r = bf16(sum), then r = bf16(f32(r x rsf)) if rsf != 1, then
//     y = bf16(f32(r + shared)) if shared (bf16(r) rounded once where neither applies);
//   otherwise (fp8 / bf16 recipes, ours): y = bf16(f32(sum + shared)) -- the shared row is the last
//     float32 add; rsf must be 1.
#include <cstdint>
#include <cuda_bf16.h>

#include <deep_gemm/comm/rows.cuh>
#include <deep_gemm/comm/symm.cuh>

namespace deep_gemm {

template <int kNumThreads, int kMaxTopk>
__global__ void __launch_bounds__(kNumThreads)
smxx_moe_combine(const uint64_t* bases, uint64_t combine_offset, const int64_t* __restrict__ topk_idx,
                 const int* __restrict__ pair_row, const int* meta, int topk, int num_local_experts,
                 int num_ranks, int hidden, __nv_bfloat16* __restrict__ y,
                 const __nv_bfloat16* __restrict__ shared = nullptr, float rsf = 1.0f, int nvfp4 = 0) {
    const int token = blockIdx.x;
    const comm::PeerBuffers peers{bases};
    const uint4* rows[kMaxTopk];
    #pragma unroll
    for (int j = 0; j < kMaxTopk; ++j) {
        rows[j] = nullptr;
        if (j >= topk) continue;
        const size_t pair = size_t(token) * topk + j;
        rows[j] = comm::expert_output_row(peers, combine_offset, __ldg(topk_idx + pair), __ldg(pair_row + pair),
                                          num_local_experts, num_ranks, hidden);
    }
    const bool aborted = comm::ld_volatile(meta + comm::kMetaAbort) != 0;
    const int num_v = hidden / 8;
    const int chunk = (num_v + gridDim.y - 1) / gridDim.y;
    const int v_end = min(num_v, int(blockIdx.y + 1) * chunk);
    for (int v = blockIdx.y * chunk + threadIdx.x; v < v_end; v += kNumThreads) {
        float acc[8] = {};
        #pragma unroll
        for (int j = 0; j < kMaxTopk; ++j) {
            if (rows[j] == nullptr) continue;
            comm::add_bf16x8(acc, rows[j][v]);
        }
        comm::combine_upstream_tail(acc, shared == nullptr ? nullptr : shared + size_t(token) * hidden, v, rsf, nvfp4 != 0);
        reinterpret_cast<uint4*>(y + size_t(token) * hidden)[v] = comm::pack_bf16x8(acc, aborted);
    }
}

}  // namespace deep_gemm
