#pragma once
// The issue loops of the sm100 grouped expert GEMM (impls/sm100_fp4_grouped_gemm.cuh), written once as
// templates over an `Ops` policy: on the device the policy issues the real PTX / CuTe atoms
// (common/sm100_tcgen05.cuh: sm100::DeviceOps); on the host a recorder policy logs the calls and a
// functional model executes them.  This header is plain C++17 (DG_HOST_DEVICE, no CUDA intrinsics):
// g++ compiles it as it is.
//
// =====================================================================================================
// THE GEMM
//   out[token, row] = alpha[e] * b_scale * sum_k W_e[row, k] * x[token, k]  (then an epilogue)
// Weights are the UMMA M side (128 rows per tile, kernel row order of deep_gemm.weights_sm100), tokens
// the N side (kBlockN tokens per tile).  Tiles (expert, weight-row tile rt, token tile) come from the
// caller (`tiles(t)` -> PlanTile); the kernel's are scheduler/grouped_tiles.cuh's.  One CTA:
//   warp 0 lane 0 : producer      (GemmPlan::producer)
//   warp 1        : MMA issuer    (GemmPlan::mma; the whole warp runs the loop, one elected lane issues)
//   warps 4..7    : epilogue      (GemmPlan::epilogue; warp w reaches TMEM lanes [32 (w % 4), + 32))
//
// Recipes (template parameter):
//   Recipe::NVFP4     : NVFP4 weights x NVFP4 tokens, kind::mxf4nvf4.block_scale.block16, UE4M3 per 16,
//                       both operands packed E2M1 in shared memory; K = 64 per MMA; 256 K per stage
//   Recipe::MXFP4_FP8 : MXFP4 weights x FP8 E4M3 tokens, kind::mxf8f6f4.block_scale.block32, UE8M0 per 32;
//                       the weights unpacked E2M1 in shared memory (TMA dtype 16U4_ALIGN16B, see
//                       kTensorA below: 16 bytes per 16 codes, not one code per byte); K = 32 per MMA;
//                       128 K per stage
// Each stage holds 128 bytes of K per row (one SW128 atom column), 4 MMAs per stage.
//
// GLOBAL TENSORS (tensor_id; shapes innermost last, strides in bytes; E experts, N weight rows per
// expert, K, T token rows, G = scale granularity 16 / 32, KB = K / G scale blocks per row)
//   kTensorA   = 0  weight codes, rows in kernel order.  NVFP4: uint8 [E * N, K / 2] (2 codes per byte,
//                   low nibble first), row stride K / 2; TMA elements = bytes.  MXFP4: E2M1 [E * N, K],
//                   packed in global (K / 2 bytes per row) but TMA dtype 16U4_ALIGN16B (elements = 4-bit
//                   codes).  cuda.h (CUDA 13.0, cuTensorMapEncodeTiled): it "copies '16 x U4' packed values
//                   to memory aligned as 16 bytes. There are 8 byte gaps between every 8 byte chunk of packed
//                   values."  I.e. per 16 codes, shared memory gets 8 packed bytes (two codes per byte, low
//                   nibble = even code, as in global) and then an 8-byte gap: 128 codes of a row = 128 bytes,
//                   and code k of an MMA's 32-byte K run sits at byte 16 (k / 16) + (k % 16) / 2, nibble
//                   k % 2 (the mxf8f6f4 E2M1 operand format; tests/sm100_model/interp.py reads it so).
//                   UNVERIFIED ON HARDWARE: that the MMA reads exactly this padded layout, that the gap
//                   bytes are never read, and that the TMA counts 16 transaction bytes per 16 codes
//                   (kStageBytes assumes so) -- the model and this plan share one reading of the docs.
//                   TMA box {128 elements, 128 rows}, SW128
//   kTensorSFA = 1  weight scales, bytes [E, N / 128, KB / 4, 512]: 512-byte atoms (sf_atom_byte), atom
//                   (e, rt, j) holds rows rt * 128 + [0, 128) and scale blocks 4 j + [0, 4); bulk copies
//   kTensorB   = 2  tokens.  NVFP4: uint8 [T, K / 2]; FP8: E4M3 [T, K].  TMA box {128, kBlockN}, SW128
//   kTensorSFB = 3  token scales, bytes [ceil(T / 128), KB / 4, 512] (the same atoms over token rows;
//                   UE4M3 for NVFP4, UE8M0 for FP8); bulk copies
//   kTensorD   = 4  the output (BF16 [T, N] or [T, N / 2]; written by the epilogue, not by this plan)
// Token tiles must not straddle a 128-row scale group: masked layouts need max_m % 128 == 0 and
// contiguous layouts expert_offsets[e] % 128 == 0 (upstream DeepGEMM's sm100 contiguous alignment);
// kBlockN in {32, 64, 128} divides 128, so a tile's tokens are rows [o, o + kBlockN) of one scale group,
// o = row_start % 128, and their TMEM scale columns start at column o / 32 of the group's atoms.
//
// SHARED MEMORY (byte offsets from the 1024-aligned base `smem_base`, a shared-window address):
//   A[s]   : kAOff + s * 16384        (128 rows x 128 B, SW128)
//   B[s]   : kBOff + s * kBlockN * 128 (kBlockN rows x 128 B, SW128)
//   SFA[s] : kSFAOff + s * kSFBytes   (kAtoms atoms of 512 B; kSFBytes = 512 kAtoms)
//   SFB[s] : kSFBOff + s * kSFBytes
//   barriers (8 B each) from kBarOff: ids below; then the TMEM base address (4 B) at kTmemSlotOff
//
// MBARRIERS (mbar_id; init count):
//   full(s)       = s                  (1: the producer's arrive_expect_tx; completes with the TMA bytes)
//   empty(s)      = S + s              (1: tcgen05.commit after the stage's MMAs)
//   tmem_full(b)  = 2 S + b            (1: tcgen05.commit after a tile's last MMA into buffer b)
//   tmem_empty(b) = 2 S + 2 + b        (128: every epilogue thread, after its last tcgen05.ld of buffer b)
//
// TMEM (columns relative to the allocation base `tmem_base`; sm100_umma.cuh, TmemLayout):
//   accumulator buffer b = tile counter % 2 (per CTA, the MMA thread's and the epilogue's count agree);
//   scale slots alternate per k block of the MMA thread (its k-block counter % 2).
//
// =====================================================================================================
// THE Ops INTERFACE (stable; every call below is all a policy needs; ids / addresses as above)
//   void init_barrier(int mbar_id, int count);
//   void wait(int mbar_id, uint32_t phase);            // mbarrier.try_wait.parity until phase `phase` done
//   void arrive(int mbar_id);                          // plain mbarrier.arrive (count 1)
//   void arrive_expect_tx(int mbar_id, uint32_t bytes);// arrive + expect `bytes` of async copies
//   void tma_load(int tensor_id, const int32_t (&coords)[2] /* elements, innermost first */,
//                 const uint32_t (&box)[2] /* elements, innermost first */, uint32_t smem_byte_addr,
//                 int swizzle_bytes /* 128 */, int mbar_id);
//   void bulk_copy(int tensor_id, uint64_t global_byte_offset, uint32_t bytes, uint32_t smem_byte_addr,
//                  int mbar_id);
//   void fence_after_sync();                           // tcgen05.fence::after_thread_sync
//   void fence_before_sync();                          // tcgen05.fence::before_thread_sync
//   void utccp(uint64_t smem_desc, uint32_t taddr /* (lane << 16) | column */, UtccpShape shape);
//   void mma(MmaKind kind, uint32_t idesc, uint64_t adesc, uint64_t bdesc, uint32_t d_taddr,
//            uint32_t sfa_taddr, uint32_t sfb_taddr, bool accumulate);
//   void commit(int mbar_id);                          // tcgen05.commit ... mbarrier::arrive::one
//   template <TmemLdShape kShape, int kNum>
//   void tmem_ld(int warp, int lane, uint32_t taddr, uint32_t (&regs)[kTmemLdRegs<kShape, kNum>]);
//                                                      // tcgen05.ld.sync.aligned.<shape>.x<kNum>.b32 by
//                                                      // warp `warp`; `lane` = this thread's lane; regs
//                                                      // are this thread's (sm100_umma.cuh tmem_ld_coord)
//   void tmem_ld_wait();                               // tcgen05.wait::ld
// The epilogue callback (not part of Ops): epi(tile, lane_base, column, lane, regs) gets this thread's
// registers of one tcgen05.ld at TMEM (lane_base, accumulator column `column`, relative to the buffer)
// and maps register j to output (weight row lane_base + c.lane, tile token column + c.column) with
// c = tmem_ld_coord(kShape, lane, j).  An optional epi_end(tile) runs after the tile's buffer is
// released (an overload of GemmPlan::epilogue; additive, the recorder may pass none).
// Issuing threads: the producer plan runs in one thread; the MMA plan in one warp (device ops elect one
// lane for utccp / mma / commit; the recorder sees each call once); the epilogue plan in each of the
// 128 epilogue threads (the recorder runs it per (warp, lane)).
// =====================================================================================================
#include <cstdint>
#include <type_traits>

