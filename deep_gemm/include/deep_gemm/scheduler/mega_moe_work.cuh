#pragma once
// Work order of one rank's Mega MoE layer for a persistent kernel (arch-neutral, host or device).
//
// Units are L1 tiles (expert, L1 weight-row tile, token tile) and L2 tiles (expert, L2 weight-row
// tile, token tile) of the experts that received rows; CTAs claim them in one global order through
// one counter (`i = atomicAdd(&next, 1)`).  An L1 unit waits until its expert's rows have arrived;
// an L2 unit waits until the L1 tiles of all row tiles of its (expert, token tile) are done.
//
// Progress: every unit waits only on units earlier in the order.  Those were all claimed before
// it (one counter), by CTAs that are running (a CTA claims only while resident and is never
// evicted), so the earliest unfinished unit always has its inputs and runs.  This needs every
// producer outside the order (the dispatch that delivers rows) to progress on its own, e.g.
// because all CTAs of the grid are resident; and a CTA must never hold up an earlier claimed unit
// to wait for a later one.
//
// Order: the L1 blocks of the active experts a_0 < a_1 < ... in turn; the L2 block of a_k goes
// right after the L1 block of a_g(k): the first a_j with j >= k + lookahead_experts whose L1
// blocks a_{k+1} .. a_j hold at least lookahead_units units, or the last active expert; e.g.
//     L1(a_0) L1(a_1) L1(a_2) L2(a_0) L1(a_3) L2(a_1) ...      (lookahead_experts 2)
// A CTA reaching L2(a_k) finds that many L1 units claimed after a_k's last one, so with
// lookahead_units at about the units in flight (the CTA count, or twice it for stragglers) that
// tile has usually finished.  The lookahead is in units as well as experts because an expert is
// 48 L1 units at decode (one token tile) and ten times that at prefill.  L2 still starts after a
// bounded amount of L1 work, not after all of it, which bounds the L1 output that is live
// (written, not yet consumed) at prefill.  Inside a block, the order of tile_order.cuh (as
// GroupedTiles): weight-row tile outer, token tile inner, in token groups sized to stay in L2.
//
// Rows of the experts lie back to back in expert order from row 0 (the dispatch layout's
// `expert_offsets`).  Only per-expert arrays: unit -> tile is two binary searches over experts.
#include <deep_gemm/scheduler/tile_order.cuh>

namespace deep_gemm {

enum class MegaPhase : int { L1 = 0, L2 = 1 };

// What a unit waits for: counters[counter] >= target.  L1: counter = local expert, counting rows
// that arrived (an array of num_experts).  L2: counter = token tile index, counting finished L1
// units of that (expert, token tile) (an array of num_token_tiles()).  Targets are per call;
// counters that keep growing across calls add their base.
struct MegaWait { int counter, target; };

struct MegaUnit {
    MegaPhase phase;
    int expert;         // local expert id
    int row_tile;       // weight-row tile: L1 in [0, l1_row_tiles), L2 in [0, l2_row_tiles)
    int token_tile;     // token tile of this expert
    int tile_index;     // token tile over all experts (GroupedTiles' numbering): the L2 counter
                        // an L1 unit bumps when done
    int row_start;      // first row of the tile
    int num_rows;       // rows in the tile, in [1, block_t]
    int expert_rows;    // rows of the expert
};

// Plain data (no constructor), so a kernel can keep it in shared memory.  build() runs on one
// thread (host or device, O(E log^2 E) for E local experts); a kernel builds it with one warp
// (build_warp: a warp scan, then every lane places some L2 blocks), then syncs.
template <int kMaxExperts>
struct MegaMoEWork {
    int num_active;                     // experts with rows
    int block_t, l1_row_tiles, l2_row_tiles;
    int l1_token_group, l2_token_group; // token tiles per group inside an L1 / L2 block (tile_order.cuh)
    int expert[kMaxExperts];            // k-th active expert -> local expert id
    int tile_prefix[kMaxExperts + 1];   // token tiles of the active experts before the k-th
    int row_prefix[kMaxExperts + 1];    // rows of the active experts before the k-th
    int l2_before[kMaxExperts + 1];     // L2 blocks placed before the k-th L1 block (non-decreasing)

