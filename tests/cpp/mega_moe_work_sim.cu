// Host-only check of deep_gemm/scheduler/mega_moe_work.cuh (built and run by
// tests/test_mega_scheduler.py).  For random cases: compares the units with a brute-force
// enumeration, checks statically that every unit waits only on earlier units and that the L2
// blocks sit where the lookahead puts them, then runs an event-driven simulation of N persistent
// CTAs claiming units through one counter (random durations, rows arriving in random chunks),
// checking that no unit starts before its inputs exist, every unit is claimed once, and nothing
// deadlocks.  Faults the checks must catch: `--fault l2_first` swaps each expert's L1 and L2
// blocks, `--fault short_wait` has L2 units wait for one L1 row tile less.
//
// Prints `key=value` lines that the Python test parses.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <queue>
#include <random>
#include <string>
#include <vector>

#include <deep_gemm/scheduler/mega_moe_work.cuh>

using deep_gemm::MegaPhase;
using deep_gemm::MegaUnit;
using deep_gemm::MegaWait;
constexpr int kMaxExperts = 64;
using Work = deep_gemm::MegaMoEWork<kMaxExperts>;

enum class Fault { None, L2First, ShortWait };
static Fault g_fault = Fault::None;

static MegaWait wait_of(const Work& work, const MegaUnit& u) {
    MegaWait w = work.wait_for(u);
    if (g_fault == Fault::ShortWait && u.phase == MegaPhase::L2) --w.target;
    return w;
}

struct Case {
    std::vector<int> counts;
    int block_t, r1, r2, lookahead, lookahead_units, ctas;
    int g1 = 0x7fffffff, g2 = 0x7fffffff;   // token tiles per group in an L1 / L2 block (tile_order.cuh)
    double arrival_span = -1;   // < 0: random
    double l2_cost = 1.0;       // mean duration of an L2 unit over an L1 unit
    double jitter = 0.5, stragglers = 0.02;   // durations: uniform +-jitter, some 6x longer
};

// Independent enumeration: plain loops over experts, groups of token tiles, row tiles and row
// ranges, units of a block in their expected order.
struct BruteUnit { int phase, expert, row_tile, token_tile, tile_index, row_start, num_rows, expert_rows; };
struct Brute {
    std::vector<int> base[2], tiles;
    std::vector<BruteUnit> units;
    std::vector<std::vector<int>> slot[2];   // [phase][expert][row tile * tiles + token tile] -> unit
    std::vector<int> active;   // experts with rows
    int num_tiles = 0;

    explicit Brute(const Case& c) {
        const int num_experts = int(c.counts.size());
        std::vector<std::vector<std::pair<int, int>>> ranges(num_experts);   // (row start, rows) per token tile
        std::vector<int> first_tile(num_experts);
        int row = 0;
        for (int e = 0; e < num_experts; ++e) {
            first_tile[e] = num_tiles;
            for (int s = 0; s < c.counts[e]; s += c.block_t)
                ranges[e].push_back({row + s, std::min(c.block_t, c.counts[e] - s)});
            row += std::max(c.counts[e], 0);
            num_tiles += int(ranges[e].size());
            tiles.push_back(int(ranges[e].size()));
            if (!ranges[e].empty()) active.push_back(e);
        }
        for (int p = 0; p < 2; ++p) {
            const int rows = p == 0 ? c.r1 : c.r2;
            const long long group = std::max(p == 0 ? c.g1 : c.g2, 1);
            for (int e = 0; e < num_experts; ++e) {
                base[p].push_back(int(units.size()));
                slot[p].emplace_back(rows * tiles[e], -1);
                for (long long first = 0; first < tiles[e]; first += group)
                    for (int r = 0; r < rows; ++r)
                        for (int t = int(first); t < std::min<long long>(first + group, tiles[e]); ++t) {
                            slot[p][e][r * tiles[e] + t] = int(units.size());
                            units.push_back({p, e, r, t, first_tile[e] + t, ranges[e][t].first, ranges[e][t].second,
                                             std::max(c.counts[e], 0)});
                        }
            }
        }
    }
    int id(int p, int e, int r, int t) const { return slot[p][e][r * tiles[e] + t]; }
};

