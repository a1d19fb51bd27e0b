#pragma once
// The comm warps of a fused launch (arch-neutral): the whole sequence that a kernel runs on the warps
// it gives to communication while its MMA core computes.  In order:
//   1. route this CTA's pairs (dispatch.cuh), sync the comm warps;
//   2. one leader thread: wait until every CTA of the rank routed; sync again; wait for the work
//      order (sh.work_built);
//   3. gather the rows in row order over the rank (dispatch.cuh);
//   4. with peers (push_combine): push finished token tiles' combine rows to their sources
//      (combine.cuh), waiting on L2 units as they finish;
//   5. sync; the leader fences at system scope (this CTA's pair_row stores and pushed rows at the
//      sources) and adds the CTA's one contribution to barrier 1.
// Progress: the gather waits on nothing but barrier 0 and the routing, so L1 units always get their
// rows; the pushes wait on L2 units, and only barrier 1 waits on the pushes.
// Register budget: these warps may run under a small setmaxnreg share (sm90: 56); kGatherChunks
// and kPushChunks (uint4 in flight per lane) are the caller's, chosen so that nothing spills.
#include <cstdint>
#include <type_traits>
#include <cuda_bf16.h>
#include <cutlass/arch/barrier.h>

#include <deep_gemm/mega/barriers.cuh>
#include <deep_gemm/mega/combine.cuh>
#include <deep_gemm/mega/dispatch.cuh>
#include <deep_gemm/mega/row_ranges.cuh>
#include <deep_gemm/mega/state.cuh>
#include <deep_gemm/mega/trace.cuh>

namespace deep_gemm::mega {

// What the comm warps are, in a kernel: kWarps warps that sync on named barrier kBarrier.
template <int kWarps, int kBarrier>
struct CommWarps {
    static constexpr int kNumWarps = kWarps;
    __device__ __forceinline__ static void sync() { named_barrier(kBarrier, 32 * kWarps); }
};

// cw: this warp's index among the comm warps; leader: one thread of them (the same in every CTA's
// call of this, e.g. cw 0's lane 0).  copy_row: the kernel's L1-input row format (gather_rows_with).
template <class Comm, int kBlockT, int kPushChunks, int kParts, bool kTrace, int kMaxExperts, class CopyRow>
__device__ __forceinline__ void run_comm_warps_with(Shared<kMaxExperts>& sh, const Call& call, const Pairs& pairs,
                                                    const Barrier1& barrier1, comm::RowSource* row_src,
                                                    float* row_weight, const __nv_bfloat16* combine, int max_rows,
                                                    int topk, int hidden, int l2_row_tiles, int push_combine,
                                                    int grid, int cw, int lane, bool leader, uint64_t* trace,
                                                    CopyRow&& copy_row) {
    constexpr int kCommWarps = Comm::kNumWarps;
    route_pairs<kCommWarps>(pairs, call, sh.count, sh.first, row_src, row_weight, max_rows, topk, cw, lane);
    Comm::sync();
    if (leader) {
        wait_routed(call, grid);
        stamp_cta<kTrace>(trace, kTraceRouted);
    }
    Comm::sync();   // every CTA routed
    cutlass::arch::ClusterBarrier::wait(&sh.work_built, 0);
    const auto& work = sh.work;
    const int num_rows_total = work.row_prefix[work.num_active];
    gather_rows_with<kBlockT, kCommWarps>(work, call, row_src, num_rows_total, grid, cw, lane, copy_row);
    if (push_combine)
        push_rows<kBlockT, kCommWarps, kPushChunks, kParts>(work, call, row_src, combine, num_rows_total,
                                                            l2_row_tiles, topk, hidden, grid, cw, lane);
    Comm::sync();
    if (leader) {
        __threadfence_system();   // this CTA's pair_row stores and pushed rows at the sources
        barrier1.contribute(1);
    }
}

// The same with the sm90 kernel's BF16 L1 input, from the buffer's token format kTokenFmt
// (kernels.dispatch_gather's `fmt`): 0 FP8 x float32 scale per kGranK (gather_rows), 1 NVFP4, 2 BF16.
template <class Comm, int kBlockT, int kGranK, int kGatherChunks, int kPushChunks, int kParts, bool kTrace,
          int kMaxExperts, int kTokenFmt = 0>
__device__ __forceinline__ void run_comm_warps(Shared<kMaxExperts>& sh, const Call& call, const Pairs& pairs,
                                               const Barrier1& barrier1, comm::RowSource* row_src, float* row_weight,
                                               __nv_bfloat16* l1_x, const __nv_bfloat16* combine, int max_rows,
                                               int topk, int hidden, int l2_row_tiles, int push_combine, int grid,
                                               int cw, int lane, bool leader, uint64_t* trace) {
    static_assert(kTokenFmt >= 0 && kTokenFmt <= 2, "token format: 0 FP8, 1 NVFP4, 2 BF16");
    using CopyRow = std::conditional_t<kTokenFmt == 0, Fp8ToBf16Row<kGranK, kGatherChunks>,
                                       std::conditional_t<kTokenFmt == 1, Nvfp4ToBf16Row, Bf16Row<kGatherChunks>>>;
    run_comm_warps_with<Comm, kBlockT, kPushChunks, kParts, kTrace>(
        sh, call, pairs, barrier1, row_src, row_weight, combine, max_rows, topk, hidden, l2_row_tiles, push_combine,
        grid, cw, lane, leader, trace, CopyRow{call, l1_x, hidden, lane});
}

}  // namespace deep_gemm::mega
