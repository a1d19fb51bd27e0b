#pragma once
// Arch-neutral routing records shared by dispatch, the expert GEMMs and combine.
//
// A (token, slot) pair of source rank s routed to a local expert e becomes one row of the
// expert-grouped L1 input; rows of local expert e are [offsets[e], offsets[e + 1]).  The row index
// goes back into the source's pair_row[token, slot], which its combine uses to pull the row's L2
// output.  Row order inside an expert is whatever the atomics give: every row's result depends
// only on its own token and expert (the GEMMs accumulate each row in a fixed k order), so y is
// bit-stable run to run regardless.
#include <cstdint>

#include <deep_gemm/comm/symm.cuh>

namespace deep_gemm::comm {

// The source of one dispatched row (the buffer's `l1_src` record).
struct RowSource {
    int rank, token, slot, local_expert;
};
static_assert(sizeof(RowSource) == 16, "l1_src is int32 [R, 4]");

// Every rank's (token, slot) pairs numbered back to back: source s owns flat pairs
// [begin[s], begin[s + 1]), in its [T, k] routing order (begin: the prefix of source_pairs).
// Pairs of source s: its token count x topk.  Peers publish their count in `meta` before their
// barrier-0 signal; a peer that never arrived may hold anything, hence the clamp.
__device__ __forceinline__ int source_pairs(const PeerBuffers peers, uint64_t meta_offset, int s, int rank,
                                            int num_tokens, int max_tokens, int topk) {
    // (an if, not a ?: with a volatile operand: that once compiled to a dead local-memory store)
    int n = num_tokens;
    if (s != rank) n = *peers.at<volatile int>(s, meta_offset + 4 * kMetaNumTokens);
    return min(max(n, 0), max_tokens) * topk;
}

// flat pair g -> (source rank, pair index in that rank's routing)
__device__ __forceinline__ void locate_pair(const int* begin, int g, int& s, int& p) {
    s = 0;
    while (g >= begin[s + 1]) ++s;
    p = g - begin[s];
}

// The local expert of source s's pair p, or -1 (masked, out of range, or another rank's expert).
// expert_begin = rank x num_local_experts.
__device__ __forceinline__ int local_expert(const PeerBuffers peers, uint64_t topk_idx_offset, int s, int p,
                                            int64_t expert_begin, int num_local_experts) {
    const int64_t e = peers.at<const int64_t>(s, topk_idx_offset)[p] - expert_begin;
    return (e >= 0 && e < num_local_experts) ? int(e) : -1;
}

// counters[key] += (lanes with this key), one shared atomic per distinct key (few experts, many
// pairs: per-lane atomics serialise).  Returns this lane's slot (the old value plus its rank among
// those lanes), or -1 for key < 0.  The whole warp calls it.
__device__ __forceinline__ int warp_aggregated_add(int* counters, int key, int lane) {
    const unsigned same = __match_any_sync(0xffffffffu, key);
    if (key < 0) return -1;
    const int leader = __ffs(same) - 1;
    int first = 0;
    if (lane == leader) first = atomicAdd(counters + key, __popc(same));
    return __shfl_sync(same, first, leader) + __popc(same & ((1u << lane) - 1));
}

}  // namespace deep_gemm::comm
