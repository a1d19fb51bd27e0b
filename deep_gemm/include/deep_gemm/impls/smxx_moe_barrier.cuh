#pragma once
// Cross-rank barrier of the Mega MoE layer (one CTA, one thread per peer, strided).
//
// Phase 0 (start of a call): "my tokens, scales, routing and token count are written, and I have
// finished reading everything you exposed in the previous call".  Phase 1 (after L2): "my pair_row
// entries in your buffer and my combine rows are written".  Each phase counts calls in `meta`; the
// signal is that count stored with release semantics at system scope into flags[phase][me] of every
// peer, so flags only grow and need no reset (a CUDA graph replays the same kernel).
//
// A wait that outlasts `timeout_ns` records (phase, me, peer, call) in the host-mapped error word,
// marks the call aborted in `meta` (combine then writes NaN, never stale data) and returns: the GPU
// never hangs and Python raises an error naming the peer.  Later barriers of an aborted buffer do
// not wait at all.
#include <cstdint>

#include <deep_gemm/comm/symm.cuh>

namespace deep_gemm {

template <int kNumThreads>
__global__ void __launch_bounds__(kNumThreads)
smxx_moe_barrier(const uint64_t* bases, uint64_t flags_offset, int* meta, int* flags, int phase, int rank,
                 int num_ranks, int num_tokens, uint64_t timeout_ns, comm::CommError* error) {
    __shared__ int s_epoch, s_aborted;
    if (threadIdx.x == 0) {
        s_aborted = meta[comm::kMetaAbort];
        const int epoch = meta[comm::kMetaEpoch + phase] + 1;
        meta[comm::kMetaEpoch + phase] = epoch;
        if (phase == 0) meta[comm::kMetaNumTokens] = num_tokens;
        s_epoch = epoch;
    }
    __syncthreads();
    const int epoch = s_epoch;
    // Order this rank's earlier writes (previous kernels on the stream, the meta stores above)
    // before the signals that let peers read them.
    __threadfence_system();
    const comm::PeerBuffers peers{bases};
    for (int r = threadIdx.x; r < num_ranks; r += kNumThreads)
        comm::st_release_sys(peers.at<int>(r, flags_offset) + phase * num_ranks + rank, epoch);

    if (s_aborted != 0) return;   // a failed buffer: signal (peers may still be in step) but never wait again
    const comm::Waiter waiter{meta, error, comm::globaltimer_ns(), timeout_ns, rank, epoch};
    for (int r = threadIdx.x; r < num_ranks; r += kNumThreads)
        if (!waiter.until<true>(flags + phase * num_ranks + r, epoch, phase, r)) break;
}

}  // namespace deep_gemm