#include <deep_gemm/common/host_device.cuh>
#include <deep_gemm/common/sm100_umma.cuh>

namespace deep_gemm::sm100 {

// NVFP4_EXACT and BF16 are kind::f16 recipes (BF16 x BF16 -> FP32, no block-scaled MMA): see
// "THE kind::f16 RECIPES" below.
enum class Recipe : int { NVFP4 = 0, MXFP4_FP8 = 1, NVFP4_EXACT = 2, BF16 = 3 };
enum class UtccpShape : int { K32x128B_WARPX4 = 0 };

enum TensorId : int { kTensorA = 0, kTensorSFA = 1, kTensorB = 2, kTensorSFB = 3, kTensorD = 4 };

template <Recipe kRecipe>
struct RecipeTraits;

template <>
struct RecipeTraits<Recipe::NVFP4> {
    static constexpr MmaKind kKind = MmaKind::MXF4NVF4_BLOCK16;
    static constexpr ElemFmt kA = ElemFmt::E2M1, kB = ElemFmt::E2M1;
    static constexpr ScaleFmt kScale = ScaleFmt::UE4M3;
    static constexpr int kGran = 16;          // elements per scale
    static constexpr int kStageK = 256;       // K elements per stage (128 bytes packed)
    static constexpr int kMmaK = 64;
    static constexpr int kMmaKBytes = 32;     // shared-memory bytes of one MMA's K, both operands
    static constexpr int kBoxK = 128;         // TMA box inner extent, elements of the tensor maps (bytes)
    static constexpr int kBoxKB = 128;        // the token map's box inner extent (elements)
    static constexpr int kBBoxes = 1;         // token boxes per stage (consecutive 128-byte K columns)
    static constexpr bool kSFA = true, kSFB = true;   // scale atoms of the stage (bulk copies)
    static constexpr bool kATmem = false;     // A operand dequantized into TMEM (TS form)
};

template <>
struct RecipeTraits<Recipe::MXFP4_FP8> {
    static constexpr MmaKind kKind = MmaKind::MXF8F6F4_BLOCK32;
    static constexpr ElemFmt kA = ElemFmt::E2M1, kB = ElemFmt::E4M3;
    static constexpr ScaleFmt kScale = ScaleFmt::UE8M0;
    static constexpr int kGran = 32;
    static constexpr int kStageK = 128;       // 128 bytes: FP8 tokens, unpacked FP4 weights
    static constexpr int kMmaK = 32;
    static constexpr int kMmaKBytes = 32;
    static constexpr int kBoxK = 128;         // elements: 4-bit codes (A, 16U4_ALIGN16B: 128 smem bytes) / FP8 bytes (B)
    static constexpr int kBoxKB = 128;
    static constexpr int kBBoxes = 1;
    static constexpr bool kSFA = true, kSFB = true;
    static constexpr bool kATmem = false;
};

// =====================================================================================================
// THE kind::f16 RECIPES (tcgen05.mma.cta_group::1.kind::f16, BF16 x BF16 -> FP32, K = 16 per MMA)
//   Recipe::NVFP4_EXACT : NVFP4 weights, BF16 tokens (FP8 E4M3 tokens times a power-of-two scale are
//       exact in BF16: the gather converts them).  The weights' per-16 UE4M3 scales are applied
//       exactly: a dequant warpgroup (GemmPlan::dequant, 128 threads, thread = weight row) reads the
//       stage's packed E2M1 codes (TMA, SW128, as the NVFP4 recipe; code bits permuted inside each
//       32-bit word for the common/fp4_bits.cuh trick, deep_gemm.weights_sm100 exact=True) and the
//       scale atoms (bulk copy, as NVFP4) from shared memory, forms code * scale * 2^-7 in BF16 (exact),
//       and stores it with tcgen05.st 32x32b into a TMEM A slot: row m -> lane m, k -> 32-bit column
//       k / 2, half k % 2 (CuTe's tmem_frg_1sm<bf16>, tests/cpp/sm100_f16_conformance.cpp).  The MMA
//       reads A from TMEM (the TS form) and B (tokens, SW128 BF16 in shared memory, 4 boxes of 64
//       elements per stage of K = 256) by descriptor.  The 2^7 goes back in the FP32 epilogue.
//   Recipe::BF16 : BF16 weights x BF16 tokens (upstream's bf16_mega_moe), both in shared memory (the
//       SS form), K = 64 per stage (one SW128 column of each), no scales.
// Extra barriers of NVFP4_EXACT (after the 2 S + 4 above): a_full(slot) = 2 S + 4 + slot (128: every
// dequant thread after tcgen05.wait::st + fence::before_thread_sync), a_empty(slot) = 2 S + 6 + slot
// (1: tcgen05.commit after the MMAs that read the slot); empty(s) counts 1 + 4 (the commit, and one
// arrive per dequant warp once the warp has read the stage's codes and scales).
// =====================================================================================================
template <>
struct RecipeTraits<Recipe::NVFP4_EXACT> {
    static constexpr MmaKind kKind = MmaKind::F16;
    static constexpr ElemFmt kA = ElemFmt::BF16, kB = ElemFmt::BF16;
    static constexpr ScaleFmt kScale = ScaleFmt::UE4M3;   // the weights' (applied by the dequant)
    static constexpr int kGran = 16;
    static constexpr int kStageK = 256;       // 128 bytes of packed weight codes per row
    static constexpr int kMmaK = 16;
    static constexpr int kMmaKBytes = 32;     // B bytes of one MMA's K inside a 128-byte column
    static constexpr int kBoxK = 128;         // weight map: bytes (as NVFP4)
    static constexpr int kBoxKB = 64;         // token map: BF16 elements (128 bytes)
    static constexpr int kBBoxes = 4;
    static constexpr bool kSFA = true, kSFB = false;
    static constexpr bool kATmem = true;
};

template <>
struct RecipeTraits<Recipe::BF16> {
    static constexpr MmaKind kKind = MmaKind::F16;
    static constexpr ElemFmt kA = ElemFmt::BF16, kB = ElemFmt::BF16;
    static constexpr ScaleFmt kScale = ScaleFmt::UE8M0;   // unused (no scales)
    static constexpr int kGran = 64;          // unused; keeps kAtoms = 0 arithmetic defined
    static constexpr int kStageK = 64;
    static constexpr int kMmaK = 16;
    static constexpr int kMmaKBytes = 32;
    static constexpr int kBoxK = 64;          // BF16 elements
    static constexpr int kBoxKB = 64;
    static constexpr int kBBoxes = 1;
    static constexpr bool kSFA = false, kSFB = false;
    static constexpr bool kATmem = false;
};

// TMEM columns of NVFP4_EXACT: the double-buffered accumulator, then two A slots of kStageK / 2
// columns (BF16 pairs; MMA kk of a stage reads columns 8 kk .. 8 kk + 7 of its slot).
template <int kBlockN, int kACols>
struct TmemLayoutA {
    static constexpr uint32_t kAccumCols = 2 * kBlockN;
    static constexpr uint32_t kACol = kAccumCols;
    static constexpr uint32_t kUsed = kAccumCols + 2 * kACols;
    static constexpr uint32_t kAlloc = tmem_alloc_columns(kUsed);
    static_assert(kUsed <= 512, "TMEM has 512 columns");
    DG_HOST_DEVICE static constexpr uint32_t accum(uint32_t buf) { return buf * kBlockN; }
    DG_HOST_DEVICE static constexpr uint32_t a(uint32_t slot) { return kACol + slot * uint32_t(kACols); }
    DG_HOST_DEVICE static constexpr uint32_t sfa(uint32_t) { return 0; }
    DG_HOST_DEVICE static constexpr uint32_t sfb(uint32_t) { return 0; }
};

// One tile of work (the fields of GroupedTiles::Tile).
struct PlanTile {
    int expert, row_tile, token_tile;
    int row_start;      // first token row of the tile in the token tensor
    int num_tokens;     // valid tokens, <= kBlockN
};

template <Recipe kRecipe, int kBlockN, int kStages>
struct GemmPlan {
    using R = RecipeTraits<kRecipe>;
    static constexpr int kBlockM = 128;
    static constexpr int kTileN = kBlockN;                                       // tokens per tile
    static constexpr Recipe kTileRecipe = kRecipe;
    static constexpr int kMmasPerStage = R::kStageK / R::kMmaK;                  // 4 (NVFP4_EXACT 16)
    static constexpr int kAtoms = (R::kSFA || R::kSFB) ? R::kStageK / R::kGran / 4 : 0;   // scale atoms per stage
    static constexpr uint32_t kABytes = kBlockM * 128, kBBytes = kBlockN * 128 * R::kBBoxes;
    static constexpr uint32_t kBBoxBytes = kBlockN * 128;                       // one 128-byte K column of B
    static constexpr uint32_t kSFBytes = kAtoms * kSFAtomBytes;
    static constexpr uint32_t kSFABytes = R::kSFA ? kSFBytes : 0, kSFBBytes = R::kSFB ? kSFBytes : 0;
    static constexpr uint32_t kStageBytes = kABytes + kBBytes + kSFABytes + kSFBBytes;   // TMA tx bytes per stage
    static constexpr uint32_t kAOff = 0;
    static constexpr uint32_t kBOff = kAOff + kStages * kABytes;
    static constexpr uint32_t kSFAOff = kBOff + kStages * kBBytes;
    static constexpr uint32_t kSFBOff = kSFAOff + kStages * kSFABytes;
    static constexpr uint32_t kBarOff = kSFBOff + kStages * kSFBBytes;
    static constexpr bool kATmem = R::kATmem;
    static constexpr bool kBlockScaledMma = R::kKind != MmaKind::F16;            // scales through TMEM (tcgen05.cp)
    static constexpr int kNumBarriers = 2 * kStages + 4 + (kATmem ? 4 : 0);
    static constexpr int kDequantWarps = kATmem ? 4 : 0;                        // warps 8..11
    static constexpr int kNumThreads = kATmem ? 384 : 256;
    static constexpr int kEmptyCount = 1 + kDequantWarps;
    static constexpr uint32_t kTmemSlotOff = kBarOff + 8 * kNumBarriers;
    static constexpr uint32_t kSmemBytes = kTmemSlotOff + 16;                  // from the aligned base
    static constexpr int kEpilogueThreads = 128;
    using Tmem = typename std::conditional<kATmem, TmemLayoutA<kBlockN, R::kStageK / 2>,
                                           TmemLayout<kBlockN, (R::kSFA || R::kSFB) ? kAtoms : 0>>::type;

