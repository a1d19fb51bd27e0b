#pragma once
// Order of one expert's (weight-row tile, token tile) pairs, shared by the grouped GEMM's scheduler
// and the Mega MoE work order (arch-neutral, host or device, plain C++ too).
//
// Token tiles go in groups of `token_group`: group outer, then row tile, then the group's token
// tiles innermost.  CTAs running together share a weight tile through L2, and a group's tokens
// (sized by the host to stay in L2) come from HBM once for all row tiles.  Without groups, a
// prefill expert's tokens (59 MB at 4096 x 7168 BF16) would stream from HBM once per ~8 row tiles
// in flight.  With every token tile in one group (decode) this is row tile outer, token tile inner.
#include <deep_gemm/common/host_device.cuh>

namespace deep_gemm {

struct TileCoord { int row_tile, token_tile; };

// The local-th pair, local in [0, num_row_tiles * num_token_tiles); token_group >= 1 (larger than
// the token tiles: one group).  Only the last group can be short, so all groups before g are full.
DG_HOST_DEVICE TileCoord expert_tile_coord(int local, int num_row_tiles, int num_token_tiles, int token_group) {
    if (token_group > num_token_tiles) token_group = num_token_tiles;
    const int g = local / (num_row_tiles * token_group);
    const int in_group = local - g * num_row_tiles * token_group;
    const int left = num_token_tiles - g * token_group;
    const int group_tiles = left < token_group ? left : token_group;
    return {in_group / group_tiles, g * token_group + in_group % group_tiles};
}

}  // namespace deep_gemm
