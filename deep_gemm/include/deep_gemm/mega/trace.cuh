#pragma once
// Timeline of one fused launch (compile-time variant kTrace, scripts/trace_mega_moe.py): globaltimer
// stamps.  Per CTA b at trace[8 b ..]: start, work order built, combine start, end, barrier 0 passed,
// this CTA's pairs counted, every CTA counted, every CTA routed; per unit u [claimed, inputs ready,
// MMA start, done] at trace[kTraceUnits + 4 u ..] and 2 x CTA + (L2 ? 1 : 0) at
// trace[kTraceUnits + 4 units + u].  Stamps from one thread each: no atomics.  The layout is read by
// deep_gemm/mega/sm90.py (_TRACE_MAX_CTAS, TRACE_UNITS) and scripts/trace_mega_moe.py.
#include <cstdint>

#include <deep_gemm/comm/symm.cuh>

namespace deep_gemm::mega {

constexpr int kTraceMaxCTAs = 1024;
constexpr int kTraceUnits = 8 * kTraceMaxCTAs;

// The per-CTA stamps, in trace[8 b + slot].
enum TraceSlot : int {
    kTraceStart = 0, kTraceOrderBuilt = 1, kTraceCombine = 2, kTraceEnd = 3,
    kTraceBarrier0 = 4, kTraceCounted = 5, kTraceAllCounted = 6, kTraceRouted = 7,
};

template <bool kTrace>
__device__ __forceinline__ void stamp(uint64_t* trace, int slot) {
    if constexpr (kTrace) trace[slot] = comm::globaltimer_ns();
}

// This CTA's stamp `slot` (TraceSlot).
template <bool kTrace>
__device__ __forceinline__ void stamp_cta(uint64_t* trace, int slot) {
    stamp<kTrace>(trace, 8 * blockIdx.x + slot);
}

}  // namespace deep_gemm::mega
