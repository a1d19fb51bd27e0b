#pragma once
// The fused Mega MoE layer of one rank on Hopper: dispatch, L1 (SwiGLU), L2 and combine in one
// persistent launch, NVFP4, MXFP4 or BF16 weights, our recipe or one of upstream's (the template's
// recipe parameters below).  Same protocol and results as the kernel sequence of
// deep_gemm/mega/sm90.py (barrier, dispatch layout, gather, L1, L2, barrier, combine), but no step
// waits for a whole previous step:
//
//   1. all threads: signal barrier 0 (CTA 0; not for a rank alone), wait for every rank's signal,
//      count this CTA's share of every rank's (token, slot) pairs per local expert; one atomic per
//      expert gives the CTA its rows, one grid-wide counter says every CTA has counted (all CTAs are
//      resident: grid = SMs x CTAs per SM); then warp 0 of every CTA turns the counts into row
//      ranges.
//   2. warpgroup 0, warps 1-3: route this CTA's pairs (row_src, routing weight, the source's
//      pair_row); once every CTA has routed, pull the rows' FP8 tokens from their source ranks in row
//      order over all CTAs, store them as BF16 (exact) and count them per token tile; then, with
//      peers (`push_combine`), push every finished token tile's combine rows of other ranks' pairs
//      into their sources' `combine_in` while later units run.
//      warp 0: meanwhile builds the work order (MegaMoEWork::build_warp).
//      warpgroup 0, thread 0: the TMA producer of common/sm90_fp4_pipeline.cuh; it claims units
//      from one counter in work order and tags the first stage of each for the consumers; a unit's
//      weights stream before its tokens are ready; its token loads wait for the tile's rows (L1) or
//      its L1 tiles (L2).
//      warpgroups 1-2: the grouped GEMM's consumers and epilogues.  L1 writes h (BF16) and bumps
//      the token tile's L1 counter; L2 writes the combine rows and bumps the tile's L2 counter.  The
//      CTA that completes the rank's last piece of work (every L2 unit and every CTA's routing and
//      pushes) signals barrier 1 at every peer.
//   3. every warp, when done: wait for barrier 1 of every rank, then reduce its share of this
//      rank's tokens (fixed slot order, FP32, one BF16 rounding) from the rows the owners pushed and
//      its own experts' rows; without pushes, from the rows pulled from the experts' owners.
//   4. the last CTA to finish zeroes the counters and advances the call counters in `meta`.
//
// Progress: units wait only on earlier units (scheduler/mega_moe_work.cuh) and on the routing
// warps' gather, which waits on nothing but barrier 0; the pushes that follow it wait on L2 units,
// and only barrier 1 waits on the pushes.  Every wait has the buffer's timeout; a timed-out
// wait records the error (host-mapped), marks the buffer aborted, and the launch finishes with y
// = NaN.  Generic-proxy stores that TMA reads later (rows, h) are followed by fence.proxy.async
// before the release, and the TMA issuer fences after its acquire.
//
// Everything above but the MMA is shared device code in include/deep_gemm/mega/ (mega/state.cuh
// lists its headers by role), which the sm100 kernel is to call too.  This file holds what is
// Hopper's: the warp-specialized layout (warpgroup 0: TMA producer and comm warps under 56
// registers; warpgroups 1-2: wgmma consumers), the pipeline of common/sm90_fp4_pipeline.cuh, the
// epilogues with their register layout, the register split, and where each shared role runs.
#include <cstdint>
#include <cuda.h>
#include <cuda_bf16.h>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>

#include <deep_gemm/comm/symm.cuh>
#include <deep_gemm/common/sm90_fp4_pipeline.cuh>
#include <deep_gemm/epilogue/sm90_moe_epilogue.cuh>
#include <deep_gemm/mega/barriers.cuh>
#include <deep_gemm/mega/combine.cuh>
#include <deep_gemm/mega/comm_warps.cuh>
#include <deep_gemm/mega/row_ranges.cuh>
#include <deep_gemm/mega/state.cuh>
#include <deep_gemm/mega/trace.cuh>
#include <deep_gemm/mega/units.cuh>
#include <deep_gemm/scheduler/mega_moe_work.cuh>

