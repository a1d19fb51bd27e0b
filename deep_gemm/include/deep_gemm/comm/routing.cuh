#pragma once
// Arch-neutral routing records shared by dispatch, the expert GEMMs and combine.
//
// A (token, slot) pair p = token * topk + slot routed to a local expert becomes one row of the
// expert-grouped L1 input; rows of local expert e are [offsets[e], offsets[e + 1]).  Row order
// inside an expert is whatever the atomics give: every row's result depends only on its own
// token and expert (the GEMMs accumulate each row in a fixed k order), so y is bit-stable run to
// run regardless.
#include <cstdint>

namespace deep_gemm::comm {

// The source of one dispatched row (the buffer's `l1_src` record).
struct RowSource {
    int rank, token, slot, local_expert;
};
static_assert(sizeof(RowSource) == 16, "l1_src is int32 [R, 4]");

// Exclusive prefix of `counts[0, n)` into `offsets[0, n]`, by one full warp.
__device__ __forceinline__ void warp_exclusive_scan(const int* counts, int* offsets, int n, int lane) {
    const int per_lane = (n + 31) / 32;
    const int begin = min(lane * per_lane, n), end = min(begin + per_lane, n);
    int local = 0;
    for (int i = begin; i < end; ++i) local += counts[i];
    int incl = local;
    #pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const int v = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += v;
    }
    int run = incl - local;
    for (int i = begin; i < end; ++i) {
        offsets[i] = run;
        run += counts[i];
    }
    if (lane == 31) offsets[n] = incl;
}

}  // namespace deep_gemm::comm
