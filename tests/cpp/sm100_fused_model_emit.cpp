// Op stream of one rank of the fused sm100 Mega MoE kernel (impls/sm100_fp8_nvfp4_mega_moe.cuh) for the
// functional model (tests/sm100_model/fused.py drives it, tests/sm100_model/interp.py executes it).
//
// Plain C++17 (g++).  The kernel's own host-device code runs here: the work order (MegaMoEWork::build,
// get, wait_for), the padded token rows and the units' plan tiles (scheduler/sm100_mega_tiles.cuh),
// the plan's per-tile steps with their Cursors (GemmPlan::produce_tile / mma_tile / epilogue_tile, two
// plans: L1 n = 2 inter, k = hidden; L2 n = hidden, k = inter, one stage ring, one TMEM accumulator
// pair, one set of barriers), and the epilogues (epilogue/sm100_epilogue.cuh: swiglu_quant_chunk +
// quantize_l2_input for L1, plain_rows_chunk for L2, tile_alpha; the kind::f16 recipes' L1 swiglu_chunk /
// swiglu_bf16_chunk).  The producer's, the MMA warp's and (NVFP4_EXACT) the dequant warpgroup's loops are the
// kernel's too (mega_produce_units / mega_mma_units / mega_dequant_units), called here with the model's hooks
// (claim counter, tags, waits, hand-over); the epilogue's loop and dispatch per unit phase (section 2c)
// is written again here over the model's primitives (the kernel's uses named barriers and
// ClusterBarrier waits; a change there must be mirrored here; the docs say so).  The comm warps are modelled by their effects:
// one gather thread per CTA (rows cta, cta + ctas, ..., each to its padded row, then arrived[tile] += 1:
// mega::gather_rows_with) and, with pushes on, one push thread per CTA (a row of another rank's pair
// once its token tile's L2 units are done: mega::push_rows).  The combine reduction after barrier 1 is
// the driver's (Python).
//
// Roles are threads of a deterministic cooperative scheduler (one runs at a time, the next drawn by a
// seeded RNG among those whose wait can pass: an mbarrier phase, a counter target, a named barrier), so
// the stream is one legal interleaving; a deadlock is an error (exit 3).
//
// Protocol with the driver: the program reads its problem from the file argv[1]; it prints one JSON line
// per op; after each {"op":"tmem_ld"} it flushes and reads one line from stdin: the registers of that
// thread's load (uint32, space-separated), which the driver's interpreter computed.  Ops besides the
// interpreter's (interp.Machine): unit_start / unit_done (a unit's inputs waited for / its done count),
// gather {row, prow}, l2x {tile, sbyte, sf, cbyte, codes[]} (bytes of the L2 input written by
// quantize_l2_input), h {idx, vals} (the f16 recipes' L1 output: element indices into the BF16 L2 input
// [rows, inter], BF16 bits), cstore {rows, cols, vals} (combine rows, BF16 bits), push {row}, claim {unit};
// for NVFP4_EXACT the dequant's and the TS MMA's (tests/cpp/sm100_f16_model_ops.h: lds, dequant_chunk,
// tmem_st, tmem_st_wait, mma_ts), executed by tests/sm100_model/f16.py's F16Machine.
// Tensor ids: the L1 plan's 0..3 (A, SFA, B = the padded L1 input, SFB), the L2 plan's 8..11.
//
// Problem file (whitespace-separated integers): recipe (0 NVFP4, 1 MXFP4_FP8, 2 NVFP4_EXACT, 3 BF16) block_t stages hidden
// inter num_experts ctas seed lookahead_experts lookahead_units push rank; counts[num_experts]; rows;
// per row: source rank; per row: route weight (float32 bits); per expert: l1 alpha gate, up, l2 alpha,
// l2_inv_global (float32 bits).
// Negative controls (tests only): built with -DDG_EMIT_FAULTS, DG_FUSED_FAULT selects one:
//   no_l1_wait     L2 units do not wait for their L1 units (wait_inputs skipped for L2)
//   swap_k         the L1 plan gets k = inter, the L2 plan k = hidden
//   unpadded_b     the plan tiles' token rows at the unit's unpadded row_start
//   combine_padded L2 combine rows written at the padded rows
//   no_tag         the producer does not tag a unit's first stage (the MMA warp reads a stale tag)
//   dequant_skip_end  the dequant warps read the -1 tag as their last unit again (the loop does not end there)
#include <condition_variable>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <iostream>
#include <mutex>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <deep_gemm/epilogue/sm100_epilogue.cuh>
#include <deep_gemm/scheduler/mega_moe_work.cuh>
#include <deep_gemm/scheduler/sm100_gemm_plan.cuh>
#include <deep_gemm/scheduler/sm100_mega_tiles.cuh>

#include "sm100_f16_model_ops.h"

