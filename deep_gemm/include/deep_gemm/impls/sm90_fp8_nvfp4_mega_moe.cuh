#pragma once
// The fused Mega MoE layer of one rank on Hopper: dispatch, L1 (SwiGLU), L2 and combine in one
// persistent launch, NVFP4 or MXFP4 weights.  Same protocol and results as the kernel sequence of
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
#include <cstdint>
#include <cuda.h>
#include <cuda_bf16.h>
#include <cutlass/arch/reg_reconfig.h>

#include <deep_gemm/comm/routing.cuh>
#include <deep_gemm/comm/rows.cuh>
#include <deep_gemm/comm/symm.cuh>
#include <deep_gemm/common/sm90_fp4_pipeline.cuh>
#include <deep_gemm/common/warp_scan.cuh>
#include <deep_gemm/epilogue/sm90_moe_epilogue.cuh>
#include <deep_gemm/scheduler/mega_moe_work.cuh>

namespace deep_gemm {

// The buffer's `work` region (int32, zero between calls).
struct MegaWork {
    enum : int { kCounted = 0, kSignal = 1, kFinished = 2, kRouted = 3, kNextUnit = 4, kHeader = 8 };
    int* base;
    int num_experts, max_tiles;   // max_tiles = rows + experts (token tiles of any block size)
    __device__ __forceinline__ int* count() const { return base + kHeader; }
    // rows gathered, per token tile
    __device__ __forceinline__ int* arrived() const { return base + kHeader + num_experts; }
    // finished L1 units (x 2 consumer warpgroups), per token tile
    __device__ __forceinline__ int* l1_done() const { return base + kHeader + num_experts + max_tiles; }
    // finished L2 units (x 2 consumer warpgroups), per token tile: its combine rows may be pushed
    __device__ __forceinline__ int* l2_done() const { return base + kHeader + num_experts + 2 * max_tiles; }
};

namespace mega {

constexpr int kMaxRanks = 128;
constexpr int kThreads = 384;
constexpr int kCommWarps = 3;          // warps 1-3
constexpr int kPhaseInternal = 2;      // CommError.phase of a wait between CTAs of one rank

// Timeline of one launch (compile-time variant kTrace, scripts/trace_mega_moe.py): globaltimer
// stamps, per CTA b at trace[8 b ..]: start, work order built, combine start, end, barrier 0 passed,
// this CTA's pairs counted, every CTA counted, every CTA routed; per unit u [claimed, inputs ready,
// MMA start, done] at trace[kTraceUnits + 4 u ..] and 2 x CTA + (L2 ? 1 : 0) at
// trace[kTraceUnits + 4 units + u].  Stamps from one thread each: no atomics.
constexpr int kTraceMaxCTAs = 1024;
constexpr int kTraceUnits = 8 * kTraceMaxCTAs;
template <bool kTrace>
__device__ __forceinline__ void stamp(uint64_t* trace, int slot) {
    if constexpr (kTrace) trace[slot] = comm::globaltimer_ns();
}

__device__ __forceinline__ void fence_proxy_async_global() {
    asm volatile("fence.proxy.async.global;" ::: "memory");
}
// Named barriers (0 is __syncthreads): the comm warps; each consumer warpgroup.
constexpr int kBarComm = 1, kBarConsumer = 2;
__device__ __forceinline__ void named_barrier(int id, int threads) {
    asm volatile("bar.sync %0, %1;" :: "r"(id), "r"(threads) : "memory");
}

// The packed RowSource of a row (rank, token, slot, local expert): written by other CTAs during this
// launch (ordered by the caller's acquire), so a relaxed load, not the read-only path.
__device__ __forceinline__ int4 load_row_src(const comm::RowSource* row_src, int row) {
    int4 packed;
    asm volatile("ld.relaxed.gpu.global.v4.s32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(packed.x), "=r"(packed.y), "=r"(packed.z), "=r"(packed.w) : "l"(row_src + row));
    return packed;
}

// The token tile holding `row`, a row of the k-th active expert of the work order.
template <int kBlockT, class Work>
__device__ __forceinline__ int token_tile(const Work& work, int k, int row) {
    return work.tile_prefix[k] + (row - work.row_prefix[k]) / kBlockT;
}

template <int kMaxExperts>
struct Shared {
    alignas(8) uint64_t work_built;   // mbarrier, 32 arrivals: warp 0 has built `work`
    MegaMoEWork<kMaxExperts> work;
    int count[kMaxExperts];       // pairs of this CTA per local expert, then the routing cursor
    int first[kMaxExperts];       // this CTA's first row of each expert
    int rows[kMaxExperts];        // rows per expert (clamped to the buffer)
    int src_begin[kMaxRanks + 1]; // first flat pair of each source rank
    int stage_unit[16];           // unit that each pipeline stage starts (-1: no more)
    int epoch0, epoch1, aborted, last, token_tiles;
};

}  // namespace mega

template <sm90::WeightFormat kFmt, int kBlockT, int kNumStages, bool kFastMath, int kCTAsPerSM, int kMaxExperts,
          int kGranK, bool kTrace = false>
__global__ void __launch_bounds__(mega::kThreads, kCTAsPerSM)
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
                        comm::CommError* error, uint64_t* trace) {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900)
    using Pipe = sm90::FP4Pipeline<kFmt, kBlockT, kNumStages>;
    using Regs = sm90::RegisterSplit<kCTAsPerSM, 56>;
    using Shared = mega::Shared<kMaxExperts>;
    static_assert(kGranK % 16 == 0, "a lane's 16 token elements must share one scale");
    static_assert(kNumStages <= 16, "mega::Shared::stage_unit holds 16 stages");