    static_assert(kBlockN == 32 || kBlockN == 64 || kBlockN == 128, "kBlockN must divide 128 and be >= 32");
    static_assert(is_legal_shape(R::kKind, kBlockM, kBlockN), "illegal UMMA shape");
    static_assert(is_legal_combo(R::kKind, R::kA, R::kB, R::kScale), "illegal element / scale combination");
    static_assert(kMmasPerStage * R::kMmaKBytes == 128 * R::kBBoxes, "a stage is kBBoxes 128-byte SW128 columns of B");
    static_assert(kBBytes % 1024 == 0, "B stages must stay 1024-aligned");
    static_assert(kStages >= 2, "at least two stages");

    // Problem (runtime)
    int n;                  // weight rows per expert (a multiple of 128)
    int k;                  // K (a multiple of R::kStageK)
    uint32_t smem_base;     // shared-window address of the 1024-aligned base
    uint32_t tmem_base;     // TMEM address of the allocation (lane 0, base column)

    // ---------------------------------------------------------------- ids and addresses
    DG_HOST_DEVICE static constexpr int full(int s) { return s; }
    DG_HOST_DEVICE static constexpr int empty(int s) { return kStages + s; }
    DG_HOST_DEVICE static constexpr int tmem_full(int b) { return 2 * kStages + b; }
    DG_HOST_DEVICE static constexpr int tmem_empty(int b) { return 2 * kStages + 2 + b; }
    DG_HOST_DEVICE static constexpr int a_full(int slot) { return 2 * kStages + 4 + slot; }    // NVFP4_EXACT
    DG_HOST_DEVICE static constexpr int a_empty(int slot) { return 2 * kStages + 6 + slot; }   // NVFP4_EXACT