using namespace deep_gemm;
using namespace deep_gemm::sm100;

namespace {

constexpr int kMaxExperts = 64;

[[noreturn]] void die(const std::string& msg) {
    std::fflush(stdout);
    std::fprintf(stderr, "%s\n", msg.c_str());
    std::exit(3);
}

#if defined(DG_EMIT_FAULTS)
bool fault(const char* name) {
    const char* f = std::getenv("DG_FUSED_FAULT");
    return f != nullptr && std::strcmp(f, name) == 0;
}
#else
constexpr bool fault(const char*) { return false; }
#endif

// ------------------------------------------------------------------------------ cooperative scheduler
struct Sched {
    std::mutex m;
    std::vector<std::condition_variable> cvs;
    std::mt19937_64 rng;
    std::vector<int> alive;
    std::vector<std::function<bool()>> waiting;   // empty: runnable
    int running = -1;
    Sched(uint64_t seed, int n) : cvs(size_t(n)), rng(seed), waiting(size_t(n)) {}
    bool eligible(int t) const { return !waiting[size_t(t)] || waiting[size_t(t)](); }
    void pick_locked() {
        if (alive.empty()) { running = -1; return; }
        std::vector<int> ok;
        for (int t : alive)
            if (eligible(t)) ok.push_back(t);
        if (ok.empty()) die("deadlock: every live role waits on something that cannot happen");
        running = ok[std::uniform_int_distribution<size_t>(0, ok.size() - 1)(rng)];
        cvs[size_t(running)].notify_one();
    }
    void yield_locked(std::unique_lock<std::mutex>& lk, int me) {
        pick_locked();
        cvs[size_t(me)].wait(lk, [&] { return running == me; });
    }
    void wait_until(int me, std::function<bool()> pred) {
        std::unique_lock<std::mutex> lk(m);
        waiting[size_t(me)] = pred;
        while (!pred()) yield_locked(lk, me);
        waiting[size_t(me)] = nullptr;
    }
    void yield(int me) {
        std::unique_lock<std::mutex> lk(m);
        yield_locked(lk, me);
    }
};

void emit(const std::string& s) {
    std::fwrite(s.data(), 1, s.size(), stdout);
    std::fputc('\n', stdout);
}

struct Bar { int count = 0, pending = 0; long long tx = 0; uint32_t phases = 0; bool init = false; };

// ------------------------------------------------------------------------------ the rank's state
struct Problem {
    int recipe = 0, block_t = 32, stages = 2, hidden = 0, inter = 0, num_experts = 0, ctas = 1, la_e = 0, la_u = 0,
        push = 0, rank = 0;
    uint64_t seed = 0;
    std::vector<int> counts, row_rank;
    std::vector<float> row_weight, l1_alpha, l2_alpha, l2_inv;
    int rows = 0;
};

struct State {
    Problem p;
    Sched* sched = nullptr;
    MegaMoEWork<kMaxExperts> work;
    int next_unit = 0;
    std::vector<int> arrived, l1_done, l2_done;
    std::vector<uint8_t> l2_x, l2_x_sf;            // the L2 input written by quantize_l2_input
    std::vector<uint16_t> combine;
};

struct Cta {
    int id;
    State* st;
    std::vector<Bar> bars;
    int stage_unit[16];
    int tile_unit[2];
    Bar unit_ready[2];
    int nb_count = 0, nb_gen = 0;                   // the epilogue's named barrier (128 threads)
    int ws_count[12] = {}, ws_gen[12] = {};         // the dequant warps' __syncwarp
    std::vector<float> scratch;                    // float [64][kBlockT]
};

uint32_t fbits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

// ------------------------------------------------------------------------------ recording Ops (one per role thread and plan)
struct Ops {
    Cta* cta;
    int me;
    int tensor_base = 0;        // 0: the L1 plan's tensors, 8: the L2 plan's
    int warp = -1, lane = -1;
    uint32_t elem_bytes[4] = {1u, 1u, 1u, 1u};   // TMA box element bytes of the plan's tensors A, SFA, B, SFB