    extern __shared__ uint8_t smem_raw[];
    __shared__ Shared sh;          // static: the compiler then addresses it with LDS/STS
    const Pipe pipe(Pipe::align(smem_raw));

    const int tid = threadIdx.x, warp = __shfl_sync(0xffffffffu, tid / 32, 0), lane = tid % 32;
    const int warpgroup = warp / 4, wg_tid = tid % 128;
    const int grid = gridDim.x;
    const comm::PeerBuffers peers{bases};
    const MegaWork ws{work_ws, num_experts, max_rows + num_experts};

    // ---------------- 1. barrier 0, count, row ranges ----------------
    if (tid == 0) mega::stamp<kTrace>(trace, 8 * blockIdx.x);
    if (tid == 0) {
        sh.epoch0 = meta[comm::kMetaEpoch] + 1;
        sh.epoch1 = meta[comm::kMetaEpoch + 1] + 1;
        sh.aborted = meta[comm::kMetaAbort];
        sh.last = 0;
        if (blockIdx.x == 0) meta[comm::kMetaNumTokens] = num_tokens;
    }
    if (tid == 32) {
        cutlass::arch::ClusterBarrier::init(&sh.work_built, 32);
        pipe.init();   // ends with the fence that publishes both inits
    }
    if (tid == 64) {
        cute::prefetch_tma_descriptor(&l1_map);
        cute::prefetch_tma_descriptor(&l2_map);
    }
    for (int e = tid; e < num_experts; e += mega::kThreads) sh.count[e] = 0;
    __syncthreads();
    const int epoch0 = sh.epoch0, epoch1 = sh.epoch1;
    const comm::Waiter waiter{meta, error, comm::globaltimer_ns(), timeout_ns, rank, epoch0};
    // Alone, this rank's inputs are earlier work on its stream, finished before the launch: no
    // barrier 0 (its fence and flag round trip were 2.7 us of every CTA's prologue).
    if (blockIdx.x == 0 && num_ranks > 1) {
        // my inputs (earlier stream work) and token count, then the signal
        __threadfence_system();
        for (int r = tid; r < num_ranks; r += mega::kThreads)
            comm::st_release_sys(peers.at<int>(r, flags_off) + rank, epoch0);
    }
    if (sh.aborted == 0 && num_ranks > 1) {
        for (int r = tid; r < num_ranks; r += mega::kThreads)
            waiter.until<true>(flags + r, epoch0, 0, r);
    }
    __syncthreads();   // every peer's arrival (acquired by thread r) before anyone reads its inputs
    if (tid == 0) mega::stamp<kTrace>(trace, 8 * blockIdx.x + 4);
    if (tid == 0) {
        sh.src_begin[0] = 0;
        for (int s = 0; s < num_ranks; ++s)
            sh.src_begin[s + 1] = sh.src_begin[s] + comm::source_pairs(peers, meta_off, s, rank, num_tokens, max_tokens, topk);
    }
    __syncthreads();

