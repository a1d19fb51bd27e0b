#pragma once
// Where the fused sm100 Mega MoE kernel (impls/sm100_fp8_nvfp4_mega_moe.cuh) puts a unit's token rows,
// and its producer, MMA and dequant roles over the work order: plain C++17 (DG_HOST_DEVICE) so that the host
// functional model (tests/cpp/sm100_fused_model_emit.cpp) runs the kernel's own placement and loops,
// with its own claim / tag / wait / hand-over hooks where the kernel has atomics and mbarriers.  Token tile i of the work order (GroupedTiles' numbering, the
// unit's tile_index) sits at the padded rows [i kBlockT, (i + 1) kBlockT) of the kernel's L1 / L2 token
// tensors; routing weights and combine rows keep the unpadded row numbering of the shared roles.
// kPadded = false: the kind::f16 recipes (BF16 token rows, no scale atoms to align) keep the shared
// roles' unpadded rows for their tokens too.
#include <deep_gemm/common/host_device.cuh>
#include <deep_gemm/scheduler/mega_moe_work.cuh>
#include <deep_gemm/scheduler/sm100_gemm_plan.cuh>

namespace deep_gemm::sm100 {

// The padded row of `row` (unpadded numbering, of the k-th active expert; mega_token_tile in
// scheduler/mega_moe_work.cuh) in the kernel's token tensors (the gather's destination row).
template <int kBlockT, bool kPadded = true, class Work>
DG_HOST_DEVICE int mega_padded_row(const Work& work, int k, int row) {
    if constexpr (!kPadded) return row;
    return mega_token_tile<kBlockT>(work, k, row) * kBlockT + (row - work.row_prefix[k]) % kBlockT;
}

// The plan's tile of a unit: its token rows at the token tile's padded rows (kPadded = false: its own rows).
template <int kBlockT, bool kPadded = true>
DG_HOST_DEVICE PlanTile mega_plan_tile(const MegaUnit& unit) {
    return PlanTile{unit.expert, unit.row_tile, unit.token_tile, kPadded ? unit.tile_index * kBlockT : unit.row_start,
                    unit.num_rows};
}

// The producer role (kernel: warp 0, lane 0): each claimed unit's tile through its plan's produce_tile
// (L1: n = 2I, k = H; L2: n = H, k = I; one stage ring, one Cursor), its first stage tagged with the
// unit (the MMA warp and the epilogue learn units from the tags) and held until the unit's inputs are
// there; after the last unit one stage tagged -1, completed by a plain arrival (no bytes).
//   claim() -> the next unit index; tag(stage, u); wait_inputs(unit, wait, u): L1 its rows gathered,
//   L2 its (expert, token tile)'s L1 units done.
template <class Plan, class Ops1, class Ops2, class Work, class TileOf, class Claim, class Tag, class WaitInputs>
DG_HOST_DEVICE void mega_produce_units(const Plan& l1p, const Plan& l2p, Ops1& ops1, Ops2& ops2, const Work& work,
                                       const TileOf& plan_tile, Claim&& claim, Tag&& tag, WaitInputs&& wait_inputs) {
    const int num_units = work.num_units();
    typename Plan::Cursor cur;
    for (;;) {
        const int u = claim();
        if (u >= num_units) {
            ops1.wait(Plan::empty(cur.stage), cur.phase ^ 1u);
            tag(cur.stage, -1);
            ops1.arrive(Plan::full(cur.stage));
            return;
        }
        const MegaUnit unit = work.get(u);
        const MegaWait w = work.wait_for(unit);
        const auto first_stage = [&](int stage) {
            tag(stage, u);
            wait_inputs(unit, w, u);
        };
        if (unit.phase == MegaPhase::L1) l1p.produce_tile(ops1, plan_tile(unit), cur, first_stage);
        else l2p.produce_tile(ops2, plan_tile(unit), cur, first_stage);
    }
}

// The MMA role (kernel: warp 1): units from the stage tags; each accumulator buffer, once free, handed
// to the epilogue with its unit (hand_over(buf, u)) before its MMAs are issued; a -1 tag, handed over
// too, ends both roles.  read_tag(stage) -> the unit its producer tagged.
template <class Plan, class Ops1, class Ops2, class Work, class TileOf, class ReadTag, class HandOver>
DG_HOST_DEVICE void mega_mma_units(const Plan& l1p, const Plan& l2p, Ops1& ops1, Ops2& ops2, const Work& work,
                                   const TileOf& plan_tile, ReadTag&& read_tag, HandOver&& hand_over) {
    typename Plan::Cursor cur;
    for (;;) {
        ops1.wait(Plan::full(cur.stage), cur.phase);
        const int u = read_tag(cur.stage);
        ops1.wait(Plan::tmem_empty(int(cur.buf())), cur.buf_phase() ^ 1u);   // mma_tile's own wait then passes
        hand_over(int(cur.buf()), u);
        if (u < 0) return;
        const MegaUnit unit = work.get(u);
        if (unit.phase == MegaPhase::L1) l1p.mma_tile(ops1, plan_tile(unit), cur);
        else l2p.mma_tile(ops2, plan_tile(unit), cur);
    }
}

// The dequant role (NVFP4_EXACT; kernel: warps 8-11, each of their 128 threads): units from the stage tags,
// as the MMA warp; each unit's k blocks through its plan's dequant_tile (both plans share ops1: the role
// reads only shared memory, barriers and TMEM, and the plans differ only in n, k); a -1 tag ends it.
//   read_tag(stage) -> the unit its producer tagged.
template <class Plan, class Ops, class Work, class ReadTag>
DG_HOST_DEVICE void mega_dequant_units(const Plan& l1p, const Plan& l2p, Ops& ops1, const Work& work, ReadTag&& read_tag,
                                       int warp, int lane) {
    typename Plan::Cursor cur;
    for (;;) {
        ops1.wait(Plan::full(cur.stage), cur.phase);
        const int u = read_tag(cur.stage);
        if (u < 0) return;
        const Plan& p = work.get(u).phase == MegaPhase::L1 ? l1p : l2p;
        p.dequant_tile(ops1, cur, warp, lane);
    }
}

}  // namespace deep_gemm::sm100
