// CuTe (CUTLASS 4.x headers) as a host-side oracle for the sm100 functional model.
// Built with plain g++ by tests/test_sm100_conformance.py; prints one JSON object per line:
//
//   {"what":"idesc", "kind", "a", "b", "sf", "m", "n", "sfa_id", "sfb_id", "value"}
//        UMMA::make_runtime_instr_desc_block_scaled<...>(sfa_addr, sfb_addr) >> 32 (the descriptor),
//        the sf ids passed in address bits 30-31 as CuTe does; also checked equal to the compile-time
//        make_instr_desc_block_scaled with the ids set.
//   {"what":"smem_desc", "elem", "rows", "kk", "base", "value"}
//        make_umma_desc<Major::K> of k block kk (32 bytes: 32 u8 / 64 packed e2m1) of a
//        tile_to_shape(Layout_K_SW128_Atom<T>, (rows, 128 bytes)) tile at shared address base.
//   {"what":"utccp_desc", "base", "value"}   make_umma_desc<Major::K> of a 32 x 16-byte scale atom.
//   {"what":"sw128", "elem", "base", "rows", "offsets"}    &tile(r, k) - smem for every (r, k) (row-major),
//        for e2m1 "nibbles": 2 * byte + nibble of element (r, k) (written through CuTe, found in memory).
//   {"what":"sf_layout", "vec", "mn", "k", "offsets"}      Sm1xxBlockScaledConfig<vec>::tile_atom_to_shape_SFA
//        offsets of every (mn, scale block), row-major.
//   {"what":"tmem_sf", "vec", "nsf", "mn", "lanes", "bytes"}  UMMA::tmem_sf_frg (ScaleFactorDuplicated4by1):
//        for every (mn, sf slot, replica) the TMEM lane and byte column.
//   {"what":"tmem_acc", "n", "lanes", "cols"}               UMMA::tmem_frg_1sm<float> of a 128 x n accumulator.
//   {"what":"tmem_ld", "shape", "num", "lanes", "cols"}     Copy_Traits<SM100_TMEM_LOAD_*>: register r of thread t.
//   {"what":"utccp", "lanes", "bits"}                       Copy_Traits<SM100_UTCCP_4x32dp128bit_1cta>::ValID.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

// CuTe turns a shared-memory pointer into a shared address with __cvta_generic_to_shared; on the host
// the "shared window" is a static array and the address is the offset into it.
static char* g_smem_base = nullptr;
static inline size_t __cvta_generic_to_shared(const void* p) { return (size_t)((const char*)p - g_smem_base); }
#define CUTE_CVTA_GENERIC_TO_SHARED_ACTIVATED 1

#include <cute/tensor.hpp>
#include <cute/atom/mma_traits_sm100.hpp>
#include <cute/atom/copy_traits_sm100.hpp>
#include <cutlass/detail/sm100_blockscaled_layout.hpp>

using namespace cute;

alignas(1024) static char g_smem[1 << 18];

template <class V>
static void print_list(const char* key, const V& v, bool last = false) {
    std::printf("\"%s\":[", key);
    for (size_t i = 0; i < v.size(); ++i) std::printf(i ? ",%lld" : "%lld", (long long)v[i]);
    std::printf(last ? "]" : "],");
}

// ------------------------------------------------------------------------------------------ idesc
template <class A, class B, class SF, int N>
static void idesc_one(const char* kind, const char* an, const char* bn, const char* sfn) {
    for (uint32_t ia = 0; ia < 4; ++ia)
        for (uint32_t ib = 0; ib < 4; ++ib) {
            const uint64_t rt = UMMA::make_runtime_instr_desc_block_scaled<A, B, float, SF, 128, N, UMMA::Major::K,
                                                                           UMMA::Major::K>(ia << 30, ib << 30);
            auto ct = UMMA::make_instr_desc_block_scaled<A, B, float, SF, 128, N, UMMA::Major::K, UMMA::Major::K>();
            ct.a_sf_id_ = ia;
            ct.b_sf_id_ = ib;
            const uint32_t v = static_cast<uint32_t>(rt >> 32);
            if (v != static_cast<uint32_t>(ct) || static_cast<uint32_t>(rt) != 0u) {
                std::fprintf(stderr, "runtime and compile-time descriptors differ\n");
                std::exit(1);
            }
            std::printf("{\"what\":\"idesc\",\"kind\":\"%s\",\"a\":\"%s\",\"b\":\"%s\",\"sf\":\"%s\",\"m\":128,\"n\":%d,"
                        "\"sfa_id\":%u,\"sfb_id\":%u,\"value\":%u}\n", kind, an, bn, sfn, N, ia, ib, v);
        }
}

