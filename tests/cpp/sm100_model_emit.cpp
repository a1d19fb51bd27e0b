// Op stream of the sm100 grouped expert GEMM for the functional model (tests/sm100_model/interp.py).
//
// Plain C++17 (g++): instantiates the kernel's own issue loops (scheduler/sm100_gemm_plan.cuh,
// GemmPlan::init_barriers / producer / mma / epilogue) with a recording Ops policy and prints every call
// as one JSON line.  The roles run as threads of a deterministic cooperative scheduler (one runs at a
// time; after every op the next one is drawn from a seeded RNG) over a model of mbarriers (arrival
// counts, transaction bytes, phase parity: a copy's bytes complete when it is issued, a tcgen05.commit
// arrives when it is issued), so the stream is one legal interleaving of producer, MMA warp and the 128
// epilogue threads of each CTA, and a deadlock of the barrier protocol is an error (exit 3).
//
//   sm100_model_emit RECIPE BLOCK_N STAGES EPILOGUE MODE N K MAX_ROWS CTAS SEED COUNTS [TOKEN_GROUP]
//     RECIPE   nvfp4 | mxfp4_fp8        EPILOGUE plain | swiglu        MODE contiguous | masked
//     COUNTS   comma-separated tokens per expert (contiguous: each expert's rows padded to a multiple of 128,
//              expert_offsets = their prefix; the kernel computes the padding rows as tokens of the expert,
//              and the problem line's "counts" are the kernel's, i.e. padded)
//     TOKEN_GROUP  token tiles per L2 group of the tile order (tile_order.cuh); default: one group
//
// Lines: {"op":"problem",...} first (tiles, row starts, tensor shapes), then per CTA the ops of the Ops
// interface with "cta", and the epilogue's stores: {"op":"store","cta","warp","lane","tensor","reg":[],
// "row":[],"col":[]} placing registers of the thread's last tcgen05.ld (tensor 4 = D [T, N] for the plain
// epilogue; 10 / 11 = gate / up accumulators [T, N / 2] of the SwiGLU epilogues, before any math: the
// math is checked by tests/cpp/sm100_epilogue_check.cpp).
// Tiles are the kernel's scheduler's (scheduler/grouped_tiles.cuh, GroupedTiles::get on the host); the
// epilogue callbacks place registers with the kernel's own index maps (GemmPlan::plain_out / swiglu_out,
// the functions impls/sm100_fp4_grouped_gemm.cuh's callbacks call).  Negative controls (tests only): built
// with -DDG_EMIT_FAULTS, the environment variable DG_EMIT_FAULT selects one fault:
//   plain    : GemmPlan::plain_out's output column XOR 1             (the model must fail)
//   swiglu   : GemmPlan::swiglu_out's channel XOR 1                  (the model must fail)
//   deadlock : the epilogue threads' arrivals on tmem_empty dropped  (the scheduler must report a deadlock)
// Without -DDG_EMIT_FAULTS none of this is compiled.
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include <deep_gemm/common/sm100_umma.cuh>
#include <deep_gemm/scheduler/grouped_tiles.cuh>
#include <deep_gemm/scheduler/sm100_gemm_plan.cuh>

using namespace deep_gemm;
using namespace deep_gemm::sm100;

namespace {

// ------------------------------------------------------------------------------ cooperative scheduler
struct Barrier {
    int count = 0, pending = 0;
    long long tx = 0;
    uint32_t phases = 0;
    bool init = false;
};

[[noreturn]] void die(const char* msg);

// One thread runs at a time; the next is drawn (seeded RNG) among the threads that can make progress:
// not waiting, or waiting on an mbarrier whose awaited phase has completed.  None eligible while some
// are alive: the barrier protocol deadlocks.
struct Sched {
    std::mutex m;
    std::vector<std::condition_variable> cvs;
    std::mt19937_64 rng;
    std::vector<int> alive;
    std::vector<int> wait_bar, wait_parity;
    std::vector<Barrier> bars;
    int running = -1;
    Sched(uint64_t seed, int nthreads) : cvs(size_t(nthreads)), rng(seed), wait_bar(size_t(nthreads), -1), wait_parity(size_t(nthreads), 0) {}