    Sched& sched() const { return *cta->st->sched; }
    std::string head(const char* op) const {
        std::ostringstream o;
        o << "{\"op\":\"" << op << "\",\"cta\":" << cta->id;
        return o.str();
    }
    void record(const std::string& line) {
        emit(line);
        sched().yield(me);
    }
    Bar& bar(int id) {
        if (id < 0 || size_t(id) >= cta->bars.size() || !cta->bars[size_t(id)].init) die("barrier not initialised");
        return cta->bars[size_t(id)];
    }
    static void settle(Bar& b) {
        if (b.pending < 0) die("mbarrier: more arrivals than its count");
        if (b.pending == 0 && b.tx == 0) { ++b.phases; b.pending = b.count; }
    }
    void init_barrier(int id, int count) {
        if (size_t(id) >= cta->bars.size()) cta->bars.resize(size_t(id) + 1);
        Bar& b = cta->bars[size_t(id)];
        if (b.init) die("barrier initialised twice");
        b.init = true, b.count = count, b.pending = count;
        emit(head("init_barrier") + ",\"mbar\":" + std::to_string(id) + ",\"count\":" + std::to_string(count) + "}");
    }
    void wait(int id, uint32_t parity) {
        bar(id);
        sched().wait_until(me, [this, id, parity] { return (cta->bars[size_t(id)].phases & 1u) != (parity & 1u); });
        record(head("wait") + ",\"mbar\":" + std::to_string(id) + ",\"parity\":" + std::to_string(parity) + "}");
    }
    void arrive(int id) {
        Bar& b = bar(id);
        --b.pending, settle(b);
        record(head("arrive") + ",\"mbar\":" + std::to_string(id) + "}");
    }
    void arrive_expect_tx(int id, uint32_t bytes) {
        Bar& b = bar(id);
        b.tx += bytes, --b.pending, settle(b);
        record(head("arrive_expect_tx") + ",\"mbar\":" + std::to_string(id) + ",\"bytes\":" + std::to_string(bytes) + "}");
    }
    void complete_tx(int id, uint32_t bytes) {
        Bar& b = bar(id);
        b.tx -= bytes, settle(b);
    }
    void tma_load(int tensor, const int32_t (&coords)[2], const uint32_t (&box)[2], uint32_t smem, int swizzle, int mbar) {
        // smem bytes per element: 1 (bytes, E4M3, 16U4_ALIGN16B codes), 2 (BF16: the f16 recipes' tokens, BF16 weights)
        const uint32_t bytes = box[0] * box[1] * elem_bytes[tensor];
        std::ostringstream o;
        o << head("tma_load") << ",\"tensor\":" << tensor + tensor_base << ",\"coords\":[" << coords[0] << "," << coords[1]
          << "],\"box\":[" << box[0] << "," << box[1] << "],\"smem\":" << smem << ",\"swizzle\":" << swizzle << ",\"mbar\":" << mbar
          << ",\"tx\":" << bytes << "}";
        complete_tx(mbar, bytes);
        record(o.str());
    }
    void bulk_copy(int tensor, uint64_t gofs, uint32_t bytes, uint32_t smem, int mbar) {
        std::ostringstream o;
        o << head("bulk_copy") << ",\"tensor\":" << tensor + tensor_base << ",\"gofs\":" << gofs << ",\"bytes\":" << bytes
          << ",\"smem\":" << smem << ",\"mbar\":" << mbar << ",\"tx\":" << bytes << "}";
        complete_tx(mbar, bytes);
        record(o.str());
    }
    void fence_after_sync() { record(head("fence_after") + "}"); }
    void fence_before_sync() { record(head("fence_before") + "}"); }
    void utccp(uint64_t desc, uint32_t taddr, UtccpShape) {
        std::ostringstream o;
        o << head("utccp") << ",\"desc\":" << desc << ",\"taddr\":" << taddr << ",\"shape\":\"32x128b.warpx4\"}";
        record(o.str());
    }
    void mma(MmaKind kind, uint32_t idesc, uint64_t adesc, uint64_t bdesc, uint32_t d, uint32_t sfa, uint32_t sfb, bool acc) {
        const char* k = kind == MmaKind::MXF4NVF4_BLOCK16 ? "mxf4nvf4.block16" : kind == MmaKind::F16 ? "f16" : "mxf8f6f4.block32";
        std::ostringstream o;
        o << head("mma") << ",\"kind\":\"" << k << "\",\"idesc\":" << idesc << ",\"adesc\":" << adesc << ",\"bdesc\":" << bdesc
          << ",\"d\":" << d << ",\"sfa\":" << sfa << ",\"sfb\":" << sfb << ",\"acc\":" << (acc ? 1 : 0) << "}";
        record(o.str());
    }
    void commit(int id) {
        Bar& b = bar(id);
        --b.pending, settle(b);
        record(head("commit") + ",\"mbar\":" + std::to_string(id) + "}");
    }
    template <TmemLdShape kShape, int kNum>
    void tmem_ld(int w, int l, uint32_t taddr, uint32_t (&regs)[kTmemLdRegs<kShape, kNum>]) {
        std::ostringstream o;
        o << head("tmem_ld") << ",\"warp\":" << w << ",\"lane\":" << l << ",\"shape\":\""
          << (kShape == TmemLdShape::K32x32B ? "32x32b" : "16x256b") << "\",\"num\":" << kNum << ",\"taddr\":" << taddr << "}";
        emit(o.str());
        std::fflush(stdout);
        std::string line;
        if (!std::getline(std::cin, line)) die("tmem_ld: no registers from the driver");
        std::istringstream in(line);
        for (int j = 0; j < kTmemLdRegs<kShape, kNum>; ++j)
            if (!(in >> regs[j])) die("tmem_ld: too few registers from the driver");
        sched().yield(me);
    }
    void tmem_ld_wait() { record(head("tmem_ld_wait") + ",\"warp\":" + std::to_string(warp) + ",\"lane\":" + std::to_string(lane) + "}"); }
};

// The kind::f16 recipes' ops (tests/cpp/sm100_f16_model_ops.h) on top, and the dequant warps' warp_arrive:
// __syncwarp (the 32 lanes of the warp meet: a counter per warp) then lane 0's arrive.
struct FusedOps : f16_model::F16Record<Ops> {
    void warp_arrive(int id, int l) {
        Cta& c = *cta;
        const int w = warp, gen = c.ws_gen[w];
        if (++c.ws_count[w] == 32) c.ws_count[w] = 0, ++c.ws_gen[w];
        sched().wait_until(me, [&c, w, gen] { return c.ws_gen[w] != gen; });
        if (l == 0) arrive(id);
    }
};

// ------------------------------------------------------------------------------ the roles
template <Recipe kRecipe, int kBlockT, int kStages>
struct Rank {
    using Plan = GemmPlan<kRecipe, kBlockT, kStages>;
    using Cursor = typename Plan::Cursor;
    static constexpr bool kNvfp4 = kRecipe == Recipe::NVFP4;
    static constexpr bool kF16 = !Plan::kBlockScaledMma;   // NVFP4_EXACT, BF16: BF16 token rows, unpadded
    static constexpr bool kDequant = Plan::kATmem;         // NVFP4_EXACT: the dequant warpgroup
    // the dequant's 2^-7 back in every alpha: common/fp4_bits.cuh fp4::kNvfp4Compensation (that header needs
    // cuda_bf16.h, not on this host build's path; the value is checked in tests/test_sm100_fused_model.py)
    static constexpr float kComp = kDequant ? 128.0f : 1.0f;
    static constexpr int kDequantThreads = 32 * Plan::kDequantWarps;