    const int num_pairs = sh.src_begin[num_ranks];
    const int per_cta = (num_pairs + grid - 1) / grid;
    const int pair0 = min(num_pairs, int(blockIdx.x) * per_cta), pair1 = min(num_pairs, pair0 + per_cta);
    const int64_t expert_begin = int64_t(rank) * num_experts;
    auto expert_of = [&](int g, int& s, int& p) {
        comm::locate_pair(sh.src_begin, g, s, p);
        return comm::local_expert(peers, topk_idx_off, s, p, expert_begin, num_experts);
    };
    // Count (all threads; whole warps step together so that lanes of one expert merge into one
    // shared atomic).
    for (int base = pair0; base < pair1; base += mega::kThreads) {
        const int g = base + tid;
        int s = 0, p = 0, e = -1;
        if (g < pair1) e = expert_of(g, s, p);
        comm::warp_aggregated_add(sh.count, e, lane);
    }
    __syncthreads();
    for (int e = tid; e < num_experts; e += mega::kThreads) {
        const int n = sh.count[e];
        sh.first[e] = n > 0 ? atomicAdd(ws.count() + e, n) : 0;
        sh.count[e] = 0;   // becomes the routing cursor
    }
    __syncthreads();
    if (warp == 0) {
        if (lane == 0) {
            mega::stamp<kTrace>(trace, 8 * blockIdx.x + 5);
            __threadfence();
            atomicAdd(ws.base + MegaWork::kCounted, 1);
            waiter.until<false>(ws.base + MegaWork::kCounted, grid, mega::kPhaseInternal, rank);
            mega::stamp<kTrace>(trace, 8 * blockIdx.x + 6);
        }
        __syncwarp();
        // counts -> row ranges (clamped to the buffer's rows), one warp: the routing waits for this
        for (int e = lane; e < num_experts; e += 32) sh.rows[e] = comm::ld_volatile(ws.count() + e);
        __syncwarp();
        int tiles = 0;
        const int total = warp_exclusive_scan_visit(num_experts, lane, [&](int e) { return sh.rows[e]; },
                                                    [&](int e, int prefix, int n) {
            const int lo = min(prefix, max_rows), hi = min(prefix + n, max_rows);
            sh.first[e] += prefix;     // global first row of this CTA's pairs of e
            sh.rows[e] = hi - lo;
            tiles += (hi - lo + kBlockT - 1) / kBlockT;
            if (blockIdx.x == 0) {
                expert_offsets[e] = lo;
                if (stats != nullptr) stats[e] += n;
            }
        });
        if (blockIdx.x == 0 && lane == 31) expert_offsets[num_experts] = min(total, max_rows);
        tiles = __reduce_add_sync(0xffffffffu, tiles);   // = the work order's num_token_tiles()
        if (lane == 0) sh.token_tiles = tiles;
    }
    __syncthreads();