    DG_HOST_DEVICE int num_k_blocks() const { return k / R::kStageK; }
    DG_HOST_DEVICE int scale_blocks() const { return k / R::kGran; }
    DG_HOST_DEVICE uint32_t a_smem(int s) const { return smem_base + kAOff + uint32_t(s) * kABytes; }
    DG_HOST_DEVICE uint32_t b_smem(int s) const { return smem_base + kBOff + uint32_t(s) * kBBytes; }
    DG_HOST_DEVICE uint32_t sfa_smem(int s) const { return smem_base + kSFAOff + uint32_t(s) * kSFABytes; }
    DG_HOST_DEVICE uint32_t sfb_smem(int s) const { return smem_base + kSFBOff + uint32_t(s) * kSFBBytes; }

    // Byte offsets of a stage's scale atoms in kTensorSFA / kTensorSFB
    DG_HOST_DEVICE uint64_t sfa_offset(const PlanTile& t, int kb) const {
        const uint64_t atoms_per_group = uint64_t(scale_blocks() / 4);
        const uint64_t group = uint64_t(t.expert) * uint64_t(n / kBlockM) + uint64_t(t.row_tile);
        return (group * atoms_per_group + uint64_t(kb) * kAtoms) * kSFAtomBytes;
    }
    DG_HOST_DEVICE uint64_t sfb_offset(const PlanTile& t, int kb) const {
        const uint64_t atoms_per_group = uint64_t(scale_blocks() / 4);
        return (uint64_t(t.row_start / 128) * atoms_per_group + uint64_t(kb) * kAtoms) * kSFAtomBytes;
    }
    // The first TMEM scale column of the tile's tokens inside a B scale atom
    DG_HOST_DEVICE static constexpr uint32_t sfb_column_offset(const PlanTile& t) {
        return uint32_t(t.row_start % 128) / 32u;
    }

    // MMA kk of a stage: its scale atom and its sf_id
    DG_HOST_DEVICE static constexpr int mma_atom(int kk) { return kk * R::kMmaK / (4 * R::kGran); }
    DG_HOST_DEVICE static constexpr int mma_sf_id(int kk) { return (kk * R::kMmaK / R::kGran) % 4; }
    DG_HOST_DEVICE static constexpr uint32_t idesc(int kk) {
        return kBlockScaledMma
            ? make_idesc_block_scaled(R::kKind, R::kA, R::kB, R::kScale, kBlockM, kBlockN, mma_sf_id(kk), mma_sf_id(kk))
            : make_idesc_f16(R::kA, R::kB, kBlockM, kBlockN);   // A and B K-major (TS: A from TMEM is K-major)
    }

