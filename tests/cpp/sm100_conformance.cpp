// Conformance of the sm100 kernels' descriptors and layouts with CUTLASS / CuTe, on the host (g++).
//
// Includes the kernel's own headers (common/sm100_umma.cuh, scheduler/sm100_gemm_plan.cuh; DG_HOST_DEVICE,
// plain C++) and CuTe, and compares exhaustively over the shapes and types the kernels use:
//   idesc        GemmPlan<recipe, N, S>::idesc(kk) and make_idesc_block_scaled(...) for every N of the legal
//                range and every sf_id  ==  UMMA::make_runtime_instr_desc_block_scaled<A, B, float, SF, 128, N,
//                K, K>(sfa_id << 30, sfb_id << 30) >> 32 (all 32 bits)
//   smem_desc    make_smem_desc_sw128_kmajor + advance_smem_desc_k at every stage address of every plan and at
//                other 1024-aligned bases, rows 8..256  ==  make_umma_desc<Major::K> of k block kk of a
//                tile_to_shape(Layout_K_SW128_Atom<T>, (rows, 128 B)) tile (all 64 bits: the kernel writes
//                LBO = 16 as CuTe does)
//   sw128        sw128_offset(base, r, kbyte)  ==  &tile(r, k) (u8 and the byte of packed e2m1), bases
//                1024-aligned and not
//   sf_desc      make_sf_atom_desc(start)  ==  make_umma_desc<Major::K> of a 32 x 16-byte K-major u8 atom,
//                LBO masked (kernel 0, CuTe 16: one core matrix along K, LBO unused), everything else equal
//   sf_global    sf_global_offset(m, kb, KB) and the plans' sfa_offset / sfb_offset + sf_atom_byte  ==
//                Sm1xxBlockScaledConfig<16|32>::tile_atom_to_shape_SFA offsets (same atom order: K-first
//                inside a 128-row group, then groups)
//   sf_tmem      the plans' scale TMEM addresses (Tmem::sfa / sfb + 4 mma_atom(kk) [+ sfb_column_offset]
//                -> sf_tmem_column, byte kb % 4 or sf_id)  ==  UMMA::tmem_sf_frg (ScaleFactorDuplicated4by1)
//                of one MMA: lane m % 32 of replica 0, byte column 4 (m / 32) + j
//   tmem_acc     the plans' accumulator (lane m, column Tmem::accum(b) + n)  ==  UMMA::tmem_frg_1sm<float>
//   tmem_ld      tmem_ld_coord(shape, t, r)  ==  Copy_Traits<SM100_TMEM_LOAD_32dp32b{1..32}x / 16dp256b{1..8}x>
//   legal        is_legal_combo / is_legal_sf_id / is_legal_shape for every kind x format x scale x id:
//                printed for the Python side, which compares them with its own table from the PTX ISA
// Output: one {"check", "cases", "mismatches", "first"} line per check (and "legal" lines).
// argv[1] (optional): a negative control, the name of one kernel-side quantity to perturb before the
// comparison (idesc_n, idesc_sfid, idesc_fmt, smem_sbo, smem_start, smem_layout, smem_version, sw128_xor,
// sf_atom_order, sf_byte, sfb_col, sf_tmem_col, acc_col, ld16_lane, ld32_col); the matching check must
// then report mismatches.
#include <vector>

#include "sm100_cute_host.h"
#include <cutlass/detail/sm100_blockscaled_layout.hpp>

alignas(1024) static char g_smem[1 << 18];

