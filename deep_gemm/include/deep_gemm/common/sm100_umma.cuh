#pragma once
// sm100 (tcgen05 / UMMA) descriptors and layouts of the Blackwell expert GEMMs, as plain integer
// arithmetic: every function is DG_HOST_DEVICE and uses no CUDA intrinsic, so the kernel
// (impls/sm100_fp4_grouped_gemm.cuh) and host programs compiled by g++ (the functional model and the
// CuTe-conformance tests) call the same code.  Bit fields as measured in /work/shared/sm100-proof-notes.md
// against CuTe's host builders (cute/arch/mma_sm100_desc.hpp: UMMA::InstrDescriptor,
// UMMA::InstrDescriptorBlockScaled, UMMA::SmemDescriptor) and the PTX ISA (tcgen05 chapter).
//
// Contents
//   * MmaKind, element / scale formats, and the PTX ISA's legal combinations (is_legal_*)
//   * instruction descriptors: make_idesc_f16(), make_idesc_block_scaled()
//   * the K-major SWIZZLE_128B shared-memory matrix descriptor (make_smem_desc_sw128_kmajor) and its
//     per-k advance (advance_smem_desc_k), the SW128 byte address (sw128_offset), and the no-swizzle
//     descriptor of a 512-byte scale-factor atom (the tcgen05.cp 32x128b.warpx4 source, make_sf_atom_desc)
//   * the block-scale byte layout (Sm1xxBlockScaledConfig-style 512-byte atoms: sf_atom_byte) and the
//     TMEM scale-factor columns (sf_tmem_column, the sf_id of an MMA)
//   * TMEM addresses, the accumulator / scale column allocation (TmemLayout, double-buffered accumulator)
//   * the tcgen05.ld fragment -> (TMEM lane, column) map (tmem_ld_coord)
#include <cstdint>

#include <deep_gemm/common/host_device.cuh>

