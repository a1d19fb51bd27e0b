#pragma once
// The MMA core of the Hopper expert GEMMs, shared by the grouped GEMM and the fused Mega MoE kernel:
// a multi-stage shared-memory pipeline of (weight codes, weight scales, token tile) per 128-wide k
// block, one producer thread that fills it, and consumer warpgroups that dequantize the weights in
// registers (E2M1 x UE4M3 is exact in BF16) and run BF16 wgmma with them as the A operand (swap
// A/B: weight rows are the M side, tokens the N side).
//
// One tile = 128 weight rows x kBlockT tokens, the whole K.  Consumer warpgroup cw owns rows
// [64 cw, 64 cw + 64).  Producer and consumers walk the same tile sequence; each keeps its own
// (stage, phase) cursor, so the pipeline runs across tile boundaries.
#include <cstdint>
#include <cuda.h>
#include <cute/arch/copy_sm90_tma.hpp>
#include <cutlass/arch/barrier.h>

#include <deep_gemm/common/sm90_fp4.cuh>
#include <deep_gemm/common/sm90_wgmma.cuh>

namespace deep_gemm::sm90 {

constexpr int kTileRows = 128;                          // weight rows per tile
constexpr int kTileK = 128;                             // k per pipeline stage
constexpr int kTileCodeBytes = kTileRows * kTileK / 2;
constexpr int kNumConsumerWarpgroups = 2;

// Register split between warpgroup 0 (producer, plus whatever else a kernel runs there) and the two
// consumer warpgroups.  setmaxnreg moves registers inside the CTA's own pool (launch-bound
// registers x threads); an increase that the pool cannot cover blocks forever, so the split must fit.
template <int kCTAsPerSM, int kProducerRegs>
struct RegisterSplit {
    static constexpr int kThreads = 384;
    static constexpr int kBound = (65536 / (kThreads * kCTAsPerSM)) & ~7;
    static constexpr int kProducer = kProducerRegs;
    static constexpr int kConsumer = ((kThreads * kBound - 128 * kProducerRegs) / 256) & ~7;
    static_assert(128 * kProducer + 256 * kConsumer <= kThreads * kBound,
                  "warpgroup register split exceeds the CTA's register pool");
};

template <WeightFormat kFmt, int kBlockT, int kNumStages>
struct FP4Pipeline {
    using Block = FP4Block<kFmt>;
    using MMA = WgmmaRS<kBlockT>;
    using Barrier = cutlass::arch::ClusterTransactionBarrier;

    static constexpr int kStages = kNumStages, kTokens = kBlockT;
    static constexpr int kTokenBytes = kBlockT * kTileK * 2;       // two 64-wide swizzle atoms
    static constexpr int kCodeBytes = Block::kCodeBytes;           // kTileCodeBytes for FP4, 32 KB for BF16
    static constexpr int kScaleBytes = Block::kScaleChunkBytes;
    static constexpr int kStageBytes = kTokenBytes + kCodeBytes + kScaleBytes;
    static constexpr int kAlign = 1024;                             // swizzle-128B atoms
    // NVFP4 scales are expanded to BF16 once per warp, not once per thread (FP4Consumer::load_block):
    // each consumer warp owns two 256-byte buffers (8 row pairs x 8 steps x bf16x2), used alternately;
    // 512-byte aligned (stages are whole KB), so switching buffers is an XOR.
    static constexpr bool kExpandScales = Block::kExpandScales;
    static constexpr int kScratchOffset = kNumStages * kStageBytes;
    static constexpr int kScratchBytes = kExpandScales ? kNumConsumerWarpgroups * 4 * 2 * 256 : 0;
    static constexpr int kBarrierOffset = kScratchOffset + kScratchBytes;
    static_assert(kStageBytes % 512 == 0, "scale scratch alignment");
    // Bytes from the aligned base, barriers included.
    static constexpr int kBytes = kBarrierOffset + 2 * kNumStages * int(sizeof(Barrier));

    uint8_t* tokens;
    uint8_t* codes;
    uint8_t* scales;
    Barrier* full;
    Barrier* empty;
    uint8_t* scratch;