    // False (and no units) if num_experts is outside [0, kMaxExperts], a tile count is not
    // positive, or the rows or units overflow int.  Negative counts and lookaheads are taken as 0,
    // token groups below 1 as 1; the default groups hold every token tile (no groups).
    DG_HOST_DEVICE bool build(const int* counts, int num_experts, int block_t_, int l1_row_tiles_,
                              int l2_row_tiles_, int lookahead_experts, int lookahead_units,
                              int l1_token_group_ = 0x7fffffff, int l2_token_group_ = 0x7fffffff) {
        if (!set_shape(num_experts, block_t_, l1_row_tiles_, l2_row_tiles_, l1_token_group_, l2_token_group_))
            return false;
        long long tiles = 0, rows = 0;
        for (int e = 0; e < num_experts; ++e) {
            const int n = counts[e] > 0 ? counts[e] : 0;
            if (n == 0) continue;
            tiles += (n + block_t - 1LL) / block_t, rows += n;
            expert[num_active++] = e;
            tile_prefix[num_active] = int(tiles), row_prefix[num_active] = int(rows);
        }
        if (!fits(tiles, rows, l1_row_tiles, l2_row_tiles)) {
            num_active = 0;
            return false;
        }
        for (int j = 1; j <= num_active; ++j) l2_before[j] = l2_blocks_before(j, lookahead_experts, lookahead_units);
        return true;
    }

#if defined(__CUDACC__)
    // The same as build(), by the 32 lanes of one warp (all must call it; the warp has synced when it
    // returns).  One thread took 17 us at 48 experts (H200), all of it before the first unit.
    __device__ __forceinline__ bool build_warp(const int* counts, int num_experts, int block_t_, int l1_row_tiles_,
                                               int l2_row_tiles_, int lookahead_experts, int lookahead_units,
                                               int l1_token_group_, int l2_token_group_, int lane) {
        bool ok = false;
        if (lane == 0) ok = set_shape(num_experts, block_t_, l1_row_tiles_, l2_row_tiles_, l1_token_group_, l2_token_group_);
        ok = __shfl_sync(0xffffffffu, ok, 0);
        if (!ok) {
            __syncwarp();
            return false;
        }
        // 32-bit sums that stick at kOver once past INT_MAX (fewer registers than 64-bit scans: under
        // the fused kernel's register cap those made ptxas serialize wgmmas); equal in every lane
        constexpr unsigned kOver = 0x80000000u;
        auto add = [](unsigned a, unsigned b) {   // a, b <= kOver, so a + b wraps only at 2 kOver
            const unsigned s = a + b;
            return s < a || s >= kOver ? kOver : s;
        };
        unsigned tiles = 0, rows = 0;   // over the chunks before this one
        int active = 0;
        for (int base = 0; base < num_experts; base += 32) {
            const int e = base + lane;
            const int n = e < num_experts && counts[e] > 0 ? counts[e] : 0;
            unsigned t = n > 0 ? unsigned(n / block_t_ + (n % block_t_ != 0)) : 0u, r = unsigned(n);   // inclusive scans
            #pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                const unsigned tu = __shfl_up_sync(0xffffffffu, t, o), ru = __shfl_up_sync(0xffffffffu, r, o);
                if (lane >= o) t = add(t, tu), r = add(r, ru);
            }
            const unsigned has = __ballot_sync(0xffffffffu, n > 0);
            if (n > 0) {
                const int k = active + __popc(has & ((1u << lane) - 1u));
                expert[k] = e;
                tile_prefix[k + 1] = int(add(tiles, t)), row_prefix[k + 1] = int(add(rows, r));
            }
            tiles = add(tiles, __shfl_sync(0xffffffffu, t, 31)), rows = add(rows, __shfl_sync(0xffffffffu, r, 31));
            active += __popc(has);
        }
        ok = rows < kOver && tiles < kOver && fits(tiles, rows, l1_row_tiles_, l2_row_tiles_);
        if (lane == 0) num_active = ok ? active : 0;
        __syncwarp();
        if (!ok)
            return false;
        for (int j = 1 + lane; j <= active; j += 32) l2_before[j] = l2_blocks_before(j, lookahead_experts, lookahead_units);
        __syncwarp();
        return true;
    }
#endif

    // g(k): the L1 block that L2 block k follows, i.e. the first j >= min(k + lookahead_experts, last
    // active expert) whose L1 blocks k+1 .. j hold at least lookahead_units units, or the last
    // active expert.  Non-decreasing in k.
    DG_HOST_DEVICE int l2_anchor(int k, int lookahead_experts, int lookahead_units) const {
        const int last = num_active - 1, ahead = lookahead_experts > 0 ? lookahead_experts : 0;
        int lo = ahead >= last - k ? last : k + ahead, hi = last;
        while (lo < hi) {
            const int mid = (lo + hi) / 2;
            if ((long long)l1_row_tiles * (tile_prefix[mid + 1] - tile_prefix[k + 1]) >= lookahead_units) hi = mid;
            else lo = mid + 1;
        }
        return lo;
    }