// ------------------------------------------------------------------------------------------ idesc
template <class A, class B, class SF, int N>
static void idesc_n(Check& ck, dg::MmaKind kind, dg::ElemFmt fa, dg::ElemFmt fb, dg::ScaleFmt fs) {
    for (int ia = 0; ia < 4; ++ia)
        for (int ib = 0; ib < 4; ++ib) {
            const uint32_t cute_v = uint32_t(UMMA::make_runtime_instr_desc_block_scaled<A, B, float, SF, 128, N, UMMA::Major::K, UMMA::Major::K>(
                                        uint32_t(ia) << 30, uint32_t(ib) << 30) >> 32);
            uint32_t k = dg::make_idesc_block_scaled(kind, fa, fb, fs, 128, N, ia, ib);
            if (brk("idesc_n")) k ^= 1u << 17;
            if (brk("idesc_sfid")) k ^= 1u << 29;
            if (brk("idesc_fmt")) k ^= 1u << 7;
            ck.eq(k, cute_v, fmt("kind %ld N %ld sfa %ld sfb %ld", long(kind), N, ia, ib));
        }
}
template <class A, class B, class SF, int... Is>
static void idesc_all(Check& ck, dg::MmaKind kind, dg::ElemFmt fa, dg::ElemFmt fb, dg::ScaleFmt fs, std::integer_sequence<int, Is...>) {
    (idesc_n<A, B, SF, 16 * (Is + 1)>(ck, kind, fa, fb, fs), ...);
}

// The plans' own idesc(kk) against CuTe with the plan's sf ids
template <class Plan, class A, class B, class SF>
static void plan_idesc(Check& ck) {
    for (int kk = 0; kk < Plan::kMmasPerStage; ++kk) {
        const int id = Plan::mma_sf_id(kk);
        uint32_t k = Plan::idesc(kk);
        const uint32_t want = uint32_t(UMMA::make_runtime_instr_desc_block_scaled<A, B, float, SF, 128, Plan::Tmem::kAccumCols / 2,
                                                                                  UMMA::Major::K, UMMA::Major::K>(uint32_t(id) << 30, uint32_t(id) << 30) >> 32);
        if (brk("idesc_sfid")) k ^= 1u << 29;
        ck.eq(k, want, fmt("plan N %ld kk %ld", Plan::Tmem::kAccumCols / 2, kk));
    }
}

// ------------------------------------------------------------------------------------------ smem descriptors
static uint64_t kernel_desc(uint32_t start, uint32_t kbytes) {
    uint64_t d = dg::advance_smem_desc_k(dg::make_smem_desc_sw128_kmajor(start), kbytes);
    if (brk("smem_sbo")) d ^= uint64_t(1) << 33;
    if (brk("smem_start")) d ^= uint64_t(1) << 1;
    if (brk("smem_layout")) d ^= uint64_t(6) << 61;     // SW128 (2) -> SW32 (4 ^ 2 = 6)... any other type
    if (brk("smem_version")) d ^= uint64_t(1) << 46;
    return d;
}

template <class T, int ROWS, int KPB>
static void smem_desc_at(Check& ck, uint32_t base) {
    auto L = tile_to_shape(UMMA::Layout_K_SW128_Atom<T>{}, make_shape(Int<ROWS>{}, Int<KPB>{}));
    auto t = make_tensor(make_smem_ptr<T>(static_cast<void*>(g_smem + base)), L);   // sub-byte iterator for 4-bit T
    constexpr int KMMA = KPB / 4;
    for (int kk = 0; kk < 4; ++kk) {
        auto sub = local_tile(t, make_shape(Int<ROWS>{}, Int<KMMA>{}), make_coord(0, kk));
        const uint64_t c = UMMA::make_umma_desc<UMMA::Major::K>(sub);
        // one 8-row group: CuTe writes SBO = 0 (no second group to address); compare SBO only from 16 rows
        const uint64_t sbo_mask = ROWS == 8 ? ~(uint64_t(0x3FFF) << 32) : ~uint64_t(0);
        ck.eq(kernel_desc(base, uint32_t(32 * kk)) & sbo_mask, c & sbo_mask, fmt("rows %ld base %ld kk %ld", ROWS, base, kk));
    }
}
template <class T, int KPB, int... Rs>
static void smem_desc_rows(Check& ck, uint32_t base, std::integer_sequence<int, Rs...>) {
    (smem_desc_at<T, 8 * (Rs + 1), KPB>(ck, base), ...);
}