    State& st;
    Plan l1p, l2p;
    int l1_row_tiles, l2_row_tiles;

    explicit Rank(State& s)
        : st(s),
          l1p{2 * s.p.inter, fault("swap_k") ? s.p.inter : s.p.hidden, 1024u, 0u},
          l2p{s.p.hidden, fault("swap_k") ? s.p.hidden : s.p.inter, 1024u, 0u},
          l1_row_tiles(2 * s.p.inter / Plan::kBlockM),
          l2_row_tiles(s.p.hidden / Plan::kBlockM) {}

    PlanTile plan_tile(const MegaUnit& unit) const {
        PlanTile t = mega_plan_tile<kBlockT, !kF16>(unit);
        if (fault("unpadded_b")) t.row_start = unit.row_start;
        return t;
    }

    static std::string unit_json(const char* op, int cta, int u, const MegaUnit& unit) {
        std::ostringstream o;
        o << "{\"op\":\"" << op << "\",\"cta\":" << cta << ",\"unit\":" << u << ",\"phase\":" << int(unit.phase)
          << ",\"expert\":" << unit.expert << ",\"row_tile\":" << unit.row_tile << ",\"token_tile\":" << unit.token_tile
          << ",\"tile_index\":" << unit.tile_index << ",\"row_start\":" << unit.row_start << ",\"num_rows\":" << unit.num_rows << "}";
        return o.str();
    }

    // 2a. the producer (kernel: warp 0 lane 0): the kernel's own loop (mega_produce_units), with the
    // model's claim counter, tags and waits
    void producer(FusedOps& ops1, FusedOps& ops2) {
        Cta& c = *ops1.cta;
        mega_produce_units(
            l1p, l2p, ops1, ops2, st.work, [this](const MegaUnit& unit) { return plan_tile(unit); },
            [&] {
                const int u = st.next_unit++;   // units.claim()
                ops1.record("{\"op\":\"claim\",\"cta\":" + std::to_string(c.id) + ",\"unit\":" + std::to_string(u) + "}");
                return u;
            },
            [&](int stage, int u) {
                if (u < 0 || !fault("no_tag")) c.stage_unit[stage] = u;
            },
            [&](const MegaUnit& unit, const MegaWait& w, int u) {
                // units.wait_inputs(unit, w): L1 the tile's rows gathered, L2 its L1 units done (kParts = 1)
                if (unit.phase == MegaPhase::L1) {
                    const int tile = unit.tile_index, target = unit.num_rows;
                    st.sched->wait_until(ops1.me, [this, tile, target] { return st.arrived[size_t(tile)] >= target; });
                } else if (!fault("no_l1_wait")) {
                    const int ctr = w.counter, target = w.target;
                    st.sched->wait_until(ops1.me, [this, ctr, target] { return st.l1_done[size_t(ctr)] >= target; });
                }
                ops1.record(unit_json("unit_start", c.id, u, unit));
            });
    }

