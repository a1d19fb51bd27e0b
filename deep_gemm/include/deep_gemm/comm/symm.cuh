#pragma once
// Symmetric-buffer addressing and system-scope signalling (arch-neutral, sm_90 and up).
//
// Every rank's buffer has the same layout, so a region is named by one byte offset; `bases[r]`
// is rank r's buffer as mapped in this process (NVLink peer memory, or plain device memory for
// this rank and for ranks emulated on one GPU).  Data reads of peer memory use plain loads, not
// the read-only path: the owning rank rewrites it between layer calls.
#include <cstdint>

namespace deep_gemm::comm {

struct PeerBuffers {
    const uint64_t* bases;   // [num_ranks], device memory

    template <typename T>
    __device__ __forceinline__ T* at(int rank, uint64_t offset) const {
        // cvta.global tells the compiler the address is global: LDG/STG instead of generic LD/ST
        const size_t addr = __ldg(reinterpret_cast<const unsigned long long*>(bases) + rank) + offset;
        return reinterpret_cast<T*>(__cvta_global_to_generic(addr));
    }
};

// Counters of the buffer's `meta` region (int32), local to each rank.
enum Meta : int {
    kMetaNumTokens = 0,     // tokens of this rank in the current call, published for the peers
    kMetaEpoch = 1,         // [2]: calls seen by each barrier phase
    kMetaAbort = 3,         // epoch of a call whose barrier timed out (0 = none)
    kMetaSize = 16,
};

__device__ __forceinline__ int ld_acquire_sys(const int* p) {
    int v;
    asm volatile("ld.acquire.sys.global.b32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

__device__ __forceinline__ int ld_acquire_gpu(const int* p) {
    int v;
    asm volatile("ld.acquire.gpu.global.b32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

__device__ __forceinline__ int ld_volatile(const int* p) { return *reinterpret_cast<const volatile int*>(p); }

__device__ __forceinline__ void st_release_sys(int* p, int v) {
    asm volatile("st.release.sys.global.b32 [%0], %1;" :: "l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ uint64_t globaltimer_ns() {
    uint64_t t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

// Host-mapped (pinned) record of the first failed wait, read by Python without a device sync.
struct CommError {
    int code;        // 0 = none, 1 = timeout
    int phase;       // barrier phase
    int rank;        // the rank that waited
    int peer;        // the rank it waited for
    int epoch;       // which call (1-based)
    int pad[3];
};
static_assert(sizeof(CommError) == 32, "comm error record is int32 [8]");

// Cross-rank and cross-CTA waits of one call, sharing its start time, timeout and error record.
struct Waiter {
    int* meta;
    CommError* error;
    uint64_t start, timeout_ns;
    int rank, epoch;

    __device__ __forceinline__ bool aborted() const { return ld_volatile(meta + kMetaAbort) != 0; }

    // Out of line with plain arguments (a member call would put the struct on the stack).
    __device__ __noinline__ static void fail(int* meta, CommError* error, int phase, int rank, int peer,
                                             int epoch) {
        if (atomicCAS_system(&error->code, 0, -1) == 0) {   // claim, fill, then publish
            error->phase = phase, error->rank = rank, error->peer = peer, error->epoch = epoch;
            __threadfence_system();
            atomicExch_system(&error->code, 1);
        }
        atomicMax(meta + kMetaAbort, epoch);
    }

    // Spin until *p >= target (acquire at system or GPU scope); false (after recording) on timeout
    // or when the buffer is aborted.
    template <bool kSystem>
    __device__ __forceinline__ bool until(const int* p, int target, int phase, int peer) const {
        while ((kSystem ? ld_acquire_sys(p) : ld_acquire_gpu(p)) - target < 0) {
            if (aborted()) return false;
            if (globaltimer_ns() - start > timeout_ns) {
                fail(meta, error, phase, rank, peer, epoch);
                return false;
            }
            __nanosleep(64);
        }
        return true;
    }
};

}  // namespace deep_gemm::comm