    // ---------------------------------------------------------------- epilogue index maps
    // Where register j of this thread's tcgen05.ld at TMEM (lane_base, accumulator column `col`) goes.
    // The kernel's epilogue callbacks (impls/sm100_fp4_grouped_gemm.cuh) and the host model
    // (tests/cpp/sm100_model_emit.cpp) both call these, so the model sees the kernel's placement.
    //
    // Epilogue::Plain (tcgen05.ld 32x32b): register j holds accumulator (weight row lane_base + c.lane,
    // token column col + c.column), c = tmem_ld_coord(K32x32B, lane, j); output D[token_row, out_col]
    // with out_col the weight row of the expert (rows in kernel order = original order for Plain).
    struct PlainOut {
        bool valid;         // the token is one of the tile's num_tokens
        int tok;            // token column within the tile
        int token_row;      // row of the output / token tensor
        int out_col;        // output column: weight row within the expert
    };
    DG_HOST_DEVICE static PlainOut plain_out(const PlanTile& tile, uint32_t lane_base, uint32_t col, int lane, int j) {
        const TmemCoord c = tmem_ld_coord(TmemLdShape::K32x32B, uint32_t(lane), uint32_t(j));
        const int tok = int(col + c.column);
        PlainOut o;
        o.valid = tok < tile.num_tokens;
        o.tok = tok;
        o.token_row = tile.row_start + tok;
        o.out_col = tile.row_tile * kBlockM + int(lane_base + c.lane);
        return o;
    }

    // Epilogue::SwiGLU / SwiGLUQuant (tcgen05.ld 16x256b, L1 rows interleaved by 8 as deep_gemm.weights_sm100):
    // kernel rows 16 G + [0, 8) are the gate rows of channels 8 G + [0, 8), kernel rows 16 G + [8, 16) their
    // up rows.  Register j with j % 4 < 2 holds a gate row (lane_base + c.lane, c.lane % 16 < 8) and
    // register j + 2 the same channel's up row (lane + 8, same column: tmem_ld_coord's 16x256b rule);
    // registers with j % 4 >= 2 are read through their gate register and give valid = false.
    struct SwiGLUOut {
        bool valid;         // j is a gate register and the token one of the tile's num_tokens
        int tok;            // token column within the tile
        int token_row;      // row of the output / token tensor
        int tile_chan;      // channel within the tile's kBlockM / 2
        int chan;           // output channel (column of the [T, N / 2] activations)
        int gate_reg, up_reg;
    };
    DG_HOST_DEVICE static SwiGLUOut swiglu_out(const PlanTile& tile, uint32_t lane_base, uint32_t col, int lane, int j) {
        const TmemCoord c = tmem_ld_coord(TmemLdShape::K16x256B, uint32_t(lane), uint32_t(j));
        const int kernel_row = int(lane_base + c.lane);      // within the tile; a gate row when j % 4 < 2
        SwiGLUOut o;
        o.tok = int(col + c.column);
        o.valid = (j % 4) < 2 && o.tok < tile.num_tokens;
        o.token_row = tile.row_start + o.tok;
        o.tile_chan = (kernel_row / 16) * 8 + kernel_row % 8;
        o.chan = tile.row_tile * (kBlockM / 2) + o.tile_chan;
        o.gate_reg = j;
        o.up_reg = j + 2;
        return o;
    }

    // Epilogue::SwiGLUQuant, second pass: the activations of a tile staged as float [kBlockM / 2 channels]
    // [kBlockN tokens] (index tile_chan * kBlockN + tok, SwiGLUOut above); item p in [0, kL2Blocks * kBlockN)
    // is scale block blk = p / kBlockN of token tok = p % kBlockN: elements src + i * kBlockN, i < kL2Gran
    // (kL2Gran = the recipe's granularity: the next GEMM's token format), written as the row's scale
    // block gblock = row_tile * kL2Blocks + blk of an L2 input with `inter` = n / 2 channels:
    //   NVFP4     : packed E2M1 codes at byte row * inter / 2 + 8 gblock (8 bytes), UE4M3 scale
    //   MXFP4_FP8 : E4M3 codes at byte row * inter + 32 gblock (32 bytes), UE8M0 scale
    // the scale at sf_global_offset(row, gblock, inter / kL2Gran) (512-byte atoms over token rows).
    static constexpr int kL2Gran = R::kGran;
    static constexpr int kL2Blocks = (kBlockM / 2) / kL2Gran;
    struct L2BlockOut {
        bool valid;         // tok is one of the tile's num_tokens
        int src;            // scratch index of element 0 (stride kBlockN)
        uint64_t row;       // token row
        uint64_t code_byte; // byte offset of the block's codes in the L2 token tensor
        uint64_t sf_byte;   // byte offset of its scale in the L2 scale tensor
    };
    DG_HOST_DEVICE static L2BlockOut l2_block_out(const PlanTile& tile, int p, int inter) {
        const int blk = p / kBlockN, tok = p % kBlockN;
        L2BlockOut o;
        o.valid = tok < tile.num_tokens;
        o.src = blk * kL2Gran * kBlockN + tok;
        o.row = uint64_t(tile.row_start + tok);
        const uint64_t gblock = uint64_t(tile.row_tile * kL2Blocks + blk);
        o.code_byte = kRecipe == Recipe::NVFP4 ? o.row * uint64_t(inter / 2) + gblock * 8u
                                               : o.row * uint64_t(inter) + gblock * 32u;
        o.sf_byte = sf_global_offset(o.row, gblock, uint64_t(inter / kL2Gran));
        return o;
    }