    // 2b. the MMA warp (kernel: warp 1): the kernel's own loop (mega_mma_units), with the model's hand-over
    // 2b'. the dequant warpgroup (NVFP4_EXACT; kernel: warps 8-11): the kernel's own loop (mega_dequant_units)
    void dequant(FusedOps& o) {
        if constexpr (kDequant) {
            Cta& c = *o.cta;
            int last = -1;
            mega_dequant_units(l1p, l2p, o, st.work,
                               [&](int stage) {
                                   const int u = c.stage_unit[stage];
                                   if (u < 0 && fault("dequant_skip_end")) return last;   // the -1 tag not seen
                                   return last = u;
                               },
                               o.warp, o.lane);
        }
    }

    void mma(FusedOps& ops1, FusedOps& ops2) {
        Cta& c = *ops1.cta;
        mega_mma_units(l1p, l2p, ops1, ops2, st.work, [this](const MegaUnit& unit) { return plan_tile(unit); },
                       [&](int stage) { return c.stage_unit[stage]; },
                       [&](int buf, int u) {
                           c.tile_unit[buf] = u;
                           Bar& b = c.unit_ready[buf];
                           --b.pending, Ops::settle(b);
                           ops1.record("{\"op\":\"handover\",\"cta\":" + std::to_string(c.id) + ",\"buf\":" +
                                       std::to_string(buf) + ",\"unit\":" + std::to_string(u) + "}");
                       });
    }

    void named_barrier(FusedOps& o) {
        Cta& c = *o.cta;
        const int gen = c.nb_gen;
        if (++c.nb_count == Plan::kEpilogueThreads) c.nb_count = 0, ++c.nb_gen;
        st.sched->wait_until(o.me, [&c, gen] { return c.nb_gen != gen; });
    }

