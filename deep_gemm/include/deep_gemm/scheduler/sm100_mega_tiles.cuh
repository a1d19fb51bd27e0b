#pragma once
// Where the fused sm100 Mega MoE kernel (impls/sm100_fp8_nvfp4_mega_moe.cuh) puts a unit's token rows:
// plain C++17 (DG_HOST_DEVICE) so that the host functional model (tests/cpp/sm100_fused_model_emit.cpp)
// runs the kernel's own placement.  Token tile i of the work order (GroupedTiles' numbering, the
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

}  // namespace deep_gemm::sm100
