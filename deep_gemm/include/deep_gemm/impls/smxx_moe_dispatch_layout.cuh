#pragma once
// Dispatch, step 1 (one CTA): route every rank's (token, slot) pairs to this rank's experts.
//
// Reads each source rank's `topk_idx` (peer memory over NVLink; this rank's own buffer for a group
// of one), counts rows per local expert (-> offsets and the receive statistics), then gives each
// pair routed here a row: row_src / row_weight locally, and the row index into the source's
// `pair_row[token, slot]`, from which the source's combine finds it.  Pairs that would overflow
// `max_rows` get -1 there.  Masked (-1) and out-of-range ids are routed nowhere.
#include <cstdint>

#include <deep_gemm/comm/routing.cuh>
#include <deep_gemm/comm/symm.cuh>
#include <deep_gemm/common/warp_scan.cuh>

namespace deep_gemm {

template <int kNumThreads>
__global__ void __launch_bounds__(kNumThreads)
smxx_moe_dispatch_layout(const uint64_t* bases, uint64_t topk_idx_offset, uint64_t topk_weights_offset,
                         uint64_t pair_row_offset, uint64_t meta_offset, int rank, int num_ranks, int num_tokens,
                         int max_tokens, int topk, int num_local_experts, int max_rows,
                         int* __restrict__ expert_offsets, comm::RowSource* __restrict__ row_src,
                         float* __restrict__ row_weight, int* __restrict__ stats) {
    extern __shared__ int smem[];
    int* count = smem;                                  // [E_l]
    int* cursor = count + num_local_experts;            // [E_l + 1]
    int* src_begin = cursor + num_local_experts + 1;    // [num_ranks + 1]: first flat pair of each source
    const comm::PeerBuffers peers{bases};
    for (int e = threadIdx.x; e < num_local_experts; e += kNumThreads) count[e] = 0;
    if (threadIdx.x == 0) {
        src_begin[0] = 0;
        for (int s = 0; s < num_ranks; ++s)
            src_begin[s + 1] = src_begin[s] + comm::source_pairs(peers, meta_offset, s, rank, num_tokens, max_tokens, topk);
    }
    __syncthreads();
    const int num_pairs = src_begin[num_ranks];
    const int64_t expert_begin = int64_t(rank) * num_local_experts;

    // Whole warps step through the pairs together (comm::warp_aggregated_add); each thread loads
    // kBatch routing entries before using any, so their latencies (NVLink for peers) overlap
    // instead of adding up.
    constexpr int kBatch = 4;
    const int lane = threadIdx.x % 32;
    auto load_batch = [&](int base, int (&src)[kBatch], int (&pair)[kBatch], int (&exp)[kBatch]) {
        #pragma unroll
        for (int i = 0; i < kBatch; ++i) {
            const int g = base + i * kNumThreads + threadIdx.x;
            src[i] = 0, pair[i] = 0, exp[i] = -1;
            if (g < num_pairs) {
                comm::locate_pair(src_begin, g, src[i], pair[i]);
                exp[i] = comm::local_expert(peers, topk_idx_offset, src[i], pair[i], expert_begin, num_local_experts);
            }
        }
    };
    for (int base = 0; base < num_pairs; base += kBatch * kNumThreads) {
        int src[kBatch], pair[kBatch], exp[kBatch];
        load_batch(base, src, pair, exp);
        #pragma unroll
        for (int i = 0; i < kBatch; ++i) comm::warp_aggregated_add(count, exp[i], lane);
    }
    __syncthreads();
    if (threadIdx.x < 32) warp_exclusive_scan(num_local_experts, threadIdx.x, [&](int e) { return count[e]; }, cursor);
    __syncthreads();
    for (int e = threadIdx.x; e <= num_local_experts; e += kNumThreads) {
        expert_offsets[e] = min(cursor[e], max_rows);
        if (stats != nullptr && e < num_local_experts) stats[e] += count[e];
    }
    __syncthreads();   // the offsets above read cursor[], which the row assignment below advances
    for (int base = 0; base < num_pairs; base += kBatch * kNumThreads) {
        int src[kBatch], pair[kBatch], exp[kBatch];
        load_batch(base, src, pair, exp);
        #pragma unroll
        for (int i = 0; i < kBatch; ++i) {
            const int e = exp[i];
            int row = comm::warp_aggregated_add(cursor, e, lane);
            if (e < 0) continue;
            const int s = src[i], p = pair[i];
            if (row < max_rows) {
                row_src[row] = comm::RowSource{s, p / topk, p % topk, e};
                row_weight[row] = peers.at<const float>(s, topk_weights_offset)[p];
            } else {
                row = -1;
            }
            peers.at<int>(s, pair_row_offset)[p] = row;
        }
    }
}

}  // namespace deep_gemm