    // l2_before[j] = #{k : g(k) < j} (g is non-decreasing): the first k with g(k) >= j, or num_active.
    DG_HOST_DEVICE int l2_blocks_before(int j, int lookahead_experts, int lookahead_units) const {
        int lo = 0, hi = num_active;
        while (lo < hi) {
            const int mid = (lo + hi) / 2;
            if (l2_anchor(mid, lookahead_experts, lookahead_units) >= j) hi = mid;
            else lo = mid + 1;
        }
        return lo;
    }

    DG_HOST_DEVICE int num_token_tiles() const { return tile_prefix[num_active]; }
    DG_HOST_DEVICE int num_units() const { return num_token_tiles() * (l1_row_tiles + l2_row_tiles); }

    // First unit of step j in [0, num_active]: L1 block j, then L2 blocks l2_before[j] .. l2_before[j + 1] - 1.
    DG_HOST_DEVICE int step_start(int j) const {
        return l1_row_tiles * tile_prefix[j] + l2_row_tiles * tile_prefix[l2_before[j]];
    }

    // i in [0, num_units()).
    DG_HOST_DEVICE MegaUnit get(int i) const {
        // Every step holds an L1 block, so the largest j with step_start(j) <= i is the step of i.
        int lo = 0, hi = num_active - 1;
        while (lo < hi) {
            const int mid = (lo + hi + 1) / 2;
            if (step_start(mid) <= i) lo = mid; else hi = mid - 1;
        }
        int local = i - step_start(lo), k = lo;
        MegaUnit u;
        u.phase = MegaPhase::L1;
        const int l1_units = l1_row_tiles * (tile_prefix[k + 1] - tile_prefix[k]);
        if (local >= l1_units) {
            // position in the stream of L2 blocks -> the L2 block holding it
            const int l2 = l2_row_tiles * tile_prefix[l2_before[lo]] + local - l1_units;
            k = l2_before[lo], hi = l2_before[lo + 1] - 1;
            while (k < hi) {
                const int mid = (k + hi + 1) / 2;
                if (l2_row_tiles * tile_prefix[mid] <= l2) k = mid; else hi = mid - 1;
            }
            local = l2 - l2_row_tiles * tile_prefix[k], u.phase = MegaPhase::L2;
        }
        const int tiles = tile_prefix[k + 1] - tile_prefix[k];
        const bool l1 = u.phase == MegaPhase::L1;
        const TileCoord c = expert_tile_coord(local, l1 ? l1_row_tiles : l2_row_tiles, tiles,
                                              l1 ? l1_token_group : l2_token_group);
        u.expert = expert[k];
        u.row_tile = c.row_tile;
        u.token_tile = c.token_tile;
        u.tile_index = tile_prefix[k] + u.token_tile;
        u.expert_rows = row_prefix[k + 1] - row_prefix[k];
        u.row_start = row_prefix[k] + u.token_tile * block_t;
        const int left = u.expert_rows - u.token_tile * block_t;
        u.num_rows = left < block_t ? left : block_t;
        return u;
    }

    // Fields that do not depend on the counts, and no units yet; false for a shape build() refuses.
    DG_HOST_DEVICE bool set_shape(int num_experts, int block_t_, int l1_row_tiles_, int l2_row_tiles_,
                                  int l1_token_group_, int l2_token_group_) {
        block_t = block_t_, l1_row_tiles = l1_row_tiles_, l2_row_tiles = l2_row_tiles_;
        l1_token_group = l1_token_group_ > 1 ? l1_token_group_ : 1;
        l2_token_group = l2_token_group_ > 1 ? l2_token_group_ : 1;
        num_active = 0, tile_prefix[0] = 0, row_prefix[0] = 0, l2_before[0] = 0;
        return num_experts >= 0 && num_experts <= kMaxExperts && block_t > 0 && l1_row_tiles > 0 && l2_row_tiles > 0;
    }

    // Whether the totals keep rows and units in int.
    static DG_HOST_DEVICE bool fits(long long tiles, long long rows, int l1_row_tiles_, int l2_row_tiles_) {
        return rows <= 0x7fffffffLL && tiles * (l1_row_tiles_ + l2_row_tiles_) <= 0x7fffffffLL;
    }

    DG_HOST_DEVICE MegaWait wait_for(const MegaUnit& u) const {
        return u.phase == MegaPhase::L1 ? MegaWait{u.expert, u.expert_rows} : MegaWait{u.tile_index, l1_row_tiles};
    }
};

// The token tile holding `row`, a row of the k-th active expert of the work order (Work: MegaMoEWork;
// mega::token_tile and the sm100 kernel's padded rows call this).
template <int kBlockT, class Work>
DG_HOST_DEVICE int mega_token_tile(const Work& work, int k, int row) {
    return work.tile_prefix[k] + (row - work.row_prefix[k]) / kBlockT;
}

}  // namespace deep_gemm