template <class A, class B, class SF, int... Ns>
static void idesc_all(const char* kind, const char* an, const char* bn, const char* sfn, std::integer_sequence<int, Ns...>) {
    (idesc_one<A, B, SF, 16 * (Ns + 1)>(kind, an, bn, sfn), ...);
}

// ------------------------------------------------------------------------------------------ smem descriptors
template <class T, int ROWS, int KPB>   // KPB: elements per 128-byte row
static void smem_desc_rows(const char* elem, uint32_t base) {
    auto L = tile_to_shape(UMMA::Layout_K_SW128_Atom<T>{}, make_shape(Int<ROWS>{}, Int<KPB>{}));
    auto t = make_tensor(make_smem_ptr<T>(static_cast<void*>(g_smem + base)), L);   // sub-byte iterator for 4-bit T
    constexpr int KMMA = KPB / 4;   // 32 bytes per MMA
    for (int kk = 0; kk < 4; ++kk) {
        auto sub = local_tile(t, make_shape(Int<ROWS>{}, Int<KMMA>{}), make_coord(0, kk));
        const uint64_t d = UMMA::make_umma_desc<UMMA::Major::K>(sub);
        std::printf("{\"what\":\"smem_desc\",\"elem\":\"%s\",\"rows\":%d,\"kk\":%d,\"base\":%u,\"value\":%llu}\n",
                    elem, ROWS, kk, base, (unsigned long long)d);
    }
}

template <class T, int KPB, int... Rs>
static void smem_desc_all(const char* elem, std::integer_sequence<int, Rs...>) {
    for (uint32_t base : {0u, 1024u, 33792u, 131072u, 199680u})
        (smem_desc_rows<T, 8 * (Rs + 1), KPB>(elem, base), ...);
}

static void utccp_desc() {
    for (uint32_t base : {0u, 512u, 1536u, 70144u}) {
        auto t = make_tensor(make_smem_ptr(reinterpret_cast<uint8_t*>(g_smem + base)), Layout<Shape<_32, _16>, Stride<_16, _1>>{});
        const uint64_t d = UMMA::make_umma_desc<UMMA::Major::K>(t);
        std::printf("{\"what\":\"utccp_desc\",\"base\":%u,\"value\":%llu}\n", base, (unsigned long long)d);
    }
}

// ------------------------------------------------------------------------------------------ SW128 offsets
static void sw128_offsets(uint32_t base) {
    constexpr int ROWS = 32;
    {
        auto L = tile_to_shape(UMMA::Layout_K_SW128_Atom<uint8_t>{}, make_shape(Int<ROWS>{}, Int<128>{}));
        auto t = make_tensor(make_smem_ptr(reinterpret_cast<uint8_t*>(g_smem + base)), L);
        std::vector<long long> off;
        for (int r = 0; r < ROWS; ++r)
            for (int k = 0; k < 128; ++k) off.push_back((long long)(raw_pointer_cast(&t(r, k)) - reinterpret_cast<uint8_t*>(g_smem)));
        std::printf("{\"what\":\"sw128\",\"elem\":\"u8\",\"base\":%u,\"rows\":%d,", base, ROWS);
        print_list("offsets", off, true);
        std::printf("}\n");
    }
    {
        // 4-bit elements through CuTe's sub-byte iterator; where element (r, k) lands is found by writing it
        // (code 7) into a zeroed tile: prints byte * 2 + nibble for every (r, k)
        using E = cutlass::float_e2m1_t;
        auto L = tile_to_shape(UMMA::Layout_K_SW128_Atom<E>{}, make_shape(Int<ROWS>{}, Int<256>{}));
        auto t = make_tensor(make_smem_ptr<E>(static_cast<void*>(g_smem + base)), L);
        const uint32_t lo = base & ~1023u, hi = base + ROWS * 128 + 1024;
        std::memset(g_smem + lo, 0, hi - lo);
        std::vector<long long> off;
        for (int r = 0; r < ROWS; ++r)
            for (int k = 0; k < 256; ++k) {
                t(r, k) = E(6.0f);
                long long where = -1;
                for (uint32_t i = lo; i < hi; ++i)
                    if (g_smem[i]) { where = 2LL * i + ((static_cast<unsigned char>(g_smem[i]) & 0xF) ? 0 : 1); break; }
                off.push_back(where);
                t(r, k) = E(0.0f);
            }
        std::printf("{\"what\":\"sw128\",\"elem\":\"e2m1\",\"base\":%u,\"rows\":%d,", base, ROWS);
        print_list("nibbles", off, true);
        std::printf("}\n");
    }
}

