// Op stream of the sm100 grouped GEMM's kind::f16 recipes (Recipe::NVFP4_EXACT, Recipe::BF16) for the
// functional model (tests/sm100_model/f16.py, on top of interp.py).
//
// Reuses tests/cpp/sm100_model_emit.cpp as it is (its deterministic cooperative scheduler, mbarrier
// model and recording Ops, included below with its main renamed) and adds what the exact recipe's
// dequant warpgroup calls (GemmPlan::dequant) and the TS MMA:
//   lds          {"warp","lane","addr","bytes","tags":[..]}     ld.shared of 16 / 4 bytes; each 32-bit word
//                                                                gets a fresh tag (a register name)
//   dequant_chunk{"warp","lane","codes":[4 tags],"scale":tag,"first_byte":b,"out":[16 tags]}
//   tmem_st      {"warp","lane","shape":"32x32b","num":16,"taddr","regs":[16 tags]}
//   tmem_st_wait {"warp","lane"}
//   mma_ts       {"kind":"f16","idesc","a":a_taddr,"bdesc","d","acc"}
// warp_arrive is modelled as __syncwarp (the 32 lanes of the warp meet on a private barrier, not
// recorded) followed by lane 0's recorded "arrive".  The roles: producer, MMA warp, 128 epilogue
// threads (warps 4-7) and, for NVFP4_EXACT, 128 dequant threads (warps 8-11).
//
//   sm100_f16_model_emit RECIPE BLOCK_N STAGES EPILOGUE MODE N K MAX_ROWS CTAS SEED COUNTS
//     RECIPE nvfp4_exact | bf16; the rest as sm100_model_emit.
#define main sm100_model_emit_main
#include "sm100_model_emit.cpp"
#undef main
#include "sm100_f16_model_ops.h"

namespace {

struct F16Ops : f16_model::F16Record<RecOps> {
    int syncs = 0;    // __syncwarp calls of this lane (the parity of its private warp barrier)

    // __syncwarp on a private barrier (id 1000 + warp, count 32), then one arrive by lane 0
    void warp_arrive(int id, int l) {
        const int wb = 1000 + warp;
        {
            std::unique_lock<std::mutex> lk(cta->sched->m);
            auto& bars = cta->sched->bars;
            if (size_t(wb) >= bars.size()) bars.resize(size_t(wb) + 1);
            Barrier& b = bars[size_t(wb)];
            if (!b.init) b.init = true, b.count = 32, b.pending = 32;
            --b.pending;
            settle(b);
            const uint32_t parity = uint32_t(syncs++ & 1);
            cta->sched->wait_bar[size_t(me)] = wb;
            cta->sched->wait_parity[size_t(me)] = int(parity);
            while ((bars[size_t(wb)].phases & 1u) == parity) cta->sched->yield_locked(lk, me);
            cta->sched->wait_bar[size_t(me)] = -1;
        }
        if (l == 0) arrive(id);
    }
};

template <Recipe kRecipe, int kBlockN, int kStages>
int run_f16(const Problem& p) {
    using Plan = GemmPlan<kRecipe, kBlockN, kStages>;
    emit_problem(p, kBlockN, kStages, Plan::kSmemBytes, Plan::Tmem::kAlloc, ",\"threads\":" + std::to_string(Plan::kNumThreads));
    // bytes per TMA box element: BF16 tokens (and BF16 weights) 2; the dequant threads (warps 8..11) for NVFP4_EXACT
    run_ctas<Plan, F16Ops>(
        p, {kRecipe == Recipe::BF16 ? 2u : 1u, 1u, 2u, 1u, 1u}, 32 * Plan::kDequantWarps,
        [&](const Plan& plan, F16Ops& o, const auto& tiles, int cta, int num_tiles, int warp, int lane) {
            if (p.epilogue == "plain") {
                plan.template epilogue<TmemLdShape::K32x32B>(
                    o, tiles, cta, num_tiles, p.ctas, warp, lane,
                    [&](const PlanTile& tile, uint32_t lane_base, uint32_t col, int l, const uint32_t (&regs)[16]) {
                        // impls/sm100_fp4_grouped_gemm.cuh, Epilogue::Plain (raw accumulators)
                        const int row = tile.row_tile * Plan::kBlockM + int(lane_base) + l;
                        std::vector<int> rg; std::vector<long> rr, cc;
                        for (int j = 0; j < 16; ++j) {
                            const TmemCoord c2 = tmem_ld_coord(TmemLdShape::K32x32B, uint32_t(l), uint32_t(j));
                            const int tok = int(col + c2.column);
                            if (tok < tile.num_tokens) { rg.push_back(int(regs[j])); rr.push_back(tile.row_start + tok); cc.push_back(row); }
                        }
                        o.store(kTensorD, rg, rr, cc);
                    });
            } else {
                plan.template epilogue<TmemLdShape::K16x256B>(
                    o, tiles, cta, num_tiles, p.ctas, warp, lane,
                    [&](const PlanTile& tile, uint32_t lane_base, uint32_t col, int l, const uint32_t (&regs)[16]) {
                        // impls/sm100_fp4_grouped_gemm.cuh, Epilogue::SwiGLU (gate = register j, up = j + 2)
                        std::vector<int> gr, ur; std::vector<long> rr, cc;
                        for (int j = 0; j < 16; ++j) {
                            if ((j % 4) >= 2) continue;
                            const TmemCoord c2 = tmem_ld_coord(TmemLdShape::K16x256B, uint32_t(l), uint32_t(j));
                            const int tok = int(col + c2.column);
                            const int kernel_row = int(lane_base + c2.lane);
                            const int chan = tile.row_tile * (Plan::kBlockM / 2) + (kernel_row / 16) * 8 + kernel_row % 8;
                            if (tok < tile.num_tokens) {
                                gr.push_back(int(regs[j])); ur.push_back(int(regs[j + 2]));
                                rr.push_back(tile.row_start + tok); cc.push_back(chan);
                            }
                        }
                        o.store(10, gr, rr, cc);
                        o.store(11, ur, rr, cc);
                    });
            }
        },
        [&](const Plan& plan, F16Ops& o, const auto& tiles, int cta, int num_tiles, int warp, int lane) {
            if constexpr (Plan::kATmem) plan.dequant(o, tiles, cta, num_tiles, p.ctas, warp, lane);
        });
    return 0;
}

template <Recipe kRecipe>
int dispatch_f16(const Problem& p) {
    if (p.stages == 2) {
        if (p.block_n == 32) return run_f16<kRecipe, 32, 2>(p);
        if (p.block_n == 64) return run_f16<kRecipe, 64, 2>(p);
    } else if (p.stages == 3) {
        if (p.block_n == 32) return run_f16<kRecipe, 32, 3>(p);
        if (p.block_n == 64) return run_f16<kRecipe, 64, 3>(p);
    }
    die("unsupported BLOCK_N / STAGES");
}

}  // namespace

int main(int argc, char** argv) {
    Problem p;
    if (!parse_problem(argc, argv, false, p)) {
        std::fprintf(stderr, "usage: %s RECIPE BLOCK_N STAGES EPILOGUE MODE N K MAX_ROWS CTAS SEED COUNTS\n", argv[0]);
        return 2;
    }
    if (p.recipe == "nvfp4_exact") return dispatch_f16<Recipe::NVFP4_EXACT>(p);
    if (p.recipe == "bf16") return dispatch_f16<Recipe::BF16>(p);
    die("RECIPE");
}