namespace deep_gemm {

namespace mega::sm90_layout {

constexpr int kThreads = 384;
constexpr int kCommWarps = 3;          // warps 1-3
constexpr int kParts = sm90::kNumConsumerWarpgroups;   // done calls per unit: one per consumer warpgroup
// Named barriers (0 is __syncthreads): the comm warps; each consumer warpgroup.
constexpr int kBarComm = 1, kBarConsumer = 2;
using Comm = CommWarps<kCommWarps, kBarComm>;

}  // namespace mega::sm90_layout

// Recipe (defaults: ours; otherwise one of upstream's, docs/design.md "Upstream's entry points", with
// the kernel sequence's epilogue and combine code, so the same bits):
//   kTokenFmt    the buffer's token format the gather reads: 0 FP8 x float32 scale per kGranK, 1 NVFP4,
//                2 BF16 (kernels.dispatch_gather's `fmt`);
//   kL1Input     -1: our exact L1 (epilogue_swiglu, BF16 h); else the sm90::L2Input of upstream's L1
//                (epilogue_swiglu_requant: 0 'swiglu_bf16', 1 'swiglu_fp8', 2 'swiglu_nvfp4' with
//                epi_scales[e] as 1 / global scale);
//   kL2Weighted  the routing weight after L2 (epilogue_weighted, fp4xfp4) instead of in L1;
//   kUpstreamCombine  the combine's upstream steps (shared rows, routed scaling rsf, nvfp4 order).
template <sm90::WeightFormat kFmt, int kBlockT, int kNumStages, bool kFastMath, int kCTAsPerSM, int kMaxExperts,
          int kGranK, bool kTrace = false, int kTokenFmt = 0, int kL1Input = -1, bool kL2Weighted = false,
          bool kUpstreamCombine = false>
__global__ void __launch_bounds__(mega::sm90_layout::kThreads, kCTAsPerSM)
sm90_fp8_nvfp4_mega_moe(const __grid_constant__ CUtensorMap l1_map, const __grid_constant__ CUtensorMap l2_map,
                        const uint8_t* l1_codes, const uint8_t* l1_scales, const float* l1_alpha,
                        const uint8_t* l2_codes, const uint8_t* l2_scales, const float* l2_alpha,
                        const uint64_t* bases, uint64_t x_off, uint64_t x_sf_off, uint64_t topk_idx_off,
                        uint64_t topk_weights_off, uint64_t pair_row_off, uint64_t combine_off,
                        uint64_t combine_in_off, uint64_t meta_off, uint64_t flags_off,
                        __nv_bfloat16* l1_x, comm::RowSource* row_src, float* row_weight, __nv_bfloat16* l2_x,
                        __nv_bfloat16* combine, int* expert_offsets, int* meta, int* flags, int* work_ws,
                        const int64_t* topk_idx, const int* pair_row, __nv_bfloat16* y, int* stats,
                        int rank, int num_ranks, int num_tokens, int max_tokens, int topk, int num_experts,
                        int max_rows, int hidden, int inter, float clamp, int lookahead_experts,
                        int lookahead_units, int l1_token_group, int l2_token_group, int push_combine,
                        uint64_t timeout_ns,
                        comm::CommError* error, uint64_t* trace, const float* epi_scales,
                        const __nv_bfloat16* shared_rows, float rsf, int nvfp4_combine) {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900)
    using namespace mega::sm90_layout;
    using Pipe = sm90::FP4Pipeline<kFmt, kBlockT, kNumStages>;
    using Regs = sm90::RegisterSplit<kCTAsPerSM, 56>;
    using Shared = mega::Shared<kMaxExperts>;
    static_assert(kTokenFmt != 0 || kGranK % 16 == 0, "a lane's 16 token elements must share one scale");
    static_assert(kL1Input >= -1 && kL1Input <= 2, "kL1Input: -1 exact, else an sm90::L2Input");
    static_assert(kNumStages <= mega::kMaxStages, "mega::Shared::stage_unit holds 16 stages");
    static_assert(Regs::kThreads == kThreads, "the register split is for this kernel's threads");

    extern __shared__ uint8_t smem_raw[];
    __shared__ Shared sh;          // static: the compiler then addresses it with LDS/STS
    const Pipe pipe(Pipe::align(smem_raw));

    const int tid = threadIdx.x, warp = __shfl_sync(0xffffffffu, tid / 32, 0), lane = tid % 32;
    const int warpgroup = warp / 4, wg_tid = tid % 128;
    const int grid = gridDim.x;
    const comm::PeerBuffers peers{bases};
    const mega::WorkRegion ws{work_ws, num_experts, max_rows + num_experts};
    const mega::Regions off{x_off, x_sf_off, topk_idx_off, topk_weights_off, pair_row_off, combine_off,
                            combine_in_off, meta_off, flags_off};