    // `smem` must be kAlign-aligned.
    __device__ __forceinline__ explicit FP4Pipeline(uint8_t* smem)
        : tokens(smem), codes(smem + kNumStages * kTokenBytes),
          scales(smem + kNumStages * (kTokenBytes + kCodeBytes)),
          full(reinterpret_cast<Barrier*>(smem + kBarrierOffset)), empty(full + kNumStages),
          scratch(smem + kScratchOffset) {}

    __device__ __forceinline__ static uint8_t* align(uint8_t* raw) {
        return reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(raw) + kAlign - 1) & ~uintptr_t(kAlign - 1));
    }

    // One thread; the block syncs before any other use.
    __device__ __forceinline__ void init() const {
        #pragma unroll
        for (int s = 0; s < kNumStages; ++s) {
            full[s].init(1);
            empty[s].init(kNumConsumerWarpgroups * 4);   // lane 0 of every consumer warp (release_and_advance)
        }
        cutlass::arch::fence_barrier_init();
    }
};

// The producer: one thread.  A tile's weights are the chunks [chunk0, chunk0 + num_k_blocks) of the
// transformed layout ([E, N/128, K/128, chunk]); its tokens are rows [token_row, token_row + kBlockT)
// of the tensor map's 2-D BF16 tokens (rows past the end are zero-filled by TMA).
template <class Pipe>
struct FP4Producer {
    const Pipe& pipe;
    int stage = 0, phase = 0;

    __device__ __forceinline__ explicit FP4Producer(const Pipe& p) : pipe(p) {}

    __device__ __forceinline__ void advance() {
        if (++stage == Pipe::kStages) stage = 0, phase ^= 1;
    }
    // `tags` (shared, one int per stage) tells consumers which unit a stage starts: written before the
    // stage's arrive (release), read after its wait (acquire).
    __device__ __forceinline__ void load_weights(const uint8_t* codes, const uint8_t* scales, size_t chunk,
                                                 int* tags = nullptr, int tag = 0) {
        pipe.empty[stage].wait(phase ^ 1);
        if (tags != nullptr) tags[stage] = tag;
        pipe.full[stage].arrive_and_expect_tx(Pipe::kStageBytes);
        auto* bar = reinterpret_cast<uint64_t*>(&pipe.full[stage]);
        cute::SM90_BULK_COPY_G2S::copy(codes + chunk * Pipe::kCodeBytes, bar, pipe.codes + stage * Pipe::kCodeBytes,
                                       Pipe::kCodeBytes);
        if constexpr (Pipe::kScaleBytes > 0)
            cute::SM90_BULK_COPY_G2S::copy(scales + chunk * Pipe::kScaleBytes, bar, pipe.scales + stage * Pipe::kScaleBytes,
                                           Pipe::kScaleBytes);
    }
    __device__ __forceinline__ void load_tokens(const CUtensorMap* tokens_map, int s, int kb, int token_row) {
        auto* bar = reinterpret_cast<uint64_t*>(&pipe.full[s]);
        #pragma unroll
        for (int h = 0; h < 2; ++h)
            cute::SM90_TMA_LOAD_2D::copy(tokens_map, bar, static_cast<uint64_t>(cute::TMA::CacheHintSm90::EVICT_NORMAL),
                                         pipe.tokens + s * Pipe::kTokenBytes + h * Pipe::kTokenBytes / 2,
                                         kb * kTileK + h * 64, token_row);
    }

    __device__ __forceinline__ void load_tile(const CUtensorMap* tokens_map, const uint8_t* codes,
                                              const uint8_t* scales, size_t chunk0, int num_k_blocks, int token_row) {
        for (int kb = 0; kb < num_k_blocks; ++kb) {
            load_weights(codes, scales, chunk0 + kb);
            load_tokens(tokens_map, stage, kb, token_row);
            advance();
        }
    }

