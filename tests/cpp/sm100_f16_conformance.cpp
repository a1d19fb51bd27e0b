// Conformance of the sm100 kind::f16 recipes' descriptors and layouts (Recipe::NVFP4_EXACT: A from TMEM,
// the TS form; Recipe::BF16: both from shared memory, the SS form) with CUTLASS / CuTe, on the host (g++).
//
// Includes the kernel's own headers (common/sm100_umma.cuh, scheduler/sm100_gemm_plan.cuh; plain C++) and
// CuTe, and compares exhaustively:
//   idesc      make_idesc_f16(a, b, M, N, a_mn, b_mn) for BF16 x BF16 and F16 x F16 -> F32, M = 128 (N = 16..256
//              step 16) and M = 64 (N = 8..256 step 8), K- and MN-major  ==  UMMA::make_runtime_instr_desc<A, B,
//              float, M, N, a_major, b_major>() >> 32 and (uint32_t) UMMA::make_instr_desc<...>() (all 32 bits)
//   plan_idesc GemmPlan<NVFP4_EXACT | BF16, N, S>::idesc(kk)  ==  CuTe's K x K BF16 descriptor, every kk (the
//              same for TS and SS: SM100_MMA_F16BF16_TS asserts a K-major A and uses the same builder)
//   smem_desc  the plans' B (and for BF16 A) descriptors of MMA kk of a stage: make_smem_desc_sw128_kmajor(
//              b_smem(s) + (kk / 4) kBBoxBytes) advanced 32 (kk % 4) bytes  ==  make_umma_desc<Major::K> of
//              MMA kk's (rows x 16) slice of a tile_to_shape(Layout_K_SW128_Atom<bfloat16_t>, (rows, kStageK))
//              tensor at the stage address (all 64 bits)
//   sw128_bf16 sw128_offset(base, r, 2 k)  ==  &tile(r, k) of the same BF16 tile (the TMA box order)
//   a_tmem     where the dequant warpgroup stores element (m, k) of a stage's A: the plan's tcgen05.st address
//              (lane 32 (warp % 4), column Tmem::a(slot) + 16 c) + the 32x32b fragment (thread m % 32 ->
//              lane, register 4 w + i -> column) + the dequant's register order (register 4 w + i of chunk
//              c = k 32 c + 8 w + 2 i + h, half h)  ==  CuTe's A operand of the TS MMA (FrgTypeA of
//              SM100_MMA_F16BF16_TS = UMMA::tmem_frg_1sm<bf16>) for MMA kk = k / 16 at the plan's
//              a_taddr(kk) = Tmem::a(slot) + 8 kk: (lane, 32-bit column, 16-bit half)
//   tmem_st    the 32x32b.x16 store fragment (thread t, register j -> lane t, column j)  ==
//              Copy_Traits<SM100_TMEM_STORE_32dp32b{1,2,4,8,16,32}x>
// Output: one {"check", "cases", "mismatches", "first"} line per check.  argv[1] (optional): a negative
// control perturbing one kernel-side quantity (idesc_n, idesc_m, idesc_fmt, idesc_major, plan_fmt,
// smem_start, smem_box, smem_sbo, sw128_xor, a_col, a_half, a_kk, st_col); the matching check must fail.
#include "sm100_cute_host.h"

alignas(1024) static char g_smem[1 << 19];