    // 2c. the epilogue (kernel: warps 4-7; this thread etid = 32 (warp - 4) + lane)
    void epilogue(FusedOps& ops1, FusedOps& ops2) {
        Cta& c = *ops1.cta;
        const int warp = ops1.warp, lane = ops1.lane, etid = 32 * (warp - 4) + lane;
        const float cb = epi::clamp_bf16(INFINITY);
        const int hidden = st.p.hidden, inter = st.p.inter;
        Cursor cur;
        for (;;) {
            const uint32_t buf = cur.buf(), ph = cur.buf_phase();
            st.sched->wait_until(ops1.me, [&c, buf, ph] { return (c.unit_ready[buf].phases & 1u) != (ph & 1u); });
            const int u = c.tile_unit[buf];
            if (u < 0) break;
            const MegaUnit unit = st.work.get(u);
            const PlanTile tile = plan_tile(unit);
            if (unit.phase == MegaPhase::L1 && kF16) {
                // the f16 recipes' L1: BF16 h into the L2 input [rows, inter] (fp8_nvfp4: swiglu_chunk, clamp on
                // the FP32 values; bf16: swiglu_bf16_chunk)
                const float ag = epi::tile_alpha(st.p.l1_alpha.data(), 2, unit.expert, 0, kComp);
                const float au = epi::tile_alpha(st.p.l1_alpha.data(), 2, unit.expert, 1, kComp);
                const float* w = st.p.row_weight.data() + unit.row_start;
                l1p.template epilogue_tile<TmemLdShape::K16x256B>(
                    ops1, tile, cur, warp, lane,
                    [&](const PlanTile& t, uint32_t lane_base, uint32_t col, int l, const uint32_t (&regs)[16]) {
                        std::ostringstream is, vs;
                        int n = 0;
                        const auto store = [&](size_t i, uint16_t v) { is << (n ? "," : "") << i, vs << (n ? "," : "") << v, ++n; };
                        if constexpr (kDequant)
                            epi::swiglu_chunk<Plan, false>(t, lane_base, col, l, regs, ag, au, INFINITY, w, 2 * inter, store);
                        else
                            epi::swiglu_bf16_chunk<Plan, false>(t, lane_base, col, l, regs, ag, au, cb, w, 2 * inter, store);
                        if (n)
                            emit("{\"op\":\"h\",\"cta\":" + std::to_string(c.id) + ",\"idx\":[" + is.str() + "],\"vals\":[" +
                                 vs.str() + "]}");
                    },
                    [&](const PlanTile&) {
                        ops1.record(ops1.head("fence_proxy_async") + "}");
                        named_barrier(ops1);
                        if (etid == 0) {
                            ++st.l1_done[size_t(unit.tile_index)];   // units.l1_done(unit)
                            ops1.record(unit_json("unit_done", c.id, u, unit));
                        }
                    });
            } else if (unit.phase == MegaPhase::L1) {
                const float ag = epi::tile_alpha(st.p.l1_alpha.data(), 2, unit.expert, 0, 1.0f);
                const float au = epi::tile_alpha(st.p.l1_alpha.data(), 2, unit.expert, 1, 1.0f);
                const float* w = kNvfp4 ? nullptr : st.p.row_weight.data() + unit.row_start;
                l1p.template epilogue_tile<TmemLdShape::K16x256B>(
                    ops1, tile, cur, warp, lane,
                    [&](const PlanTile& t, uint32_t lane_base, uint32_t col, int l, const uint32_t (&regs)[16]) {
                        epi::swiglu_quant_chunk<Plan, false>(t, lane_base, col, l, regs, ag, au, cb, w, c.scratch.data());
                    },
                    [&](const PlanTile& t) {
                        if constexpr (!kF16) {
                        named_barrier(ops1);
                        const float inv = kNvfp4 ? st.p.l2_inv[size_t(unit.expert)] : 1.0f;
                        epi::quantize_l2_input<Plan>(t, etid, 128, c.scratch.data(), inter, inv, st.l2_x.data(), st.l2_x_sf.data());
                        // what this thread wrote (the plan's index map), for the driver's copy of the L2 input
                        for (int p = etid; p < Plan::kL2Blocks * Plan::kTileN; p += 128) {
                            const auto o = Plan::l2_block_out(t, p, inter);
                            if (!o.valid) continue;
                            std::ostringstream s;
                            s << "{\"op\":\"l2x\",\"cta\":" << c.id << ",\"tile\":" << unit.tile_index << ",\"sbyte\":" << o.sf_byte
                              << ",\"sf\":" << int(st.l2_x_sf[o.sf_byte]) << ",\"cbyte\":" << o.code_byte << ",\"codes\":[";
                            const int nbytes = kNvfp4 ? 8 : 32;
                            for (int i = 0; i < nbytes; ++i) s << (i ? "," : "") << int(st.l2_x[o.code_byte + uint64_t(i)]);
                            s << "]}";
                            emit(s.str());
                        }
                        ops1.record(ops1.head("fence_proxy_async") + "}");
                        named_barrier(ops1);
                        if (etid == 0) {
                            ++st.l1_done[size_t(unit.tile_index)];   // units.l1_done(unit)
                            ops1.record(unit_json("unit_done", c.id, u, unit));
                        }
                        }
                    });
            } else {
                const float a = epi::tile_alpha(st.p.l2_alpha.data(), 1, unit.expert, 0, kComp);
                l2p.template epilogue_tile<TmemLdShape::K32x32B>(
                    ops2, tile, cur, warp, lane,
                    [&](const PlanTile& t, uint32_t lane_base, uint32_t col, int l, const uint32_t (&regs)[16]) {
                        std::ostringstream rs, cs, vs;
                        int n = 0;
                        const int row0 = fault("combine_padded") ? unit.tile_index * kBlockT : unit.row_start;
                        epi::plain_rows_chunk<Plan, kNvfp4>(
                            t, lane_base, col, l, regs, a, st.p.row_weight.data() + unit.row_start, [&](int tok, int out_col, uint16_t v) {
                                const size_t row = size_t(row0 + tok);
                                if (row < size_t(st.p.rows)) st.combine[row * size_t(hidden) + size_t(out_col)] = v;
                                rs << (n ? "," : "") << row, cs << (n ? "," : "") << out_col, vs << (n ? "," : "") << v;
                                ++n;
                            });
                        if (n)
                            emit("{\"op\":\"cstore\",\"cta\":" + std::to_string(c.id) + ",\"rows\":[" + rs.str() + "],\"cols\":[" +
                                 cs.str() + "],\"vals\":[" + vs.str() + "]}");
                    },
                    [&](const PlanTile&) {
                        named_barrier(ops2);
                        if (etid == 0) {
                            ++st.l2_done[size_t(unit.tile_index)];   // units.l2_done(unit)
                            ops2.record(unit_json("unit_done", c.id, u, unit));
                        }
                    });
            }
        }
    }

    // the k-th active expert of a row (rows lie back to back in expert order)
    int active_of(int row) const {
        int k = 0;
        while (row >= st.work.row_prefix[k + 1]) ++k;
        return k;
    }

    // 2d. comm warps, gather (mega::gather_rows_with with the kernel's RawTokenRow placement)
    void gather(FusedOps& o) {
        for (int row = o.cta->id; row < st.work.row_prefix[st.work.num_active]; row += st.p.ctas) {
            const int k = active_of(row);
            const int prow = mega_padded_row<kBlockT, !kF16>(st.work, k, row);
            o.record("{\"op\":\"gather\",\"cta\":" + std::to_string(o.cta->id) + ",\"row\":" + std::to_string(row) +
                     ",\"prow\":" + std::to_string(prow) + "}");
            ++st.arrived[size_t(mega_token_tile<kBlockT>(st.work, k, row))];
        }
    }

