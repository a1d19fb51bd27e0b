#pragma once
// The fused Mega MoE layer of one rank on Blackwell (sm_100a / sm_103a): dispatch, L1 (SwiGLU), L2 and
// combine in one persistent launch, for upstream's two block-scaled recipes:
//   Recipe::NVFP4     fp4_fp4_mega_moe: NVFP4 tokens x NVFP4 weights (tcgen05 kind::mxf4nvf4.block16);
//                     L1 unweighted, its output quantized to NVFP4 (UE4M3 per 16, the expert's global
//                     scale 1 / l2_inv_global[e]); L2 alpha (l2 alpha x a2), then the top-k weight
//                     (bf16(f32(bf16(acc x alpha)) x w)).
//   Recipe::MXFP4_FP8 fp8_fp4_mega_moe: FP8 E4M3 tokens (UE8M0 per 32) x MXFP4 weights (kind::mxf8f6f4
//                     .block32); L1 weighted, its output quantized to FP8 E4M3 with a power-of-two
//                     scale per 32; L2 alpha.
// and the two kind::f16 recipes (scheduler/sm100_gemm_plan.cuh "THE kind::f16 RECIPES"):
//   Recipe::NVFP4_EXACT fp8_nvfp4_mega_moe: FP8 tokens (any float32 scale per 32) gathered as BF16 (exact, as
//                     on Hopper: mega::Fp8ToBf16Row) x NVFP4 weights dequantized exactly to BF16 into TMEM
//                     by a dequant warpgroup (warps 8-11; the TS form); L1 weighted, its output the BF16
//                     h = bf16(swiglu(acc_g x a_g, acc_u x a_u, clamp) x w) (docs/design.md, reference.py);
//                     L2 plain, alpha a2; the dequant's 2^-7 back in every alpha (fp4::kNvfp4Compensation).
//   Recipe::BF16      bf16_mega_moe: BF16 tokens copied verbatim x BF16 weights (SS form); L1 weighted, its
//                     output bf16(f32(swiglu(bf16(acc_g a_g), bf16(acc_u a_u), bf16(clamp))) x w) (sm90
//                     SwiGLUBF16's roundings); L2 plain.
// The f16 recipes' token rows are BF16 at the shared roles' unpadded rows (no scale atoms to align).
// The protocol is the sm90 kernel's (impls/sm90_fp8_nvfp4_mega_moe.cuh, whose header says it step by
// step), through the same shared roles of include/deep_gemm/mega/ (called, not repeated here):
// barrier 0 and the row ranges (mega::prologue), routing, gather and combine pushes
// (mega::run_comm_warps_with), the work order (mega::build_work_order), the units' claim / input
// waits / done counts (mega::Units, kParts = 1), barrier 1, the reduction and the reset.
//
// What is Blackwell's here:
//   * the MMA core: scheduler/sm100_gemm_plan.cuh's per-tile steps (produce_tile, mma_tile,
//     epilogue_tile) over common/sm100_tcgen05.cuh's DeviceOps, two plans (L1: n = 2 inter,
//     k = hidden; L2: n = hidden, k = inter) sharing one stage ring, TMEM accumulator pair and
//     barriers; units reach the MMA warp through a tag on their first stage (the producer writes
//     sh.stage_unit[stage] before the stage's arrive_expect_tx) and the epilogue through tile_unit[b]
//     + unit_ready[b] (the MMA warp, once accumulator buffer b is free);
//   * the token rows in the MMA's format, padded per token tile: the L1 and L2 inputs of token
//     tile i (work-order numbering, GroupedTiles') are rows [i kBlockT, i kBlockT + kBlockT) of the
//     kernel's token tensors, so that every tile starts at a multiple of kBlockT (its scales lie in
//     one 128-row atom group, as the plan requires); routing weights and combine rows keep the
//     unpadded row numbering of the shared roles.  The gather copies the source's codes verbatim and
//     scatters its scales into the 512-byte atom layout (RawTokenRow below);
//   * the TMEM epilogues of epilogue/sm100_epilogue.cuh (the grouped GEMM's, host-callable, checked on
//     the CPU by tests/cpp/sm100_epilogue_check.cpp): L1 swiglu_quant_chunk + quantize_l2_input
//     (epilogue/moe_l2_input.cuh), L2 plain_rows_chunk (with the top-k weight for NVFP4) into `combine`.
// Warp layout (384 threads, 1 CTA per SM): warp 0 builds the work order, then its lane 0 is the
// producer; warp 1 allocates TMEM and issues the MMAs; warps 4-7 the epilogue (warp w reads TMEM
// lanes 32 (w % 4) ..); warps 2, 3, 8-11 the comm warps (NVFP4_EXACT: warps 2, 3; warps 8-11 are its
// dequant warpgroup, warp w writing TMEM lanes 32 (w % 4) ..); every warp then joins the combine.
//
// Not run on a GPU (none with CC 10.x here): compiled for sm_100a and sm_103a, SASS checked
// (tests/test_sm100_fused_build.py).  docs/sm100.md, "The fused kernel", says what is verified.
#include <cstdint>
#include <cuda.h>
#include <cuda_bf16.h>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>