// ------------------------------------------------------------------------------------------ idesc
template <class T, int M, int N, UMMA::Major AM, UMMA::Major BM>
static void idesc_one(Check& ck, dg::ElemFmt f) {
    const uint32_t rt = uint32_t(UMMA::make_runtime_instr_desc<T, T, float, M, N, AM, BM>() >> 32);
    const uint32_t st = uint32_t(UMMA::make_instr_desc<T, T, float, M, N, AM, BM>());
    uint32_t k = dg::make_idesc_f16(f, f, M, N, AM == UMMA::Major::MN, BM == UMMA::Major::MN);
    if (brk("idesc_n")) k ^= 1u << 17;
    if (brk("idesc_m")) k ^= 1u << 24;
    if (brk("idesc_fmt")) k ^= 1u << 7;
    if (brk("idesc_major")) k ^= 1u << 15;
    ck.eq(k, rt, fmt("fmt %ld M %ld N %ld majors %ld", long(f), M, N, long(AM) * 2 + long(BM)));
    ck.eq(k, st, fmt("static fmt %ld M %ld N %ld majors %ld", long(f), M, N, long(AM) * 2 + long(BM)));
}
template <class T, int M, int N>
static void idesc_majors(Check& ck, dg::ElemFmt f) {
    idesc_one<T, M, N, UMMA::Major::K, UMMA::Major::K>(ck, f);
    idesc_one<T, M, N, UMMA::Major::K, UMMA::Major::MN>(ck, f);
    idesc_one<T, M, N, UMMA::Major::MN, UMMA::Major::K>(ck, f);
    idesc_one<T, M, N, UMMA::Major::MN, UMMA::Major::MN>(ck, f);
}
template <class T, int... Is>
static void idesc_all(Check& ck, dg::ElemFmt f, std::integer_sequence<int, Is...>) {
    (idesc_majors<T, 128, 16 * (Is + 1)>(ck, f), ...);
    (idesc_majors<T, 64, 8 * (Is + 1)>(ck, f), ...);
    (idesc_majors<T, 64, 8 * (Is + 17)>(ck, f), ...);
}

template <class Plan>
static void plan_idesc(Check& ck) {
    constexpr int N = int(Plan::Tmem::kAccumCols / 2);
    const uint32_t want = uint32_t(UMMA::make_runtime_instr_desc<bfloat16_t, bfloat16_t, float, 128, N, UMMA::Major::K,
                                                                 UMMA::Major::K>() >> 32);
    for (int kk = 0; kk < Plan::kMmasPerStage; ++kk) {
        uint32_t k = Plan::idesc(kk);
        if (brk("plan_fmt")) k ^= 1u << 10;
        ck.eq(k, want, fmt("plan N %ld kk %ld", N, kk));
    }
}

// ------------------------------------------------------------------------------------------ smem descriptors
template <class Plan, int ROWS>
static void desc_stage(Check& ck, uint32_t start, bool b_side) {
    using R = typename Plan::R;
    auto L = tile_to_shape(UMMA::Layout_K_SW128_Atom<bfloat16_t>{}, make_shape(Int<ROWS>{}, Int<R::kStageK>{}));
    auto t = make_tensor(make_smem_ptr(reinterpret_cast<bfloat16_t*>(g_smem + start)), L);
    const uint32_t box = b_side ? Plan::kBBoxBytes : Plan::kABytes;
    for (int kk = 0; kk < Plan::kMmasPerStage; ++kk) {
        auto sub = local_tile(t, make_shape(Int<ROWS>{}, _16{}), make_coord(0, kk));
        const uint64_t c = UMMA::make_umma_desc<UMMA::Major::K>(sub);
        // the plan's expression (GemmPlan::mma, the kind::f16 branch)
        uint32_t box_off = uint32_t(kk / 4) * (brk("smem_box") ? box / 2 : box);
        uint64_t d = dg::advance_smem_desc_k(dg::make_smem_desc_sw128_kmajor(start + box_off), uint32_t((kk % 4) * R::kMmaKBytes));
        if (brk("smem_start")) d ^= uint64_t(1) << 1;
        if (brk("smem_sbo")) d ^= uint64_t(1) << 33;
        ck.eq(d, c, fmt("rows %ld start %ld kk %ld side %ld", ROWS, start, kk, b_side));
    }
}

template <class Plan>
static void plan_descs(Check& ck) {
    const Plan plan{256, 1024, 0u, 0u};
    constexpr int BN = int(Plan::kBBoxBytes / 128);
    for (int s = 0; s < 2; ++s) {
        if (plan.b_smem(s) + Plan::kBBytes > sizeof(g_smem)) break;
        desc_stage<Plan, BN>(ck, plan.b_smem(s), true);
        if (!Plan::kATmem) desc_stage<Plan, 128>(ck, plan.a_smem(s), false);
    }
}

