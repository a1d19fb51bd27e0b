#pragma once
// The state of one fused Mega MoE launch that every role reads: the buffer's `work` counters, the
// CTA's shared block, and the call's peers, waits and rank (arch-neutral, sm_90 and up).
//
// The fused kernels (impls/sm90_fp8_nvfp4_mega_moe.cuh; the sm100 one to come) run the same
// protocol around different MMA cores, so the roles that are not MMA (barriers, counting, row
// ranges, routing, gather, combine push, combine, the work order's claims) live in this folder and
// take what they need from here.  Headers by role:
//   state.cuh       this file: counters, shared block, the call, small helpers
//   trace.cuh       the timeline stamps of the trace variant
//   barriers.cuh    barrier 0 (inputs written) and barrier 1 (rows and pair_row written)
//   row_ranges.cuh  count every rank's pairs per local expert, give each CTA its rows, row ranges
//   dispatch.cuh    route this CTA's pairs, gather the rows' tokens from their sources
//   units.cuh       the work order's units: claim, inputs ready, done (what an MMA core calls)
//   combine.cuh     push finished tiles' rows to their sources, reduce this rank's tokens
//   comm_warps.cuh  the comm warps' whole sequence: route, gather, push, barrier-1 contribution
// The layout of Shared is checked at load against deep_gemm/mega/sm90.py's _fused_shared_bytes.
#include <cstdint>

#include <deep_gemm/comm/routing.cuh>
#include <deep_gemm/comm/symm.cuh>
#include <deep_gemm/scheduler/mega_moe_work.cuh>