    // The same, for tokens that may not exist yet: the weights of the first stages go out at once,
    // their token loads only after ready() returns (which waits for the tokens' producers), so
    // weight streaming overlaps that wait.
    template <class Ready>
    __device__ __forceinline__ void load_tile_after(const CUtensorMap* tokens_map, const uint8_t* codes,
                                                    const uint8_t* scales, size_t chunk0, int num_k_blocks,
                                                    int token_row, Ready&& ready, int* tags = nullptr, int tag = 0) {
        const int deferred = num_k_blocks < Pipe::kStages ? num_k_blocks : Pipe::kStages;
        const int first = stage;
        for (int kb = 0; kb < deferred; ++kb) {
            load_weights(codes, scales, chunk0 + kb, kb == 0 ? tags : nullptr, tag);
            advance();
        }
        ready();
        for (int kb = 0, s = first; kb < deferred; ++kb, s = s + 1 == Pipe::kStages ? 0 : s + 1)
            load_tokens(tokens_map, s, kb, token_row);
        for (int kb = deferred; kb < num_k_blocks; ++kb) {
            load_weights(codes, scales, chunk0 + kb);
            load_tokens(tokens_map, stage, kb, token_row);
            advance();
        }
    }

    // An empty stage tagged `tag` (e.g. -1: no more tiles).
    __device__ __forceinline__ void finish(int* tags, int tag) {
        pipe.empty[stage].wait(phase ^ 1);
        tags[stage] = tag;
        pipe.full[stage].arrive();
        advance();
    }
};

// A consumer warpgroup.  mma_tile() leaves the tile's sums in `acc`:
//   acc[4j + {0,1}] = (row r0, tokens 8j + 2q + {0,1}), acc[4j + {2,3}] = (row r0 + 8, same tokens)
// with r0 = 64 cw + 16 (warp in warpgroup) + lane / 4 and q = lane % 4, in units of the block scale
// (the caller applies alpha x Block::kCompensation).
template <class Pipe, int kCTAsPerSM>
struct FP4Consumer {
    using Block = typename Pipe::Block;
    using MMA = typename Pipe::MMA;
    static constexpr int kNumAccum = MMA::kNumAccum;

    static constexpr int kScaleRegs = Block::kScaleRegs;

    const Pipe& pipe;
    int stage = 0, phase = 0;
    uint32_t codes_addr, scales_addr, scratch_st, scratch_ld;
    uint64_t desc_base;

    // cw: which 64 rows; wg_tid: thread in the warpgroup.
    __device__ __forceinline__ FP4Consumer(const Pipe& p, int cw, int wg_tid) : pipe(p) {
        const int warp = wg_tid / 32, lane = wg_tid % 32;
        const int row_pair = cw * 32 + warp * 8 + lane / 4;
        // Shared addresses and ld.shared (LDS.128 with immediate offsets) rather than generic
        // pointers, which compiled to 64-bit address math and LD.E.128.
        // FP4: the thread's 16 bytes of each half block; BF16: its 16 bytes (one A fragment) of each
        // step, the steps 2 x 128 x 16 bytes apart (deep_gemm/weights.py, _bf16_index).
        codes_addr = cute::cast_smem_ptr_to_uint(p.codes) + ((Block::kDense ? cw : cw * 2) * 128 + wg_tid) * 16;
        if constexpr (Pipe::kExpandScales) {
            // The warp's 8 row pairs hold 32 scale words: lane l expands word l (row pair l / 4, steps
            // 2 (l % 4) and 2 (l % 4) + 1) and reads back its row pair's 8 expanded words.
            scales_addr = cute::cast_smem_ptr_to_uint(p.scales) + (cw * 32 + warp * 8) * 16 + lane * 4;
            const uint32_t scratch = cute::cast_smem_ptr_to_uint(p.scratch) + (cw * 4 + warp) * 512;
            scratch_st = scratch + lane * 8;
            scratch_ld = scratch + (lane / 4) * 32;
        } else {
            scales_addr = cute::cast_smem_ptr_to_uint(p.scales) + row_pair * Block::kScaleBytesPerRowPair;
            scratch_st = scratch_ld = 0;
        }
        desc_base = make_kmajor_sw128_desc(cute::cast_smem_ptr_to_uint(p.tokens));
    }

    // The tag of the next stage (see FP4Producer::load_weights), once it is full.
    __device__ __forceinline__ int peek(const int* tags) const {
        pipe.full[stage].wait(phase);
        return *reinterpret_cast<const volatile int*>(tags + stage);
    }