    // 2d. comm warps, combine pushes (mega::push_rows): rows of other ranks' pairs once the tile's L2 units are done
    void push(FusedOps& o) {
        for (int row = o.cta->id; row < st.work.row_prefix[st.work.num_active]; row += st.p.ctas) {
            if (st.p.row_rank[size_t(row)] == st.p.rank) continue;
            const int tile = mega_token_tile<kBlockT>(st.work, active_of(row), row), target = l2_row_tiles;
            st.sched->wait_until(o.me, [this, tile, target] { return st.l2_done[size_t(tile)] >= target; });
            o.record("{\"op\":\"push\",\"cta\":" + std::to_string(o.cta->id) + ",\"row\":" + std::to_string(row) + "}");
        }
    }

    int run() {
        const Problem& p = st.p;
        if (!st.work.build(p.counts.data(), p.num_experts, kBlockT, l1_row_tiles, l2_row_tiles, p.la_e, p.la_u))
            die("MegaMoEWork::build refused the problem");
        const int tiles = st.work.num_token_tiles();
        st.arrived.assign(size_t(tiles), 0), st.l1_done.assign(size_t(tiles), 0), st.l2_done.assign(size_t(tiles), 0);
        const size_t prows = size_t((tiles * kBlockT + 127) / 128 * 128);
        if constexpr (!kF16) {   // the f16 recipes' L2 input is BF16 h, written by the h ops
            st.l2_x.assign(prows * size_t(kNvfp4 ? p.inter / 2 : p.inter), 0);
            st.l2_x_sf.assign(prows * size_t(p.inter / Plan::kL2Gran), 0);
        }
        st.combine.assign(size_t(p.rows) * size_t(p.hidden), 0);
        {
            std::ostringstream o;
            o << "{\"op\":\"problem\",\"units\":" << st.work.num_units() << ",\"token_tiles\":" << tiles << ",\"l1_row_tiles\":"
              << l1_row_tiles << ",\"l2_row_tiles\":" << l2_row_tiles << ",\"smem_bytes\":" << Plan::kSmemBytes
              << ",\"tmem_cols\":" << Plan::Tmem::kAlloc << ",\"order\":[";
            for (int u = 0; u < st.work.num_units(); ++u) {
                const MegaUnit x = st.work.get(u);
                o << (u ? "," : "") << "[" << int(x.phase) << "," << x.expert << "," << x.row_tile << "," << x.token_tile << ","
                  << x.tile_index << "," << x.row_start << "," << x.num_rows << "]";
            }
            o << "]}";
            emit(o.str());
        }
        const int per_cta = 2 + Plan::kEpilogueThreads + kDequantThreads + 1 + (p.push ? 1 : 0);
        const int nthreads = per_cta * p.ctas;
        Sched sched(p.seed * 1000003ull + uint64_t(p.rank), nthreads);
        st.sched = &sched;
        std::vector<Cta> ctas(size_t(p.ctas));
        std::vector<FusedOps> ops1(static_cast<size_t>(nthreads)), ops2(static_cast<size_t>(nthreads));
        for (int c = 0; c < p.ctas; ++c) {
            Cta& x = ctas[size_t(c)];
            x.id = c, x.st = &st, x.scratch.assign(size_t(64 * kBlockT), 0.0f);
            for (int& v : x.stage_unit) v = -2;
            for (Bar& b : x.unit_ready) b.init = true, b.count = 1, b.pending = 1;
        }
        for (int i = 0; i < nthreads; ++i) {
            Cta* c = &ctas[size_t(i / per_cta)];
            static_cast<Ops&>(ops1[size_t(i)]) = Ops{c, i, 0};
            static_cast<Ops&>(ops2[size_t(i)]) = Ops{c, i, 8};
            for (FusedOps* o : {&ops1[size_t(i)], &ops2[size_t(i)]}) {
                if (kRecipe == Recipe::BF16) o->elem_bytes[0] = 2u;   // BF16 weights
                if (kF16) o->elem_bytes[2] = 2u;                      // BF16 tokens
            }
            const int r = i % per_cta;
            if (r >= 2 && r < 2 + Plan::kEpilogueThreads) {
                const int e = r - 2;
                ops1[size_t(i)].warp = ops2[size_t(i)].warp = 4 + e / 32;
                ops1[size_t(i)].lane = ops2[size_t(i)].lane = e % 32;
            } else if (r >= 2 + Plan::kEpilogueThreads && r < 2 + Plan::kEpilogueThreads + kDequantThreads) {
                const int e = r - 2 - Plan::kEpilogueThreads;
                ops1[size_t(i)].warp = ops2[size_t(i)].warp = 8 + e / 32;
                ops1[size_t(i)].lane = ops2[size_t(i)].lane = e % 32;
            }
        }
        for (int c = 0; c < p.ctas; ++c) l1p.init_barriers(ops1[size_t(c * per_cta)]);   // one thread, before the sync
        {
            std::lock_guard<std::mutex> g(sched.m);
            for (int i = 0; i < nthreads; ++i) sched.alive.push_back(i);
        }
        std::vector<std::thread> th;
        auto body = [&](int me, std::function<void()> fn) {
            {
                std::unique_lock<std::mutex> lk(sched.m);
                sched.cvs[size_t(me)].wait(lk, [&] { return sched.running == me; });
            }
            fn();
            std::unique_lock<std::mutex> lk(sched.m);
            for (size_t i = 0; i < sched.alive.size(); ++i)
                if (sched.alive[i] == me) { sched.alive.erase(sched.alive.begin() + long(i)); break; }
            sched.pick_locked();
        };
        for (int i = 0; i < nthreads; ++i) {
            const int r = i % per_cta;
            FusedOps* a = &ops1[size_t(i)];
            FusedOps* b = &ops2[size_t(i)];
            std::function<void()> fn;
            if (r == 0) fn = [this, a, b] { producer(*a, *b); };
            else if (r == 1) fn = [this, a, b] { mma(*a, *b); };
            else if (r < 2 + Plan::kEpilogueThreads) fn = [this, a, b] { epilogue(*a, *b); };
            else if (r < 2 + Plan::kEpilogueThreads + kDequantThreads) fn = [this, a] { dequant(*a); };
            else if (r == 2 + Plan::kEpilogueThreads + kDequantThreads) fn = [this, a] { gather(*a); };
            else fn = [this, a] { push(*a); };
            th.emplace_back(body, i, fn);
        }
        {
            std::lock_guard<std::mutex> g(sched.m);
            sched.pick_locked();
        }
        for (auto& t : th) t.join();
        for (const Cta& c : ctas)
            for (const Bar& b : c.bars)
                if (b.tx != 0) die("an mbarrier ends with outstanding transaction bytes");
        emit("{\"op\":\"end\",\"claimed\":" + std::to_string(st.next_unit) + "}");
        std::fflush(stdout);
        return 0;
    }
};

template <Recipe kRecipe>
int dispatch(State& st) {
    const Problem& p = st.p;
    if (p.stages == 2) {
        if (p.block_t == 32) return Rank<kRecipe, 32, 2>(st).run();
        if (p.block_t == 64) return Rank<kRecipe, 64, 2>(st).run();
    } else if (p.stages == 3) {
        if (p.block_t == 32) return Rank<kRecipe, 32, 3>(st).run();
        if (p.block_t == 64) return Rank<kRecipe, 64, 3>(st).run();
    }
    die("unsupported BLOCK_T / STAGES");
}

}  // namespace