namespace deep_gemm::mega {

constexpr int kMaxRanks = 128;         // deep_gemm/mega/sm90.py: _MAX_RANKS
constexpr int kMaxStages = 16;         // Shared::stage_unit
constexpr int kPhaseInternal = 2;      // CommError.phase of a wait between CTAs of one rank

// The buffer's `work` region (int32, zero between calls; the last CTA of a launch zeroes it).
struct WorkRegion {
    enum : int { kCounted = 0, kSignal = 1, kFinished = 2, kRouted = 3, kNextUnit = 4, kHeader = 8 };
    int* base;
    int num_experts, max_tiles;   // max_tiles = rows + experts (token tiles of any block size)
    // pairs per local expert over every CTA (each CTA's atomic gives it its first rows)
    __device__ __forceinline__ int* count() const { return base + kHeader; }
    // rows gathered, per token tile
    __device__ __forceinline__ int* arrived() const { return base + kHeader + num_experts; }
    // finished L1 units (x the MMA core's parts per unit), per token tile
    __device__ __forceinline__ int* l1_done() const { return base + kHeader + num_experts + max_tiles; }
    // finished L2 units (x parts), per token tile: its combine rows may be pushed
    __device__ __forceinline__ int* l2_done() const { return base + kHeader + num_experts + 2 * max_tiles; }
};

// The CTA's shared block: static shared memory, so the compiler addresses it with LDS/STS.
template <int kMaxExperts>
struct Shared {
    alignas(8) uint64_t work_built;   // mbarrier, 32 arrivals: warp 0 has built `work`
    MegaMoEWork<kMaxExperts> work;
    int count[kMaxExperts];       // pairs of this CTA per local expert, then the routing cursor
    int first[kMaxExperts];       // this CTA's first row of each expert
    int rows[kMaxExperts];        // rows per expert (clamped to the buffer)
    int src_begin[kMaxRanks + 1]; // first flat pair of each source rank
    int stage_unit[kMaxStages];   // unit that each pipeline stage starts (-1: no more)
    int epoch0, epoch1, aborted, last, token_tiles;
};

// Byte offsets of the symmetric buffer's regions (the same at every rank; comm/symm.cuh).
struct Regions {
    uint64_t x, x_sf, topk_idx, topk_weights, pair_row, combine, combine_in, meta, flags;
};

// What the roles of one launch share, built by every thread once the call's epochs are known
// (after the first __syncthreads).  Plain data passed by reference into inlined roles: the
// compiler keeps the fields in the same registers it would give the kernel's own locals.
struct Call {
    comm::PeerBuffers peers;
    Regions off;
    WorkRegion ws;
    comm::Waiter waiter;          // timeout, error record, abort flag of every wait of the call
    int rank, num_ranks;
};

// The call of a launch, built by every thread once begin_call's state is published (after the first
// __syncthreads): its waits' timeout clock starts here, epoch0 goes into their error records.
template <int kMaxExperts>
__device__ __forceinline__ Call open_call(const Shared<kMaxExperts>& sh, const comm::PeerBuffers& peers,
                                          const Regions& off, const WorkRegion& ws, int* meta,
                                          comm::CommError* error, uint64_t timeout_ns, int rank, int num_ranks) {
    return Call{peers, off, ws, comm::Waiter{meta, error, comm::globaltimer_ns(), timeout_ns, rank, sh.epoch0},
                rank, num_ranks};
}

// Generic-proxy stores that TMA reads later (rows, h) are followed by this before their release;
// the TMA issuer fences after its acquire.
__device__ __forceinline__ void fence_proxy_async_global() {
    asm volatile("fence.proxy.async.global;" ::: "memory");
}

// Named barriers (0 is __syncthreads).
__device__ __forceinline__ void named_barrier(int id, int threads) {
    asm volatile("bar.sync %0, %1;" :: "r"(id), "r"(threads) : "memory");
}

// The packed RowSource of a row (rank, token, slot, local expert): written by other CTAs during this
// launch (ordered by the caller's acquire), so a relaxed load, not the read-only path.
__device__ __forceinline__ int4 load_row_src(const comm::RowSource* row_src, int row) {
    int4 packed;
    asm volatile("ld.relaxed.gpu.global.v4.s32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(packed.x), "=r"(packed.y), "=r"(packed.z), "=r"(packed.w) : "l"(row_src + row));
    return packed;
}

// The token tile holding `row`, a row of the k-th active expert of the work order.
template <int kBlockT, class Work>
__device__ __forceinline__ int token_tile(const Work& work, int k, int row) {
    return mega_token_tile<kBlockT>(work, k, row);   // scheduler/mega_moe_work.cuh (host-callable)
}

// The start of a launch (thread 0; a __syncthreads publishes it): this call's epochs (both barrier
// phases), the buffer's abort flag, and in CTA 0 this rank's token count for the peers (read after
// barrier 0).
template <int kMaxExperts>
__device__ __forceinline__ void begin_call(Shared<kMaxExperts>& sh, int* meta, int num_tokens) {
    sh.epoch0 = meta[comm::kMetaEpoch] + 1;
    sh.epoch1 = meta[comm::kMetaEpoch + 1] + 1;
    sh.aborted = meta[comm::kMetaAbort];
    sh.last = 0;
    if (blockIdx.x == 0) meta[comm::kMetaNumTokens] = num_tokens;
}

// The end of a launch (every thread): the last CTA to finish zeroes the `work` counters and
// advances the call counters in `meta`, so that the next call (or a CUDA graph replay) starts clean.
template <int kNumThreads, int kMaxExperts>
__device__ __forceinline__ void finish_call(Shared<kMaxExperts>& sh, const WorkRegion& ws, int* meta, int tid,
                                            int num_experts, int grid, int epoch0, int epoch1) {
    if (tid == 0) {
        __threadfence();
        sh.last = atomicAdd(ws.base + WorkRegion::kFinished, 1) == grid - 1;
    }
    __syncthreads();
    if (sh.last) {
        __threadfence();
        const int n = WorkRegion::kHeader + num_experts, tiles = sh.work.num_token_tiles();
        for (int i = tid; i < n; i += kNumThreads) ws.base[i] = 0;
        for (int i = tid; i < tiles; i += kNumThreads) ws.arrived()[i] = 0, ws.l1_done()[i] = 0, ws.l2_done()[i] = 0;
        if (tid == 0) {
            meta[comm::kMetaEpoch] = epoch0;
            meta[comm::kMetaEpoch + 1] = epoch1;
        }
    }
}

}  // namespace deep_gemm::mega
