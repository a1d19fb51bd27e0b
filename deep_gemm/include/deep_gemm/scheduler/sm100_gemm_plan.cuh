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
//                       the weights one E2M1 per byte in shared memory (TMA dtype 16U4_ALIGN16B: the low
//                       4 bits? see the notes: unverified); K = 32 per MMA; 128 K per stage
// Each stage holds 128 bytes of K per row (one SW128 atom column), 4 MMAs per stage.
//
// GLOBAL TENSORS (tensor_id; shapes innermost last, strides in bytes; E experts, N weight rows per
// expert, K, T token rows, G = scale granularity 16 / 32, KB = K / G scale blocks per row)
//   kTensorA   = 0  weight codes, rows in kernel order.  NVFP4: uint8 [E * N, K / 2] (2 codes per byte,
//                   low nibble first), row stride K / 2; TMA elements = bytes.  MXFP4: E2M1 [E * N, K],
//                   packed in global (K / 2 bytes per row) but TMA dtype 16U4_ALIGN16B (elements = 4-bit
//                   codes; shared memory gets one code per byte).  TMA box {128 elements, 128 rows}, SW128
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

#include <deep_gemm/common/host_device.cuh>
#include <deep_gemm/common/sm100_umma.cuh>

namespace deep_gemm::sm100 {

enum class Recipe : int { NVFP4 = 0, MXFP4_FP8 = 1 };
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
    static constexpr int kBoxK = 128;         // elements: 4-bit codes (A, 16U4_ALIGN16B) / FP8 bytes (B)
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
    static constexpr int kMmasPerStage = R::kStageK / R::kMmaK;                  // 4
    static constexpr int kAtoms = R::kStageK / R::kGran / 4;                     // scale atoms per stage
    static constexpr uint32_t kABytes = kBlockM * 128, kBBytes = kBlockN * 128;
    static constexpr uint32_t kSFBytes = kAtoms * kSFAtomBytes;
    static constexpr uint32_t kStageBytes = kABytes + kBBytes + 2 * kSFBytes;   // TMA tx bytes per stage
    static constexpr uint32_t kAOff = 0;
    static constexpr uint32_t kBOff = kAOff + kStages * kABytes;
    static constexpr uint32_t kSFAOff = kBOff + kStages * kBBytes;
    static constexpr uint32_t kSFBOff = kSFAOff + kStages * kSFBytes;
    static constexpr uint32_t kBarOff = kSFBOff + kStages * kSFBytes;
    static constexpr int kNumBarriers = 2 * kStages + 4;
    static constexpr uint32_t kTmemSlotOff = kBarOff + 8 * kNumBarriers;
    static constexpr uint32_t kSmemBytes = kTmemSlotOff + 16;                  // from the aligned base
    static constexpr int kEpilogueThreads = 128;
    using Tmem = TmemLayout<kBlockN, kAtoms>;

    static_assert(kBlockN == 32 || kBlockN == 64 || kBlockN == 128, "kBlockN must divide 128 and be >= 32");
    static_assert(is_legal_shape(R::kKind, kBlockM, kBlockN), "illegal UMMA shape");
    static_assert(is_legal_combo(R::kKind, R::kA, R::kB, R::kScale), "illegal element / scale combination");
    static_assert(kMmasPerStage * R::kMmaKBytes == 128, "a stage is one 128-byte SW128 column");
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

    DG_HOST_DEVICE int num_k_blocks() const { return k / R::kStageK; }
    DG_HOST_DEVICE int scale_blocks() const { return k / R::kGran; }
    DG_HOST_DEVICE uint32_t a_smem(int s) const { return smem_base + kAOff + uint32_t(s) * kABytes; }
    DG_HOST_DEVICE uint32_t b_smem(int s) const { return smem_base + kBOff + uint32_t(s) * kBBytes; }
    DG_HOST_DEVICE uint32_t sfa_smem(int s) const { return smem_base + kSFAOff + uint32_t(s) * kSFBytes; }
    DG_HOST_DEVICE uint32_t sfb_smem(int s) const { return smem_base + kSFBOff + uint32_t(s) * kSFBytes; }

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
        return make_idesc_block_scaled(R::kKind, R::kA, R::kB, R::kScale, kBlockM, kBlockN, mma_sf_id(kk), mma_sf_id(kk));
    }

    // ---------------------------------------------------------------- set-up (one thread)
    template <class Ops>
    DG_HOST_DEVICE void init_barriers(Ops& ops) const {
        for (int s = 0; s < kStages; ++s) {
            ops.init_barrier(full(s), 1);
            ops.init_barrier(empty(s), 1);
        }
        for (int b = 0; b < 2; ++b) {
            ops.init_barrier(tmem_full(b), 1);
            ops.init_barrier(tmem_empty(b), kEpilogueThreads);
        }
    }

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
        constexpr int kCols = kChunkCols<kShape>, kNum = kChunkNum<kShape>;
        constexpr int kGroups = kShape == TmemLdShape::K32x32B ? 1 : 2;
        uint32_t tcount = 0;
        for (int t = first; t < num_tiles; t += stride, ++tcount) {
            const PlanTile tile = tiles(t);
            const uint32_t buf = tcount % 2, buf_phase = (tcount / 2) % 2;
            ops.wait(tmem_full(int(buf)), buf_phase);
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
            epi_end(tile);
        }
    }

    // ---------------------------------------------------------------- per-tile steps
    // The producer and MMA loops above, one tile at a time (they are these steps over the caller's
    // tiles), for a caller that learns its tiles as it goes: the fused Mega MoE kernel
    // (impls/sm100_fp8_nvfp4_mega_moe.cuh) claims units from a counter and runs L1 and L2 units, two
    // plans of other n / k, through one pipeline.  The pipeline position travels in a Cursor, one per
    // issuing role (each role's own copy: the producer's, the MMA warp's, each epilogue thread's).
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

    // Producer, one tile: per k block wait for the stage to be free, expect its bytes, then A (TMA),
    // B (TMA), SFA and SFB (bulk copies) into it.  first_stage(stage) runs once, after the tile's
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
            const int32_t b_coords[2] = {int32_t(kb * R::kBoxK), int32_t(tile.row_start)};
            const uint32_t b_box[2] = {uint32_t(R::kBoxK), uint32_t(kBlockN)};
            ops.tma_load(kTensorB, b_coords, b_box, b_smem(stage), 128, full(stage));
            ops.bulk_copy(kTensorSFA, sfa_offset(tile, kb), kSFBytes, sfa_smem(stage), full(stage));
            ops.bulk_copy(kTensorSFB, sfb_offset(tile, kb), kSFBytes, sfb_smem(stage), full(stage));
            cur.next_stage();
        }
    }

    // MMA warp, one tile: wait for accumulator buffer b to be drained; per k block wait for the stage,
    // copy its scale atoms to TMEM scale slot (k-block counter % 2), 4 MMAs (the first of a tile
    // overwrites), commit -> empty(stage); after the tile's last k block commit -> tmem_full(b).
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
            ops.fence_after_sync();
            const uint32_t slot = cur.kcount % 2;
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

    // Epilogue thread, one tile (the body of `epilogue` above; left separate from it while the
    // epilogue's index maps change on another branch: fold `epilogue` onto this once they land):
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
