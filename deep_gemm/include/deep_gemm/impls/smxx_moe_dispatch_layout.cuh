#pragma once
// Dispatch, step 1 (one CTA): route this rank's (token, slot) pairs to local experts.
// Counts per local expert -> row offsets (and the receive statistics), then one row per pair:
// pair_row[p] (-1 for masked, remote or overflowing pairs), the row's source and routing weight.
#include <cstdint>

#include <deep_gemm/comm/routing.cuh>
#include <deep_gemm/common/warp_scan.cuh>

namespace deep_gemm {

template <int kNumThreads>
__global__ void __launch_bounds__(kNumThreads)
smxx_moe_dispatch_layout(const int64_t* __restrict__ topk_idx, const float* __restrict__ topk_weights,
                         int num_pairs, int topk, int expert_begin, int num_local_experts, int max_rows,
                         int* __restrict__ expert_offsets, int* __restrict__ pair_row,
                         comm::RowSource* __restrict__ row_src, float* __restrict__ row_weight,
                         int* __restrict__ stats) {
    extern __shared__ int smem[];
    int* count = smem;                              // [E_l]
    int* cursor = smem + num_local_experts;         // [E_l + 1]
    for (int e = threadIdx.x; e < num_local_experts; e += kNumThreads) count[e] = 0;
    __syncthreads();

    auto local_expert = [&](int p) {
        const int64_t e = __ldg(topk_idx + p) - expert_begin;
        return (e >= 0 && e < num_local_experts) ? int(e) : -1;
    };
    for (int p = threadIdx.x; p < num_pairs; p += kNumThreads) {
        const int e = local_expert(p);
        if (e >= 0) atomicAdd(count + e, 1);
    }
    __syncthreads();
    if (threadIdx.x < 32) warp_exclusive_scan(num_local_experts, threadIdx.x, [&](int e) { return count[e]; }, cursor);
    __syncthreads();
    for (int e = threadIdx.x; e <= num_local_experts; e += kNumThreads) {
        expert_offsets[e] = min(cursor[e], max_rows);
        if (stats != nullptr && e < num_local_experts) stats[e] += count[e];
    }
    for (int p = threadIdx.x; p < num_pairs; p += kNumThreads) {
        const int e = local_expert(p);
        int row = -1;
        if (e >= 0) {
            row = atomicAdd(cursor + e, 1);
            if (row < max_rows) {
                row_src[row] = comm::RowSource{0, p / topk, p % topk, e};
                row_weight[row] = __ldg(topk_weights + p);
            } else {
                row = -1;
            }
        }
        pair_row[p] = row;
    }
}

}  // namespace deep_gemm
