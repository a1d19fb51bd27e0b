#pragma once
// Exclusive prefix over a short array by one full warp (arch-neutral): out[i] = sum of value(j)
// for j < i, out[n] = the total.  Each lane takes a contiguous chunk, so n may exceed 32.
namespace deep_gemm {

template <typename ValueFn>
__device__ __forceinline__ void warp_exclusive_scan(int n, int lane, ValueFn value, int* out) {
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
        out[i] = run;
        run += value(i);
    }
    if (lane == 31) out[n] = incl;
}

}  // namespace deep_gemm