// ------------------------------------------------------------------------------------------ scale layouts
template <int VEC>
static void sf_layout() {
    constexpr int MN = 256, K = 1024;
    auto L = cutlass::detail::Sm1xxBlockScaledConfig<VEC>::tile_atom_to_shape_SFA(make_shape(MN, 128, K, 1));
    std::vector<long long> off;
    for (int m = 0; m < MN; ++m)
        for (int kb = 0; kb < K / VEC; ++kb) off.push_back((long long)L(make_coord(m, kb * VEC, 0)));
    // every element of a block has the block's scale
    for (int m = 0; m < MN; m += 37)
        for (int k = 0; k < K; k += 7)
            if (L(make_coord(m, k, 0)) != L(make_coord(m, (k / VEC) * VEC, 0))) { std::fprintf(stderr, "sf block\n"); std::exit(1); }
    std::printf("{\"what\":\"sf_layout\",\"vec\":%d,\"mn\":%d,\"k\":%d,", VEC, MN, K);
    print_list("offsets", off, true);
    std::printf("}\n");
}

template <int VEC, int NSF, int MN>
static void tmem_sf() {
    using SF = cutlass::float_ue4m3_t;
    auto shape = make_shape(make_shape(Int<MN>{}, make_shape(Int<VEC>{}, Int<NSF>{})), _1{}, _1{});
    auto t = UMMA::tmem_sf_frg<SF, VEC, 1, true>::make(shape);
    auto L = t.layout();
    // coordinate ((mn, (v, j)), 0, 0) for the replica-free logical view; replicas come from the atom's REP mode,
    // which the logical shape hides: print the address of each (mn, j) and the replication separately.
    constexpr int DP = TMEM::DP<SF>::value;
    std::vector<long long> lanes, bytes;
    for (int m = 0; m < MN; ++m)
        for (int j = 0; j < NSF; ++j) {
            const long long a = (long long)L(make_coord(make_coord(m, make_coord(0, j)), 0, 0));
            lanes.push_back(a / DP);
            bytes.push_back(a % DP);
        }
    std::printf("{\"what\":\"tmem_sf\",\"vec\":%d,\"nsf\":%d,\"mn\":%d,\"dp\":%d,\"size\":%d,", VEC, NSF, MN, DP, (int)size(L));
    print_list("lanes", lanes);
    print_list("bytes", bytes, true);
    std::printf("}\n");
}

// The replica structure: the atom CuTe composes (before tiling) maps (((32, MN/32), REP 4), (VEC, NSF)).
template <int NSF, int MN>
static void tmem_sf_atom() {
    using SF = cutlass::float_ue4m3_t;
    auto atom = Layout<Shape<Shape<Shape<_32, Int<MN / 32>>, _4>, Shape<_1, Int<NSF>>>,
                       Stride<Stride<Stride<_1, _512>, _32>, Stride<_0, _128>>>{};
    auto restride = Layout<Shape<_128, _16384>, Stride<TMEM::DP<SF>, _1>>{};
    auto L = composition(restride, atom);
    constexpr int DP = TMEM::DP<SF>::value;
    std::vector<long long> lanes, bytes;
    for (int m = 0; m < MN; ++m)
        for (int r = 0; r < 4; ++r)
            for (int j = 0; j < NSF; ++j) {
                const long long a = (long long)L(make_coord(make_coord(make_coord(m % 32, m / 32), r), make_coord(0, j)));
                lanes.push_back(a / DP);
                bytes.push_back(a % DP);
            }
    std::printf("{\"what\":\"tmem_sf_atom\",\"nsf\":%d,\"mn\":%d,", NSF, MN);
    print_list("lanes", lanes);
    print_list("bytes", bytes, true);
    std::printf("}\n");
}

template <int N>
static void tmem_acc() {
    auto shape = make_shape(make_shape(_128{}, Int<N>{}), _1{}, _1{});
    auto t = UMMA::tmem_frg_1sm<float>::make(shape);
    auto L = t.layout();
    constexpr int DP = TMEM::DP<float>::value;
    std::vector<long long> lanes, cols;
    for (int m = 0; m < 128; ++m)
        for (int n = 0; n < N; ++n) {
            const long long a = (long long)L(make_coord(make_coord(m, n), 0, 0));
            lanes.push_back(a / DP);
            cols.push_back(a % DP);
        }
    std::printf("{\"what\":\"tmem_acc\",\"n\":%d,", N);
    print_list("lanes", lanes);
    print_list("cols", cols, true);
    std::printf("}\n");
}