    bool eligible(int t) const {
        const int b = wait_bar[size_t(t)];
        return b < 0 || (bars[size_t(b)].phases & 1u) != uint32_t(wait_parity[size_t(t)] & 1);
    }
    void pick_locked() {
        if (alive.empty()) { running = -1; return; }
        std::vector<int> ok;
        for (int t : alive)
            if (eligible(t)) ok.push_back(t);
        if (ok.empty()) die("deadlock: every live thread waits on an mbarrier phase that cannot complete");
        running = ok[std::uniform_int_distribution<size_t>(0, ok.size() - 1)(rng)];
        cvs[size_t(running)].notify_one();
    }
    void yield_locked(std::unique_lock<std::mutex>& lk, int me) {
        pick_locked();
        cvs[size_t(me)].wait(lk, [&] { return running == me; });
    }
    void finish_locked(int me) {
        for (size_t i = 0; i < alive.size(); ++i)
            if (alive[i] == me) { alive.erase(alive.begin() + long(i)); break; }
        pick_locked();
    }
};

#if defined(DG_EMIT_FAULTS)
bool fault(const char* name) {
    const char* f = std::getenv("DG_EMIT_FAULT");
    return f != nullptr && std::strcmp(f, name) == 0;
}
#else
constexpr bool fault(const char*) { return false; }
#endif

std::mutex g_out_mutex;
void emit(const std::string& s) {
    std::lock_guard<std::mutex> g(g_out_mutex);
    std::fwrite(s.data(), 1, s.size(), stdout);
    std::fputc('\n', stdout);
}

[[noreturn]] void die(const char* msg) {
    std::fflush(stdout);
    std::fprintf(stderr, "%s\n", msg);
    std::exit(3);
}

// ------------------------------------------------------------------------------ recording Ops
struct Cta {
    int id;
    Sched* sched;
    std::vector<uint32_t> a_bytes_per_elem;   // smem bytes per box element, per tensor id
};

struct RecOps {
    Cta* cta;
    int me;                     // scheduler thread id
    int warp = -1, lane = -1;   // for the epilogue threads

    std::string head(const char* op) const {
        std::ostringstream o;
        o << "{\"op\":\"" << op << "\",\"cta\":" << cta->id;
        return o.str();
    }
    // every op: record under the baton, then yield
    void record(const std::string& line) {
        std::unique_lock<std::mutex> lk(cta->sched->m);
        emit(line);
        cta->sched->yield_locked(lk, me);
    }
    Barrier& bar(int id) {
        auto& bars = cta->sched->bars;
        if (id < 0 || size_t(id) >= bars.size() || !bars[size_t(id)].init) die("barrier not initialised");
        return bars[size_t(id)];
    }
    static void settle(Barrier& b) {
        if (b.pending < 0) die("mbarrier: more arrivals than its count");
        if (b.pending == 0 && b.tx == 0) { ++b.phases; b.pending = b.count; }
    }