    // smem -> registers: the thread's 8 step code words and its scales (NVFP4: one bf16x2 per step,
    // [s(r0, j), s(r1, j)] * 2^119; MXFP4: its row pair's raw scale words); volatile keeps the loads
    // after the wait.
    __device__ __forceinline__ void load_block(uint32_t (&codes)[8], uint32_t (&scales)[kScaleRegs]) {
        pipe.full[stage].wait(phase);
        if constexpr (Block::kDense) return;        // BF16: mma_steps loads the fragments themselves
        const uint32_t c = codes_addr + stage * kTileCodeBytes;
        asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];"
                     : "=r"(codes[0]), "=r"(codes[1]), "=r"(codes[2]), "=r"(codes[3]) : "r"(c));
        asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4 + %5];"   // steps 4..7, 128 uint4 further
                     : "=r"(codes[4]), "=r"(codes[5]), "=r"(codes[6]), "=r"(codes[7]) : "r"(c), "n"(128 * 16));
        const uint32_t sa = scales_addr + stage * Pipe::kScaleBytes;
        if constexpr (Pipe::kExpandScales) {
            // The 4 threads of a quad need the same 8 scales; expanding them in every thread was 28 of
            // the 132 dequant instructions per block.  Here each lane expands 2 and the warp shares them
            // through its scratch (two buffers: a lane rewrites one only after the __syncwarp that
            // follows every lane's read of it).
            uint32_t w;
            asm volatile("ld.shared.u32 %0, [%1];" : "=r"(w) : "r"(sa));
            const uint32_t even = as_u32(ue4m3x2_to_bf16x2_biased<false>(w));
            const uint32_t odd = as_u32(ue4m3x2_to_bf16x2_biased<true>(w));
            asm volatile("st.shared.v2.u32 [%0], {%1, %2};" :: "r"(scratch_st), "r"(even), "r"(odd) : "memory");
            __syncwarp();
            asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];"
                         : "=r"(scales[0]), "=r"(scales[1]), "=r"(scales[2]), "=r"(scales[3]) : "r"(scratch_ld) : "memory");
            asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4 + 16];"
                         : "=r"(scales[4]), "=r"(scales[5]), "=r"(scales[6]), "=r"(scales[7]) : "r"(scratch_ld) : "memory");
            scratch_st ^= 256, scratch_ld ^= 256;
        } else {
            asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];" : "=r"(scales[0]), "=r"(scales[1]) : "r"(sa));
        }
    }

    // Steps [kFirst, kFirst + kCount) of the current block: dequant into `a`, then async wgmmas over
    // the first kN tokens of the tile.  Descriptors as plain 64-bit adds to a uniform base: one
    // UIADD3.64 per wgmma.
    template <int kN, int kFirst, int kCount>
    __device__ __forceinline__ void mma_steps(float (&acc)[kNumAccum], int kb, const uint32_t (&codes)[8],
                                              const uint32_t (&scales)[kScaleRegs], uint32_t (&a)[kCount][4]) {
        if constexpr (Block::kDense) {
            #pragma unroll
            for (int j = kFirst; j < kFirst + kCount; ++j)
                asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];"
                             : "=r"(a[j - kFirst][0]), "=r"(a[j - kFirst][1]), "=r"(a[j - kFirst][2]), "=r"(a[j - kFirst][3])
                             : "r"(codes_addr + stage * Pipe::kCodeBytes + j * (2 * 128 * 16)));
        } else {
            Block::template dequant<kFirst, kCount>(codes, scales, a);
        }
        const uint64_t desc0 = desc_base + static_cast<uint32_t>(stage * (Pipe::kTokenBytes >> 4));
        #pragma unroll
        for (int i = 0; i < kNumAccum; ++i) cute::warpgroup_fence_operand(acc[i]);
        cute::warpgroup_arrive();
        #pragma unroll
        for (int j = kFirst; j < kFirst + kCount; ++j) {
            constexpr int kStride = Pipe::kTokens * 128;
            WgmmaRS<kN>::mma(a[j - kFirst], desc0 + (((j / 4) * kStride + (j % 4) * 32) >> 4), acc, kb > 0 || j > 0);
        }
        cute::warpgroup_commit_batch();
    }

    // Every warp releases the stage itself: its own ld.shared of the stage (codes, scales, tag) are
    // ordered before its lane 0's arrive by the warp-synchronous wgmma wait.  One arrive per
    // warpgroup would order warps 1-3's reads only through the collective wgmma, which the hardware
    // honours but the memory model does not state.  Same speed (docs/perf-notes.md, v15).
    __device__ __forceinline__ void release_and_advance(int wg_tid) {
        if (wg_tid % 32 == 0) pipe.empty[stage].arrive();
        if (++stage == Pipe::kStages) stage = 0, phase ^= 1;
    }

    // Dequant and wgmma of one block do not overlap inside a warpgroup; overlap comes from the other
    // consumer warpgroup(s).  Versions that dequantize block kb + 1 while block kb's wgmmas run were
    // correct but no faster: at decode (v7), at prefill (v7, 6 % slower) and at 64-128 tokens per
    // expert (v12, 2-7 % slower).  Every size runs at the board's power limit (docs/perf-notes.md).
    template <int kN>
    __device__ __forceinline__ void mma_tile_n(float (&acc)[kNumAccum], int num_k_blocks, int wg_tid) {
        // Two CTAs per SM (80 registers at compile time) hold half a block of A at a time.
        constexpr int kSteps = kCTAsPerSM == 1 ? 8 : 4;
        uint32_t a[kSteps][4];
        for (int kb = 0; kb < num_k_blocks; ++kb) {
            uint32_t codes[8], scales[kScaleRegs];
            load_block(codes, scales);
            mma_steps<kN, 0, kSteps>(acc, kb, codes, scales, a);
            cute::warpgroup_wait<0>();
            if constexpr (kSteps < 8) {
                mma_steps<kN, kSteps, kSteps>(acc, kb, codes, scales, a);
                cute::warpgroup_wait<0>();
            }
            release_and_advance(wg_tid);
        }
        #pragma unroll
        for (int i = 0; i < kNumAccum; ++i) cute::warpgroup_fence_operand(acc[i]);
    }

    // A tile of 32 or more tokens holding num_tokens (<= kTokens) runs the MMA only over the tokens
    // rounded up to kGran = max(8, kTokens / 8) (wgmma's N is a multiple of 8): at 128 tokens per
    // rank the experts' last (often only) tiles are 40-95 % full, and under skewed routing most
    // experts fill a small part of a tile sized for the busiest ones.  Only acc[0, n / 2) is written
    // then; the epilogues read only the tile's tokens.  (16-token tiles keep one k loop: the
    // two-way switch cost them 0.5-1.2 % at decode, where the grouped GEMM uses them.)
    __device__ __forceinline__ void mma_tile(float (&acc)[kNumAccum], int num_k_blocks, int wg_tid,
                                             int num_tokens = Pipe::kTokens) {
        constexpr int kT = Pipe::kTokens;
        if constexpr (kT >= 32) {
            constexpr int kGran = kT / 8 > 8 ? kT / 8 : 8;
            // warp-uniform for the compiler too (keeps the k loop on the uniform datapath)
            const int parts = __shfl_sync(0xffffffffu, (num_tokens + kGran - 1) / kGran, 0);
            switch (parts) {
                case 1: mma_tile_n<kGran>(acc, num_k_blocks, wg_tid); break;
                case 2: if constexpr (kT > 2 * kGran) { mma_tile_n<2 * kGran>(acc, num_k_blocks, wg_tid); break; }
                case 3: if constexpr (kT > 3 * kGran) { mma_tile_n<3 * kGran>(acc, num_k_blocks, wg_tid); break; }
                case 4: if constexpr (kT > 4 * kGran) { mma_tile_n<4 * kGran>(acc, num_k_blocks, wg_tid); break; }
                case 5: if constexpr (kT > 5 * kGran) { mma_tile_n<5 * kGran>(acc, num_k_blocks, wg_tid); break; }
                case 6: if constexpr (kT > 6 * kGran) { mma_tile_n<6 * kGran>(acc, num_k_blocks, wg_tid); break; }
                case 7: if constexpr (kT > 7 * kGran) { mma_tile_n<7 * kGran>(acc, num_k_blocks, wg_tid); break; }
                default: mma_tile_n<kT>(acc, num_k_blocks, wg_tid); break;
            }
        } else {
            mma_tile_n<kT>(acc, num_k_blocks, wg_tid);
        }
    }
};

}  // namespace deep_gemm::sm90