#include <deep_gemm/comm/symm.cuh>
#include <deep_gemm/common/sm100_dequant.cuh>
#include <deep_gemm/common/sm100_tcgen05.cuh>
#include <deep_gemm/epilogue/sm100_epilogue.cuh>
#include <deep_gemm/mega/barriers.cuh>
#include <deep_gemm/mega/combine.cuh>
#include <deep_gemm/mega/comm_warps.cuh>
#include <deep_gemm/mega/dispatch.cuh>
#include <deep_gemm/mega/row_ranges.cuh>
#include <deep_gemm/mega/state.cuh>
#include <deep_gemm/mega/units.cuh>
#include <deep_gemm/scheduler/mega_moe_work.cuh>
#include <deep_gemm/scheduler/sm100_gemm_plan.cuh>
#include <deep_gemm/scheduler/sm100_mega_tiles.cuh>

namespace deep_gemm {

namespace mega::sm100_layout {

constexpr int kThreads = 384;
// comm warps: 2, 3, 8-11; with a dequant warpgroup (NVFP4_EXACT, warps 8-11) 2, 3
template <bool kDequant>
constexpr int kCommWarps = kDequant ? 2 : 6;
constexpr int kParts = 1;              // one done call per unit: the epilogue's thread 0, after its barrier
constexpr int kBarComm = 2, kBarEpilogue = 3;   // named barriers (0 is __syncthreads)
constexpr int kEpilogueWarp0 = 4;
template <bool kDequant>
using Comm = CommWarps<kCommWarps<kDequant>, kBarComm>;
// NVFP4_EXACT's register split (setmaxnreg): the dequant warpgroup, the other two
constexpr int kDequantRegs = 200, kOtherRegs = 152;

__device__ __forceinline__ int comm_warp_index(int warp) { return warp < kEpilogueWarp0 ? warp - 2 : warp - 6; }

// The hand-over of units from the MMA warp to the epilogue, per accumulator buffer b.
struct Handover {
    alignas(8) uint64_t unit_ready[2];   // mbarriers, 1 arrival (the MMA warp) per use of buffer b
    int tile_unit[2];                    // unit in buffer b (-1: no more)
};

// One row of the L1 input in the MMA's token format (a copy_row of mega::gather_rows_with; the whole
// warp): the source's codes verbatim (row_bytes: hidden (FP8) or hidden / 2 (NVFP4)) and its
// scales (one byte per kGran channels: the buffer's packed UE4M3 / UE8M0 words) into the 512-byte
// atom layout, at the padded row of the token tile (tile_index x kBlockT + row within the tile).
// (The kind::f16 recipes' BF16 rows are the shared roles' mega::Fp8ToBf16Row / mega::Bf16Row.)
template <int kBlockT, int kGran, class Work>
struct RawTokenRow {
    const Call& call;
    const Work& work;
    uint8_t* codes;
    uint8_t* sf;
    int hidden, lane;
    __device__ __forceinline__ void operator()(const comm::RowSource& src, int row, int k) const {
        constexpr int kCodeBytesPer16 = kGran == 16 ? 8 : 16;   // bytes of 16 channels: E2M1 / E4M3
        const int row_bytes = hidden / 16 * kCodeBytesPer16;
        const int prow = sm100::mega_padded_row<kBlockT>(work, k, row);
        const uint4* x = call.peers.at<const uint4>(src.rank, call.off.x + uint64_t(src.token) * row_bytes);
        uint4* dst = reinterpret_cast<uint4*>(codes + size_t(prow) * row_bytes);
        for (int v = lane; v < row_bytes / 16; v += 32) dst[v] = x[v];
        const int blocks = hidden / kGran;
        const uint8_t* s = call.peers.at<const uint8_t>(src.rank, call.off.x_sf + uint64_t(src.token) * blocks);
        for (int b = lane; b < blocks; b += 32) sf[sm100::sf_global_offset(uint64_t(prow), uint64_t(b), uint64_t(blocks))] = s[b];
    }
};

}  // namespace mega::sm100_layout

template <sm100::Recipe kRecipe, int kBlockT, int kNumStages, bool kFastMath, int kMaxExperts>
__global__ void __launch_bounds__(mega::sm100_layout::kThreads, 1)
sm100_fp8_nvfp4_mega_moe(const __grid_constant__ CUtensorMap l1_w_map, const __grid_constant__ CUtensorMap l1_x_map,
                         const __grid_constant__ CUtensorMap l2_w_map, const __grid_constant__ CUtensorMap l2_x_map,
                         const uint8_t* l1_scales, const float* l1_alpha, const uint8_t* l2_scales,
                         const float* l2_alpha, const float* l2_inv_global,
                         const uint64_t* bases, uint64_t x_off, uint64_t x_sf_off, uint64_t topk_idx_off,
                         uint64_t topk_weights_off, uint64_t pair_row_off, uint64_t combine_off,
                         uint64_t combine_in_off, uint64_t meta_off, uint64_t flags_off,
                         uint8_t* l1_x, uint8_t* l1_x_sf, comm::RowSource* row_src, float* row_weight,
                         uint8_t* l2_x, uint8_t* l2_x_sf, __nv_bfloat16* combine, int* expert_offsets, int* meta,
                         int* flags, int* work_ws, const int64_t* topk_idx, const int* pair_row, __nv_bfloat16* y,
                         int* stats, int rank, int num_ranks, int num_tokens, int max_tokens, int topk,
                         int num_experts, int max_rows, int hidden, int inter, float clamp, int lookahead_experts,
                         int lookahead_units, int l1_token_group, int l2_token_group, int push_combine,
                         uint64_t timeout_ns, comm::CommError* error) {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 1000)
    using namespace mega::sm100_layout;
    using Plan = sm100::GemmPlan<kRecipe, kBlockT, kNumStages>;
    using Ops = sm100::DeviceOps<kBlockT>;
    using Cursor = typename Plan::Cursor;
    using Shared = mega::Shared<kMaxExperts>;
    constexpr bool kNvfp4 = kRecipe == sm100::Recipe::NVFP4;
    constexpr bool kF16 = !Plan::kBlockScaledMma;      // NVFP4_EXACT, BF16: BF16 token rows, unpadded
    constexpr bool kDequant = Plan::kATmem;            // NVFP4_EXACT: the dequant warpgroup, warps 8-11
    constexpr int kGran = sm100::RecipeTraits<kRecipe>::kGran;
    // the exact recipe's A is code x scale x 2^-7: every FP32 alpha takes the 2^7 back
    constexpr float kComp = kDequant ? fp4::kNvfp4Compensation : 1.0f;
    using CommW = Comm<kDequant>;
    static_assert(kNumStages <= mega::kMaxStages, "mega::Shared::stage_unit holds 16 stages");

