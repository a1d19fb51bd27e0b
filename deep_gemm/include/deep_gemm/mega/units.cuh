#pragma once
// The units of a fused launch, and what an MMA core implements around them (arch-neutral).
//
// A unit is one tile of the work order (scheduler/mega_moe_work.cuh): (L1 or L2, local expert,
// weight-row tile, token tile = a row range of the expert's rows).  The shared roles and an MMA
// core meet at three points, all through the `work` counters:
//   claim    the core's issuing thread takes units one at a time from one counter, in work order
//            (claim(); num_units() ends the loop), and reads the unit from the order in shared
//            memory (sh.work.get(u), sh.work.wait_for(unit));
//   ready    before it loads a unit's tokens (its weights may stream before), it waits for the
//            unit's inputs: L1, the token tile's rows gathered (dispatch.cuh counts them); L2, the
//            L1 units of its (expert, token tile) done, kParts each (wait_inputs), then fences the
//            async proxy (the inputs were written by generic stores);
//   done     every thread that wrote a unit's output fences the async proxy if TMA reads it (L1's
//            h), the core syncs those threads, and one thread per part calls l1_done / l2_done.
//            l2_done also contributes to barrier 1 and lets the comm warps push the tile's rows.
// kParts: how many of those done calls make one unit (on sm90 the two consumer warpgroups, each
// with half of the weight rows); the barrier-1 target (barriers.cuh) counts the same parts.
// Progress: units wait only on earlier units and on the gather, which waits only on barrier 0,
// so every unit a resident CTA claimed eventually runs (scheduler/mega_moe_work.cuh).
#include <cutlass/arch/barrier.h>

#include <deep_gemm/mega/barriers.cuh>
#include <deep_gemm/mega/state.cuh>
#include <deep_gemm/mega/trace.cuh>
#include <deep_gemm/scheduler/mega_moe_work.cuh>

namespace deep_gemm::mega {

// One warp (e.g. the core's issuing warp, before it issues): build the work order from the row
// ranges into sh.work and arrive on sh.work_built (32 arrivals; the comm warps' gather waits on it,
// and the core's other threads need no wait if they learn their units from the issuing thread).
// Every lane arrives: each releases its own part of the order.
template <int kBlockT, bool kTrace, int kMaxExperts>
__device__ __forceinline__ void build_work_order(Shared<kMaxExperts>& sh, int num_experts, int l1_row_tiles,
                                                 int l2_row_tiles, int lookahead_experts, int lookahead_units,
                                                 int l1_token_group, int l2_token_group, int lane, uint64_t* trace) {
    sh.work.build_warp(sh.rows, num_experts, kBlockT, l1_row_tiles, l2_row_tiles, lookahead_experts,
                       lookahead_units, l1_token_group, l2_token_group, lane);
    if (lane == 0) stamp_cta<kTrace>(trace, kTraceOrderBuilt);
    cutlass::arch::ClusterBarrier::arrive(&sh.work_built);
}

template <int kParts>
struct Units {
    const Call& call;
    const Barrier1& barrier1;

    // The next unit of the order (>= num_units(): none left).  Units are claimed from one counter
    // in work order (the progress argument of scheduler/mega_moe_work.cuh holds for any claiming
    // CTA), so units of different lengths (L1: K = hidden, L2: K = inter) balance over the CTAs.
    __device__ __forceinline__ int claim() const { return atomicAdd(call.ws.base + WorkRegion::kNextUnit, 1); }

    // Wait for the unit's inputs (w = work.wait_for(unit), read before the unit's first copies);
    // false on timeout or an aborted buffer (the unit then runs on whatever is there: y is NaN).
    __device__ __forceinline__ bool wait_inputs(const MegaUnit& unit, const MegaWait& w) const {
        if (unit.phase == MegaPhase::L1)
            return call.waiter.until<false>(call.ws.arrived() + unit.tile_index, unit.num_rows, kPhaseInternal, call.rank);
        return call.waiter.until<false>(call.ws.l1_done() + w.counter, kParts * w.target, kPhaseInternal, call.rank);
    }

    // One part of an L1 unit done: its h rows are written (and proxy-fenced by their writers).
    __device__ __forceinline__ void l1_done(const MegaUnit& unit) const {
        __threadfence();
        atomicAdd(call.ws.l1_done() + unit.tile_index, 1);
    }

    // One part of an L2 unit done: its combine rows are written.  System scope: peers read them.
    __device__ __forceinline__ void l2_done(const MegaUnit& unit) const {
        __threadfence_system();
        atomicAdd(call.ws.l2_done() + unit.tile_index, 1);
        barrier1.contribute(1);
    }
};

}  // namespace deep_gemm::mega
