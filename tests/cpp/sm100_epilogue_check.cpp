// The epilogues of the sm100 grouped expert GEMM on the host: the kernel's own epilogue loop
// (GemmPlan::epilogue, scheduler/sm100_gemm_plan.cuh) with the kernel's callbacks (epilogue/sm100_epilogue.cuh:
// plain_chunk / swiglu_chunk / swiglu_quant_chunk + l2_quant_tile, the functions
// impls/sm100_fp4_grouped_gemm.cuh calls) over given accumulators, tiles from the kernel's scheduler
// (scheduler/grouped_tiles.cuh).  Driven by tests/test_sm100_model.py against deep_gemm.reference_recipes.
//
//   sm100_epilogue_check RECIPE BLOCK_N EPILOGUE MODE N MAX_ROWS COUNTS B_SCALE CLAMP L2_INV_GLOBAL WEIGHTED DIR
//     RECIPE nvfp4 | mxfp4_fp8; EPILOGUE plain | swiglu | swiglu_quant; MODE contiguous | masked
//     COUNTS rows per expert (contiguous: multiples of 128; the kernel's expert_offsets are their prefix)
//     DIR/acc.f32    float32 [T, N]: the TMEM accumulator of every token row, weight rows in kernel order
//                    (T = total rows: the sum of COUNTS, or E * MAX_ROWS)
//     DIR/alpha.f32  float32 [E, S] (S = 1 plain, 2 swiglu*: gate, up)
//     DIR/route.f32  float32 [T] (read when WEIGHTED = 1; the kernel's route_weights, else nullptr; with
//                    plain: the fused kernel's L2, bf16(f32(bf16(acc * alpha) * w)), plain_rows_chunk<Plan, true>)
//   writes DIR/out.bin: plain uint16 [T, N], swiglu uint16 [T, N / 2] (BF16 bits, 0xFFFF where not written);
//   swiglu_quant: codes (NVFP4 uint8 [T, N / 4], FP8 uint8 [T, N / 2]; 0xEE where not written) then the scale
//   bytes (atoms over ceil(T / 128) row groups; 0xEE where not written).
// The accumulator of a token column beyond the tile's tokens is NaN (must never reach an output).
// Negative controls (built with -DDG_EPI_FAULTS, selected by the environment variable DG_EPI_FAULT):
//   gate_up : registers j and j + 2 exchanged before the SwiGLU callbacks (gate and up swapped)
//   block   : the L2 block's amax over half the block (a wrong block size)
//   weight_rows : plain with WEIGHTED = 1 reads the route weights from row 0, not from the tile's first row
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <deep_gemm/epilogue/sm100_epilogue.cuh>
#include <deep_gemm/scheduler/grouped_tiles.cuh>
#include <deep_gemm/scheduler/sm100_gemm_plan.cuh>

using namespace deep_gemm;
using namespace deep_gemm::sm100;

