#pragma once
// Exclusive prefix over a short array by one full warp (arch-neutral).  Each lane takes a
// contiguous chunk, so n may exceed 32.
namespace deep_gemm {

// visit(i, sum of value(j) for j < i, value(i)) for every i in [0, n), each i by one lane; returns
// the sum up to the end of this lane's chunk (lane 31: the total).  value(i) is read before
// visit(i, ...), so visit may overwrite what value reads.
template <typename ValueFn, typename VisitFn>
__device__ __forceinline__ int warp_exclusive_scan_visit(int n, int lane, ValueFn value, VisitFn visit) {
    const int per_lane = (n + 31) / 32;
    const int begin = min(lane * per_lane, n), end = min(begin + per_lane, n);
    int local = 0;
    for (int i = begin; i < end; ++i) local += value(i);
    int incl = local;
    #pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const int v = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += v;
    }
    int run = incl - local;
    for (int i = begin; i < end; ++i) {
        const int v = value(i);
        visit(i, run, v);
        run += v;
    }
    return incl;
}

// out[i] = sum of value(j) for j < i, out[n] = the total.
template <typename ValueFn>
__device__ __forceinline__ void warp_exclusive_scan(int n, int lane, ValueFn value, int* out) {
    const int total = warp_exclusive_scan_visit(n, lane, value, [&](int i, int prefix, int) { out[i] = prefix; });
    if (lane == 31) out[n] = total;
}

}  // namespace deep_gemm