    extern __shared__ __align__(16) uint8_t smem_raw[];   // aligned to 1024 below (1024 B of slack)
    __shared__ Shared sh;          // static: the compiler then addresses it with LDS/STS
    __shared__ Handover ho;
    uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
    float* epi_scratch = reinterpret_cast<float*>(smem + Plan::kSmemBytes);   // float [64][kBlockT]
    uint32_t* tmem_slot = reinterpret_cast<uint32_t*>(smem + Plan::kTmemSlotOff);
    const uint32_t smem_base = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
    uint64_t* bars = reinterpret_cast<uint64_t*>(smem + Plan::kBarOff);
    const Ops ops1{smem, smem_base, bars, &l1_w_map, &l1_x_map, l1_scales, l1_x_sf};
    const Ops ops2{smem, smem_base, bars, &l2_w_map, &l2_x_map, l2_scales, l2_x_sf};

    const int tid = threadIdx.x, warp = __shfl_sync(0xffffffffu, tid / 32, 0), lane = tid % 32;
    const int grid = gridDim.x;
    const comm::PeerBuffers peers{bases};
    const mega::WorkRegion ws{work_ws, num_experts, max_rows + num_experts};
    const mega::Regions off{x_off, x_sf_off, topk_idx_off, topk_weights_off, pair_row_off, combine_off,
                            combine_in_off, meta_off, flags_off};