    // ---------------------------------------------------------------- set-up (one thread)
    template <class Ops>
    DG_HOST_DEVICE void init_barriers(Ops& ops) const {
        for (int s = 0; s < kStages; ++s) {
            ops.init_barrier(full(s), 1);
            ops.init_barrier(empty(s), kEmptyCount);
        }
        for (int b = 0; b < 2; ++b) {
            ops.init_barrier(tmem_full(b), 1);
            ops.init_barrier(tmem_empty(b), kEpilogueThreads);
        }
        if constexpr (kATmem) {
            for (int slot = 0; slot < 2; ++slot) {
                ops.init_barrier(a_full(slot), 32 * kDequantWarps);
                ops.init_barrier(a_empty(slot), 1);
            }
        }
    }

    // The pipeline position of one issuing role (see "per-tile steps" below).
    struct Cursor {
        int stage = 0;
        uint32_t phase = 0;     // parity of the stage ring
        uint32_t kcount = 0;    // k blocks issued by the MMA warp (scale slot = kcount % 2)
        uint32_t tcount = 0;    // tiles through the MMA warp / the epilogue (accumulator buffer = tcount % 2)
        DG_HOST_DEVICE void next_stage() {
            if (++stage == kStages) stage = 0, phase ^= 1u;
        }
        DG_HOST_DEVICE uint32_t buf() const { return tcount % 2; }
        DG_HOST_DEVICE uint32_t buf_phase() const { return (tcount / 2) % 2; }
    };

    // ---------------------------------------------------------------- producer (one thread)
    // For every tile t = first, first + stride, ... < num_tiles and k block kb: wait for the stage to be
    // free, expect its bytes, then A (TMA), B (TMA), SFA and SFB (bulk copies) into it.
    template <class Ops, class Tiles>
    DG_HOST_DEVICE void producer(Ops& ops, Tiles&& tiles, int first, int num_tiles, int stride) const {
        Cursor cur;
        for (int t = first; t < num_tiles; t += stride) produce_tile(ops, tiles(t), cur, [](int) {});
    }

    // ---------------------------------------------------------------- MMA issuer (one warp)
    // Per tile: wait for accumulator buffer b to be drained; per k block: wait for the stage, copy its
    // scale atoms to TMEM scale slot (k-block counter % 2), 4 MMAs (the first of a tile overwrites),
    // commit -> empty(stage); after the tile's last k block commit -> tmem_full(b).
    template <class Ops, class Tiles>
    DG_HOST_DEVICE void mma(Ops& ops, Tiles&& tiles, int first, int num_tiles, int stride) const {
        Cursor cur;
        for (int t = first; t < num_tiles; t += stride) mma_tile(ops, tiles(t), cur);
    }

    // ---------------------------------------------------------------- dequant (NVFP4_EXACT; 128 threads)
    // Thread (warp, lane) of the dequant warps (warp % 4 = its TMEM lane quarter) owns weight row
    // m = 32 (warp % 4) + lane of every tile.  Per k block: wait full(stage); read the row's 8 16-byte
    // code chunks (SW128: sw128_offset) and its kAtoms scale words (atom j, word sf_atom_byte(m, 0): the
    // UE4M3 of blocks 4 j .. 4 j + 3 as bytes 0..3); release the stage (one arrive per warp); wait for A
    // slot kcount % 2 to be free (the MMAs that read it committed); per chunk c (K 32 c .. 32 c + 31, scale
    // blocks 2 c, 2 c + 1): 16 BF16 pairs (dequant_chunk: register 4 w + i = k 8 w + 2 i, + 1 of the chunk)
    // -> tcgen05.st 32x32b.x16 at (lane 32 (warp % 4), column Tmem::a(slot) + 16 c); then wait::st,
    // fence::before_thread_sync, arrive a_full(slot).  Ops additions (only this role uses them):
    //   void lds128(uint32_t smem_addr, uint32_t (&v)[4]);  uint32_t lds32(uint32_t smem_addr);
    //   void warp_arrive(int mbar_id, int lane);   // __syncwarp, then one mbarrier.arrive by lane 0
    //   void dequant_chunk(const uint32_t (&codes)[4], uint32_t scale_word, int first_byte, uint32_t (&regs)[16]);
    //   template <int kNum> void tmem_st(int warp, int lane, uint32_t taddr, const uint32_t (&regs)[kNum]);
    //                                              // tcgen05.st.sync.aligned.32x32b.x<kNum>.b32: thread t,
    //                                              // register j -> lane base + t, column col + j
    //   void tmem_st_wait();                       // tcgen05.wait::st
    //   void mma_ts(uint32_t idesc, uint32_t a_taddr, uint64_t bdesc, uint32_t d_taddr, bool accumulate);
    //                                              // tcgen05.mma.cta_group::1.kind::f16 [d], [a], bdesc (MMA warp)
    static constexpr int kDequantChunks = R::kStageK / 32;
    static constexpr int kChunkRegs = 16;
    template <class Ops, class Tiles>
    DG_HOST_DEVICE void dequant(Ops& ops, Tiles&& tiles, int first, int num_tiles, int stride, int warp, int lane) const {
        (void)tiles;    // the rows of a tile are whatever the producer put in the stage
        Cursor cur;
        for (int t = first; t < num_tiles; t += stride) dequant_tile(ops, cur, warp, lane);
    }