    // ---------------- 1. barrier 0, count, row ranges (mega/barriers.cuh, mega/row_ranges.cuh) ----------------
    if (tid == 0) mega::stamp_cta<kTrace>(trace, mega::kTraceStart);
    if (tid == 0) mega::begin_call(sh, meta, num_tokens);
    if (tid == 32) {
        cutlass::arch::ClusterBarrier::init(&sh.work_built, 32);
        pipe.init();   // ends with the fence that publishes both inits
    }
    if (tid == 64) {
        cute::prefetch_tma_descriptor(&l1_map);
        cute::prefetch_tma_descriptor(&l2_map);
    }
    for (int e = tid; e < num_experts; e += kThreads) sh.count[e] = 0;
    __syncthreads();
    const int epoch0 = sh.epoch0, epoch1 = sh.epoch1;
    const mega::Call call = mega::open_call(sh, peers, off, ws, meta, error, timeout_ns, rank, num_ranks);
    const mega::Pairs pairs = mega::prologue<kThreads, kBlockT, kTrace>(
        sh, call, flags, epoch0, num_tokens, max_tokens, topk, num_experts, max_rows, expert_offsets, stats, grid, tid,
        warp, lane, trace);

    // Warp 0 builds the work order while warps 1-3 route: they need only the row ranges; the gather
    // waits for sh.work_built, the consumers for their first stage, which the producer (warp 0's
    // lane 0, after the build) tags.  Built before the routing, it held up the first rows
    // (perf-notes, v10).  Built by one thread it took 17 us at 48 experts; with 64-bit scans, ptxas
    // serialized the BLOCK_T 64 consumers' wgmmas (v14).
    // The barrier-1 target comes from the row ranges, not the order, so that no consumer reads the
    // order outside a unit (that reload cost the consumers' main loop instructions under the
    // 80-register cap).
    const int l1_row_tiles = 2 * inter / sm90::kTileRows, l2_row_tiles = hidden / sm90::kTileRows;
    const mega::Barrier1 barrier1 = mega::barrier1_of<kParts>(call, sh, l2_row_tiles, grid, epoch1);
    const mega::Units<kParts> units{call, barrier1};

