#pragma once
// Arch-neutral tile scheduler for grouped (per-expert) GEMMs with device-side token counts.
//
// Tiles are (expert, weight-row tile, token tile), numbered expert-major, then in an expert as
// tile_order.cuh says (row tiles outer, token tiles inner, in L2-sized token groups).
// Experts with no tokens own no tiles, so their weights are never read.  Counts live on the
// device (no host sync, CUDA-graph friendly): every CTA builds the per-expert tile prefix in
// shared memory once.
//
// Host-callable (DG_HOST_DEVICE; g++ compiles it): everything but build_prefix (a warp scan, device
// only), whose host counterpart build_prefix_serial writes the same prefix; on the host `__ldg` is a
// plain load.  tests/cpp/sm100_model_emit.cpp takes its tiles from here.
#include <cstdint>

#include <deep_gemm/common/host_device.cuh>
#if defined(__CUDACC__)
#include <deep_gemm/common/warp_scan.cuh>
#endif
#include <deep_gemm/scheduler/tile_order.cuh>

namespace deep_gemm {

enum class GroupMode : int { Contiguous = 0, Masked = 1 };

template <GroupMode kMode, int kBlockT>
struct GroupedTiles {
    const int* layout;      // Contiguous: row offsets [E + 1]; Masked: counts [E]
    int num_experts;
    int max_rows;           // Masked: rows reserved per expert
    int num_row_tiles;      // weight-row tiles per expert
    int* smem_prefix;       // [E + 1] token tiles before each expert
    int token_group;        // token tiles per group (>= 1, tile_order.cuh)

    DG_HOST_DEVICE static int load(const int* p) {
#if defined(__CUDA_ARCH__)
        return __ldg(p);
#else
        return *p;
#endif
    }
    DG_HOST_DEVICE static int imin(int a, int b) {
#if defined(__CUDA_ARCH__)
        return min(a, b);
#else
        return a < b ? a : b;
#endif
    }
    DG_HOST_DEVICE static int imax(int a, int b) {
#if defined(__CUDA_ARCH__)
        return max(a, b);
#else
        return a > b ? a : b;
#endif
    }

    DG_HOST_DEVICE int row_start(int e) const {
        return kMode == GroupMode::Contiguous ? load(layout + e) : e * max_rows;
    }
    DG_HOST_DEVICE int count(int e) const {
        if constexpr (kMode == GroupMode::Contiguous)
            return load(layout + e + 1) - load(layout + e);
        else
            return imin(imax(load(layout + e), 0), max_rows);
    }
    DG_HOST_DEVICE int token_tiles(int e) const { return (count(e) + kBlockT - 1) / kBlockT; }

#if defined(__CUDACC__)
    // Called by one full warp; the caller syncs the block afterwards.
    __device__ __forceinline__ void build_prefix(int lane) {
        warp_exclusive_scan(num_experts, lane, [&](int e) { return token_tiles(e); }, smem_prefix);
    }
#endif
    // The same prefix by one thread (host programs).
    DG_HOST_DEVICE void build_prefix_serial() {
        smem_prefix[0] = 0;
        for (int e = 0; e < num_experts; ++e) smem_prefix[e + 1] = smem_prefix[e] + token_tiles(e);
    }

    DG_HOST_DEVICE int num_tiles() const { return smem_prefix[num_experts] * num_row_tiles; }

    struct Tile { int expert, row_tile, token_tile, row_start, num_tokens; };

    DG_HOST_DEVICE Tile get(int t) const {
        // largest e with prefix[e] * R <= t (binary search; empty experts have equal prefixes)
        int lo = 0, hi = num_experts - 1;
        while (lo < hi) {
            const int mid = (lo + hi + 1) / 2;
            if (smem_prefix[mid] * num_row_tiles <= t) lo = mid; else hi = mid - 1;
        }
        const int e = lo;
        const int tt_e = smem_prefix[e + 1] - smem_prefix[e];
        const int local = t - smem_prefix[e] * num_row_tiles;
        const TileCoord c = expert_tile_coord(local, num_row_tiles, tt_e, token_group);
        Tile tile;
        tile.expert = e;
        tile.row_tile = c.row_tile;
        tile.token_tile = c.token_tile;
        tile.row_start = row_start(e) + tile.token_tile * kBlockT;
        tile.num_tokens = imin(kBlockT, count(e) - tile.token_tile * kBlockT);
        return tile;
    }
};

}  // namespace deep_gemm