static void sw128_bf16(Check& ck, uint32_t base) {
    constexpr int ROWS = 64;
    auto L = tile_to_shape(UMMA::Layout_K_SW128_Atom<bfloat16_t>{}, make_shape(Int<ROWS>{}, Int<64>{}));
    auto t = make_tensor(make_smem_ptr(reinterpret_cast<bfloat16_t*>(g_smem + base)), L);
    for (int r = 0; r < ROWS; ++r)
        for (int k = 0; k < 64; ++k) {
            uint32_t kv = dg::sw128_offset(base, uint32_t(r), uint32_t(2 * k));
            if (brk("sw128_xor")) kv ^= 16u * ((uint32_t(r) >> 1) & 1u);
            ck.eq(kv, uint64_t(reinterpret_cast<char*>(raw_pointer_cast(&t(r, k))) - g_smem), fmt("base %ld r %ld k %ld", base, r, k));
        }
}

// ------------------------------------------------------------------------------------------ A in TMEM
// CuTe's TMEM address of A element (m, k) of MMA kk: offsets of a tmem_ptr<bf16> tensor are 16-bit
// element offsets, lane stride DP<bf16> = 2^17; the 32-bit column is (offset % DP) / 2, the half offset % 2.
template <class Plan>
static void a_tmem(Check& ck) {
    constexpr int KMMAS = Plan::kMmasPerStage;
    auto shape = make_shape(make_shape(_128{}, _16{}), _1{}, Int<KMMAS>{});
    using FrgA = typename MMA_Traits<SM100_MMA_F16BF16_TS<bfloat16_t, bfloat16_t, float, 128, 64, UMMA::Major::K,
                                                          UMMA::Major::K>>::FrgTypeA;
    auto L = FrgA::make(shape).layout();
    constexpr long DP = TMEM::DP<bfloat16_t>::value;
    static_assert(DP == (1 << 17), "16-bit TMEM elements: 2 per 32-bit column");
    const Plan plan{256, 1024, 0u, 0u};
    for (uint32_t slot = 0; slot < 2; ++slot)
        for (int m = 0; m < 128; ++m)
            for (int k = 0; k < Plan::R::kStageK; ++k) {
                // the dequant warpgroup: warp quarter m / 32, lane m % 32; chunk c, word w, register i, half h
                const int quarter = m / 32, t = m % 32;
                const int c = k / 32, w = (k % 32) / 8, i = (k % 8) / 2;
                int h = k % 2;
                const uint32_t st_taddr = dg::tmem_addr(32u * uint32_t(quarter), Plan::Tmem::a(slot) + uint32_t(Plan::kChunkRegs * c));
                int j = 4 * w + i;                                    // dq register index = tcgen05.st register
                if (brk("a_col") && k >= 16) j ^= 1;
                if (brk("a_half")) h ^= 1;
                const uint32_t lane = dg::tmem_lane(st_taddr) + uint32_t(t);   // 32x32b: thread t -> lane base + t
                const uint32_t col = dg::tmem_column(st_taddr) + uint32_t(j);
                // CuTe's stage tensor of A placed at the slot: element (m, k % 16) of MMA kk = k / 16
                const int kk = k / 16;
                const long off = long(L(make_coord(make_coord(m, k % 16), 0, kk)));
                const uint32_t cute_lane = uint32_t(off / DP), cute_col = Plan::Tmem::a(slot) + uint32_t((off % DP) / 2),
                               cute_half = uint32_t(off % 2);
                ck.eq(lane, cute_lane, fmt("lane slot %ld m %ld k %ld", slot, m, k));
                ck.eq(col, cute_col, fmt("column slot %ld m %ld k %ld", slot, m, k));
                ck.eq(uint32_t(h), cute_half, fmt("half slot %ld m %ld k %ld", slot, m, k));
            }
    // the MMA kk's A address (GemmPlan::mma: Tmem::a(slot) + kk * kMmaK / 2) is the start of CuTe's slice kk
    for (uint32_t slot = 0; slot < 2; ++slot)
        for (int kk = 0; kk < KMMAS; ++kk) {
            uint32_t a_col0 = Plan::Tmem::a(slot) + uint32_t(kk * Plan::R::kMmaK / 2);
            if (brk("a_kk")) a_col0 += uint32_t(kk % 2);
            const long off = long(L(make_coord(make_coord(0, 0), 0, kk)));
            ck.eq(a_col0, Plan::Tmem::a(slot) + uint32_t((off % DP) / 2), fmt("mma a_taddr slot %ld kk %ld", slot, kk));
            ck.eq(0, uint32_t(off / DP), fmt("mma a lane slot %ld kk %ld", slot, kk));
        }
    (void)plan;
}