    void init_barrier(int id, int count) {
        auto& bars = cta->sched->bars;
        if (size_t(id) >= bars.size()) bars.resize(size_t(id) + 1);
        Barrier& b = bars[size_t(id)];
        if (b.init) die("barrier initialised twice");
        b.init = true, b.count = count, b.pending = count;
        record(head("init_barrier") + ",\"mbar\":" + std::to_string(id) + ",\"count\":" + std::to_string(count) + "}");
    }
    void wait(int id, uint32_t parity) {
        std::unique_lock<std::mutex> lk(cta->sched->m);
        bar(id);
        cta->sched->wait_bar[size_t(me)] = id;
        cta->sched->wait_parity[size_t(me)] = int(parity);
        while ((bar(id).phases & 1u) == (parity & 1u)) cta->sched->yield_locked(lk, me);
        cta->sched->wait_bar[size_t(me)] = -1;
        lk.unlock();
        record(head("wait") + ",\"mbar\":" + std::to_string(id) + ",\"parity\":" + std::to_string(parity) + "}");
    }
    void arrive(int id) {
        if (fault("deadlock") && warp >= 0) { record(head("arrive_dropped") + ",\"mbar\":" + std::to_string(id) + "}"); return; }
        { std::lock_guard<std::mutex> g(cta->sched->m); Barrier& b = bar(id); --b.pending; settle(b); }
        record(head("arrive") + ",\"mbar\":" + std::to_string(id) + "}");
    }
    void arrive_expect_tx(int id, uint32_t bytes) {
        { std::lock_guard<std::mutex> g(cta->sched->m); Barrier& b = bar(id); b.tx += bytes; --b.pending; settle(b); }
        record(head("arrive_expect_tx") + ",\"mbar\":" + std::to_string(id) + ",\"bytes\":" + std::to_string(bytes) + "}");
    }
    void complete_tx(int id, uint32_t bytes) {
        std::lock_guard<std::mutex> g(cta->sched->m);
        Barrier& b = bar(id);
        b.tx -= bytes;
        settle(b);
    }
    void tma_load(int tensor, const int32_t (&coords)[2], const uint32_t (&box)[2], uint32_t smem, int swizzle, int mbar) {
        const uint32_t bytes = box[0] * box[1] * cta->a_bytes_per_elem[size_t(tensor)];
        std::ostringstream o;
        o << head("tma_load") << ",\"tensor\":" << tensor << ",\"coords\":[" << coords[0] << "," << coords[1] << "],\"box\":["
          << box[0] << "," << box[1] << "],\"smem\":" << smem << ",\"swizzle\":" << swizzle << ",\"mbar\":" << mbar
          << ",\"tx\":" << bytes << "}";
        complete_tx(mbar, bytes);
        record(o.str());
    }
    void bulk_copy(int tensor, uint64_t gofs, uint32_t bytes, uint32_t smem, int mbar) {
        std::ostringstream o;
        o << head("bulk_copy") << ",\"tensor\":" << tensor << ",\"gofs\":" << gofs << ",\"bytes\":" << bytes << ",\"smem\":" << smem
          << ",\"mbar\":" << mbar << ",\"tx\":" << bytes << "}";
        complete_tx(mbar, bytes);
        record(o.str());
    }
    void fence_after_sync() { record(head("fence_after") + "}"); }
    void fence_before_sync() { record(head("fence_before") + "}"); }
    void utccp(uint64_t desc, uint32_t taddr, UtccpShape shape) {
        if (shape != UtccpShape::K32x128B_WARPX4) die("utccp shape");
        std::ostringstream o;
        o << head("utccp") << ",\"desc\":" << desc << ",\"taddr\":" << taddr << ",\"shape\":\"32x128b.warpx4\"}";
        record(o.str());
    }
    void mma(MmaKind kind, uint32_t idesc, uint64_t adesc, uint64_t bdesc, uint32_t d, uint32_t sfa, uint32_t sfb, bool acc) {
        const char* k = kind == MmaKind::MXF4NVF4_BLOCK16 ? "mxf4nvf4.block16" : kind == MmaKind::MXF8F6F4_BLOCK32 ? "mxf8f6f4.block32" : "f16";
        std::ostringstream o;
        o << head("mma") << ",\"kind\":\"" << k << "\",\"idesc\":" << idesc << ",\"adesc\":" << adesc << ",\"bdesc\":" << bdesc
          << ",\"d\":" << d << ",\"sfa\":" << sfa << ",\"sfb\":" << sfb << ",\"acc\":" << (acc ? 1 : 0) << "}";
        record(o.str());
    }
    void commit(int id) {
        { std::lock_guard<std::mutex> g(cta->sched->m); Barrier& b = bar(id); --b.pending; settle(b); }
        record(head("commit") + ",\"mbar\":" + std::to_string(id) + "}");
    }
    template <TmemLdShape kShape, int kNum>
    void tmem_ld(int w, int l, uint32_t taddr, uint32_t (&regs)[kTmemLdRegs<kShape, kNum>]) {
        for (int j = 0; j < kTmemLdRegs<kShape, kNum>; ++j) regs[j] = uint32_t(j);   // tags: register index
        std::ostringstream o;
        o << head("tmem_ld") << ",\"warp\":" << w << ",\"lane\":" << l << ",\"shape\":\""
          << (kShape == TmemLdShape::K32x32B ? "32x32b" : "16x256b") << "\",\"num\":" << kNum << ",\"taddr\":" << taddr << "}";
        record(o.str());
    }
    void tmem_ld_wait() { record(head("tmem_ld_wait") + ",\"warp\":" + std::to_string(warp) + ",\"lane\":" + std::to_string(lane) + "}"); }
    void store(int tensor, const std::vector<int>& reg, const std::vector<long>& row, const std::vector<long>& col) {
        if (reg.empty()) return;
        std::ostringstream o;
        o << head("store") << ",\"warp\":" << warp << ",\"lane\":" << lane << ",\"tensor\":" << tensor << ",\"reg\":[";
        for (size_t i = 0; i < reg.size(); ++i) o << (i ? "," : "") << reg[i];
        o << "],\"row\":[";
        for (size_t i = 0; i < row.size(); ++i) o << (i ? "," : "") << row[i];
        o << "],\"col\":[";
        for (size_t i = 0; i < col.size(); ++i) o << (i ? "," : "") << col[i];
        o << "]}";
        std::lock_guard<std::mutex> g(g_out_mutex);   // stores do not yield: part of the same thread step
        std::fwrite(o.str().data(), 1, o.str().size(), stdout);
        std::fputc('\n', stdout);
    }
};

// ------------------------------------------------------------------------------ problem
struct Problem {
    std::string recipe, epilogue, mode;
    int block_n = 0, stages = 0, n = 0, k = 0, max_rows = 0, ctas = 1, token_group = 1 << 30;
    uint64_t seed = 0;
    std::vector<int> counts, starts;
    int total_rows = 0;
    std::vector<PlanTile> tiles;
};

// The grouped tile list from the kernel's scheduler (scheduler/grouped_tiles.cuh): the layout the kernel
// gets (contiguous: expert_offsets [E + 1], each expert's rows padded to a multiple of 128; masked:
// masked_m [E] with max_rows per expert), GroupedTiles::build_prefix_serial (the host form of the warp
// scan) and GroupedTiles::get for every tile index.
template <int kBlockN>
void make_tiles_n(Problem& p) {
    const int e_num = int(p.counts.size());
    p.starts.resize(size_t(e_num));
    std::vector<int> layout;
    if (p.mode == "contiguous") {
        int off = 0;
        layout.push_back(0);
        for (int e = 0; e < e_num; ++e) {
            off += (p.counts[size_t(e)] + 127) / 128 * 128;
            layout.push_back(off);
        }
        p.total_rows = off;
    } else {
        for (int e = 0; e < e_num; ++e) {
            if (p.counts[size_t(e)] > p.max_rows) die("masked count > max_rows");
            layout.push_back(p.counts[size_t(e)]);
        }
        p.total_rows = e_num * p.max_rows;
    }
    std::vector<int> prefix(size_t(e_num) + 1);
    const auto run_mode = [&](auto mode_tag) {
        constexpr GroupMode kMode = decltype(mode_tag)::value;
        GroupedTiles<kMode, kBlockN> sched{layout.data(), e_num, p.max_rows, p.n / 128, prefix.data(), p.token_group};
        sched.build_prefix_serial();
        for (int e = 0; e < e_num; ++e) {
            p.starts[size_t(e)] = sched.row_start(e);
            // contiguous: the kernel has no token counts, every row up to the next offset is the expert's
            // (the padding rows too); the problem line reports the kernel's counts
            if (kMode == GroupMode::Masked && sched.count(e) != p.counts[size_t(e)]) die("GroupedTiles::count differs from COUNTS");
            p.counts[size_t(e)] = sched.count(e);
        }
        for (int t = 0; t < sched.num_tiles(); ++t) {
            const auto x = sched.get(t);
            p.tiles.push_back(PlanTile{x.expert, x.row_tile, x.token_tile, x.row_start, x.num_tokens});
        }
    };
    if (p.mode == "contiguous")
        run_mode(std::integral_constant<GroupMode, GroupMode::Contiguous>{});
    else
        run_mode(std::integral_constant<GroupMode, GroupMode::Masked>{});
}

void make_tiles(Problem& p) {
    if (p.block_n == 32) return make_tiles_n<32>(p);
    if (p.block_n == 64) return make_tiles_n<64>(p);
    if (p.block_n == 128) return make_tiles_n<128>(p);
    die("unsupported BLOCK_N");
}

// ------------------------------------------------------------------------------ shared with sm100_f16_model_emit.cpp
// The {"op":"problem"} line; `extra` (fields with their leading commas) goes right after "tmem_cols".
void emit_problem(const Problem& p, int block_n, int stages, uint32_t smem_bytes, uint32_t tmem_cols, const std::string& extra) {
    std::ostringstream o;
    o << "{\"op\":\"problem\",\"recipe\":\"" << p.recipe << "\",\"block_n\":" << block_n << ",\"stages\":" << stages
      << ",\"epilogue\":\"" << p.epilogue << "\",\"mode\":\"" << p.mode << "\",\"n\":" << p.n << ",\"k\":" << p.k
      << ",\"max_rows\":" << p.max_rows << ",\"ctas\":" << p.ctas << ",\"total_rows\":" << p.total_rows
      << ",\"smem_bytes\":" << smem_bytes << ",\"tmem_cols\":" << tmem_cols << extra << ",\"counts\":[";
    for (size_t e = 0; e < p.counts.size(); ++e) o << (e ? "," : "") << p.counts[e];
    o << "],\"starts\":[";
    for (size_t e = 0; e < p.starts.size(); ++e) o << (e ? "," : "") << p.starts[e];
    o << "],\"tiles\":[";
    for (size_t t = 0; t < p.tiles.size(); ++t) {
        const PlanTile& x = p.tiles[t];
        o << (t ? "," : "") << "[" << x.expert << "," << x.row_tile << "," << x.token_tile << "," << x.row_start << "," << x.num_tokens << "]";
    }
    o << "]}";
    emit(o.str());
}

// Every CTA of the problem under the cooperative scheduler: thread 0 the producer, 1 the MMA warp,
// 2.. the Plan::kEpilogueThreads epilogue threads (warps 4..) running epi_fn, then extra_threads more
// (warps 8..) running extra_fn; both called as fn(plan, ops, tiles, cta, num_tiles, warp, lane).
// OpsT: RecOps or a type derived from it; bytes_per_elem: Cta::a_bytes_per_elem.
template <class Plan, class OpsT, class EpiFn, class ExtraFn>
void run_ctas(const Problem& p, const std::vector<uint32_t>& bytes_per_elem, int extra_threads, EpiFn&& epi_fn, ExtraFn&& extra_fn) {
    const int num_tiles = int(p.tiles.size());
    const auto tiles = [&](int t) { return p.tiles[size_t(t)]; };

    for (int cta = 0; cta < p.ctas; ++cta) {
        const int kEpi = Plan::kEpilogueThreads;
        const int nthreads = 2 + kEpi + extra_threads;
        Sched sched(p.seed * 1000003ull + uint64_t(cta), nthreads);
        Cta c{cta, &sched, bytes_per_elem};
        // a 1024-aligned dynamic shared-memory base past a few static bytes; the TMEM allocation at column 0
        const Plan plan{p.n, p.k, 1024u, 0u};
        if (Plan::kSmemBytes + plan.smem_base > 232448u) die("shared memory plan exceeds 227 KiB");
        std::vector<OpsT> ops(static_cast<size_t>(nthreads));
        for (int i = 0; i < nthreads; ++i) {
            ops[size_t(i)].cta = &c;
            ops[size_t(i)].me = i;
        }
        // barriers first, by one thread (before the block-wide sync of the kernel)
        sched.alive = {0};
        sched.running = 0;
        plan.init_barriers(ops[0]);
        std::vector<std::thread> th;
        {
            std::lock_guard<std::mutex> g(sched.m);
            sched.alive.clear();
            for (int i = 0; i < nthreads; ++i) sched.alive.push_back(i);
            sched.running = -1;
        }
        auto body = [&](int me, std::function<void()> fn) {
            {
                std::unique_lock<std::mutex> lk(sched.m);
                sched.cvs[size_t(me)].wait(lk, [&] { return sched.running == me; });
            }
            fn();
            std::unique_lock<std::mutex> lk(sched.m);
            sched.finish_locked(me);
        };
        th.emplace_back(body, 0, [&] { plan.producer(ops[0], tiles, cta, num_tiles, p.ctas); });
        th.emplace_back(body, 1, [&] { plan.mma(ops[1], tiles, cta, num_tiles, p.ctas); });
        for (int i = 0; i < kEpi; ++i) {
            const int warp = 4 + i / 32, lane = i % 32, me = 2 + i;
            ops[size_t(me)].warp = warp, ops[size_t(me)].lane = lane;
            th.emplace_back(body, me, [&, warp, lane, me] { epi_fn(plan, ops[size_t(me)], tiles, cta, num_tiles, warp, lane); });
        }
        for (int i = 0; i < extra_threads; ++i) {
            const int warp = 8 + i / 32, lane = i % 32, me = 2 + kEpi + i;
            ops[size_t(me)].warp = warp, ops[size_t(me)].lane = lane;
            th.emplace_back(body, me, [&, warp, lane, me] { extra_fn(plan, ops[size_t(me)], tiles, cta, num_tiles, warp, lane); });
        }
        {
            std::lock_guard<std::mutex> g(sched.m);
            sched.pick_locked();
        }
        for (auto& t : th) t.join();
        for (size_t b = 0; b < sched.bars.size(); ++b)
            if (sched.bars[b].tx != 0) die("an mbarrier ends with outstanding transaction bytes");
    }
}

// The command line shared by both emitters: RECIPE BLOCK_N STAGES EPILOGUE MODE N K MAX_ROWS CTAS SEED
// COUNTS, then TOKEN_GROUP where with_token_group; MODE and EPILOGUE checked, the tiles made.
// Returns false on a wrong argument count (the caller prints its usage).
bool parse_problem(int argc, char** argv, bool with_token_group, Problem& p) {
    if (argc != 12 && !(with_token_group && argc == 13)) return false;
    p.recipe = argv[1], p.block_n = std::atoi(argv[2]), p.stages = std::atoi(argv[3]), p.epilogue = argv[4], p.mode = argv[5];
    p.n = std::atoi(argv[6]), p.k = std::atoi(argv[7]), p.max_rows = std::atoi(argv[8]), p.ctas = std::atoi(argv[9]);
    p.seed = std::strtoull(argv[10], nullptr, 10);
    std::stringstream ss(argv[11]);
    for (std::string tok; std::getline(ss, tok, ',');) p.counts.push_back(std::atoi(tok.c_str()));
    if (argc == 13) p.token_group = std::atoi(argv[12]);
    if (p.token_group < 1) die("TOKEN_GROUP must be >= 1");
    if (p.mode != "contiguous" && p.mode != "masked") die("MODE");
    if (p.epilogue != "plain" && p.epilogue != "swiglu") die("EPILOGUE");
    make_tiles(p);
    return true;
}

template <Recipe kRecipe, int kBlockN, int kStages>
int run(const Problem& p) {
    using Plan = GemmPlan<kRecipe, kBlockN, kStages>;
    emit_problem(p, kBlockN, kStages, Plan::kSmemBytes, Plan::Tmem::kAlloc, "");
    run_ctas<Plan, RecOps>(
        p, {1, 1, 1, 1, 1}, 0,
        [&](const Plan& plan, RecOps& o, const auto& tiles, int cta, int num_tiles, int warp, int lane) {
            if (p.epilogue == "plain") {
                plan.template epilogue<TmemLdShape::K32x32B>(
                    o, tiles, cta, num_tiles, p.ctas, warp, lane,
                    [&](const PlanTile& tile, uint32_t lane_base, uint32_t col, int l, const uint32_t (&regs)[16]) {
                        // impls/sm100_fp4_grouped_gemm.cuh, Epilogue::Plain: the kernel's map
                        std::vector<int> rg; std::vector<long> rr, cc;
                        for (int j = 0; j < 16; ++j) {
                            auto m = Plan::plain_out(tile, lane_base, col, l, j);
                            if (fault("plain")) m.out_col ^= 1;
                            if (m.valid) { rg.push_back(int(regs[j])); rr.push_back(m.token_row); cc.push_back(m.out_col); }
                        }
                        o.store(kTensorD, rg, rr, cc);
                    });
            } else {
                plan.template epilogue<TmemLdShape::K16x256B>(
                    o, tiles, cta, num_tiles, p.ctas, warp, lane,
                    [&](const PlanTile& tile, uint32_t lane_base, uint32_t col, int l, const uint32_t (&regs)[16]) {
                        // impls/sm100_fp4_grouped_gemm.cuh, Epilogue::SwiGLU / SwiGLUQuant: the kernel's map
                        std::vector<int> gr, ur; std::vector<long> rr, cc;
                        for (int j = 0; j < 16; ++j) {
                            auto m = Plan::swiglu_out(tile, lane_base, col, l, j);
                            if (fault("swiglu")) m.chan ^= 1;
                            if (m.valid) {
                                gr.push_back(int(regs[m.gate_reg])); ur.push_back(int(regs[m.up_reg]));
                                rr.push_back(m.token_row); cc.push_back(m.chan);
                            }
                        }
                        o.store(10, gr, rr, cc);
                        o.store(11, ur, rr, cc);
                    });
            }
        },
        [](const Plan&, RecOps&, const auto&, int, int, int, int) {});
    return 0;
}

template <Recipe kRecipe>
int dispatch_n(const Problem& p) {
    if (p.stages == 2) {
        if (p.block_n == 32) return run<kRecipe, 32, 2>(p);
        if (p.block_n == 64) return run<kRecipe, 64, 2>(p);
        if (p.block_n == 128) return run<kRecipe, 128, 2>(p);
    } else if (p.stages == 3) {
        if (p.block_n == 32) return run<kRecipe, 32, 3>(p);
        if (p.block_n == 64) return run<kRecipe, 64, 3>(p);
        if (p.block_n == 128) return run<kRecipe, 128, 3>(p);
    }
    die("unsupported BLOCK_N / STAGES");
}

}  // namespace

int main(int argc, char** argv) {
    Problem p;
    if (!parse_problem(argc, argv, true, p)) {
        std::fprintf(stderr, "usage: %s RECIPE BLOCK_N STAGES EPILOGUE MODE N K MAX_ROWS CTAS SEED COUNTS [TOKEN_GROUP]\n", argv[0]);
        return 2;
    }
    if (p.recipe == "nvfp4") return dispatch_n<Recipe::NVFP4>(p);
    if (p.recipe == "mxfp4_fp8") return dispatch_n<Recipe::MXFP4_FP8>(p);
    die("RECIPE");
}