template <class Plan>
static void plan_smem_descs(Check& ck) {
    const Plan plan{256, 1024, 1024u, 0u};
    constexpr int R = Plan::kBlockM;
    for (int s = 0; s < 3; ++s) {
        if (plan.a_smem(s) + Plan::kABytes > sizeof(g_smem)) break;
        smem_desc_at<uint8_t, R, 128>(ck, plan.a_smem(s));
        smem_desc_at<cutlass::float_e2m1_t, R, 256>(ck, plan.a_smem(s));
        constexpr int BN = int(Plan::kBBytes / 128);
        smem_desc_at<uint8_t, BN, 128>(ck, plan.b_smem(s));
        smem_desc_at<cutlass::float_e2m1_t, BN, 256>(ck, plan.b_smem(s));
    }
}

// ------------------------------------------------------------------------------------------ SW128 offsets
static void sw128(Check& ck, uint32_t base) {
    constexpr int ROWS = 256;
    auto L = tile_to_shape(UMMA::Layout_K_SW128_Atom<uint8_t>{}, make_shape(Int<ROWS>{}, Int<128>{}));
    auto t = make_tensor(make_smem_ptr(reinterpret_cast<uint8_t*>(g_smem + base)), L);
    // 4-bit elements through CuTe's sub-byte iterator (make_smem_ptr<T>(void*)); where CuTe puts element
    // (r, k) is found by writing it (code 7 = 6.0) into a zeroed tile and reading the predicted nibble back
    using E = cutlass::float_e2m1_t;
    auto L4 = tile_to_shape(UMMA::Layout_K_SW128_Atom<E>{}, make_shape(Int<ROWS>{}, Int<256>{}));
    auto t4 = make_tensor(make_smem_ptr<E>(static_cast<void*>(g_smem + base)), L4);
    std::memset(g_smem + (base & ~1023u), 0, ROWS * 128 + 1024);
    for (int r = 0; r < ROWS; ++r)
        for (int k = 0; k < 128; ++k) {
            uint32_t kv = dg::sw128_offset(base, uint32_t(r), uint32_t(k));
            if (brk("sw128_xor")) kv = (base + (r / 8) * 1024u + (r % 8) * 128u + k) ^ ((((base + (r / 8) * 1024u + (r % 8) * 128u + k) >> 8) & 7u) << 4);
            ck.eq(kv, uint64_t(raw_pointer_cast(&t(r, k)) - reinterpret_cast<uint8_t*>(g_smem)), fmt("u8 base %ld r %ld k %ld", base, r, k));
            for (int h = 0; h < 2; ++h) {
                t4(r, 2 * k + h) = E(6.0f);
                const unsigned got = (static_cast<unsigned char>(g_smem[kv]) >> (4 * h)) & 0xFu;
                ck.eq(got, 7u, fmt("e2m1 base %ld r %ld k %ld (nibble k & 1 of byte k / 2)", base, r, 2 * k + h));
                t4(r, 2 * k + h) = E(0.0f);
            }
        }
}

// ------------------------------------------------------------------------------------------ scales
static void sf_desc(Check& ck) {
    for (uint32_t base = 0; base < 65536; base += 512) {
        auto t = make_tensor(make_smem_ptr(reinterpret_cast<uint8_t*>(g_smem + base)), Layout<Shape<_32, _16>, Stride<_16, _1>>{});
        const uint64_t c = UMMA::make_umma_desc<UMMA::Major::K>(t);
        uint64_t k = dg::make_sf_atom_desc(base);
        if (brk("smem_sbo")) k ^= uint64_t(1) << 33;
        const uint64_t lbo_mask = ~(uint64_t(0x3FFF) << 16);
        ck.eq(k & lbo_mask, c & lbo_mask, fmt("sf atom base %ld", base));
    }
}