    // Dequant thread, one tile (`dequant` above is this step over the caller's tiles; the fused kernel
    // runs it per unit, L1 and L2 plans sharing the Cursor): the tile's k blocks, as described above.
    template <class Ops>
    DG_HOST_DEVICE void dequant_tile(Ops& ops, Cursor& cur, int warp, int lane) const {
        static_assert(kATmem, "only the NVFP4_EXACT recipe dequantizes into TMEM");
        const uint32_t quarter = uint32_t(warp % 4);
        const uint32_t m = 32u * quarter + uint32_t(lane);
        const int nkb = num_k_blocks();
        for (int kb = 0; kb < nkb; ++kb, ++cur.kcount) {
            const int stage = cur.stage;
            ops.wait(full(stage), cur.phase);
            uint32_t codes[kDequantChunks][4];
            uint32_t scales[kAtoms];
            for (int c = 0; c < kDequantChunks; ++c) ops.lds128(sw128_offset(a_smem(stage), m, 16u * uint32_t(c)), codes[c]);
            for (int j = 0; j < kAtoms; ++j) scales[j] = ops.lds32(sfa_smem(stage) + uint32_t(j) * kSFAtomBytes + sf_atom_byte(m, 0));
            ops.warp_arrive(empty(stage), lane);
            const uint32_t slot = cur.kcount % 2;
            ops.wait(a_empty(int(slot)), ((cur.kcount / 2) % 2) ^ 1u);
            ops.fence_after_sync();
            for (int c = 0; c < kDequantChunks; ++c) {
                uint32_t regs[kChunkRegs];
                ops.dequant_chunk(codes[c], scales[(2 * c) / 4], (2 * c) % 4, regs);
                ops.template tmem_st<kChunkRegs>(warp, lane,
                                                 tmem_base + tmem_addr(32u * quarter, Tmem::a(slot) + uint32_t(kChunkRegs * c)), regs);
            }
            ops.tmem_st_wait();
            ops.fence_before_sync();
            ops.arrive(a_full(int(slot)));
            cur.next_stage();
        }
    }

    // ---------------------------------------------------------------- epilogue (each of 128 threads)
    // Thread (warp, lane) of the epilogue warps: per tile wait tmem_full(b), then tcgen05.ld chunks of
    // the accumulator and hand each to `epi`; then release the buffer (fence, arrive tmem_empty(b)).
    //   K32x32B : one lane group of 32 rows (lane base 32 (warp % 4)), chunks of kChunk32 columns
    //   K16x256B: two lane groups of 16 rows (lane bases 32 (warp % 4) + {0, 16}), chunks of 32 columns
    // Only the chunks that hold one of the tile's num_tokens tokens are loaded (warp-uniform).
    static constexpr int kChunk32 = 16;
    template <TmemLdShape kShape>
    static constexpr int kChunkCols = kShape == TmemLdShape::K32x32B ? kChunk32 : 32;
    template <TmemLdShape kShape>
    static constexpr int kChunkNum = kShape == TmemLdShape::K32x32B ? kChunk32 : 4;

    template <TmemLdShape kShape, class Ops, class Tiles, class Epi>
    DG_HOST_DEVICE void epilogue(Ops& ops, Tiles&& tiles, int first, int num_tiles, int stride, int warp, int lane,
                                 Epi&& epi) const {
        epilogue<kShape>(ops, tiles, first, num_tiles, stride, warp, lane, epi, [](const PlanTile&) {});
    }
    // The same with `epi_end(tile)` called once per tile after its accumulator buffer is released
    // (shared-memory-only work such as the L2-input quantization of the SwiGLUQuant epilogue).
    template <TmemLdShape kShape, class Ops, class Tiles, class Epi, class EpiEnd>
    DG_HOST_DEVICE void epilogue(Ops& ops, Tiles&& tiles, int first, int num_tiles, int stride, int warp, int lane,
                                 Epi&& epi, EpiEnd&& epi_end) const {
        Cursor cur;
        for (int t = first; t < num_tiles; t += stride) epilogue_tile<kShape>(ops, tiles(t), cur, warp, lane, epi, epi_end);
    }

    // ---------------------------------------------------------------- per-tile steps
    // The producer, MMA and epilogue loops above, one tile at a time (they are these steps
    // over the caller's tiles), for a caller that learns its tiles as it goes: the fused Mega MoE kernel
    // (impls/sm100_fp8_nvfp4_mega_moe.cuh) claims units from a counter and runs L1 and L2 units, two
    // plans of other n / k, through one pipeline.  The pipeline position travels in a Cursor, one per
    // issuing role (each role's own copy: the producer's, the MMA warp's, each epilogue thread's).

    // Producer, one tile: per k block wait for the stage to be free, expect its bytes, then A (TMA),
    // B (TMA, R::kBBoxes boxes), SFA and SFB (bulk copies, where the recipe has them) into it.  first_stage(stage) runs once, after the tile's
    // first stage is free and before its bytes are expected (the fused kernel tags the stage with
    // its unit there, and waits for the unit's tokens).
    template <class Ops, class FirstStage>
    DG_HOST_DEVICE void produce_tile(Ops& ops, const PlanTile& tile, Cursor& cur, FirstStage&& first_stage) const {
        const int nkb = num_k_blocks();
        const int32_t a_row = int32_t(tile.expert * n + tile.row_tile * kBlockM);
        for (int kb = 0; kb < nkb; ++kb) {
            const int stage = cur.stage;
            ops.wait(empty(stage), cur.phase ^ 1u);
            if (kb == 0) first_stage(stage);
            ops.arrive_expect_tx(full(stage), kStageBytes);
            const int32_t a_coords[2] = {int32_t(kb * R::kBoxK), a_row};
            const uint32_t a_box[2] = {uint32_t(R::kBoxK), uint32_t(kBlockM)};
            ops.tma_load(kTensorA, a_coords, a_box, a_smem(stage), 128, full(stage));
            for (int i = 0; i < R::kBBoxes; ++i) {
                const int32_t b_coords[2] = {int32_t((kb * R::kBBoxes + i) * R::kBoxKB), int32_t(tile.row_start)};
                const uint32_t b_box[2] = {uint32_t(R::kBoxKB), uint32_t(kBlockN)};
                ops.tma_load(kTensorB, b_coords, b_box, b_smem(stage) + uint32_t(i) * kBBoxBytes, 128, full(stage));
            }
            if constexpr (R::kSFA)
                ops.bulk_copy(kTensorSFA, sfa_offset(tile, kb), kSFBytes, sfa_smem(stage), full(stage));
            if constexpr (R::kSFB)
                ops.bulk_copy(kTensorSFB, sfb_offset(tile, kb), kSFBytes, sfb_smem(stage), full(stage));
            cur.next_stage();
        }
    }

