#pragma once
// The two cross-rank barriers of a fused launch (arch-neutral).  The same flags, meanings and
// memory orders as the kernel sequence's smxx_moe_barrier: the signal is the call's epoch stored
// with release semantics at system scope into flags[phase][me] of every rank, the wait an acquire
// at system scope until flags[phase][r] >= epoch, with the buffer's timeout (phase and peer go into
// the error record).
//   barrier 0: "my inputs and token count are written, and I finished reading what you exposed in
//              the previous call".  CTA 0 signals, every CTA waits (each reads every peer's inputs).
//   barrier 1: "my pair_row entries at your rank and the combine rows you read are written".  It
//              counts this rank's pieces of work in the `work` region (every L2 unit part, every
//              CTA's routing and pushes); whichever thread completes the count signals every peer.
#include <cstdint>

#include <deep_gemm/comm/symm.cuh>
#include <deep_gemm/mega/state.cuh>

namespace deep_gemm::mega {

// Where this rank signals `phase` at rank r: flags[phase][rank] of r's buffer.
__device__ __forceinline__ int* peer_flag(const Call& call, int r, int phase) {
    return call.peers.at<int>(r, call.off.flags) + phase * call.num_ranks + call.rank;
}

// Barrier 0, signal (CTA 0; threads stride over the peers).  A rank alone skips barrier 0: its
// inputs are earlier work on its own stream (the fence and flag round trip were 2.7 us of every
// CTA's prologue).
template <int kNumThreads>
__device__ __forceinline__ void signal_barrier0(const Call& call, int epoch0, int tid) {
    if (blockIdx.x == 0 && call.num_ranks > 1) {
        // my inputs (earlier stream work) and token count, then the signal
        __threadfence_system();
        for (int r = tid; r < call.num_ranks; r += kNumThreads)
            comm::st_release_sys(peer_flag(call, r, 0), epoch0);
    }
}

// Barrier 0, wait (every CTA; thread r acquires peer r's signal, so the caller's __syncthreads must
// follow before anyone reads peers' inputs).  `aborted`: the buffer's abort flag as read at the start.
template <int kNumThreads>
__device__ __forceinline__ void wait_barrier0(const Call& call, const int& aborted, const int* flags, int epoch0,
                                              int tid) {
    if (aborted == 0 && call.num_ranks > 1) {
        for (int r = tid; r < call.num_ranks; r += kNumThreads)
            call.waiter.until<true>(flags + r, epoch0, 0, r);
    }
}

// Barrier 1's count: kParts contributions per L2 unit (the MMA core's, e.g. one per consumer
// warpgroup) and one per CTA (its routing and pushes).  From the row ranges, not the work order,
// so that no MMA thread reads the order outside a unit.
template <int kParts>
__device__ __forceinline__ int barrier1_target(int token_tiles, int l2_row_tiles, int grid) {
    return kParts * token_tiles * l2_row_tiles + grid;
}

struct Barrier1 {
    const Call& call;
    int target, epoch1;

    // n pieces of this rank's work are done; the caller fenced its writes (system scope for
    // anything a peer reads).  The last contribution tells every peer that this rank's pair_row
    // entries and combine rows are complete.
    __device__ __forceinline__ void contribute(int n) const {
        const int old = atomicAdd(call.ws.base + WorkRegion::kSignal, n);
        if (old + n == target) {
            __threadfence_system();
            for (int r = 0; r < call.num_ranks; ++r)
                comm::st_release_sys(peer_flag(call, r, 1), epoch1);
        }
    }
};

// Barrier 1 of the call, once the prologue's row ranges are known (its target: barrier1_target).
template <int kParts, int kMaxExperts>
__device__ __forceinline__ Barrier1 barrier1_of(const Call& call, const Shared<kMaxExperts>& sh, int l2_row_tiles,
                                                int grid, int epoch1) {
    return Barrier1{call, barrier1_target<kParts>(sh.token_tiles, l2_row_tiles, grid), epoch1};
}

// Barrier 1, wait (one warp; lane r acquires peer r's signal and the warp syncs).  Skipped by an
// aborted buffer.
__device__ __forceinline__ void wait_barrier1(const Call& call, const int& aborted, const int* flags, int epoch1,
                                              int lane) {
    for (int r = lane; r < call.num_ranks; r += 32)
        if (aborted == 0)
            call.waiter.until<true>(flags + call.num_ranks + r, epoch1, 1, r);
    __syncwarp();
}

}  // namespace deep_gemm::mega