template <int VEC, class Plan>
static void sf_global(Check& ck) {
    // an (E * N) x K weight-scale matrix and a T x K token-scale matrix, E = 3, N = 256, K = 1024, T = 384
    constexpr int E = 3, N = 256, K = 1024, T = 384, KB = K / VEC;
    auto LA = cutlass::detail::Sm1xxBlockScaledConfig<VEC>::tile_atom_to_shape_SFA(make_shape(E * N, T, K, 1));
    auto LB = cutlass::detail::Sm1xxBlockScaledConfig<VEC>::tile_atom_to_shape_SFB(make_shape(E * N, T, K, 1));
    for (int m = 0; m < E * N; ++m)
        for (int kb = 0; kb < KB; ++kb) {
            uint64_t k = dg::sf_global_offset(uint64_t(m), uint64_t(kb), KB);
            if (brk("sf_atom_order")) k = ((uint64_t(kb) / 4) * (E * N / 128) + uint64_t(m) / 128) * 512 + dg::sf_atom_byte(uint32_t(m % 128), uint32_t(kb % 4));
            if (brk("sf_byte")) k ^= 4;
            ck.eq(k, uint64_t(LA(make_coord(m, kb * VEC, 0))), fmt("sfa m %ld kb %ld", m, kb));
        }
    // the plans' per-stage atom addressing: atom i of stage kb of tile (e, rt) holds rows rt*128 + [0,128) of
    // expert e and scale blocks (kb * kAtoms + i) * 4 + [0, 4)
    const Plan plan{N, K, 1024u, 0u};
    for (int e = 0; e < E; ++e)
        for (int rt = 0; rt < N / 128; ++rt)
            for (int kb = 0; kb < plan.num_k_blocks(); ++kb)
                for (int i = 0; i < Plan::kAtoms; ++i)
                    for (int m = 0; m < 128; m += 5)
                        for (int j = 0; j < 4; ++j) {
                            const dg::PlanTile tile{e, rt, 0, 0, 0};
                            const uint64_t k = plan.sfa_offset(tile, kb) + uint64_t(i) * 512 + dg::sf_atom_byte(uint32_t(m), uint32_t(j));
                            const int row = e * N + rt * 128 + m, blk = (kb * Plan::kAtoms + i) * 4 + j;
                            ck.eq(k, uint64_t(LA(make_coord(row, blk * VEC, 0))), fmt("plan sfa e %ld rt %ld kb %ld i %ld", e, rt, kb, i));
                        }
    for (int rs = 0; rs < T; rs += Plan::kBlockM / 4)
        for (int kb = 0; kb < plan.num_k_blocks(); ++kb)
            for (int i = 0; i < Plan::kAtoms; ++i)
                for (int tok = 0; tok < 32; tok += 3)
                    for (int j = 0; j < 4; ++j) {
                        const dg::PlanTile tile{0, 0, 0, rs, 32};
                        const int row = rs + tok;
                        // token row `row` of the tile: atom byte of its position in the 128-row group
                        const uint64_t k = plan.sfb_offset(tile, kb) + uint64_t(i) * 512 + dg::sf_atom_byte(uint32_t(row % 128), uint32_t(j));
                        const int blk = (kb * Plan::kAtoms + i) * 4 + j;
                        ck.eq(k, uint64_t(LB(make_coord(row, blk * VEC, 0))), fmt("plan sfb rs %ld kb %ld i %ld tok %ld", rs, kb, i, tok));
                    }
}