namespace deep_gemm::sm100 {

// ------------------------------------------------------------------------------------------ kinds
// tcgen05.mma kinds used here (cta_group::1 only).  Spelled in PTX as
//   F16              : tcgen05.mma.cta_group::1.kind::f16
//   MXF8F6F4_BLOCK32 : tcgen05.mma.cta_group::1.kind::mxf8f6f4.block_scale.block32   (UE8M0 per 32, K = 32)
//   MXF4NVF4_BLOCK16 : tcgen05.mma.cta_group::1.kind::mxf4nvf4.block_scale.block16   (UE4M3 per 16, K = 64)
enum class MmaKind : int { F16 = 0, MXF8F6F4_BLOCK32 = 1, MXF4NVF4_BLOCK16 = 2 };

// Element formats in the descriptor's a_format / b_format fields.  The encoding depends on the kind:
// under mxf8f6f4 E2M1 is 5, under mxf4 / mxf4nvf4 it is 1 (notes; CuTe's MXF8F6F4Format / MXF4Format).
enum class ElemFmt : int { E4M3 = 0, E5M2 = 1, E2M3 = 3, E3M2 = 4, E2M1 = 5, F16 = 16, BF16 = 17 };
enum class ScaleFmt : int { UE4M3 = 0, UE8M0 = 1 };

DG_HOST_DEVICE constexpr int mma_k(MmaKind kind) {
    // K per MMA instruction (dense): f16 16, mxf8f6f4 32, mxf4nvf4 64
    return kind == MmaKind::F16 ? 16 : kind == MmaKind::MXF8F6F4_BLOCK32 ? 32 : 64;
}
DG_HOST_DEVICE constexpr int scale_block(MmaKind kind) {
    // elements per scale factor: block32 / block16 (0: not block-scaled)
    return kind == MmaKind::MXF8F6F4_BLOCK32 ? 32 : kind == MmaKind::MXF4NVF4_BLOCK16 ? 16 : 0;
}

// Shape rules for cta_group::1 as used here: M = 128 (block-scaled kinds: 128 only), N a multiple of 16
// in [16, 256] (the PTX ISA allows N % 8 for M = 64; we only use M = 128).
DG_HOST_DEVICE constexpr bool is_legal_shape(MmaKind kind, int m, int n) {
    return (m == 128 || (kind == MmaKind::F16 && m == 64)) &&
           (m == 64 ? (n % 8 == 0 && n >= 8) : (n % 16 == 0 && n >= 16)) && n <= 256;
}

// PTX ISA, tcgen05.mma, "valid combinations of scale_vectorsize" / element types:
//   kind::mxf8f6f4 (.block32 only, i.e. scale_vec::1X): A, B in {E4M3, E5M2, E2M3, E3M2, E2M1}, scales UE8M0
//   kind::mxf4nvf4 .block16 (scale_vec::4X): A, B = E2M1, scales UE4M3 or UE8M0
//   kind::mxf4nvf4 .block32 (2X) exists too but is not a kind of ours (MmaKind has no such member)
//   kind::f16: A, B both F16 or both BF16, no scales
// CuTe's host builder encodes illegal combinations (e.g. E4M3 x E2M1 with UE4M3 scales) without
// complaint, so this check is ours.
DG_HOST_DEVICE constexpr bool is_mxf8f6f4_elem(ElemFmt f) {
    return f == ElemFmt::E4M3 || f == ElemFmt::E5M2 || f == ElemFmt::E2M3 || f == ElemFmt::E3M2 || f == ElemFmt::E2M1;
}
DG_HOST_DEVICE constexpr bool is_legal_combo(MmaKind kind, ElemFmt a, ElemFmt b, ScaleFmt s) {
    return kind == MmaKind::F16 ? ((a == ElemFmt::F16 && b == ElemFmt::F16) || (a == ElemFmt::BF16 && b == ElemFmt::BF16))
         : kind == MmaKind::MXF8F6F4_BLOCK32 ? (is_mxf8f6f4_elem(a) && is_mxf8f6f4_elem(b) && s == ScaleFmt::UE8M0)
         : (a == ElemFmt::E2M1 && b == ElemFmt::E2M1 && (s == ScaleFmt::UE4M3 || s == ScaleFmt::UE8M0));
}

// The descriptor's 3-bit format code of `f` under `kind`.
DG_HOST_DEVICE constexpr uint32_t fmt_code(MmaKind kind, ElemFmt f) {
    return kind == MmaKind::F16 ? (f == ElemFmt::BF16 ? 1u : 0u)
         : kind == MmaKind::MXF4NVF4_BLOCK16 ? 1u                      // E2M1 under mxf4 / mxf4nvf4
         : static_cast<uint32_t>(f);                                    // MXF8F6F4Format
}

// ------------------------------------------------------------------ instruction descriptors
// kind::f16 (UMMA::InstrDescriptor): c_format 4-5 (1 = F32), a_format 7-9, b_format 10-12, a_negate 13,
// b_negate 14, a_major 15, b_major 16 (0 = K-major), N >> 3 at 17-22, M >> 4 at 24-28, max_shift 30-31 (0).
DG_HOST_DEVICE constexpr uint32_t make_idesc_f16(ElemFmt a, ElemFmt b, int m, int n, bool a_mn_major = false,
                                                 bool b_mn_major = false) {
    return (1u << 4) | (fmt_code(MmaKind::F16, a) << 7) | (fmt_code(MmaKind::F16, b) << 10) |
           (uint32_t(a_mn_major) << 15) | (uint32_t(b_mn_major) << 16) |
           (uint32_t(n >> 3) << 17) | (uint32_t(m >> 4) << 24);
}

// Block-scaled kinds (UMMA::InstrDescriptorBlockScaled): sparse 0-2 (0), b_sf_id 4-5, a_format 7-9,
// b_format 10-12, negate 13-14 (0), majors 15-16 (0 = K-major: the only major of 4-bit operands), N >> 3
// at 17-22, scale_format 23 (0 = UE4M3, 1 = UE8M0), M >> 4 at 24-28, a_sf_id 29-30, k_size 31 (0 = dense
// K 32 for mxf8f6f4 / K 64 for mxf4nvf4).
// sf_id: the byte (1X, block32 under mxf8f6f4) of each 32-bit TMEM scale column the MMA reads; must be 0
// for 4X (block16 under mxf4nvf4, whose 4 scale blocks fill the whole 32-bit column).
DG_HOST_DEVICE constexpr uint32_t make_idesc_block_scaled(MmaKind kind, ElemFmt a, ElemFmt b, ScaleFmt s, int m, int n,
                                                          int sfa_id, int sfb_id) {
    return (uint32_t(sfb_id & 3) << 4) | (fmt_code(kind, a) << 7) | (fmt_code(kind, b) << 10) |
           (uint32_t(n >> 3) << 17) | (uint32_t(s) << 23) | (uint32_t(m >> 4) << 24) | (uint32_t(sfa_id & 3) << 29);
}

// Legal sf_id values for a block-scaled kind: 1X (block32 in mxf8f6f4) 0..3, 4X (block16) 0 only.
DG_HOST_DEVICE constexpr bool is_legal_sf_id(MmaKind kind, int sf_id) {
    return kind == MmaKind::MXF8F6F4_BLOCK32 ? (sf_id >= 0 && sf_id < 4) : sf_id == 0;
}

// ------------------------------------------------------------- shared-memory matrix descriptors
// UMMA::SmemDescriptor: start address >> 4 at 0-13, leading byte offset >> 4 at 16-29, stride byte
// offset >> 4 at 32-45, version 46-47 (1 on sm100), base_offset 49-51, lbo_mode 52, layout type 61-63
// (0 = SWIZZLE_NONE, 2 = SWIZZLE_128B).  Addresses are shared-window byte addresses (< 2^18).
enum class SmemLayout : uint32_t { SWIZZLE_NONE = 0, SWIZZLE_128B = 2 };

DG_HOST_DEVICE constexpr uint64_t make_smem_desc(uint32_t start, uint32_t lbo, uint32_t sbo, SmemLayout layout,
                                                 uint32_t base_offset = 0) {
    return uint64_t((start >> 4) & 0x3FFFu) | (uint64_t((lbo >> 4) & 0x3FFFu) << 16) |
           (uint64_t((sbo >> 4) & 0x3FFFu) << 32) | (uint64_t(1) << 46) | (uint64_t(base_offset & 7u) << 49) |
           (uint64_t(static_cast<uint32_t>(layout)) << 61);
}

// A K-major tile of rows x 128 bytes (one SW128 atom column), rows in groups of 8 at 1024 bytes (SBO),
// as TMA writes it with CU_TENSOR_MAP_SWIZZLE_128B into a 1024-aligned buffer.  LBO is unused by a
// K-major SW128 operand; we write 16 bytes as CuTe's make_umma_desc<Major::K> does (upstream DeepGEMM
// writes 0).  base_offset 0: the buffer is 1024-aligned.
constexpr uint32_t kSW128AtomBytes = 1024;
constexpr uint32_t kSW128RowBytes = 128;
DG_HOST_DEVICE constexpr uint64_t make_smem_desc_sw128_kmajor(uint32_t start) {
    return make_smem_desc(start, 16, kSW128AtomBytes, SmemLayout::SWIZZLE_128B);
}
// The descriptor of the same tile advanced by `k_bytes` along K (within the 128-byte row): the start
// address moves by k_bytes (the hardware applies the swizzle XOR on absolute address bits 4-6 from
// bits 7-9), e.g. 32 bytes per MMA of K = 64 packed E2M1, K = 32 FP8 or K = 32 unpacked FP4.
DG_HOST_DEVICE constexpr uint64_t advance_smem_desc_k(uint64_t desc, uint32_t k_bytes) {
    return desc + uint64_t(k_bytes >> 4);
}
// Physical byte address of logical (row r, byte kbyte in the row) of a K-major SW128 tile at `base`
// (verified exhaustively against CuTe's &tensor(r, k), also for a base that is not 1024-aligned):
//   lin = base + (r / 8) * 1024 + (r % 8) * 128 + kbyte;  phys = lin ^ (((lin >> 7) & 7) << 4)
// A 4-bit element k of a packed row is nibble (k & 1) of byte k / 2.
DG_HOST_DEVICE constexpr uint32_t sw128_offset(uint32_t base, uint32_t r, uint32_t kbyte) {
    return (base + (r / 8) * 1024u + (r % 8) * 128u + kbyte) ^
           ((((base + (r / 8) * 1024u + (r % 8) * 128u + kbyte) >> 7) & 7u) << 4);
}

// The source of one tcgen05.cp.cta_group::1.32x128b.warpx4: a 512-byte scale-factor atom, 32 rows of
// 16 bytes, contiguous (no swizzle; core matrices of 8 rows x 16 bytes, SBO 128 bytes, LBO unused: one
// core matrix along K).  [Recorder note: this is an assumption of ours, not measured against CuTe yet;
// the model should interpret the cp as: TMEM lane 32 q + i (q = 0..3), column c + j (j = 0..3) <-
// bytes [16 i + 4 j, 16 i + 4 j + 4) of the atom at the descriptor's start address.]
constexpr uint32_t kSFAtomBytes = 512;
DG_HOST_DEVICE constexpr uint64_t make_sf_atom_desc(uint32_t start) {
    return make_smem_desc(start, 0, 128, SmemLayout::SWIZZLE_NONE);
}
DG_HOST_DEVICE constexpr uint32_t smem_desc_start(uint64_t desc) { return uint32_t(desc & 0x3FFFu) << 4; }

// --------------------------------------------------------------------------- block-scale layout
// Sm1xxBlockScaledConfig-style scale bytes: 512-byte atoms of 128 MN rows x 4 scale blocks; inside an
// atom, row m and scale block kb sit at byte 16 * (m % 32) + 4 * ((m / 32) % 4) + kb % 4.  Atoms are
// K-first, then MN blocks of 128 rows: a [rows, kblocks] scale matrix (rows padded to 128, kblocks to 4)
// has (rows / 128) x (kblocks / 4) atoms and byte offset
//   ((m / 128) * (kblocks / 4) + kb / 4) * 512 + sf_atom_byte(m, kb).
DG_HOST_DEVICE constexpr uint32_t sf_atom_byte(uint32_t m, uint32_t kb) {
    return 16u * (m % 32u) + 4u * ((m / 32u) % 4u) + kb % 4u;
}
DG_HOST_DEVICE constexpr uint64_t sf_global_offset(uint64_t m, uint64_t kb, uint64_t kblocks) {
    return ((m / 128u) * ((kblocks + 3) / 4) + kb / 4u) * kSFAtomBytes + sf_atom_byte(uint32_t(m % 128u), uint32_t(kb % 4u));
}

// Where the scales of an MMA sit in TMEM after 32x128b.warpx4 copies of consecutive atoms to columns
// col0, col0 + 4, ...: the scale of row m (m < 128) and scale block kb of atom a is TMEM lane m % 32
// (replicated at + 32, + 64, + 96), 32-bit column col0 + 4 a + m / 32, byte kb % 4.  An MMA whose scales
// are atom a starts at column col0 + 4 a; 4X (block16) reads the whole column (4 blocks, K = 64);
// 1X (block32 under mxf8f6f4, one block per MMA of K = 32) reads byte sf_id of it.
DG_HOST_DEVICE constexpr uint32_t sf_tmem_column(uint32_t col0, uint32_t atom, uint32_t m) {
    return col0 + 4u * atom + m / 32u;
}

// ------------------------------------------------------------------------------------------ TMEM
// A TMEM address: lane in bits 16-31, 32-bit column in bits 0-15.
DG_HOST_DEVICE constexpr uint32_t tmem_addr(uint32_t lane, uint32_t column) { return (lane << 16) | column; }
DG_HOST_DEVICE constexpr uint32_t tmem_lane(uint32_t taddr) { return taddr >> 16; }
DG_HOST_DEVICE constexpr uint32_t tmem_column(uint32_t taddr) { return taddr & 0xFFFFu; }

// TMEM allocation: a power of two >= 32 columns.
DG_HOST_DEVICE constexpr uint32_t tmem_alloc_columns(uint32_t used) {
    uint32_t c = 32;
    while (c < used) c *= 2;
    return c;
}

// Column plan of one CTA (all relative to the allocation's base column; lanes 0-127):
//   accumulator buffer b (b = 0, 1): columns [b * kBlockN, (b + 1) * kBlockN) (128 x kBlockN FP32,
//     lane = M row, column = N index)
//   SFA slot s (s = 0, 1): kAtoms atoms of 4 columns at 2 kBlockN + s * 4 kAtoms
//   SFB slot s: kAtoms atoms at 2 kBlockN + 8 kAtoms + s * 4 kAtoms
// The scale slots alternate per k block (the MMA thread's k-block counter % 2): a tcgen05.cp of k block
// i + 1 never writes columns an MMA of k block i reads, whatever the tensor pipe's copy / MMA overlap.
template <int kBlockN, int kAtoms>
struct TmemLayout {
    static constexpr uint32_t kAccumCols = 2 * kBlockN;
    static constexpr uint32_t kSFCols = 4 * kAtoms;
    static constexpr uint32_t kSFA = kAccumCols;
    static constexpr uint32_t kSFB = kAccumCols + 2 * kSFCols;
    static constexpr uint32_t kUsed = kAccumCols + 4 * kSFCols;
    static constexpr uint32_t kAlloc = tmem_alloc_columns(kUsed);
    static_assert(kUsed <= 512, "TMEM has 512 columns");

