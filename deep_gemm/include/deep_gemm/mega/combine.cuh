#pragma once
// Combine inside a fused launch (arch-neutral).
//   push:   the comm warps copy the combine rows of other ranks' pairs to their sources'
//           `combine_in` at row token x k + slot as each token tile's L2 units finish, while later
//           units run: pulled after barrier 1 instead, all of the combine's NVLink traffic came
//           after the last unit.  Whole rows (H x 2 bytes), in row order over all comm warps like
//           the gather; rows of this rank's own pairs stay in place (`combine`).
//   reduce: every warp, after barrier 1: y[t] = the sum over slots j in increasing order of the
//           pair's expert output row (comm::combine_source_row: the pushed copy, an own expert's
//           row, or without pushes the owner's row), FP32, one BF16 rounding; NaN when aborted.
//           The same bits as the sequence's smxx_moe_combine.
#include <cstdint>
#include <cuda_bf16.h>

#include <deep_gemm/comm/rows.cuh>
#include <deep_gemm/comm/symm.cuh>
#include <deep_gemm/mega/state.cuh>

namespace deep_gemm::mega {

// Comm warp cw pushes its rows (the gather's row split and num_rows_total).  A row waits for its
// token tile's L2 units (kParts done calls each); a timed-out wait ends the pushes (the call is
// aborted).
// kChunks uint4 in flight per lane: a register budget of the caller's.
template <int kBlockT, int kCommWarps, int kChunks, int kParts, class Work>
__device__ __forceinline__ void push_rows(const Work& work, const Call& call, const comm::RowSource* row_src,
                                          const __nv_bfloat16* combine, int num_rows_total, int l2_row_tiles,
                                          int topk, int hidden, int grid, int cw, int lane) {
    const int l2_target = kParts * l2_row_tiles;
    int k = 0, waited = -1;
    for (int row = blockIdx.x * kCommWarps + cw; row < num_rows_total; row += grid * kCommWarps) {
        while (row >= work.row_prefix[k + 1]) ++k;
        const int4 packed = load_row_src(row_src, row);
        if (packed.x == call.rank) continue;
        const int tile = token_tile<kBlockT>(work, k, row);
        if (tile != waited) {
            if (!call.waiter.until<false>(call.ws.l2_done() + tile, l2_target, kPhaseInternal, call.rank)) break;
            waited = tile;
        }
        comm::copy_row<32, kChunks>(reinterpret_cast<const uint4*>(combine + size_t(row) * hidden),
                                    call.peers.at<uint4>(packed.x, call.off.combine_in +
                                                                   (uint64_t(packed.y) * topk + packed.z) * hidden * 2),
                                    hidden / 8, lane);
    }
}

// Every warp of every CTA, after barrier 1: its share of this rank's tokens, in items of 32 uint4
// (a token's row in chunks, so that a decode batch of a few tokens still spreads over the grid).
// kUpstream: then upstream's steps (comm::combine_upstream_tail: shared-expert rows `shared`
// [num_tokens, hidden] or nullptr, routed scaling rsf, fp4_fp4's order if nvfp4), as smxx_moe_combine.
template <int kNumThreads, bool kUpstream = false>
__device__ __forceinline__ void reduce_tokens(const Call& call, const int64_t* topk_idx, const int* pair_row,
                                              __nv_bfloat16* y, bool pushed, int num_tokens, int topk,
                                              int num_experts, int hidden, int grid, int warp, int lane,
                                              const __nv_bfloat16* shared = nullptr, float rsf = 1.0f,
                                              bool nvfp4 = false) {
    const bool aborted = call.waiter.aborted();
    const int num_v = hidden / 8;                  // uint4 of BF16 per row
    const int chunks = (num_v + 31) / 32;
    const int num_warps = grid * (kNumThreads / 32);
    for (int item = blockIdx.x * (kNumThreads / 32) + warp; item < num_tokens * chunks; item += num_warps) {
        const int t = item / chunks, v = (item % chunks) * 32 + lane;
        if (v >= num_v) continue;
        float accum[8] = {};
        for (int j = 0; j < topk; ++j) {
            // pair_row: written by the owners during this launch, so not through the read-only path
            const size_t pair = size_t(t) * topk + j;
            const uint4* src = comm::combine_source_row(call.peers, call.off.combine, call.off.combine_in, pushed,
                                                        __ldg(topk_idx + pair), pair_row[pair], pair, call.rank,
                                                        num_experts, call.num_ranks, hidden);
            if (src != nullptr) comm::add_bf16x8(accum, src[v]);
        }
        if constexpr (kUpstream)
            comm::combine_upstream_tail(accum, shared == nullptr ? nullptr : shared + size_t(t) * hidden, v, rsf, nvfp4);
        reinterpret_cast<uint4*>(y + size_t(t) * hidden)[v] = comm::pack_bf16x8(accum, aborted);
    }
}

}  // namespace deep_gemm::mega