// The MMA's scale TMEM layout: CuTe's tmem_sf_frg of one MMA (MN rows, VEC, NSF) vs the plan's addresses.
template <int VEC, int NSF, int MN, class Plan>
static void sf_tmem(Check& ck) {
    using SF = cutlass::float_ue4m3_t;
    auto shape = make_shape(make_shape(Int<MN>{}, make_shape(Int<VEC>{}, Int<NSF>{})), _1{}, _1{});
    auto L = UMMA::tmem_sf_frg<SF, VEC, 1, true>::make(shape).layout();
    constexpr int DP = TMEM::DP<SF>::value;
    for (int kk = 0; kk < Plan::kMmasPerStage; ++kk)
        for (int slot = 0; slot < 2; ++slot)
            for (int m = 0; m < MN; ++m)
                for (int j = 0; j < NSF; ++j) {
                    const long a = long(L(make_coord(make_coord(m, make_coord(0, j)), 0, 0)));
                    const long cute_lane = a / DP, cute_byte = a % DP;   // byte column from the MMA's scale address
                    // kernel: the MMA's scale address column, then row m's column and byte
                    const uint32_t mma_col = Plan::Tmem::sfa(uint32_t(slot)) + 4u * uint32_t(Plan::mma_atom(kk));
                    uint32_t col = dg::sf_tmem_column(Plan::Tmem::sfa(uint32_t(slot)), uint32_t(Plan::mma_atom(kk)), uint32_t(m));
                    if (brk("sf_tmem_col")) col += (m >= 64);
                    const uint32_t byte = NSF == 4 ? uint32_t(j) : uint32_t(Plan::mma_sf_id(kk));
                    const uint32_t lane = uint32_t(m % 32);
                    // CuTe's layout of one MMA has its scale blocks at byte 0 (1X: the MMA's sf_id selects the
                    // byte, CuTe passes it in address bits 30-31); compare lane and column, and for 4X the byte
                    const long kernel_rel = long(col - mma_col) * 4 + long(NSF == 4 ? byte : 0);
                    ck.eq(uint64_t(lane), uint64_t(cute_lane), fmt("sf lane kk %ld m %ld j %ld", kk, m, j));
                    ck.eq(uint64_t(kernel_rel), uint64_t(cute_byte), fmt("sf byte col kk %ld m %ld j %ld", kk, m, j));
                }
    // the B side: the plan's SFB address for a tile starting at token row o (o % 32 == 0, the tile inside
    // one 128-row group): token n of the tile sits at row o % 128 + n of the atoms
    for (int o = 0; o < 128; o += 32)
        for (int n = 0; n + (o % 128) < 128 && n < 128; ++n) {
            const dg::PlanTile tile{0, 0, 0, 256 + o, 32};
            uint32_t base = Plan::Tmem::sfb(0) + Plan::sfb_column_offset(tile);
            if (brk("sfb_col")) base += (o == 64);
            const uint32_t col_kernel = base + uint32_t(n) / 32u;           // the MMA reads column base + n / 32
            const long a = long(L(make_coord(make_coord(o + n, make_coord(0, 0)), 0, 0)));
            ck.eq(col_kernel - Plan::Tmem::sfb(0), uint64_t((a % DP) / 4), fmt("sfb o %ld n %ld", o, n));
        }
}

template <class Plan>
static void tmem_acc(Check& ck) {
    constexpr int N = Plan::Tmem::kAccumCols / 2;
    auto shape = make_shape(make_shape(_128{}, Int<N>{}), _1{}, _1{});
    auto L = UMMA::tmem_frg_1sm<float>::make(shape).layout();
    constexpr int DP = TMEM::DP<float>::value;
    for (int b = 0; b < 2; ++b)
        for (int m = 0; m < 128; ++m)
            for (int n = 0; n < N; ++n) {
                const long a = long(L(make_coord(make_coord(m, n), 0, 0)));
                uint32_t col = Plan::Tmem::accum(uint32_t(b)) + uint32_t(n);
                if (brk("acc_col")) col += (n >= 16);
                ck.eq(uint64_t(m), uint64_t(a / DP), fmt("acc lane b %ld m %ld n %ld", b, m, n));
                ck.eq(uint64_t(col - Plan::Tmem::accum(uint32_t(b))), uint64_t(a % DP), fmt("acc col b %ld m %ld n %ld", b, m, n));
            }
}

// ------------------------------------------------------------------------------------------ tcgen05.ld
template <class Op>
static void tmem_ld(Check& ck, dg::TmemLdShape shape) {
    using TL = Copy_Traits<Op>;
    constexpr int DPB = TMEM::DP_b::value;
    const int regs = int(size<1>(typename TL::DstLayout{})) / 32;
    for (int t = 0; t < 32; ++t)
        for (int r = 0; r < regs; ++r) {
            const long bit = long(typename TL::ValID{}(typename TL::DstLayout{}(t, 32 * r)));
            dg::TmemCoord c = dg::tmem_ld_coord(shape, uint32_t(t), uint32_t(r));
            if (brk("ld16_lane") && shape == dg::TmemLdShape::K16x256B) c.lane = uint32_t(t) / 4u + 8u * (uint32_t(r) % 2u);
            if (brk("ld32_col") && shape == dg::TmemLdShape::K32x32B) c.column = uint32_t(r) ^ 1u;
            ck.eq(c.lane, uint64_t(bit / DPB), fmt("ld t %ld r %ld lane", t, r));
            ck.eq(c.column, uint64_t((bit % DPB) / 32), fmt("ld t %ld r %ld col", t, r));
        }
}