struct Totals {
    long long cases = 0, units = 0, claims = 0, build_failures = 0, mismatches = 0, duplicates = 0, unclaimed = 0;
    long long order_errors = 0, interleave_errors = 0, violations = 0, deadlocks = 0, bad_counters = 0;
    long long zero_expert_cases = 0, empty_cases = 0, one_token_cases = 0, grouped_cases = 0;
    std::map<int, int> by_experts, by_ctas, by_lookahead, by_block_t;
    std::map<std::pair<int, int>, int> by_row_tiles;
    // per lookahead: L2 units, L2 units that waited after their claim, L1 units that waited
    std::map<int, long long> l2_units, l2_waited, l1_waited;
    double l2_wait_time = 0, busy_time = 0, makespan = 0;
};

static std::vector<MegaUnit> make_order(const Work& work, bool l2_first) {
    std::vector<MegaUnit> order;
    for (int i = 0; i < work.num_units(); ++i) order.push_back(work.get(i));
    if (l2_first) {
        // built with lookahead 0: each expert's units are contiguous [L1 ..., L2 ...]
        for (size_t b = 0; b < order.size();) {
            size_t e = b;
            while (e < order.size() && order[e].expert == order[b].expert) ++e;
            std::stable_partition(order.begin() + b, order.begin() + e,
                                  [](const MegaUnit& u) { return u.phase == MegaPhase::L2; });
            b = e;
        }
    }
    return order;
}

// Static checks; returns false if the order cannot be simulated (wrong size or unknown units).
static bool check_order(const Case& c, const Brute& brute, const Work& work, const std::vector<MegaUnit>& order,
                        bool check_interleave, std::vector<int>& ids, Totals& tot) {
    const int n = int(brute.units.size());
    if (int(order.size()) != n || work.num_units() != n || work.num_token_tiles() != brute.num_tiles) {
        ++tot.mismatches;
        return false;
    }
    std::vector<int> pos(n, -1);
    ids.assign(n, -1);
    for (int p = 0; p < n; ++p) {
        const MegaUnit& u = order[p];
        const int ph = int(u.phase), e = u.expert;
        if ((ph != 0 && ph != 1) || e < 0 || e >= int(c.counts.size()) || u.row_tile < 0 ||
            u.row_tile >= (ph == 0 ? c.r1 : c.r2) || u.token_tile < 0 || u.token_tile >= brute.tiles[e]) {
            ++tot.mismatches;
            return false;
        }
        const int id = brute.id(ph, e, u.row_tile, u.token_tile);
        const BruteUnit& b = brute.units[id];
        if (b.row_start != u.row_start || b.num_rows != u.num_rows || b.tile_index != u.tile_index ||
            b.expert_rows != u.expert_rows)
            ++tot.mismatches;
        if (pos[id] >= 0) {
            ++tot.duplicates;
            return false;
        }
        pos[id] = p, ids[p] = id;
    }
    for (int p = 0; p < n; ++p) {
        const MegaUnit& u = order[p];
        if (u.phase != MegaPhase::L2) continue;
        for (int r = 0; r < c.r1; ++r)
            if (pos[brute.id(0, u.expert, r, u.token_tile)] > p) ++tot.order_errors;
    }
    if (check_interleave) {
        // L1 blocks in expert order, each in one piece; the L2 block of the k-th active expert in
        // one piece right after the L1 block of the g-th (or after the L2 block of the (k-1)-th):
        // g >= k + lookahead, the L1 units of the (k+1)-th .. g-th >= lookahead_units, or the last.
        const int a = int(brute.active.size());
        std::vector<int> first1(a, n), last1(a, -1), first2(a, n), last2(a, -1);
        for (int k = 0; k < a; ++k) {
            const int e = brute.active[k];
            for (int i = brute.base[0][e]; i < brute.base[0][e] + c.r1 * brute.tiles[e]; ++i)
                first1[k] = std::min(first1[k], pos[i]), last1[k] = std::max(last1[k], pos[i]);
            for (int i = brute.base[1][e]; i < brute.base[1][e] + c.r2 * brute.tiles[e]; ++i)
                first2[k] = std::min(first2[k], pos[i]), last2[k] = std::max(last2[k], pos[i]);
            // inside a block: the brute ids' order (token groups, row tile, token tile)
            for (int i = brute.base[0][e]; i < brute.base[0][e] + c.r1 * brute.tiles[e]; ++i)
                if (pos[i] - first1[k] != i - brute.base[0][e]) ++tot.interleave_errors;
            for (int i = brute.base[1][e]; i < brute.base[1][e] + c.r2 * brute.tiles[e]; ++i)
                if (pos[i] - first2[k] != i - brute.base[1][e]) ++tot.interleave_errors;
        }
        std::vector<int> gs(a);
        for (int k = 0; k < a; ++k) {
            int g = k + c.lookahead;
            for (;; ++g) {
                if (g >= a - 1) { g = a - 1; break; }
                long long between = 0;
                for (int j = k + 1; j <= g; ++j) between += (long long)c.r1 * brute.tiles[brute.active[j]];
                if (between >= c.lookahead_units) break;
            }
            gs[k] = g;
        }
        for (int k = 0; k < a; ++k) {
            const int g = gs[k];
            const int l1_size = c.r1 * brute.tiles[brute.active[k]], l2_size = c.r2 * brute.tiles[brute.active[k]];
            if (last1[k] - first1[k] + 1 != l1_size || last2[k] - first2[k] + 1 != l2_size) ++tot.interleave_errors;
            if (k + 1 < a && (last1[k] > first1[k + 1] || last2[k] > first2[k + 1])) ++tot.interleave_errors;
            const int after = k > 0 && gs[k - 1] == g ? last2[k - 1] : last1[g];
            if (first2[k] != after + 1 || (g + 1 < a && last2[k] + 1 != first1[g + 1] && gs[k + 1] != g))
                ++tot.interleave_errors;
        }
    }
    return true;
}