    // Warp 0 builds the work order while warps 1-3 route: they need only the row ranges; the gather
    // waits for sh.work_built, the consumers for their first stage, which the producer (warp 0's
    // lane 0, after the build) tags.  Built before the routing, it held up the first rows
    // (perf-notes, v10).  Built by one thread it took 17 us at 48 experts; with 64-bit scans, ptxas
    // serialized the BLOCK_T 64 consumers' wgmmas (v14).
    // The barrier-1 target comes from the row ranges, not the order, so that no consumer reads the
    // order outside a unit (that reload cost the consumers' main loop instructions under the
    // 80-register cap).  Target: each consumer warpgroup per L2 unit + each CTA's routing.
    const int l1_row_tiles = 2 * inter / sm90::kTileRows, l2_row_tiles = hidden / sm90::kTileRows;
    const int signal_target = 2 * sh.token_tiles * l2_row_tiles + grid;
    auto signal = [&](int n) {
        // The caller's writes are ordered before (fence by the caller); the last contribution tells
        // every peer that this rank's pair_row entries and combine rows are complete.
        const int old = atomicAdd(ws.base + MegaWork::kSignal, n);
        if (old + n == signal_target) {
            __threadfence_system();
            for (int r = 0; r < num_ranks; ++r)
                comm::st_release_sys(peers.at<int>(r, flags_off) + num_ranks + rank, epoch1);
        }
    };