    // ---------------- 1. set-up, barrier 0, count, row ranges (mega/row_ranges.cuh) ----------------
    if (tid == 0) mega::begin_call(sh, meta, num_tokens);
    if (warp == 1) {
        sm100::tmem_alloc(tmem_slot, int(Plan::Tmem::kAlloc));
        sm100::tmem_relinquish();
    }
    if (tid == 64) {
        cutlass::arch::ClusterBarrier::init(&sh.work_built, 32);
        Plan{0, 0, smem_base, 0u}.init_barriers(ops1);
        for (int b = 0; b < 2; ++b) cutlass::arch::ClusterBarrier::init(&ho.unit_ready[b], 1);
        cutlass::arch::fence_barrier_init();
    }
    if (tid == 96) {
        cute::prefetch_tma_descriptor(&l1_w_map);
        cute::prefetch_tma_descriptor(&l1_x_map);
        cute::prefetch_tma_descriptor(&l2_w_map);
        cute::prefetch_tma_descriptor(&l2_x_map);
    }
    for (int e = tid; e < num_experts; e += kThreads) sh.count[e] = 0;
    sm100::tcgen05_fence_before_thread_sync();
    __syncthreads();
    sm100::tcgen05_fence_after_thread_sync();
    const uint32_t tmem_base = *tmem_slot;
    const int l1_row_tiles = 2 * inter / Plan::kBlockM, l2_row_tiles = hidden / Plan::kBlockM;
    const int epoch0 = sh.epoch0, epoch1 = sh.epoch1;
    const mega::Call call = mega::open_call(sh, peers, off, ws, meta, error, timeout_ns, rank, num_ranks);
    const mega::Pairs pairs = mega::prologue<kThreads, kBlockT, false>(
        sh, call, flags, epoch0, num_tokens, max_tokens, topk, num_experts, max_rows, expert_offsets, stats, grid, tid,
        warp, lane, nullptr);
    const mega::Barrier1 barrier1 = mega::barrier1_of<kParts>(call, sh, l2_row_tiles, grid, epoch1);
    const mega::Units<kParts> units{call, barrier1};
    const Plan l1p{2 * inter, hidden, smem_base, tmem_base};
    const Plan l2p{hidden, inter, smem_base, tmem_base};
    // the plan's tile of a unit: its token rows at the token tile's padded rows (f16 recipes: its own rows)
    const auto plan_tile = [](const MegaUnit& unit) { return sm100::mega_plan_tile<kBlockT, !kF16>(unit); };