struct Event {
    double t;
    long long seq;
    int kind, a, b;   // kind 0: rows arrive (expert a, b rows); 1: CTA a finishes its unit
    bool operator>(const Event& o) const { return t != o.t ? t > o.t : seq > o.seq; }
};

static void simulate(const Case& c, const Brute& brute, const Work& work, const std::vector<MegaUnit>& order,
                     const std::vector<int>& ids, std::mt19937_64& rng, Totals& tot) {
    const int n = int(order.size()), num_experts = int(c.counts.size());
    std::uniform_real_distribution<double> uni(0.0, 1.0);
    std::priority_queue<Event, std::vector<Event>, std::greater<Event>> events;
    long long seq = 0;

    // Rows of an expert arrive in 1..3 chunks at random times, on a scale of the L1 work.
    const double work_scale = double(n) / c.ctas;
    const double span = c.arrival_span >= 0 ? c.arrival_span : uni(rng) < 0.3 ? 0.0 : uni(rng) * work_scale;
    std::vector<double> ready(num_experts, 0.0);
    for (int e = 0; e < num_experts; ++e) {
        int left = std::max(c.counts[e], 0);
        while (left > 0) {
            const int chunk = uni(rng) < 0.5 ? left : 1 + int(uni(rng) * left);
            const double t = span * uni(rng);
            events.push({t, seq++, 0, e, chunk});
            ready[e] = std::max(ready[e], t);
            left -= chunk;
        }
    }
    std::vector<int> arrived(num_experts, 0), l1_done(brute.num_tiles, 0), claimed(n, 0);
    std::vector<char> finished(n, 0);
    std::vector<std::vector<int>> wait_rows(num_experts), wait_l1(brute.num_tiles);
    std::vector<int> cta_pos(c.ctas, -1);
    std::vector<double> cta_claim(c.ctas, 0.0);
    int next = 0, waiting = 0;

    auto duration = [&](const MegaUnit& u) {
        const double d = (u.phase == MegaPhase::L1 ? 1.0 : c.l2_cost) * (1.0 + c.jitter * (2.0 * uni(rng) - 1.0));
        return uni(rng) < c.stragglers ? d * 6.0 : d;
    };
    auto satisfied = [&](const MegaWait& w, MegaPhase ph) {
        return (ph == MegaPhase::L1 ? arrived[w.counter] : l1_done[w.counter]) >= w.target;
    };
    auto start = [&](int cta, double now) {
        const MegaUnit& u = order[cta_pos[cta]];
        // Independent of the helper: the expert's last rows arrived / all L1 row tiles done.
        if (u.phase == MegaPhase::L1) {
            if (now < ready[u.expert]) ++tot.violations;
        } else {
            for (int r = 0; r < c.r1; ++r)
                if (!finished[brute.id(0, u.expert, r, u.token_tile)]) { ++tot.violations; break; }
        }
        if (now > cta_claim[cta]) {
            if (u.phase == MegaPhase::L2) ++tot.l2_waited[c.lookahead], tot.l2_wait_time += now - cta_claim[cta];
            else ++tot.l1_waited[c.lookahead];
        }
        const double d = duration(u);
        tot.busy_time += d;
        events.push({now + d, seq++, 1, cta, 0});
    };
    auto claim = [&](int cta, double now) {
        if (next >= n) { cta_pos[cta] = -1; return; }
        const int p = next++;
        cta_pos[cta] = p, cta_claim[cta] = now;
        ++claimed[ids[p]], ++tot.claims;
        const MegaUnit& u = order[p];
        const MegaWait w = wait_of(work, u);
        const int limit = u.phase == MegaPhase::L1 ? num_experts : brute.num_tiles;
        if (w.counter < 0 || w.counter >= limit) {
            ++tot.bad_counters;
            start(cta, now);
            return;
        }
        if (satisfied(w, u.phase)) {
            start(cta, now);
        } else {
            (u.phase == MegaPhase::L1 ? wait_rows[w.counter] : wait_l1[w.counter]).push_back(cta);
            ++waiting;
        }
    };
    auto wake = [&](std::vector<int>& list, double now) {
        std::vector<int> still;
        for (int cta : list) {
            const MegaUnit& u = order[cta_pos[cta]];
            if (satisfied(wait_of(work, u), u.phase)) --waiting, start(cta, now);
            else still.push_back(cta);
        }
        list.swap(still);
    };

    for (int cta = 0; cta < c.ctas; ++cta) claim(cta, 0.0);
    while (!events.empty()) {
        const Event ev = events.top();
        events.pop();
        tot.makespan = ev.t;
        if (ev.kind == 0) {
            arrived[ev.a] += ev.b;
            wake(wait_rows[ev.a], ev.t);
        } else {
            const int p = cta_pos[ev.a];
            const MegaUnit& u = order[p];
            finished[ids[p]] = 1;
            if (u.phase == MegaPhase::L1) {
                ++l1_done[u.tile_index];
                wake(wait_l1[u.tile_index], ev.t);
            }
            claim(ev.a, ev.t);
        }
    }
    if (waiting > 0 || next < n) ++tot.deadlocks;
    if (waiting == 0)
        for (int i = 0; i < n; ++i) tot.unclaimed += claimed[i] != 1 || !finished[i];
    for (const MegaUnit& u : order) tot.l2_units[c.lookahead] += u.phase == MegaPhase::L2;
}

