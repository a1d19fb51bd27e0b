#pragma once
// Phase 1 of a fused launch from barrier 0 on (arch-neutral): every rank's (token, slot) pairs, numbered
// back to back (comm/routing.cuh), are split evenly over the CTAs; each CTA counts its share per
// local expert, takes its first rows of each expert with one atomic, and, once every CTA has
// counted (a grid-wide counter: all CTAs are resident), one warp turns the totals into row ranges
// (expert e's rows [offsets[e], offsets[e + 1]), clamped to the buffer) and this CTA's first rows.
// The same pairs, counts and rows as the sequence's smxx_moe_dispatch_layout, in parallel.
#include <cstdint>

#include <deep_gemm/comm/routing.cuh>
#include <deep_gemm/comm/symm.cuh>
#include <deep_gemm/common/warp_scan.cuh>
#include <deep_gemm/mega/barriers.cuh>
#include <deep_gemm/mega/state.cuh>
#include <deep_gemm/mega/trace.cuh>

namespace deep_gemm::mega {

// One thread: the first flat pair of each source rank (its published token count x topk, clamped).
__device__ __forceinline__ void source_ranges(int* src_begin, const Call& call, int num_tokens, int max_tokens,
                                              int topk) {
    src_begin[0] = 0;
    for (int s = 0; s < call.num_ranks; ++s)
        src_begin[s + 1] = src_begin[s] + comm::source_pairs(call.peers, call.off.meta, s, call.rank, num_tokens,
                                                             max_tokens, topk);
}

// This CTA's flat pairs [begin, end): an even share of every rank's pairs.  The counting and the
// routing walk the same pairs, so a CTA routes exactly the pairs it counted.
struct Pairs {
    const int* src_begin;         // shared
    comm::PeerBuffers peers;
    uint64_t topk_idx_off;
    int64_t expert_begin;         // rank x num_experts
    int num_experts, begin, end;

    __device__ __forceinline__ Pairs(const int* src_begin_, const Call& call, int num_experts_, int grid)
        : src_begin(src_begin_), peers(call.peers), topk_idx_off(call.off.topk_idx), num_experts(num_experts_) {
        const int num_pairs = src_begin[call.num_ranks];
        const int per_cta = (num_pairs + grid - 1) / grid;
        begin = min(num_pairs, int(blockIdx.x) * per_cta), end = min(num_pairs, begin + per_cta);
        expert_begin = int64_t(call.rank) * num_experts;
    }