// ------------------------------------------------------------------------------------------ tcgen05.ld / cp
template <class Op>
static void tmem_ld(const char* shape, int num) {
    using TL = Copy_Traits<Op>;
    constexpr int DPB = TMEM::DP_b::value;
    const int regs = int(size<1>(typename TL::DstLayout{})) / 32;
    std::vector<long long> lanes, cols;
    for (int t = 0; t < 32; ++t)
        for (int r = 0; r < regs; ++r) {
            const long long bit = (long long)typename TL::ValID{}(typename TL::DstLayout{}(t, 32 * r));
            lanes.push_back(bit / DPB);
            cols.push_back((bit % DPB) / 32);
            // the register's 32 bits are one column's 32 bits
            for (int b = 1; b < 32; ++b)
                if ((long long)typename TL::ValID{}(typename TL::DstLayout{}(t, 32 * r + b)) != bit + b) {
                    std::fprintf(stderr, "register bits not contiguous\n");
                    std::exit(1);
                }
        }
    std::printf("{\"what\":\"tmem_ld\",\"shape\":\"%s\",\"num\":%d,\"regs\":%d,", shape, num, regs);
    print_list("lanes", lanes);
    print_list("cols", cols, true);
    std::printf("}\n");
}

static void utccp_map() {
    using TL = Copy_Traits<SM100_UTCCP_4x32dp128bit_1cta>;
    constexpr int DPB = TMEM::DP_b::value;
    std::vector<long long> lanes, bits;
    for (int i = 0; i < 32; ++i)
        for (int j = 0; j < 128; ++j)
            for (int b = 0; b < 4; ++b) {
                const long long a = (long long)typename TL::ValID{}(make_coord(i, j, b));
                lanes.push_back(a / DPB);
                bits.push_back(a % DPB);
            }
    std::printf("{\"what\":\"utccp\",");
    print_list("lanes", lanes);
    print_list("bits", bits, true);
    std::printf("}\n");
}

int main() {
    g_smem_base = g_smem;
    using E2 = cutlass::float_e2m1_t;
    using E2U = cutlass::detail::float_e2m1_unpacksmem_t;
    using E4 = cutlass::float_e4m3_t;
    using U43 = cutlass::float_ue4m3_t;
    using U80 = cutlass::float_ue8m0_t;
    auto Ns = std::make_integer_sequence<int, 16>{};   // N = 16 .. 256 step 16
    idesc_all<E2, E2, U43>("mxf4nvf4.block16", "e2m1", "e2m1", "ue4m3", Ns);
    idesc_all<E2, E2, U80>("mxf4nvf4.block16", "e2m1", "e2m1", "ue8m0", Ns);
    idesc_all<E4, E2U, U80>("mxf8f6f4.block32", "e4m3", "e2m1", "ue8m0", Ns);
    idesc_all<E2U, E4, U80>("mxf8f6f4.block32", "e2m1", "e4m3", "ue8m0", Ns);
    idesc_all<E4, E4, U80>("mxf8f6f4.block32", "e4m3", "e4m3", "ue8m0", Ns);
    idesc_all<E2U, E2U, U80>("mxf8f6f4.block32", "e2m1", "e2m1", "ue8m0", Ns);
    // CuTe encodes the illegal mxf8f6f4 + UE4M3 without complaint; the model must reject it
    idesc_all<E4, E2U, U43>("illegal.mxf8f6f4.ue4m3", "e4m3", "e2m1", "ue4m3", std::integer_sequence<int, 7>{});

    auto Rs = std::make_integer_sequence<int, 32>{};   // rows 8 .. 256 step 8
    smem_desc_all<uint8_t, 128>("u8", Rs);
    smem_desc_all<E2, 256>("e2m1", Rs);
    utccp_desc();

    sw128_offsets(0);
    sw128_offsets(3072);    // 1024-aligned
    sw128_offsets(4352);    // 128-aligned only: the swizzle follows absolute address bits

    sf_layout<16>();
    sf_layout<32>();
    tmem_sf<16, 4, 128>();
    tmem_sf<16, 4, 256>();
    tmem_sf<32, 1, 128>();
    tmem_sf<32, 1, 256>();
    tmem_sf_atom<4, 128>();
    tmem_sf_atom<4, 256>();
    tmem_sf_atom<1, 128>();
    tmem_acc<64>();
    tmem_acc<256>();

    tmem_ld<SM100_TMEM_LOAD_32dp32b1x>("32x32b", 1);
    tmem_ld<SM100_TMEM_LOAD_32dp32b2x>("32x32b", 2);
    tmem_ld<SM100_TMEM_LOAD_32dp32b4x>("32x32b", 4);
    tmem_ld<SM100_TMEM_LOAD_32dp32b8x>("32x32b", 8);
    tmem_ld<SM100_TMEM_LOAD_32dp32b16x>("32x32b", 16);
    tmem_ld<SM100_TMEM_LOAD_32dp32b32x>("32x32b", 32);
    tmem_ld<SM100_TMEM_LOAD_16dp256b1x>("16x256b", 1);
    tmem_ld<SM100_TMEM_LOAD_16dp256b2x>("16x256b", 2);
    tmem_ld<SM100_TMEM_LOAD_16dp256b4x>("16x256b", 4);
    tmem_ld<SM100_TMEM_LOAD_16dp256b8x>("16x256b", 8);
    utccp_map();
    return 0;
}