// Cases too large to enumerate (units near INT_MAX), and inputs build() must refuse.  Positions
// come from the block sequence written out from its definition; random units are compared.
static void check_limits(std::mt19937_64& rng, long long& cases, long long& errors) {
    const long long kIntMax = 0x7fffffffLL;
    for (int trial = 0; trial < 24; ++trial) {
        const int num_experts = trial % 3 == 0 ? 64 : 1 + int(rng() % 64);
        const int block_t = 8 << (rng() % 5);
        const int r1 = trial % 2 ? 48 : 1 + int(rng() % 8), r2 = trial % 2 ? 56 : 1 + int(rng() % 8);
        const int lookahead = int(rng() % 4), lookahead_units = int(rng() % 2) * 264;
        const int g1 = trial % 4 < 2 ? 0x7fffffff : 1 + int(rng() % 5), g2 = trial % 4 < 2 ? 0x7fffffff : 1 + int(rng() % 9);
        // rows per expert so that the units are just below INT_MAX, some experts empty
        std::vector<int> counts(num_experts, 0);
        std::vector<int> tiles(num_experts, 0);
        const long long tiles_total = std::min(kIntMax / (r1 + r2), kIntMax / block_t) - int(rng() % 1000);
        int active = 0;
        for (int e = 0; e < num_experts; ++e) active += (counts[e] = (rng() % 4 == 0 && e > 0) ? 0 : 1) != 0;
        long long given = 0;
        for (int e = 0, k = 0; e < num_experts; ++e) {
            if (counts[e] == 0) continue;
            tiles[e] = int(++k == active ? tiles_total - given : tiles_total / active);
            given += tiles[e];
            counts[e] = tiles[e] * block_t - int(rng() % block_t);
        }
        long long rows = 0;
        for (int n : counts) rows += n;
        Work work;
        const bool ok = work.build(counts.data(), num_experts, block_t, r1, r2, lookahead, lookahead_units, g1, g2);
        if (rows > kIntMax) {   // rows overflow int: must be refused
            errors += ok;
            continue;
        }
        ++cases;
        if (!ok || (long long)work.num_units() != tiles_total * (r1 + r2)) { ++errors; continue; }
        // block sequence: L1 of the k-th active expert, then the L2 blocks whose g is k
        std::vector<int> act;
        for (int e = 0; e < num_experts; ++e) if (counts[e] > 0) act.push_back(e);
        const int a = int(act.size());
        std::vector<int> g(a);
        for (int k = 0, j = 0; k < a; ++k) {
            for (j = std::min(k + lookahead, a - 1); j < a - 1; ++j) {
                long long between = 0;
                for (int m = k + 1; m <= j; ++m) between += (long long)r1 * tiles[act[m]];
                if (between >= lookahead_units) break;
            }
            g[k] = j;
        }
        std::vector<long long> start[2];
        start[0].assign(a, 0), start[1].assign(a, 0);
        long long at = 0;
        for (int j = 0, k2 = 0; j < a; ++j) {
            start[0][j] = at, at += (long long)r1 * tiles[act[j]];
            for (; k2 < a && g[k2] == j; ++k2) start[1][k2] = at, at += (long long)r2 * tiles[act[k2]];
        }
        std::vector<long long> first_row(num_experts, 0);
        for (int e = 1; e < num_experts; ++e) first_row[e] = first_row[e - 1] + counts[e - 1];
        std::vector<int> slot(num_experts, -1);
        for (int k = 0; k < a; ++k) slot[act[k]] = k;
        for (int sample = 0; sample < 2000; ++sample) {
            const int i = sample == 0 ? 0 : sample == 1 ? work.num_units() - 1 : int(rng() % work.num_units());
            const MegaUnit u = work.get(i);
            const int ph = int(u.phase);
            if (u.expert < 0 || u.expert >= num_experts || slot[u.expert] < 0) { ++errors; continue; }
            const int t = tiles[u.expert];
            // groups of token tiles: the full groups before, then row tile, then token tile in the group
            const long long group = std::min(ph ? g2 : g1, t), first = u.token_tile / group * group;
            const long long in_group = std::min<long long>(group, t - first);
            const long long expect = start[ph][slot[u.expert]] + first * (ph ? r2 : r1) + u.row_tile * in_group +
                                     (u.token_tile - first);
            const long long row = first_row[u.expert] + (long long)u.token_tile * block_t;
            if (expect != i || u.token_tile >= t || u.row_tile >= (ph ? r2 : r1) || u.row_start != row ||
                u.num_rows != std::min<long long>(block_t, counts[u.expert] - (long long)u.token_tile * block_t))
                ++errors;
        }
    }
    // refused: too many experts, bad tile counts, units past INT_MAX
    Work work;
    std::vector<int> counts(65, 1);
    errors += work.build(counts.data(), 65, 8, 48, 56, 0, 0) || work.num_units() != 0;
    errors += work.build(counts.data(), 64, 0, 48, 56, 0, 0) || work.build(counts.data(), 64, 8, 0, 56, 0, 0);
    counts.assign(64, 1 << 22);   // 2^28 rows: 2^25 tiles of 104 units
    errors += work.build(counts.data(), 64, 8, 48, 56, 0, 0) || work.num_units() != 0;
    errors += !work.build(counts.data(), 0, 8, 48, 56, 0, 0) || work.num_units() != 0;
    counts.assign(64, 1 << 25);   // 2^31 rows (past INT_MAX), only 2^25 units
    errors += work.build(counts.data(), 64, 128, 1, 1, 0, 0) || work.num_units() != 0;
}