namespace {

[[noreturn]] void die(const char* msg) {
    std::fprintf(stderr, "%s\n", msg);
    std::exit(3);
}

#if defined(DG_EPI_FAULTS)
bool fault(const char* name) {
    const char* f = std::getenv("DG_EPI_FAULT");
    return f != nullptr && std::strcmp(f, name) == 0;
}
#else
constexpr bool fault(const char*) { return false; }
#endif

template <class T>
std::vector<T> read_file(const std::string& path, size_t n) {
    std::vector<T> v(n);
    std::FILE* f = std::fopen(path.c_str(), "rb");
    if (!f) die("cannot open an input file");
    if (n && std::fread(v.data(), sizeof(T), n, f) != n) die("short read");
    std::fclose(f);
    return v;
}

struct Args {
    std::string recipe, epilogue, mode, dir;
    int block_n = 0, n = 0, max_rows = 0, weighted = 0;
    float b_scale = 1, clamp = 1, l2_inv_global = 1;
    std::vector<int> counts;
};

// Ops of GemmPlan::epilogue over an accumulator array: barriers and fences do nothing (one thread at a time,
// the tile's accumulator is complete), tcgen05.ld reads the accumulator through tmem_ld_coord.
struct AccOps {
    const float* acc;       // [T, N]
    int n, rows;
    PlanTile tile;
    uint32_t accum_col;     // TMEM column of the accumulator buffer (buffer 0: one tile per run)
    void wait(int, uint32_t) {}
    void arrive(int) {}
    void fence_after_sync() {}
    void fence_before_sync() {}
    void tmem_ld_wait() {}
    template <TmemLdShape kShape, int kNum>
    void tmem_ld(int warp, int lane, uint32_t taddr, uint32_t (&regs)[kTmemLdRegs<kShape, kNum>]) {
        const uint32_t lane0 = taddr >> 16, col0 = (taddr & 0xFFFFu) - accum_col;
        if (lane0 / 32u != uint32_t(warp % 4)) die("tcgen05.ld outside the warp's lane quarter");
        for (int j = 0; j < kTmemLdRegs<kShape, kNum>; ++j) {
            const TmemCoord c = tmem_ld_coord(kShape, uint32_t(lane), uint32_t(j));
            const int tok = int(col0 + c.column), m = int(lane0 + c.lane);
            float v = NAN;
            if (tok < tile.num_tokens) {
                const int row = tile.row_start + tok, wrow = tile.row_tile * 128 + m;
                if (row >= rows || wrow >= n) die("accumulator index out of range");
                v = acc[size_t(row) * size_t(n) + size_t(wrow)];
            }
            regs[j] = l2_input::float_bits(v);
        }
    }
};

template <Recipe kRecipe, int kBlockN, GroupMode kMode>
int run(const Args& a) {
    using Plan = GemmPlan<kRecipe, kBlockN, 2>;
    const int e_num = int(a.counts.size()), n = a.n;
    std::vector<int> layout;
    int rows = 0;
    if (kMode == GroupMode::Contiguous) {
        layout.push_back(0);
        for (int c : a.counts) {
            if (c % 128) die("contiguous counts must be multiples of 128");
            rows += c;
            layout.push_back(rows);
        }
    } else {
        for (int c : a.counts) layout.push_back(c);
        rows = e_num * a.max_rows;
    }
    std::vector<int> prefix(size_t(e_num) + 1);
    GroupedTiles<kMode, kBlockN> sched{layout.data(), e_num, a.max_rows, n / 128, prefix.data(), 1 << 30};
    sched.build_prefix_serial();

    const bool quant = a.epilogue == "swiglu_quant", swiglu = a.epilogue != "plain";
    const int stride = swiglu ? 2 : 1;
    const auto acc = read_file<float>(a.dir + "/acc.f32", size_t(rows) * size_t(n));
    const auto alpha = read_file<float>(a.dir + "/alpha.f32", size_t(e_num) * size_t(stride));
    const auto route = a.weighted ? read_file<float>(a.dir + "/route.f32", size_t(rows)) : std::vector<float>();
    const float* rw = a.weighted ? route.data() : nullptr;

    const int inter = n / 2, gran = Plan::kL2Gran;
    const size_t code_bytes = quant ? size_t(rows) * size_t(kRecipe == Recipe::NVFP4 ? inter / 2 : inter) : 0;
    const size_t sf_bytes = quant ? size_t((rows + 127) / 128) * size_t((inter / gran + 3) / 4) * kSFAtomBytes : 0;
    std::vector<uint16_t> out16(quant ? 0 : size_t(rows) * size_t(swiglu ? n / 2 : n), 0xFFFFu);
    std::vector<uint8_t> codes(code_bytes, 0xEE), sfs(sf_bytes, 0xEE);
    std::vector<float> scratch(size_t(64) * kBlockN);
    const float cb = epi::clamp_bf16(a.clamp);

    const Plan plan{n, 256, 0u, 0u};
    for (int t = 0; t < sched.num_tiles(); ++t) {
        const auto x = sched.get(t);
        const PlanTile tile{x.expert, x.row_tile, x.token_tile, x.row_start, x.num_tokens};
        AccOps ops{acc.data(), n, rows, tile, Plan::Tmem::accum(0)};
        const auto tiles = [&](int) { return tile; };
        std::fill(scratch.begin(), scratch.end(), NAN);
        for (int i = 0; i < Plan::kEpilogueThreads; ++i) {       // the first pass of every epilogue thread
            const int warp = 4 + i / 32, lane = i % 32;
            if (!swiglu) {
                plan.template epilogue<TmemLdShape::K32x32B>(
                    ops, tiles, 0, 1, 1, warp, lane,
                    [&](const PlanTile& tl, uint32_t lane_base, uint32_t col, int l, const uint32_t (&regs)[16]) {
                        const float al = epi::tile_alpha(alpha.data(), stride, tl.expert, 0, a.b_scale);
                        if (rw != nullptr) {     // the fused kernel's L2: the top-k weight after L2 (the tile's weights)
                            const float* trw = fault("weight_rows") ? rw : rw + tl.row_start;
                            epi::plain_rows_chunk<Plan, true>(tl, lane_base, col, l, regs, al, trw, [&](int tok, int oc, uint16_t v) {
                                out16.at(size_t(tl.row_start + tok) * size_t(n) + size_t(oc)) = v;
                            });
                        } else {
                            epi::plain_chunk<Plan>(tl, lane_base, col, l, regs, al, n, [&](size_t k, uint16_t v) { out16.at(k) = v; });
                        }
                    });
            } else {
                plan.template epilogue<TmemLdShape::K16x256B>(
                    ops, tiles, 0, 1, 1, warp, lane,
                    [&](const PlanTile& tl, uint32_t lane_base, uint32_t col, int l, const uint32_t (&regs_in)[16]) {
                        uint32_t regs[16];
                        for (int j = 0; j < 16; ++j) regs[j] = regs_in[j];
                        if (fault("gate_up"))
                            for (int j = 0; j < 16; ++j)
                                if (j % 4 < 2) std::swap(regs[j], regs[j + 2]);
                        const float ag = epi::tile_alpha(alpha.data(), stride, tl.expert, 0, a.b_scale);
                        const float au = epi::tile_alpha(alpha.data(), stride, tl.expert, 1, a.b_scale);
                        const float* trw = rw != nullptr ? rw + tl.row_start : nullptr;   // the tile's route weights
                        if (quant)
                            epi::swiglu_quant_chunk<Plan, false>(tl, lane_base, col, l, regs, ag, au, cb, trw, scratch.data());
                        else
                            epi::swiglu_chunk<Plan, false>(tl, lane_base, col, l, regs, ag, au, a.clamp, trw, n,
                                                           [&](size_t k, uint16_t v) { out16.at(k) = v; });
                    });
            }
        }
        if (quant) {                                              // the second pass (after the named barrier)
            const auto store = [&](const typename Plan::L2BlockOut& o, const epi::L2Block<kRecipe>& b) {
                const int nb = kRecipe == Recipe::NVFP4 ? 8 : 32;
                if (o.code_byte + size_t(nb) > codes.size() || o.sf_byte >= sfs.size()) die("L2 block store out of range");
                std::memcpy(codes.data() + o.code_byte, b.words, size_t(nb));
                sfs[o.sf_byte] = b.sf;
            };
            for (int tid = 0; tid < 128; ++tid) {
                if (fault("block"))
                    epi::l2_quant_tile<Plan, decltype(store)&, Plan::kL2Gran / 2>(tile, tid, 128, scratch.data(), inter,
                                                                                 a.l2_inv_global, store);
                else
                    epi::l2_quant_tile<Plan>(tile, tid, 128, scratch.data(), inter, a.l2_inv_global, store);
            }
        }
    }
    std::FILE* f = std::fopen((a.dir + "/out.bin").c_str(), "wb");
    if (!f) die("cannot write out.bin");
    if (!quant) {
        std::fwrite(out16.data(), 2, out16.size(), f);
    } else {
        std::fwrite(codes.data(), 1, codes.size(), f);
        std::fwrite(sfs.data(), 1, sfs.size(), f);
    }
    std::fclose(f);
    std::printf("{\"tiles\":%d,\"rows\":%d}\n", sched.num_tiles(), rows);
    return 0;
}

template <Recipe kRecipe, int kBlockN>
int dispatch_mode(const Args& a) {
    if (a.mode == "contiguous") return run<kRecipe, kBlockN, GroupMode::Contiguous>(a);
    if (a.mode == "masked") return run<kRecipe, kBlockN, GroupMode::Masked>(a);
    die("MODE");
}

template <Recipe kRecipe>
int dispatch_n(const Args& a) {
    if (a.block_n == 32) return dispatch_mode<kRecipe, 32>(a);
    if (a.block_n == 64) return dispatch_mode<kRecipe, 64>(a);
    if (a.block_n == 128) return dispatch_mode<kRecipe, 128>(a);
    die("BLOCK_N");
}

}  // namespace

