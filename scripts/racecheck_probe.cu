// Does compute-sanitizer racecheck honour mbarrier ordering?  A 4-stage pipeline shaped like the
// expert GEMMs' (one producer thread: a tag store and a TMA bulk copy per stage; two consumer
// warpgroups that read the stage after `full` and release it on `empty`), in five variants picked
// by `mode` (scripts/racecheck_probe.py runs each under racecheck):
//   0 racy:        one thread per warpgroup releases; nothing orders warps 1-3's reads before it;
//   1 per-warp:    every warp releases its own reads (__syncwarp, then lane 0 arrives);
//   2 named:       a warpgroup bar.sync, then one thread releases;
//   3 token:       no parity waits: consumers arrive on `full` and wait on the returned state, the
//                  producer does the same on `empty`;
//   4 syncthreads: no pipeline: one stage, __syncthreads between the reads and the next copy.
// Modes 1-4 are race-free; a checker that models mbarriers reports only mode 0.
#include <cstdint>
#include <cute/arch/copy_sm90_tma.hpp>
#include <cutlass/arch/barrier.h>

namespace {

constexpr int kStages = 4, kStageBytes = 8192, kBlocks = 64;
using Barrier = cutlass::arch::ClusterTransactionBarrier;

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ uint64_t arrive_state(Barrier* bar) {
    uint64_t state;
    asm volatile("mbarrier.arrive.shared::cta.b64 %0, [%1];" : "=l"(state) : "r"(smem_addr(bar)) : "memory");
    return state;
}

__device__ __forceinline__ void wait_state(Barrier* bar, uint64_t state) {
    uint32_t done = 0;
    while (!done)
        asm volatile("{ .reg .pred p; mbarrier.try_wait.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
                     : "=r"(done) : "r"(smem_addr(bar)), "l"(state) : "memory");
}

__device__ __forceinline__ void copy_stage(const uint8_t* src, int block, uint8_t* dst, Barrier* bar) {
    cute::SM90_BULK_COPY_G2S::copy(src + (size_t(blockIdx.x) * kBlocks + block) * kStageBytes,
                                   reinterpret_cast<uint64_t*>(bar), dst, kStageBytes);
}

// 32 bytes of the stage per consumer thread, then a delay that grows with the warp index (warps
// reach the release at different times).
__device__ __forceinline__ float consume(const uint8_t* stage, const int* tag, int cw, int wg_tid) {
    const uint4* p = reinterpret_cast<const uint4*>(stage + cw * 4096 + wg_tid * 32);
    const uint4 a = p[0], b = p[1];
    float sum = float(*reinterpret_cast<const volatile int*>(tag));
    sum += __uint_as_float(a.x & 0x3fffffffu) + __uint_as_float(b.w & 0x3fffffffu);
    for (int i = 0; i < (wg_tid / 32) * 50; ++i) sum = sum * 0.999f + 1e-3f;
    return sum;
}

}  // namespace

extern "C" __global__ void __launch_bounds__(384, 1) racecheck_probe(const uint8_t* src, float* out, int mode) {
    extern __shared__ __align__(1024) uint8_t smem[];
    auto* full = reinterpret_cast<Barrier*>(smem + kStages * kStageBytes);
    auto* empty = full + kStages;
    int* tags = reinterpret_cast<int*>(empty + kStages);
    const int warpgroup = threadIdx.x / 128, wg_tid = threadIdx.x % 128, cw = warpgroup - 1;
    const bool per_warp = mode == 1 || mode == 3;
    if (threadIdx.x == 0) {
        for (int s = 0; s < kStages; ++s) {
            full[s].init(mode == 3 ? 1 + 8 : 1);
            empty[s].init(mode == 3 ? 1 + 8 : per_warp ? 8 : 2);
        }
        cutlass::arch::fence_barrier_init();
    }
    __syncthreads();
    float sum = 0.f;
    if (mode == 4) {
        for (int b = 0; b < kBlocks; ++b) {
            if (threadIdx.x == 0) {
                tags[0] = b;
                full[0].arrive_and_expect_tx(kStageBytes);
                copy_stage(src, b, smem, &full[0]);
            }
            full[0].wait(b & 1);
            if (warpgroup > 0) sum += consume(smem, tags, cw, wg_tid);
            __syncthreads();
        }
    } else if (warpgroup == 0) {
        if (threadIdx.x == 0) {
            for (int b = 0, stage = 0, phase = 0; b < kBlocks; ++b) {
                if (mode == 3) {
                    if (b >= kStages) wait_state(&empty[stage], arrive_state(&empty[stage]));
                } else {
                    empty[stage].wait(phase ^ 1);
                }
                tags[stage] = b;
                full[stage].arrive_and_expect_tx(kStageBytes);
                copy_stage(src, b, smem + stage * kStageBytes, &full[stage]);
                if (++stage == kStages) stage = 0, phase ^= 1;
            }
        }
    } else {
        for (int b = 0, stage = 0, phase = 0; b < kBlocks; ++b) {
            if (mode == 3) {
                if (wg_tid % 32 == 0) wait_state(&full[stage], arrive_state(&full[stage]));
                __syncwarp();
            } else {
                full[stage].wait(phase);
            }
            sum += consume(smem + stage * kStageBytes, tags + stage, cw, wg_tid);
            if (mode == 2) asm volatile("bar.sync %0, 128;" :: "r"(warpgroup));
            if (per_warp) __syncwarp();
            if (per_warp ? wg_tid % 32 == 0 : wg_tid == 0) empty[stage].arrive();
            if (++stage == kStages) stage = 0, phase ^= 1;
        }
    }
    if (warpgroup > 0) out[blockIdx.x * 256 + threadIdx.x - 128] = sum;
}