static Case random_case(std::mt19937_64& rng, long long i) {
    auto pick = [&](std::initializer_list<int> v) { return *(v.begin() + rng() % v.size()); };
    auto below = [&](int n) { return int(rng() % n); };
    Case c;
    const int num_experts = i % 9 == 0 ? 1 : pick({8, 16, 48, 64, 1 + below(64)});
    c.counts.assign(num_experts, 0);
    switch (below(6)) {
        case 0:   // decode: most experts get 0..2 rows
            for (int& n : c.counts) n = below(4) == 0 ? 1 + below(2) : 0;
            break;
        case 1:   // one token in total
            c.counts[below(num_experts)] = 1;
            break;
        case 2:   // skewed: a few hot experts
            for (int& n : c.counts) n = below(8) == 0 ? below(600) : below(3) == 0 ? below(20) : 0;
            break;
        case 3:   // nothing routed here
            break;
        default:  // moderate, some empty
            for (int& n : c.counts) n = below(5) == 0 ? 0 : below(160);
            break;
    }
    c.block_t = pick({8, 16, 32, 64, 128, 8 + below(121)});
    switch (below(4)) {
        case 0: case 1: c.r1 = 48, c.r2 = 56; break;   // 2 * 3072 / 128, 7168 / 128
        case 2: c.r1 = pick({1, 2, 3}), c.r2 = pick({1, 2, 5}); break;
        default: c.r1 = 1 + below(8), c.r2 = 1 + below(8); break;
    }
    c.lookahead = i % 17 == 0 ? 5 + below(60) : below(4);
    c.lookahead_units = pick({0, 0, 0, 132, 264, below(3000)});
    c.l2_cost = 0.3 + 1.2 * double(rng() % 1000) / 1000;
    c.ctas = pick({1, 2, 7, 132, 264});
    if (below(2)) c.g1 = pick({1, 2, 3, 1 + below(8)}), c.g2 = pick({1, 2, 5, 1 + below(8)});
    return c;
}