    if (warpgroup == 0) {
        cutlass::arch::warpgroup_reg_dealloc<Regs::kProducer>();
        if (warp == 0) {
            // ---------------- 2a. work order (warp 0), then the TMA producer (lane 0) ----------------
            mega::build_work_order<kBlockT, kTrace>(sh, num_experts, l1_row_tiles, l2_row_tiles, lookahead_experts,
                                                    lookahead_units, l1_token_group, l2_token_group, lane, trace);
            if (lane == 0) {   // build_warp's last __syncwarp ordered every lane's part of the order
                const int num_units = sh.work.num_units();
                sm90::FP4Producer<Pipe> producer(pipe);
                for (;;) {
                    const int u = units.claim();
                    if (u >= num_units) {
                        producer.finish(sh.stage_unit, -1);
                        break;
                    }
                    mega::stamp<kTrace>(trace, mega::kTraceUnits + 4 * u);
                    const MegaUnit unit = sh.work.get(u);
                    const bool l1 = unit.phase == MegaPhase::L1;
                    if constexpr (kTrace) trace[mega::kTraceUnits + 4 * num_units + u] = 2 * blockIdx.x + (l1 ? 0 : 1);
                    const int nkb = (l1 ? hidden : inter) / sm90::kTileK;
                    const int row_tiles = l1 ? sh.work.l1_row_tiles : sh.work.l2_row_tiles;
                    const MegaWait w = sh.work.wait_for(unit);
                    // the weights of the first stages stream while the unit waits for its tokens
                    producer.load_tile_after(l1 ? &l1_map : &l2_map, l1 ? l1_codes : l2_codes, l1 ? l1_scales : l2_scales,
                                             (size_t(unit.expert) * row_tiles + unit.row_tile) * nkb, nkb, unit.row_start,
                                             [&] {
                        units.wait_inputs(unit, w);
                        mega::fence_proxy_async_global();
                        mega::stamp<kTrace>(trace, mega::kTraceUnits + 4 * u + 1);
                    }, sh.stage_unit, u);
                }
            }
            __syncwarp();
        } else {
            // ---------------- 2b. routing, row gather, combine push (mega/comm_warps.cuh) ----------------
            // uint4 loads in flight per lane under the 56 registers: the gather 4 (1 CTA per SM) or 2;
            // the push 1: with 2 or 4, ptxas scheduled the consumers' k loop differently and one rank
            // ran 1.3-1.5 % slower at BLOCK_T 32 (perf-notes, v13), although a rank alone never pushes;
            // the BLOCK_T 16 variant spills with 1 and compiles clean with 2.
            constexpr int kGatherChunks = kCTAsPerSM == 1 ? 4 : 2;
            constexpr int kPushChunks = kBlockT == 16 ? 2 : 1;
            mega::run_comm_warps<Comm, kBlockT, kGranK, kGatherChunks, kPushChunks, kParts, kTrace, kMaxExperts,
                                 kTokenFmt>(
                sh, call, pairs, barrier1, row_src, row_weight, l1_x, combine, max_rows, topk, hidden, l2_row_tiles,
                push_combine, grid, warp - 1, lane, tid == 32, trace);
        }
    } else {
        // ---------------- 2c. consumers: L1 and L2 tiles ----------------
        cutlass::arch::warpgroup_reg_alloc<Regs::kConsumer>();
        const int cw = warpgroup - 1;
        sm90::FP4Consumer<Pipe, kCTAsPerSM> consumer(pipe, cw, wg_tid);
        const int wg_warp = wg_tid / 32, g = lane / 4, q = lane % 4;
        constexpr float kComp = Pipe::Block::kCompensation;
        float acc[Pipe::MMA::kNumAccum];
        for (;;) {
            const int u = consumer.peek(sh.stage_unit);
            if (u < 0) break;
            const bool stamps = kTrace && wg_tid == 0 && cw == 0;
            if (stamps) mega::stamp<kTrace>(trace, mega::kTraceUnits + 4 * u + 2);
            const MegaUnit unit = sh.work.get(u);
            if (unit.phase == MegaPhase::L1) {
                consumer.mma_tile(acc, hidden / sm90::kTileK, wg_tid, unit.num_rows);
                const float* a = l1_alpha + unit.expert * 2;
                const int chan = unit.row_tile * (sm90::kTileRows / 2) + cw * 32 + wg_warp * 8 + g;
                if constexpr (kL1Input < 0) {
                    sm90::epilogue_swiglu<kBlockT, kFastMath>(acc, __ldg(a) * kComp, __ldg(a + 1) * kComp, row_weight,
                                                              clamp, l2_x, inter, unit.row_start, unit.num_rows, chan, q);
                } else {
                    // the quantizing epilogues' amax scratch, this warpgroup's: static shared memory (a
                    // pointer into the dynamic one went generic and spilled; run_fused budgets it)
                    float* scratch = nullptr;
                    if constexpr (kL1Input != int(sm90::L2Input::BF16)) {
                        constexpr int kScratch = sm90::kRequantScratchBytes<kBlockT> / int(sizeof(float));
                        __shared__ float requant_scratch[kParts * kScratch];
                        scratch = requant_scratch + cw * kScratch;
                    }
                    const float inv_global = kL1Input == int(sm90::L2Input::NVFP4) ? __ldg(epi_scales + unit.expert) : 1.0f;
                    sm90::epilogue_swiglu_requant<kBlockT, kFastMath, sm90::L2Input(kL1Input)>(
                        acc, __ldg(a) * kComp, __ldg(a + 1) * kComp, kL2Weighted ? nullptr : row_weight, clamp,
                        inv_global, l2_x, inter, unit.row_start, unit.num_rows, chan, q, wg_warp, lane, scratch,
                        kBarConsumer + cw);
                }
                mega::fence_proxy_async_global();   // h: the L2 units' TMA reads it
                mega::named_barrier(kBarConsumer + cw, 128);
                if (wg_tid == 0) units.l1_done(unit);
                if (stamps) mega::stamp<kTrace>(trace, mega::kTraceUnits + 4 * u + 3);
            } else {
                consumer.mma_tile(acc, inter / sm90::kTileK, wg_tid, unit.num_rows);
                const int col = unit.row_tile * sm90::kTileRows + cw * 64 + wg_warp * 16 + g;
                if constexpr (kL2Weighted)
                    sm90::epilogue_weighted<kBlockT>(acc, __ldg(l2_alpha + unit.expert) * kComp, row_weight, combine,
                                                     hidden, unit.row_start, unit.num_rows, col, q);
                else
                    sm90::epilogue_plain<kBlockT>(acc, __ldg(l2_alpha + unit.expert) * kComp, combine, hidden,
                                                  unit.row_start, unit.num_rows, col, q);
                mega::named_barrier(kBarConsumer + cw, 128);
                if (wg_tid == 0) units.l2_done(unit);
                if (stamps) mega::stamp<kTrace>(trace, mega::kTraceUnits + 4 * u + 3);
            }
        }
    }

    // ---------------- 3. combine (every warp; mega/barriers.cuh, mega/combine.cuh) ----------------
    mega::wait_barrier1(call, sh.aborted, flags, epoch1, lane);
    if (kTrace && tid == 128) mega::stamp_cta<kTrace>(trace, mega::kTraceCombine);
    mega::reduce_tokens<kThreads, kUpstreamCombine>(call, topk_idx, pair_row, y, push_combine != 0, num_tokens, topk,
                                                    num_experts, hidden, grid, warp, lane, shared_rows, rsf,
                                                    nvfp4_combine != 0);

    // ---------------- 4. the last CTA resets the counters (mega/state.cuh) ----------------
    __syncthreads();
    if (tid == 0) mega::stamp_cta<kTrace>(trace, mega::kTraceEnd);
    mega::finish_call<kThreads>(sh, call.ws, meta, tid, num_experts, grid, epoch0, epoch1);
#endif
}

}  // namespace deep_gemm