    if constexpr (kDequant) {
        // the dequant loop alone holds ~166 registers (the grouped GEMM's 384-thread cap is 168); here the
        // kernel's state live across the roles comes on top, so its warpgroup takes registers from the
        // other two (setmaxnreg inside the CTA's pool of 384 x 168; every role but the dequant fits in 96)
        static_assert(2 * 128 * kOtherRegs + 128 * kDequantRegs <= kThreads * 168, "register split exceeds the pool");
        if (warp >= kEpilogueWarp0 + 4) cutlass::arch::warpgroup_reg_alloc<kDequantRegs>();
        else cutlass::arch::warpgroup_reg_dealloc<kOtherRegs>();
    }
    if (warp == 0) {
        // ---------------- 2a. work order (warp 0), then the producer (lane 0) ----------------
        mega::build_work_order<kBlockT, false>(sh, num_experts, l1_row_tiles, l2_row_tiles, lookahead_experts,
                                               lookahead_units, l1_token_group, l2_token_group, lane, nullptr);
        if (lane == 0)   // build_warp's last __syncwarp ordered every lane's part of the order
            sm100::mega_produce_units(
                l1p, l2p, ops1, ops2, sh.work, plan_tile, [&] { return units.claim(); },
                [&](int stage, int u) { sh.stage_unit[stage] = u; },
                [&](const MegaUnit& unit, const MegaWait& w, int) {   // rows gathered / L1 units done
                    units.wait_inputs(unit, w);
                    mega::fence_proxy_async_global();
                });
        __syncwarp();
    } else if (warp == 1) {
        // ---------------- 2b. MMA warp: units from the stage tags, to the epilogue per accumulator buffer ----------------
        sm100::mega_mma_units(l1p, l2p, ops1, ops2, sh.work, plan_tile, [&](int stage) { return sh.stage_unit[stage]; },
                              [&](int buf, int u) {
                                  if (lane == 0) {
                                      ho.tile_unit[buf] = u;
                                      cutlass::arch::ClusterBarrier::arrive(&ho.unit_ready[buf]);
                                  }
                                  __syncwarp();
                              });
    } else if (kDequant && warp >= kEpilogueWarp0 + 4) {
        // ---------------- 2b'. dequant warpgroup (NVFP4_EXACT): units from the stage tags, as the MMA warp ----------------
        if constexpr (kDequant)
            sm100::mega_dequant_units(l1p, l2p, ops1, sh.work, [&](int stage) { return sh.stage_unit[stage]; }, warp, lane);
    } else if (warp >= kEpilogueWarp0 && warp < kEpilogueWarp0 + 4) {
        // ---------------- 2c. epilogue: L1 -> the L2 input, L2 -> the combine rows ----------------
        const int etid = tid - 32 * kEpilogueWarp0;
        const float cb = sm100::epi::clamp_bf16(clamp);
        uint16_t* combine_bits = reinterpret_cast<uint16_t*>(combine);
        Cursor cur;
        for (;;) {
            cutlass::arch::ClusterBarrier::wait(&ho.unit_ready[cur.buf()], cur.buf_phase());
            const int u = ho.tile_unit[cur.buf()];
            if (u < 0) break;
            const MegaUnit unit = sh.work.get(u);
            const sm100::PlanTile tile = plan_tile(unit);
            if (unit.phase == MegaPhase::L1) {
                if constexpr (kF16) {
                    const float ag = sm100::epi::tile_alpha(l1_alpha, 2, unit.expert, 0, kComp);
                    const float au = sm100::epi::tile_alpha(l1_alpha, 2, unit.expert, 1, kComp);
                    const float* w = row_weight + unit.row_start;
                    uint16_t* h_bits = reinterpret_cast<uint16_t*>(l2_x);   // BF16 [rows, inter]
                    l1p.template epilogue_tile<sm100::TmemLdShape::K16x256B>(
                        ops1, tile, cur, warp, lane,
                        [&](const sm100::PlanTile& t, uint32_t lane_base, uint32_t col, int l, const uint32_t (&regs)[16]) {
                            const auto store = [&](size_t i, uint16_t v) { h_bits[i] = v; };
                            if constexpr (kDequant)   // fp8_nvfp4_mega_moe's h (clamp on the FP32 values)
                                sm100::epi::swiglu_chunk<Plan, kFastMath>(t, lane_base, col, l, regs, ag, au, clamp, w, 2 * inter, store);
                            else                      // bf16_mega_moe's h
                                sm100::epi::swiglu_bf16_chunk<Plan, kFastMath>(t, lane_base, col, l, regs, ag, au, cb, w, 2 * inter, store);
                        },
                        [&](const sm100::PlanTile&) {
                            mega::fence_proxy_async_global();   // the L2 units' TMA reads the rows
                            mega::named_barrier(kBarEpilogue, 128);
                            if (etid == 0) units.l1_done(unit);
                        });
                } else {
                    const float ag = sm100::epi::tile_alpha(l1_alpha, 2, unit.expert, 0, 1.0f);
                    const float au = sm100::epi::tile_alpha(l1_alpha, 2, unit.expert, 1, 1.0f);
                    const float* w = kNvfp4 ? nullptr : row_weight + unit.row_start;   // the unit's (unpadded) rows
                    l1p.template epilogue_tile<sm100::TmemLdShape::K16x256B>(
                        ops1, tile, cur, warp, lane,
                        [&](const sm100::PlanTile& t, uint32_t lane_base, uint32_t col, int l, const uint32_t (&regs)[16]) {
                            sm100::epi::swiglu_quant_chunk<Plan, kFastMath>(t, lane_base, col, l, regs, ag, au, cb, w, epi_scratch);
                        },
                        [&](const sm100::PlanTile& t) {
                            mega::named_barrier(kBarEpilogue, 128);
                            sm100::epi::quantize_l2_input<Plan>(t, etid, 128, epi_scratch, inter,
                                                                kNvfp4 ? __ldg(l2_inv_global + unit.expert) : 1.0f, l2_x, l2_x_sf);
                            mega::fence_proxy_async_global();   // the L2 units' TMA and bulk copies read them
                            mega::named_barrier(kBarEpilogue, 128);
                            if (etid == 0) units.l1_done(unit);
                        });
                }
            } else {
                const float a = sm100::epi::tile_alpha(l2_alpha, 1, unit.expert, 0, kComp);
                l2p.template epilogue_tile<sm100::TmemLdShape::K32x32B>(
                    ops2, tile, cur, warp, lane,
                    [&](const sm100::PlanTile& t, uint32_t lane_base, uint32_t col, int l, const uint32_t (&regs)[16]) {
                        // combine rows: the unit's unpadded rows (the shared roles' numbering)
                        sm100::epi::plain_rows_chunk<Plan, kNvfp4>(
                            t, lane_base, col, l, regs, a, row_weight + unit.row_start, [&](int tok, int out_col, uint16_t v) {
                                combine_bits[size_t(unit.row_start + tok) * size_t(hidden) + size_t(out_col)] = v;
                            });
                    },
                    [&](const sm100::PlanTile&) {
                        mega::named_barrier(kBarEpilogue, 128);
                        if (etid == 0) units.l2_done(unit);
                    });
            }
        }
    } else {
        // ---------------- 2d. routing, row gather (MMA format), combine push (mega/comm_warps.cuh) ----------------
        // the MMA's token format: NVFP4 / FP8 codes + scale atoms (padded rows), FP8 -> BF16 (exact), BF16
        using CopyRow = std::conditional_t<
            kDequant, mega::Fp8ToBf16Row<32, 2>,
            std::conditional_t<kF16, mega::Bf16Row<2>, mega::sm100_layout::RawTokenRow<kBlockT, kGran, decltype(sh.work)>>>;
        const CopyRow copy_row = [&] {
            if constexpr (kF16) return CopyRow{call, reinterpret_cast<__nv_bfloat16*>(l1_x), hidden, lane};
            else return CopyRow{call, sh.work, l1_x, l1_x_sf, hidden, lane};
        }();
        mega::run_comm_warps_with<CommW, kBlockT, 2, kParts, false>(
            sh, call, pairs, barrier1, row_src, row_weight, combine, max_rows, topk, hidden, l2_row_tiles,
            push_combine, grid, comm_warp_index(warp), lane, tid == 64, nullptr, copy_row);
    }

    // ---------------- 3. combine (every warp; mega/barriers.cuh, mega/combine.cuh) ----------------
    mega::wait_barrier1(call, sh.aborted, flags, epoch1, lane);
    mega::reduce_tokens<kThreads>(call, topk_idx, pair_row, y, push_combine != 0, num_tokens, topk, num_experts,
                                  hidden, grid, warp, lane);

    // ---------------- 4. TMEM back; the last CTA resets the counters (mega/state.cuh) ----------------
    sm100::tcgen05_fence_before_thread_sync();
    __syncthreads();
    if (warp == 1) {
        sm100::tcgen05_fence_after_thread_sync();
        sm100::tmem_dealloc(tmem_base, int(Plan::Tmem::kAlloc));
    }
    mega::finish_call<kThreads>(sh, call.ws, meta, tid, num_experts, grid, epoch0, epoch1);
#endif
}

}  // namespace deep_gemm