    if (warpgroup == 0) {
        cutlass::arch::warpgroup_reg_dealloc<Regs::kProducer>();
        if (warp == 0) {
            // ---------------- 2a. work order (warp 0), then the TMA producer (lane 0) ----------------
            sh.work.build_warp(sh.rows, num_experts, kBlockT, l1_row_tiles, l2_row_tiles, lookahead_experts,
                               lookahead_units, l1_token_group, l2_token_group, lane);
            if (lane == 0) mega::stamp<kTrace>(trace, 8 * blockIdx.x + 1);
            cutlass::arch::ClusterBarrier::arrive(&sh.work_built);   // every lane: each releases its own writes
            if (lane == 0) {   // build_warp's last __syncwarp ordered every lane's part of the order
                const int num_units = sh.work.num_units();
                sm90::FP4Producer<Pipe> producer(pipe);
                // Units are claimed from one counter in work order (the progress argument of
                // scheduler/mega_moe_work.cuh holds for any claiming CTA), so the L1 (56 k blocks
                // at 7168) and L2 (24) units balance over the CTAs as they finish.
                for (;;) {
                    const int u = atomicAdd(ws.base + MegaWork::kNextUnit, 1);
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
                    producer.load_tile_after(l1 ? &l1_map : &l2_map, l1 ? l1_codes : l2_codes, l1 ? l1_scales : l2_scales,
                                             (size_t(unit.expert) * row_tiles + unit.row_tile) * nkb, nkb, unit.row_start,
                                             [&] {
                        if (l1)
                            waiter.until<false>(ws.arrived() + unit.tile_index, unit.num_rows, mega::kPhaseInternal, rank);
                        else
                            waiter.until<false>(ws.l1_done() + w.counter, 2 * w.target, mega::kPhaseInternal, rank);
                        mega::fence_proxy_async_global();
                        mega::stamp<kTrace>(trace, mega::kTraceUnits + 4 * u + 1);
                    }, sh.stage_unit, u);
                }
            }
            __syncwarp();
        } else {
            // ---------------- 2b. routing and row gather ----------------
            const int cw = warp - 1;
            const int len = (pair1 - pair0 + mega::kCommWarps - 1) / mega::kCommWarps;
            const int w0 = min(pair1, pair0 + cw * len), w1 = min(pair1, w0 + len);
            for (int base = w0; base < w1; base += 32) {
                const int g = base + lane;
                int s = 0, p = 0, e = -1, row = -1;
                if (g < w1) e = expert_of(g, s, p);
                const int slot = comm::warp_aggregated_add(sh.count, e, lane);
                if (e >= 0) {
                    row = sh.first[e] + slot;
                    if (row >= max_rows) row = -1;
                    if (row >= 0) {
                        row_src[row] = comm::RowSource{s, p / topk, p % topk, e};
                        row_weight[row] = peers.at<const float>(s, topk_weights_off)[p];
                    }
                    peers.at<int>(s, pair_row_off)[p] = row;
                }
            }
            mega::named_barrier(mega::kBarComm, 32 * mega::kCommWarps);
            if (tid == 32) {
                // row_src / row_weight for the gather of every CTA of this GPU; the system-scope
                // fence that the pair_row stores at the sources need comes after the gather, before
                // this CTA's barrier-1 contribution (which waits for every L2 unit anyway): on the
                // critical path it held up the first rows
                __threadfence();
                atomicAdd(ws.base + MegaWork::kRouted, 1);
                waiter.until<false>(ws.base + MegaWork::kRouted, grid, mega::kPhaseInternal, rank);
                mega::stamp<kTrace>(trace, 8 * blockIdx.x + 7);
            }
            mega::named_barrier(mega::kBarComm, 32 * mega::kCommWarps);   // every CTA routed
            cutlass::arch::ClusterBarrier::wait(&sh.work_built, 0);
            // Gather in row order over all comm warps of the rank: the rows of the first experts (and
            // token tiles) arrive first, so their L1 units start while later rows are in flight.
            const auto& work = sh.work;
            const int num_rows_total = work.row_prefix[work.num_active];
            constexpr int kChunks = kCTAsPerSM == 1 ? 4 : 2;   // uint4 loads in flight per lane (56 registers)
            int k = 0;
            for (int row = blockIdx.x * mega::kCommWarps + cw; row < num_rows_total; row += grid * mega::kCommWarps) {
                while (row >= work.row_prefix[k + 1]) ++k;
                const int4 packed = mega::load_row_src(row_src, row);   // ordered by the routed counter
                const comm::RowSource src{packed.x, packed.y, packed.z, packed.w};
                const uint4* x = peers.at<const uint4>(src.rank, x_off + uint64_t(src.token) * hidden);
                const float* sf = peers.at<const float>(src.rank, x_sf_off + uint64_t(src.token) * (hidden / kGranK) * 4);
                uint4* dst = reinterpret_cast<uint4*>(l1_x + size_t(row) * hidden);
                comm::gather_fp8_row<kGranK, 32, kChunks>(x, sf, dst, hidden / 16, lane);
                mega::fence_proxy_async_global();
                __syncwarp();
                if (lane == 0) {
                    __threadfence();
                    atomicAdd(ws.arrived() + mega::token_tile<kBlockT>(work, k, row), 1);
                }
            }
            // Push the combine rows of other ranks' pairs to their sources' `combine_in` as each token
            // tile's L2 units finish, while later units run: pulled after barrier 1 instead, all of
            // the combine's NVLink traffic came after the last unit.  Whole rows (H x 2 bytes), in row
            // order over all comm warps like the gather; rows of this rank's own pairs stay in place.
            // One uint4 in flight per lane (the rows were just written, so mostly L2 hits): with 2 or 4,
            // ptxas scheduled the consumers' k loop differently and one rank ran 1.3-1.5 % slower at
            // BLOCK_T 32 (perf-notes, v13), although a rank alone never pushes; the BLOCK_T 16 variant
            // spills with 1 and compiles clean with 2.
            constexpr int kPushChunks = kBlockT == 16 ? 2 : 1;
            if (push_combine) {
                const int l2_target = 2 * l2_row_tiles;
                int waited = -1;
                k = 0;
                for (int row = blockIdx.x * mega::kCommWarps + cw; row < num_rows_total; row += grid * mega::kCommWarps) {
                    while (row >= work.row_prefix[k + 1]) ++k;
                    const int4 packed = mega::load_row_src(row_src, row);
                    if (packed.x == rank) continue;
                    const int tile = mega::token_tile<kBlockT>(work, k, row);
                    if (tile != waited) {
                        if (!waiter.until<false>(ws.l2_done() + tile, l2_target, mega::kPhaseInternal, rank)) break;
                        waited = tile;
                    }
                    comm::copy_row<32, kPushChunks>(reinterpret_cast<const uint4*>(combine + size_t(row) * hidden),
                                          peers.at<uint4>(packed.x, combine_in_off + (uint64_t(packed.y) * topk + packed.z) * hidden * 2),
                                          hidden / 8, lane);
                }
            }
            mega::named_barrier(mega::kBarComm, 32 * mega::kCommWarps);
            if (tid == 32) {
                __threadfence_system();   // this CTA's pair_row stores and pushed rows at the sources
                signal(1);
            }
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
                sm90::epilogue_swiglu<kBlockT, kFastMath>(acc, __ldg(a) * kComp, __ldg(a + 1) * kComp, row_weight, clamp,
                                                          l2_x, inter, unit.row_start, unit.num_rows,
                                                          unit.row_tile * (sm90::kTileRows / 2) + cw * 32 + wg_warp * 8 + g, q);
                mega::fence_proxy_async_global();
                mega::named_barrier(mega::kBarConsumer + cw, 128);
                if (wg_tid == 0) {
                    __threadfence();
                    atomicAdd(ws.l1_done() + unit.tile_index, 1);
                }
                if (stamps) mega::stamp<kTrace>(trace, mega::kTraceUnits + 4 * u + 3);
            } else {
                consumer.mma_tile(acc, inter / sm90::kTileK, wg_tid, unit.num_rows);
                sm90::epilogue_plain<kBlockT>(acc, __ldg(l2_alpha + unit.expert) * kComp, combine, hidden,
                                              unit.row_start, unit.num_rows,
                                              unit.row_tile * sm90::kTileRows + cw * 64 + wg_warp * 16 + g, q);
                mega::named_barrier(mega::kBarConsumer + cw, 128);
                if (wg_tid == 0) {
                    __threadfence_system();
                    atomicAdd(ws.l2_done() + unit.tile_index, 1);
                    signal(1);
                }
                if (stamps) mega::stamp<kTrace>(trace, mega::kTraceUnits + 4 * u + 3);
            }
        }
    }

    // ---------------- 3. combine (every warp) ----------------
    {
        for (int r = lane; r < num_ranks; r += 32)
            if (sh.aborted == 0)
                waiter.until<true>(flags + num_ranks + r, epoch1, 1, r);
        __syncwarp();
        if (kTrace && tid == 128) mega::stamp<kTrace>(trace, 8 * blockIdx.x + 2);
        const bool aborted = waiter.aborted();
        const int num_v = hidden / 8;                  // uint4 of BF16 per row
        const int chunks = (num_v + 31) / 32;
        const int num_warps = grid * (mega::kThreads / 32);
        for (int item = blockIdx.x * (mega::kThreads / 32) + warp; item < num_tokens * chunks; item += num_warps) {
            const int t = item / chunks, v = (item % chunks) * 32 + lane;
            if (v >= num_v) continue;
            float accum[8] = {};
            for (int j = 0; j < topk; ++j) {
                // pair_row: written by the owners during this launch, so not through the read-only path
                const size_t pair = size_t(t) * topk + j;
                const uint4* src = comm::combine_source_row(peers, combine_off, combine_in_off, push_combine != 0,
                                                            __ldg(topk_idx + pair), pair_row[pair], pair, rank,
                                                            num_experts, num_ranks, hidden);
                if (src != nullptr) comm::add_bf16x8(accum, src[v]);
            }
            reinterpret_cast<uint4*>(y + size_t(t) * hidden)[v] = comm::pack_bf16x8(accum, aborted);
        }
    }

    // ---------------- 4. the last CTA resets the counters ----------------
    __syncthreads();
    if (tid == 0) mega::stamp<kTrace>(trace, 8 * blockIdx.x + 3);
    if (tid == 0) {
        __threadfence();
        sh.last = atomicAdd(ws.base + MegaWork::kFinished, 1) == grid - 1;
    }
    __syncthreads();
    if (sh.last) {
        __threadfence();
        const int n = MegaWork::kHeader + num_experts, tiles = sh.work.num_token_tiles();
        for (int i = tid; i < n; i += mega::kThreads) ws.base[i] = 0;
        for (int i = tid; i < tiles; i += mega::kThreads) ws.arrived()[i] = 0, ws.l1_done()[i] = 0, ws.l2_done()[i] = 0;
        if (tid == 0) {
            meta[comm::kMetaEpoch] = epoch0;
            meta[comm::kMetaEpoch + 1] = epoch1;
        }
    }
#endif
}

}  // namespace deep_gemm