    // MMA warp, one tile: wait for accumulator buffer b to be drained; per k block wait for the stage,
    // copy its scale atoms to TMEM scale slot (k-block counter % 2), 4 MMAs (the first of a tile
    // overwrites), commit -> empty(stage); after the tile's last k block commit -> tmem_full(b).
    // kind::f16 recipes: no scale copies; NVFP4_EXACT waits a_full(slot) and issues TS MMAs (A from
    // TMEM slot kcount % 2, then commit -> a_empty(slot)), BF16 SS MMAs.
    template <class Ops>
    DG_HOST_DEVICE void mma_tile(Ops& ops, const PlanTile& tile, Cursor& cur) const {
        const int nkb = num_k_blocks();
        const uint32_t buf = cur.buf();
        ops.wait(tmem_empty(int(buf)), cur.buf_phase() ^ 1u);
        ops.fence_after_sync();
        const uint32_t d_taddr = tmem_base + Tmem::accum(buf);
        for (int kb = 0; kb < nkb; ++kb, ++cur.kcount) {
            const int stage = cur.stage;
            ops.wait(full(stage), cur.phase);
            const uint32_t slot = cur.kcount % 2;
            if constexpr (kATmem) {
                // the dequant warpgroup's BF16 A of this k block is in TMEM slot `slot`
                ops.wait(a_full(int(slot)), (cur.kcount / 2) % 2);
            }
            ops.fence_after_sync();
            if constexpr (!kBlockScaledMma) {
                for (int kk = 0; kk < kMmasPerStage; ++kk) {
                    const uint64_t bdesc = advance_smem_desc_k(
                        make_smem_desc_sw128_kmajor(b_smem(stage) + uint32_t(kk / 4) * kBBoxBytes), uint32_t((kk % 4) * R::kMmaKBytes));
                    if constexpr (kATmem) {
                        ops.mma_ts(idesc(kk), tmem_base + Tmem::a(slot) + uint32_t(kk * R::kMmaK / 2), bdesc, d_taddr,
                                   kb > 0 || kk > 0);
                    } else {
                        const uint64_t adesc = advance_smem_desc_k(make_smem_desc_sw128_kmajor(a_smem(stage)),
                                                                   uint32_t(kk * R::kMmaKBytes));
                        ops.mma(R::kKind, idesc(kk), adesc, bdesc, d_taddr, 0u, 0u, kb > 0 || kk > 0);
                    }
                }
                ops.commit(empty(stage));
                if constexpr (kATmem) ops.commit(a_empty(int(slot)));
                cur.next_stage();
                continue;
            }
            for (int i = 0; i < kAtoms; ++i) {
                ops.utccp(make_sf_atom_desc(sfa_smem(stage) + uint32_t(i) * kSFAtomBytes),
                          tmem_base + Tmem::sfa(slot) + 4u * uint32_t(i), UtccpShape::K32x128B_WARPX4);
                ops.utccp(make_sf_atom_desc(sfb_smem(stage) + uint32_t(i) * kSFAtomBytes),
                          tmem_base + Tmem::sfb(slot) + 4u * uint32_t(i), UtccpShape::K32x128B_WARPX4);
            }
            const uint64_t adesc = make_smem_desc_sw128_kmajor(a_smem(stage));
            const uint64_t bdesc = make_smem_desc_sw128_kmajor(b_smem(stage));
            for (int kk = 0; kk < kMmasPerStage; ++kk) {
                const uint32_t kbytes = uint32_t(kk * R::kMmaKBytes);
                ops.mma(R::kKind, idesc(kk), advance_smem_desc_k(adesc, kbytes), advance_smem_desc_k(bdesc, kbytes),
                        d_taddr, tmem_base + Tmem::sfa(slot) + 4u * uint32_t(mma_atom(kk)),
                        tmem_base + Tmem::sfb(slot) + 4u * uint32_t(mma_atom(kk)) + sfb_column_offset(tile),
                        kb > 0 || kk > 0);
            }
            ops.commit(empty(stage));
            cur.next_stage();
        }
        ops.commit(tmem_full(int(buf)));
        ++cur.tcount;
    }

    // Epilogue thread, one tile (`epilogue` above is this step over the caller's tiles):
    // wait tmem_full(b), tcgen05.ld the chunks that hold one of the tile's tokens and hand each to
    // `epi`, release the buffer (fence, arrive tmem_empty(b)), then epi_end(tile).
    template <TmemLdShape kShape, class Ops, class Epi, class EpiEnd>
    DG_HOST_DEVICE void epilogue_tile(Ops& ops, const PlanTile& tile, Cursor& cur, int warp, int lane, Epi&& epi,
                                      EpiEnd&& epi_end) const {
        constexpr int kCols = kChunkCols<kShape>, kNum = kChunkNum<kShape>;
        constexpr int kGroups = kShape == TmemLdShape::K32x32B ? 1 : 2;
        const uint32_t buf = cur.buf();
        ops.wait(tmem_full(int(buf)), cur.buf_phase());
        ops.fence_after_sync();
        const int chunks = (tile.num_tokens + kCols - 1) / kCols;
        for (int g = 0; g < kGroups; ++g) {
            const uint32_t lane_base = 32u * uint32_t(warp % 4) + 16u * uint32_t(g);
            for (int c = 0; c < chunks; ++c) {
                uint32_t regs[kTmemLdRegs<kShape, kNum>];
                const uint32_t col = uint32_t(c * kCols);
                ops.template tmem_ld<kShape, kNum>(warp, lane, tmem_base + tmem_addr(lane_base, Tmem::accum(buf) + col),
                                                   regs);
                ops.tmem_ld_wait();
                epi(tile, lane_base, col, lane, regs);
            }
        }
        ops.fence_before_sync();
        ops.arrive(tmem_empty(int(buf)));
        ++cur.tcount;
        epi_end(tile);
    }
};

}  // namespace deep_gemm::sm100