// ------------------------------------------------------------------------------------------ legality table
static void legal() {
    const dg::ElemFmt fmts[] = {dg::ElemFmt::E4M3, dg::ElemFmt::E5M2, dg::ElemFmt::E2M3, dg::ElemFmt::E3M2, dg::ElemFmt::E2M1};
    const char* names[] = {"e4m3", "e5m2", "e2m3", "e3m2", "e2m1"};
    const dg::MmaKind kinds[] = {dg::MmaKind::MXF8F6F4_BLOCK32, dg::MmaKind::MXF4NVF4_BLOCK16};
    const char* knames[] = {"mxf8f6f4.block32", "mxf4nvf4.block16"};
    for (int ki = 0; ki < 2; ++ki)
        for (int a = 0; a < 5; ++a)
            for (int b = 0; b < 5; ++b)
                for (int s = 0; s < 2; ++s) {
                    const bool ok = dg::is_legal_combo(kinds[ki], fmts[a], fmts[b], dg::ScaleFmt(s));
                    const uint32_t d = dg::make_idesc_block_scaled(kinds[ki], fmts[a], fmts[b], dg::ScaleFmt(s), 128, 128, 0, 0);
                    std::printf("{\"legal\":\"combo\",\"kind\":\"%s\",\"a\":\"%s\",\"b\":\"%s\",\"scale\":%d,\"ok\":%d,\"idesc\":%u}\n",
                                knames[ki], names[a], names[b], s, ok ? 1 : 0, d);
                }
    for (int ki = 0; ki < 2; ++ki)
        for (int id = 0; id < 4; ++id)
            std::printf("{\"legal\":\"sf_id\",\"kind\":\"%s\",\"id\":%d,\"ok\":%d}\n", knames[ki], id, dg::is_legal_sf_id(kinds[ki], id) ? 1 : 0);
    for (int ki = 0; ki < 2; ++ki)
        for (int n = 8; n <= 264; n += 8)
            std::printf("{\"legal\":\"shape\",\"kind\":\"%s\",\"m\":128,\"n\":%d,\"ok\":%d}\n", knames[ki], n, dg::is_legal_shape(kinds[ki], 128, n) ? 1 : 0);
}

