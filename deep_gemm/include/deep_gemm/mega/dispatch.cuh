#pragma once
// Dispatch inside a fused launch (arch-neutral), run by the comm warps of every CTA:
//   route:  each of this CTA's pairs routed here gets its row (the CTA's first row of the expert +
//           a cursor): row_src and the routing weight locally, the row index into the source's
//           pair_row (-1 past the buffer's rows), exactly as smxx_moe_dispatch_layout does;
//   gather: after every CTA has routed, the rows in row order over all comm warps of the rank pull
//           their FP8 token and scales from the source and store BF16 (comm/rows.cuh, as
//           smxx_moe_dispatch_gather), each row counted in its token tile's `arrived` counter,
//           which an L1 unit waits for.  Row order: the first experts' (and token tiles') rows
//           arrive first, so their L1 units start while later rows are in flight.
#include <cstdint>
#include <cuda_bf16.h>

#include <deep_gemm/comm/routing.cuh>
#include <deep_gemm/comm/rows.cuh>
#include <deep_gemm/comm/symm.cuh>
#include <deep_gemm/mega/row_ranges.cuh>
#include <deep_gemm/mega/state.cuh>

namespace deep_gemm::mega {

// Comm warp cw of kCommWarps routes its share of the CTA's pairs (whole warps: the cursor's
// atomics merge per expert).  cursor / first: the CTA's shared count (zeroed by claim_rows) and
// first rows (global, from row_ranges).
template <int kCommWarps>
__device__ __forceinline__ void route_pairs(const Pairs& pairs, const Call& call, int* cursor, const int* first,
                                            comm::RowSource* row_src, float* row_weight, int max_rows, int topk,
                                            int cw, int lane) {
    const int len = (pairs.end - pairs.begin + kCommWarps - 1) / kCommWarps;
    const int w0 = min(pairs.end, pairs.begin + cw * len), w1 = min(pairs.end, w0 + len);
    for (int base = w0; base < w1; base += 32) {
        const int g = base + lane;
        int s = 0, p = 0, e = -1, row = -1;
        if (g < w1) e = pairs.expert_of(g, s, p);
        const int slot = comm::warp_aggregated_add(cursor, e, lane);
        if (e >= 0) {
            row = first[e] + slot;
            if (row >= max_rows) row = -1;
            if (row >= 0) {
                row_src[row] = comm::RowSource{s, p / topk, p % topk, e};
                row_weight[row] = call.peers.at<const float>(s, call.off.topk_weights)[p];
            }
            call.peers.at<int>(s, call.off.pair_row)[p] = row;
        }
    }
}

// One thread per CTA, after its comm warps routed: wait until every CTA of this rank has.  The
// GPU-scope fence covers row_src / row_weight, which only this GPU's CTAs read; the system-scope
// fence that the pair_row stores at the sources need comes before this CTA's barrier-1
// contribution instead (on the critical path it held up the first rows).
__device__ __forceinline__ void wait_routed(const Call& call, int grid) {
    __threadfence();
    atomicAdd(call.ws.base + WorkRegion::kRouted, 1);
    call.waiter.until<false>(call.ws.base + WorkRegion::kRouted, grid, kPhaseInternal, call.rank);
}

// Comm warp cw: gather its rows (row = CTA x kCommWarps + cw, stepping over every comm warp of the
// rank) once every CTA routed and the work order is built; num_rows_total = the order's rows
// (work.row_prefix[work.num_active]).  copy_row(src, row, k) moves one row from its source into the
// kernel's L1 input (the whole warp; k: the row's active expert in the work order); then the row is
// proxy-fenced (TMA reads it) and counted in its token tile's `arrived` counter.
template <int kBlockT, int kCommWarps, class Work, class CopyRow>
__device__ __forceinline__ void gather_rows_with(const Work& work, const Call& call, const comm::RowSource* row_src,
                                                 int num_rows_total, int grid, int cw, int lane, CopyRow&& copy_row) {
    int k = 0;
    for (int row = blockIdx.x * kCommWarps + cw; row < num_rows_total; row += grid * kCommWarps) {
        while (row >= work.row_prefix[k + 1]) ++k;
        const int4 packed = load_row_src(row_src, row);   // ordered by the routed counter
        const comm::RowSource src{packed.x, packed.y, packed.z, packed.w};
        copy_row(src, row, k);
        fence_proxy_async_global();   // TMA reads the row
        __syncwarp();
        if (lane == 0) {
            __threadfence();
            atomicAdd(call.ws.arrived() + token_tile<kBlockT>(work, k, row), 1);
        }
    }
}

// The BF16 L1 input of the sm90 kernel (a copy_row of gather_rows_with): each row's FP8 token and
// scales from the source, stored as BF16 (exact) at `row` of l1_x.  kChunks uint4 loads in flight
// per lane: a register budget (the caller's), not a result.
template <int kGranK, int kChunks>
struct Fp8ToBf16Row {
    const Call& call;
    __nv_bfloat16* l1_x;
    int hidden, lane;
    __device__ __forceinline__ void operator()(const comm::RowSource& src, int row, int) const {
        const uint4* x = call.peers.at<const uint4>(src.rank, call.off.x + uint64_t(src.token) * hidden);
        const float* sf = call.peers.at<const float>(src.rank, call.off.x_sf + uint64_t(src.token) * (hidden / kGranK) * 4);
        uint4* dst = reinterpret_cast<uint4*>(l1_x + size_t(row) * hidden);
        comm::gather_fp8_row<kGranK, 32, kChunks>(x, sf, dst, hidden / 16, lane);
    }
};

// The other token formats of upstream's recipes (kernels.dispatch_gather's `fmt`): NVFP4 (packed
// E2M1 codes, [T, H / 2] bytes, and UE4M3 per 16, [T, H / 16] bytes, at x_sf) and BF16 (copied; kChunks
// uint4 in flight per lane), stored as BF16 (exact) at `row` of l1_x, as smxx_moe_dispatch_gather.
struct Nvfp4ToBf16Row {
    const Call& call;
    __nv_bfloat16* l1_x;
    int hidden, lane;
    __device__ __forceinline__ void operator()(const comm::RowSource& src, int row, int) const {
        const uint4* x = call.peers.at<const uint4>(src.rank, call.off.x + uint64_t(src.token) * (hidden / 2));
        const uint16_t* sf = call.peers.at<const uint16_t>(src.rank, call.off.x_sf + uint64_t(src.token) * (hidden / 16));
        comm::gather_nvfp4_row<32>(x, sf, reinterpret_cast<uint4*>(l1_x + size_t(row) * hidden), hidden / 32, lane);
    }
};

template <int kChunks>
struct Bf16Row {
    const Call& call;
    __nv_bfloat16* l1_x;
    int hidden, lane;
    __device__ __forceinline__ void operator()(const comm::RowSource& src, int row, int) const {
        const uint4* x = call.peers.at<const uint4>(src.rank, call.off.x + uint64_t(src.token) * hidden * 2);
        comm::copy_row<32, kChunks>(x, reinterpret_cast<uint4*>(l1_x + size_t(row) * hidden), hidden / 8, lane);
    }
};

template <int kBlockT, int kGranK, int kCommWarps, int kChunks, class Work>
__device__ __forceinline__ void gather_rows(const Work& work, const Call& call, const comm::RowSource* row_src,
                                            __nv_bfloat16* l1_x, int num_rows_total, int hidden, int grid, int cw,
                                            int lane) {
    gather_rows_with<kBlockT, kCommWarps>(work, call, row_src, num_rows_total, grid, cw, lane,
                                          Fp8ToBf16Row<kGranK, kChunks>{call, l1_x, hidden, lane});
}

}  // namespace deep_gemm::mega