int main(int argc, char** argv) {
    if (argc != 13) {
        std::fprintf(stderr, "usage: %s RECIPE BLOCK_N EPILOGUE MODE N MAX_ROWS COUNTS B_SCALE CLAMP L2_INV_GLOBAL WEIGHTED DIR\n",
                     argv[0]);
        return 2;
    }
    Args a;
    a.recipe = argv[1], a.block_n = std::atoi(argv[2]), a.epilogue = argv[3], a.mode = argv[4];
    a.n = std::atoi(argv[5]), a.max_rows = std::atoi(argv[6]);
    std::stringstream ss(argv[7]);
    for (std::string tok; std::getline(ss, tok, ',');) a.counts.push_back(std::atoi(tok.c_str()));
    a.b_scale = std::strtof(argv[8], nullptr), a.clamp = std::strtof(argv[9], nullptr);
    a.l2_inv_global = std::strtof(argv[10], nullptr), a.weighted = std::atoi(argv[11]), a.dir = argv[12];
    if (a.epilogue != "plain" && a.epilogue != "swiglu" && a.epilogue != "swiglu_quant") die("EPILOGUE");
    if (a.n % 128) die("N must be a multiple of 128");
    if (a.recipe == "nvfp4") return dispatch_n<Recipe::NVFP4>(a);
    if (a.recipe == "mxfp4_fp8") return dispatch_n<Recipe::MXFP4_FP8>(a);
    die("RECIPE");
}