// ------------------------------------------------------------------------------------------ tcgen05.st
template <class Op>
static void tmem_st(Check& ck) {
    using TL = Copy_Traits<Op>;
    constexpr int DPB = TMEM::DP_b::value;
    const int regs = int(size<1>(typename TL::SrcLayout{})) / 32;
    for (int t = 0; t < 32; ++t)
        for (int r = 0; r < regs; ++r) {
            const long bit = long(typename TL::ValID{}(typename TL::SrcLayout{}(t, 32 * r)));
            // ours: thread t, register j -> lane base + t, column col + j (the 32x32b fragment, as the load)
            dg::TmemCoord c = dg::tmem_ld_coord(dg::TmemLdShape::K32x32B, uint32_t(t), uint32_t(r));
            if (brk("st_col")) c.column = uint32_t(r) ^ 2u;
            ck.eq(c.lane, uint64_t(bit / DPB), fmt("st t %ld r %ld lane", t, r));
            ck.eq(c.column, uint64_t((bit % DPB) / 32), fmt("st t %ld r %ld column", t, r));
        }
}

using EX32 = dg::GemmPlan<dg::Recipe::NVFP4_EXACT, 32, 2>;
using EX64 = dg::GemmPlan<dg::Recipe::NVFP4_EXACT, 64, 4>;
using EX128 = dg::GemmPlan<dg::Recipe::NVFP4_EXACT, 128, 2>;
using BF64 = dg::GemmPlan<dg::Recipe::BF16, 64, 8>;
using BF128 = dg::GemmPlan<dg::Recipe::BF16, 128, 6>;

int main(int argc, char** argv) {
    if (argc > 1) g_break = argv[1];
    g_smem_base = g_smem;
    {
        Check ck("idesc");
        idesc_all<bfloat16_t>(ck, dg::ElemFmt::BF16, std::make_integer_sequence<int, 16>{});
        idesc_all<half_t>(ck, dg::ElemFmt::F16, std::make_integer_sequence<int, 16>{});
    }
    {
        Check ck("plan_idesc");
        plan_idesc<EX32>(ck);
        plan_idesc<EX64>(ck);
        plan_idesc<EX128>(ck);
        plan_idesc<BF64>(ck);
        plan_idesc<BF128>(ck);
    }
    {
        Check ck("smem_desc");
        plan_descs<EX32>(ck);
        plan_descs<EX64>(ck);
        plan_descs<EX128>(ck);
        plan_descs<BF64>(ck);
        plan_descs<BF128>(ck);
    }
    {
        Check ck("sw128_bf16");
        for (uint32_t base : {0u, 1024u, 8192u, 65536u + 3072u}) sw128_bf16(ck, base);
    }
    {
        Check ck("a_tmem");
        a_tmem<EX32>(ck);
        a_tmem<EX128>(ck);
    }
    {
        Check ck("tmem_st");
        tmem_st<SM100_TMEM_STORE_32dp32b1x>(ck);
        tmem_st<SM100_TMEM_STORE_32dp32b2x>(ck);
        tmem_st<SM100_TMEM_STORE_32dp32b4x>(ck);
        tmem_st<SM100_TMEM_STORE_32dp32b8x>(ck);
        tmem_st<SM100_TMEM_STORE_32dp32b16x>(ck);
        tmem_st<SM100_TMEM_STORE_32dp32b32x>(ck);
    }
    return 0;
}