// Fixed scenarios for the effect of the lookahead (the Python test checks them loosely): all rows
// present at the start, 132 CTAs, the real row-tile counts, an L2 unit 3072 / 7168 of an L1 unit,
// durations +-20%.  `stall` is the L2 wait time over the busy time, `makespan` over the busy time
// per CTA (1 = no CTA ever idle).
static void report_lookahead(std::mt19937_64& rng) {
    struct Scenario { const char* name; int experts, rows, block_t; };
    for (const Scenario s : {Scenario{"decode", 32, 4, 16}, Scenario{"prefill", 32, 512, 128}}) {
        const std::pair<int, int> lookaheads[] = {{0, 0},   {1, 0},   {2, 0},   {4, 0}, {0, 132},
                                                  {0, 264}, {1, 264}, {0, 528}, {64, 0}};
        for (const auto& [la, lu] : lookaheads) {
            Case c;
            c.counts.assign(s.experts, s.rows);
            c.block_t = s.block_t, c.r1 = 48, c.r2 = 56, c.lookahead = la, c.lookahead_units = lu, c.ctas = 132;
            c.arrival_span = 0, c.l2_cost = 3072.0 / 7168, c.jitter = 0.2, c.stragglers = 0;
            Brute brute(c);
            Work work;
            work.build(c.counts.data(), s.experts, c.block_t, c.r1, c.r2, la, lu);
            std::vector<MegaUnit> order = make_order(work, false);
            std::vector<int> ids;
            Totals t;
            check_order(c, brute, work, order, true, ids, t);
            simulate(c, brute, work, order, ids, rng, t);
            std::printf("scenario=%s lookahead=%d lookahead_units=%d l2_units=%lld l2_waited=%lld stall=%.4f "
                        "makespan=%.4f errors=%lld\n",
                        s.name, la, lu, t.l2_units[la], t.l2_waited[la], t.l2_wait_time / t.busy_time,
                        t.makespan * c.ctas / t.busy_time,
                        t.mismatches + t.order_errors + t.interleave_errors + t.violations + t.deadlocks);
        }
    }
}