    // flat pair g -> (source rank s, pair p of s) and its local expert, or -1
    __device__ __forceinline__ int expert_of(int g, int& s, int& p) const {
        comm::locate_pair(src_begin, g, s, p);
        return comm::local_expert(peers, topk_idx_off, s, p, expert_begin, num_experts);
    }
};

// Count this CTA's pairs per local expert into count[] (shared, zeroed).  All threads; whole warps
// step together so that lanes of one expert merge into one shared atomic.
template <int kNumThreads>
__device__ __forceinline__ void count_pairs(const Pairs& pairs, int* count, int tid, int lane) {
    for (int base = pairs.begin; base < pairs.end; base += kNumThreads) {
        const int g = base + tid;
        int s = 0, p = 0, e = -1;
        if (g < pairs.end) e = pairs.expert_of(g, s, p);
        comm::warp_aggregated_add(count, e, lane);
    }
}

// This CTA's first row of each expert, in the order of the other CTAs' atomics (relative to the
// expert's first row until row_ranges adds it); count[] becomes the routing cursor.  All threads.
template <int kNumThreads>
__device__ __forceinline__ void claim_rows(int* count, int* first, const WorkRegion& ws, int num_experts, int tid) {
    for (int e = tid; e < num_experts; e += kNumThreads) {
        const int n = count[e];
        first[e] = n > 0 ? atomicAdd(ws.count() + e, n) : 0;
        count[e] = 0;   // becomes the routing cursor
    }
}

// One warp, after every thread's claim_rows (and a __syncthreads): wait until every CTA has
// claimed, then rows per expert (clamped to max_rows) into sh.rows, this CTA's global first rows
// into sh.first, and the call's token tiles into sh.token_tiles.  CTA 0 writes the offsets and
// adds the receive statistics.
template <int kBlockT, bool kTrace, int kMaxExperts>
__device__ __forceinline__ void row_ranges(Shared<kMaxExperts>& sh, const Call& call, int num_experts, int max_rows,
                                           int* expert_offsets, int* stats, int grid, int lane, uint64_t* trace) {
    const WorkRegion& ws = call.ws;
    if (lane == 0) {
        stamp_cta<kTrace>(trace, kTraceCounted);
        __threadfence();
        atomicAdd(ws.base + WorkRegion::kCounted, 1);
        call.waiter.until<false>(ws.base + WorkRegion::kCounted, grid, kPhaseInternal, call.rank);
        stamp_cta<kTrace>(trace, kTraceAllCounted);
    }
    __syncwarp();
    // counts -> row ranges (clamped to the buffer's rows), one warp: the routing waits for this
    for (int e = lane; e < num_experts; e += 32) sh.rows[e] = comm::ld_volatile(ws.count() + e);
    __syncwarp();
    int tiles = 0;
    const int total = warp_exclusive_scan_visit(num_experts, lane, [&](int e) { return sh.rows[e]; },
                                                [&](int e, int prefix, int n) {
        const int lo = min(prefix, max_rows), hi = min(prefix + n, max_rows);
        sh.first[e] += prefix;     // global first row of this CTA's pairs of e
        sh.rows[e] = hi - lo;
        tiles += (hi - lo + kBlockT - 1) / kBlockT;
        if (blockIdx.x == 0) {
            expert_offsets[e] = lo;
            if (stats != nullptr) stats[e] += n;
        }
    });
    if (blockIdx.x == 0 && lane == 31) expert_offsets[num_experts] = min(total, max_rows);
    tiles = __reduce_add_sync(0xffffffffu, tiles);   // = the work order's num_token_tiles()
    if (lane == 0) sh.token_tiles = tiles;
}

// Phase 1, every thread of the CTA, once begin_call's state is published and sh.count zeroed:
// barrier 0, the source ranges, this CTA's pairs (returned: the routing walks the same), their
// counts, first rows and the row ranges, with a __syncthreads after each step.  Thread 0 stamps
// barrier 0 passed, warp 0 runs row_ranges.
template <int kNumThreads, int kBlockT, bool kTrace, int kMaxExperts>
__device__ __forceinline__ Pairs prologue(Shared<kMaxExperts>& sh, const Call& call, const int* flags, int epoch0,
                                          int num_tokens, int max_tokens, int topk, int num_experts, int max_rows,
                                          int* expert_offsets, int* stats, int grid, int tid, int warp, int lane,
                                          uint64_t* trace) {
    signal_barrier0<kNumThreads>(call, epoch0, tid);
    wait_barrier0<kNumThreads>(call, sh.aborted, flags, epoch0, tid);
    __syncthreads();   // every peer's arrival (acquired by thread r) before anyone reads its inputs
    if (tid == 0) stamp_cta<kTrace>(trace, kTraceBarrier0);
    if (tid == 0) source_ranges(sh.src_begin, call, num_tokens, max_tokens, topk);
    __syncthreads();

    const Pairs pairs(sh.src_begin, call, num_experts, grid);
    count_pairs<kNumThreads>(pairs, sh.count, tid, lane);
    __syncthreads();
    claim_rows<kNumThreads>(sh.count, sh.first, call.ws, num_experts, tid);
    __syncthreads();
    if (warp == 0) row_ranges<kBlockT, kTrace>(sh, call, num_experts, max_rows, expert_offsets, stats, grid, lane, trace);
    __syncthreads();
    return pairs;
}

}  // namespace deep_gemm::mega