    DG_HOST_DEVICE static constexpr uint32_t accum(uint32_t buf) { return buf * kBlockN; }
    DG_HOST_DEVICE static constexpr uint32_t sfa(uint32_t slot) { return kSFA + slot * kSFCols; }
    DG_HOST_DEVICE static constexpr uint32_t sfb(uint32_t slot) { return kSFB + slot * kSFCols; }
};

// ------------------------------------------------------------------------- tcgen05.ld fragments
// Shapes of tcgen05.ld.sync.aligned used by the epilogues.  A warp w reaches only TMEM lanes
// [32 (w % 4), 32 (w % 4) + 32).
//   K32x32B  .num x N: N registers; thread t, register j -> lane base + t, column col + j
//   K16x256B .num x N: 4 N registers; thread t, register j (i = j / 4, r = j % 4) ->
//            lane base + t / 4 + 8 (r / 2), column col + 8 i + 2 (t % 4) + r % 2
// (x1 mappings measured with CuTe's partition_D of the TMEM copy; the repetition rule for N > 1 (i
// advances the column by 8) is CuTe's Copy_Traits layout read, to be confirmed by the model.)
enum class TmemLdShape : int { K32x32B = 0, K16x256B = 1 };

template <TmemLdShape kShape, int kNum>
constexpr int kTmemLdRegs = kShape == TmemLdShape::K32x32B ? kNum : 4 * kNum;

struct TmemCoord {
    uint32_t lane;      // relative to the instruction's lane base
    uint32_t column;    // relative to the instruction's column
};

DG_HOST_DEVICE constexpr TmemCoord tmem_ld_coord(TmemLdShape shape, uint32_t thread, uint32_t reg) {
    return shape == TmemLdShape::K32x32B
        ? TmemCoord{thread, reg}
        : TmemCoord{thread / 4u + 8u * ((reg % 4u) / 2u), 8u * (reg / 4u) + 2u * (thread % 4u) + reg % 2u};
}

}  // namespace deep_gemm::sm100