int main(int argc, char** argv) {
    long long num_cases = 400;
    unsigned long long seed = 1;
    bool report = false;
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        if (a == "--cases" && i + 1 < argc) num_cases = std::atoll(argv[++i]);
        else if (a == "--seed" && i + 1 < argc) seed = std::strtoull(argv[++i], nullptr, 10);
        else if (a == "--fault" && i + 1 < argc) {
            const std::string f = argv[++i];
            g_fault = f == "l2_first" ? Fault::L2First : f == "short_wait" ? Fault::ShortWait : Fault::None;
        }
        else if (a == "--report-lookahead") report = true;
        else {
            std::fprintf(stderr, "usage: %s [--cases N] [--seed S] [--fault none|l2_first|short_wait] "
                                 "[--report-lookahead]\n", argv[0]);
            return 2;
        }
    }
    std::mt19937_64 rng(seed);
    Totals tot;
    for (long long i = 0; i < num_cases; ++i) {
        Case c = random_case(rng, i);
        const bool l2_first = g_fault == Fault::L2First;
        if (l2_first) c.lookahead = 0, c.lookahead_units = 0;
        const Brute brute(c);
        Work work;
        if (!work.build(c.counts.data(), int(c.counts.size()), c.block_t, c.r1, c.r2, c.lookahead, c.lookahead_units,
                        c.g1, c.g2)) {
            ++tot.build_failures;
            continue;
        }
        ++tot.cases, tot.units += work.num_units();
        ++tot.by_experts[int(c.counts.size())], ++tot.by_ctas[c.ctas], ++tot.by_block_t[c.block_t];
        ++tot.by_lookahead[c.lookahead], ++tot.by_row_tiles[{c.r1, c.r2}];
        int zero = 0, rows = 0;
        for (int n : c.counts) zero += n == 0, rows += n;
        tot.zero_expert_cases += zero > 0, tot.empty_cases += rows == 0, tot.one_token_cases += rows == 1;
        int most_tiles = 0;
        for (int t : brute.tiles) most_tiles = std::max(most_tiles, t);
        tot.grouped_cases += std::min(c.g1, c.g2) < most_tiles;
        const std::vector<MegaUnit> order = make_order(work, l2_first);
        std::vector<int> ids;
        if (!check_order(c, brute, work, order, !l2_first, ids, tot)) continue;
        simulate(c, brute, work, order, ids, rng, tot);
    }
    std::printf("summary cases=%lld units=%lld claims=%lld build_failures=%lld mismatches=%lld duplicates=%lld "
                "unclaimed=%lld order_errors=%lld interleave_errors=%lld violations=%lld deadlocks=%lld "
                "bad_counters=%lld\n",
                tot.cases, tot.units, tot.claims, tot.build_failures, tot.mismatches, tot.duplicates, tot.unclaimed,
                tot.order_errors, tot.interleave_errors, tot.violations, tot.deadlocks, tot.bad_counters);
    std::printf("coverage zero_expert_cases=%lld empty_cases=%lld one_token_cases=%lld grouped_cases=%lld "
                "min_block_t=%d max_block_t=%d",
                tot.zero_expert_cases, tot.empty_cases, tot.one_token_cases, tot.grouped_cases,
                tot.by_block_t.empty() ? 0 : tot.by_block_t.begin()->first,
                tot.by_block_t.empty() ? 0 : tot.by_block_t.rbegin()->first);
    auto keys = [](const char* name, const std::map<int, int>& m) {
        std::printf(" %s=", name);
        bool first = true;
        for (const auto& kv : m) std::printf(first ? "%d" : ",%d", kv.first), first = false;
    };
    keys("experts", tot.by_experts), keys("ctas", tot.by_ctas), keys("lookahead", tot.by_lookahead);
    std::printf(" row_tiles=");
    bool first = true;
    for (const auto& kv : tot.by_row_tiles)
        std::printf(first ? "%dx%d" : ",%dx%d", kv.first.first, kv.first.second), first = false;
    std::printf("\n");
    for (const auto& kv : tot.l2_units)
        std::printf("waits lookahead=%d l2_units=%lld l2_waited=%lld l1_waited=%lld\n", kv.first, kv.second,
                    tot.l2_waited[kv.first], tot.l1_waited[kv.first]);
    long long limit_cases = 0, limit_errors = 0;
    check_limits(rng, limit_cases, limit_errors);
    std::printf("limits cases=%lld errors=%lld\n", limit_cases, limit_errors);
    if (report) report_lookahead(rng);
    return 0;
}