int main(int argc, char** argv) {
    g_smem_base = g_smem;
    if (argc > 1) g_break = argv[1];
    using E2 = cutlass::float_e2m1_t;
    using E2U = cutlass::detail::float_e2m1_unpacksmem_t;
    using E4 = cutlass::float_e4m3_t;
    using U43 = cutlass::float_ue4m3_t;
    using U80 = cutlass::float_ue8m0_t;
    using NV32 = dg::GemmPlan<dg::Recipe::NVFP4, 32, 2>;
    using NV64 = dg::GemmPlan<dg::Recipe::NVFP4, 64, 3>;
    using NV128 = dg::GemmPlan<dg::Recipe::NVFP4, 128, 2>;
    using MX32 = dg::GemmPlan<dg::Recipe::MXFP4_FP8, 32, 3>;
    using MX64 = dg::GemmPlan<dg::Recipe::MXFP4_FP8, 64, 2>;
    using MX128 = dg::GemmPlan<dg::Recipe::MXFP4_FP8, 128, 3>;
    {
        Check ck("idesc");
        auto Ns = std::make_integer_sequence<int, 16>{};
        idesc_all<E2, E2, U43>(ck, dg::MmaKind::MXF4NVF4_BLOCK16, dg::ElemFmt::E2M1, dg::ElemFmt::E2M1, dg::ScaleFmt::UE4M3, Ns);
        idesc_all<E2, E2, U80>(ck, dg::MmaKind::MXF4NVF4_BLOCK16, dg::ElemFmt::E2M1, dg::ElemFmt::E2M1, dg::ScaleFmt::UE8M0, Ns);
        idesc_all<E2U, E4, U80>(ck, dg::MmaKind::MXF8F6F4_BLOCK32, dg::ElemFmt::E2M1, dg::ElemFmt::E4M3, dg::ScaleFmt::UE8M0, Ns);
        idesc_all<E4, E2U, U80>(ck, dg::MmaKind::MXF8F6F4_BLOCK32, dg::ElemFmt::E4M3, dg::ElemFmt::E2M1, dg::ScaleFmt::UE8M0, Ns);
        plan_idesc<NV32, E2, E2, U43>(ck);
        plan_idesc<NV64, E2, E2, U43>(ck);
        plan_idesc<NV128, E2, E2, U43>(ck);
        plan_idesc<MX32, E2U, E4, U80>(ck);
        plan_idesc<MX64, E2U, E4, U80>(ck);
        plan_idesc<MX128, E2U, E4, U80>(ck);
    }
    {
        Check ck("smem_desc");
        auto Rs = std::make_integer_sequence<int, 32>{};
        for (uint32_t base : {0u, 1024u, 7168u, 33792u, 131072u, 198656u}) {
            smem_desc_rows<uint8_t, 128>(ck, base, Rs);
            smem_desc_rows<E2, 256>(ck, base, Rs);
        }
        plan_smem_descs<NV32>(ck);
        plan_smem_descs<NV64>(ck);
        plan_smem_descs<NV128>(ck);
        plan_smem_descs<MX32>(ck);
        plan_smem_descs<MX64>(ck);
        plan_smem_descs<MX128>(ck);
    }
    {
        Check ck("sw128");
        for (uint32_t base : {0u, 1024u, 4352u, 9216u, 66560u}) sw128(ck, base);
    }
    { Check ck("sf_desc"); sf_desc(ck); }
    {
        Check ck("sf_global");
        sf_global<16, NV64>(ck);
        sf_global<16, NV32>(ck);
        sf_global<32, MX128>(ck);
        sf_global<32, MX32>(ck);
    }
    {
        Check ck("sf_tmem");
        sf_tmem<16, 4, 128, NV64>(ck);
        sf_tmem<16, 4, 128, NV128>(ck);
        sf_tmem<32, 1, 128, MX64>(ck);
        sf_tmem<32, 1, 128, MX128>(ck);
    }
    {
        Check ck("tmem_acc");
        tmem_acc<NV32>(ck);
        tmem_acc<NV64>(ck);
        tmem_acc<NV128>(ck);
        tmem_acc<MX64>(ck);
    }
    {
        Check ck("tmem_ld");
        tmem_ld<SM100_TMEM_LOAD_32dp32b1x>(ck, dg::TmemLdShape::K32x32B);
        tmem_ld<SM100_TMEM_LOAD_32dp32b2x>(ck, dg::TmemLdShape::K32x32B);
        tmem_ld<SM100_TMEM_LOAD_32dp32b4x>(ck, dg::TmemLdShape::K32x32B);
        tmem_ld<SM100_TMEM_LOAD_32dp32b8x>(ck, dg::TmemLdShape::K32x32B);
        tmem_ld<SM100_TMEM_LOAD_32dp32b16x>(ck, dg::TmemLdShape::K32x32B);
        tmem_ld<SM100_TMEM_LOAD_32dp32b32x>(ck, dg::TmemLdShape::K32x32B);
        tmem_ld<SM100_TMEM_LOAD_16dp256b1x>(ck, dg::TmemLdShape::K16x256B);
        tmem_ld<SM100_TMEM_LOAD_16dp256b2x>(ck, dg::TmemLdShape::K16x256B);
        tmem_ld<SM100_TMEM_LOAD_16dp256b4x>(ck, dg::TmemLdShape::K16x256B);
        tmem_ld<SM100_TMEM_LOAD_16dp256b8x>(ck, dg::TmemLdShape::K16x256B);
    }
    legal();
    return 0;
}