int main(int argc, char** argv) {
    if (argc != 2) {
        std::fprintf(stderr, "usage: %s PROBLEM_FILE (registers of each tcgen05.ld on stdin)\n", argv[0]);
        return 2;
    }
    std::ifstream f(argv[1]);
    State st;
    Problem& p = st.p;
    f >> p.recipe >> p.block_t >> p.stages >> p.hidden >> p.inter >> p.num_experts >> p.ctas >> p.seed >> p.la_e >> p.la_u >> p.push >> p.rank;
    if (!f || p.num_experts > kMaxExperts) die("problem file: header");
    p.counts.resize(size_t(p.num_experts));
    for (int& c : p.counts) f >> c;
    f >> p.rows;
    p.row_rank.resize(size_t(p.rows));
    for (int& r : p.row_rank) f >> r;
    const auto read_f = [&](std::vector<float>& v, size_t n) {
        v.resize(n);
        for (float& x : v) {
            uint32_t u = 0;
            f >> u;
            std::memcpy(&x, &u, 4);
        }
    };
    read_f(p.row_weight, size_t(p.rows));
    std::vector<float> alphas;
    read_f(alphas, size_t(4 * p.num_experts));
    if (!f) die("problem file: body");
    for (int e = 0; e < p.num_experts; ++e) {
        p.l1_alpha.push_back(alphas[size_t(4 * e)]), p.l1_alpha.push_back(alphas[size_t(4 * e + 1)]);
        p.l2_alpha.push_back(alphas[size_t(4 * e + 2)]), p.l2_inv.push_back(alphas[size_t(4 * e + 3)]);
    }
    if (p.recipe == 0) return dispatch<Recipe::NVFP4>(st);
    if (p.recipe == 1) return dispatch<Recipe::MXFP4_FP8>(st);
    if (p.recipe == 2) return dispatch<Recipe::NVFP4_EXACT>(st);
    if (p.recipe == 3) return dispatch<Recipe::BF16>(st);
    die("recipe");
}
