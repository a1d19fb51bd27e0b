#pragma once
// Hopper grouped GEMM: NVFP4/MXFP4 expert weights x BF16 tokens -> BF16, swap-AB.
//
//   out[token, n] = alpha[e] * sum_k W_e[n, k] * x[token, k]
//
// Weight rows are the M side of wgmma and come from registers: they are dequantized exactly
// (E2M1 x UE4M3 is exact in BF16) right before the MMA, so HBM carries 4.5 bits per weight.
// Tokens are the N side, loaded by TMA into 128B-swizzled shared memory (the token side is
// FP8 x power-of-two scale upstream of this kernel, exact in BF16 too).
//
// Warp roles: warpgroup 0 = producer (one thread issues bulk copies and TMA), warpgroups 1..2 =
// consumers, each owning 64 of the tile's 128 weight rows and sharing the token tile.
// Persistent grid over GroupedTiles.  Epilogues: plain (alpha -> BF16), and L1 SwiGLU
// (gate/up rows interleaved by the transform so one thread holds both; routing weight applied;
// the L2 input is written in BF16).
#include <cstdint>
#include <type_traits>
#include <cuda.h>
#include <cuda_bf16.h>
#include <cute/arch/copy_sm90_tma.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>

#include <deep_gemm/common/sm90_fp4.cuh>
#include <deep_gemm/common/sm90_wgmma.cuh>
#include <deep_gemm/epilogue/moe_math.cuh>
#include <deep_gemm/scheduler/grouped_tiles.cuh>

namespace deep_gemm {

enum class Epilogue : int { Plain = 0, SwiGLU = 1 };

namespace sm90_grouped {

constexpr int kBlockN = 128;            // weight rows per tile
constexpr int kBlockK = 128;            // k per pipeline stage
constexpr int kCodeBytes = kBlockN * kBlockK / 2;
constexpr int kNumThreads = 384;

template <sm90::WeightFormat kFmt, int kBlockT>
struct SmemLayout {
    static constexpr int kTokenBytes = kBlockT * kBlockK * 2;        // two 64-wide swizzle atoms
    static constexpr int kScaleBytes = sm90::FP4Block<kFmt>::kScaleChunkBytes;
    static constexpr int kStageBytes = kTokenBytes + kCodeBytes + kScaleBytes;
    static constexpr int kAlign = 1024;                               // swizzle-128B atoms
};

}  // namespace sm90_grouped

struct GroupedGemmParams {
    const uint8_t* codes;        // [E, N/128, K/128, 8192]
    const uint8_t* scales;       // [E, N/128, K/128, scale chunk]
    const float* alpha;          // [E, alpha_stride]
    const int* layout;           // Contiguous: offsets [E+1]; Masked: counts [E]
    __nv_bfloat16* out;          // Plain: [rows, N]; SwiGLU: [rows, N/2]
    const float* route_weights;  // SwiGLU: [rows] (nullptr = 1)
    float clamp;                 // SwiGLU clamp (inf = none)
    int num_experts, n, k, max_rows, alpha_stride;
};

// kCTAsPerSM = 2 (small token tiles): two CTAs share an SM so that four consumer warpgroups hide
// the latency of the dequant chains; each gets half the shared memory; consumers run at 96 registers.
template <sm90::WeightFormat kFmt, int kBlockT, int kNumStages, Epilogue kEpilogue, GroupMode kMode,
          bool kFastMath, int kCTAsPerSM>
__global__ void __launch_bounds__(sm90_grouped::kNumThreads, kCTAsPerSM)
sm90_fp8_nvfp4_grouped_gemm(const __grid_constant__ CUtensorMap tokens_map,
                            const uint8_t* codes, const uint8_t* scales, const float* alpha, const int* layout,
                            __nv_bfloat16* out, const float* route_weights, float clamp,
                            int num_experts, int n, int k, int max_rows, int alpha_stride) {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900)
    // Flat parameters keep the Python launcher free of struct packing.
    const GroupedGemmParams p{codes, scales, alpha, layout, out, route_weights, clamp,
                              num_experts, n, k, max_rows, alpha_stride};
    using namespace sm90_grouped;
    using Layout = SmemLayout<kFmt, kBlockT>;
    using Block = sm90::FP4Block<kFmt>;
    using MMA = sm90::WgmmaRS<kBlockT>;
    using Barrier = cutlass::arch::ClusterTransactionBarrier;

    // setmaxnreg moves registers inside the CTA's own pool (launch-bound registers x threads); an
    // increase that the pool cannot cover blocks forever, so the split must fit the bound.
    constexpr int kProducerRegs = 40, kConsumerRegs = kCTAsPerSM == 1 ? 232 : 96;
    constexpr int kBoundRegs = (65536 / (kNumThreads * kCTAsPerSM)) & ~7;
    static_assert(128 * kProducerRegs + 256 * kConsumerRegs <= kNumThreads * kBoundRegs,
                  "warpgroup register split exceeds the CTA's register pool");

    extern __shared__ uint8_t smem_raw[];
    uint8_t* smem = reinterpret_cast<uint8_t*>(
        (reinterpret_cast<uintptr_t>(smem_raw) + Layout::kAlign - 1) & ~uintptr_t(Layout::kAlign - 1));
    uint8_t* smem_tokens = smem;
    uint8_t* smem_codes = smem_tokens + kNumStages * Layout::kTokenBytes;
    uint8_t* smem_scales = smem_codes + kNumStages * kCodeBytes;
    auto* full = reinterpret_cast<Barrier*>(smem_scales + kNumStages * Layout::kScaleBytes);
    auto* empty = full + kNumStages;
    int* smem_prefix = reinterpret_cast<int*>(empty + kNumStages);

    // The role and the tile count are warp-uniform, but ptxas cannot prove it for threadIdx or a
    // shared-memory load; through a shuffle it can, and then the consumer k loop (stage, phase,
    // barrier addresses, wgmma descriptors) runs on the uniform datapath: no R2UR per wgmma and no
    // vector ALU slots for loop control.
    const int warpgroup = __shfl_sync(0xffffffffu, threadIdx.x / 128, 0);
    const int wg_tid = threadIdx.x % 128;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

    GroupedTiles<kMode, kBlockT> sched{p.layout, p.num_experts, p.max_rows, p.n / kBlockN, smem_prefix};
    if (warp == 0) sched.build_prefix(lane);
    if (threadIdx.x == 32) {
        #pragma unroll
        for (int s = 0; s < kNumStages; ++s) {
            full[s].init(1);
            empty[s].init(2);   // one elected thread per consumer warpgroup
        }
        cutlass::arch::fence_barrier_init();
    }
    if (threadIdx.x == 64) cute::prefetch_tma_descriptor(&tokens_map);
    __syncthreads();

    const int num_tiles = __shfl_sync(0xffffffffu, sched.num_tiles(), 0);
    const int num_k_blocks = p.k / kBlockK;
    const int num_row_tiles = p.n / kBlockN;

    if (warpgroup == 0) {
        // ---------------- producer ----------------
        cutlass::arch::warpgroup_reg_dealloc<kProducerRegs>();
        if (threadIdx.x != 0) return;
        int stage = 0, phase = 0;
        for (int t = blockIdx.x; t < num_tiles; t += gridDim.x) {
            const auto tile = sched.get(t);
            const size_t chunk0 = (size_t(tile.expert) * num_row_tiles + tile.row_tile) * num_k_blocks;
            for (int kb = 0; kb < num_k_blocks; ++kb) {
                empty[stage].wait(phase ^ 1);
                full[stage].arrive_and_expect_tx(Layout::kStageBytes);
                cute::SM90_BULK_COPY_G2S::copy(p.codes + (chunk0 + kb) * kCodeBytes,
                                               reinterpret_cast<uint64_t*>(&full[stage]),
                                               smem_codes + stage * kCodeBytes, kCodeBytes);
                cute::SM90_BULK_COPY_G2S::copy(p.scales + (chunk0 + kb) * Layout::kScaleBytes,
                                               reinterpret_cast<uint64_t*>(&full[stage]),
                                               smem_scales + stage * Layout::kScaleBytes, Layout::kScaleBytes);
                #pragma unroll
                for (int h = 0; h < 2; ++h)
                    cute::SM90_TMA_LOAD_2D::copy(&tokens_map, reinterpret_cast<uint64_t*>(&full[stage]),
                                                 static_cast<uint64_t>(cute::TMA::CacheHintSm90::EVICT_NORMAL),
                                                 smem_tokens + stage * Layout::kTokenBytes + h * kBlockT * 128,
                                                 kb * kBlockK + h * 64, tile.row_start);
                if (++stage == kNumStages) stage = 0, phase ^= 1;
            }
        }
    } else {
        // ---------------- consumers ----------------
        cutlass::arch::warpgroup_reg_alloc<kConsumerRegs>();
        const int cw = warpgroup - 1;                 // which 64 rows of the tile
        const int wg_warp = wg_tid / 32, g = lane / 4, q = lane % 4;
        const int row_pair = cw * 32 + wg_warp * 8 + g;
        float acc[MMA::kNumAccum];
        int stage = 0, phase = 0;
        // Dequant and wgmma of one block do not overlap inside a warpgroup: the async wgmma reads its
        // A registers, and a second register set written meanwhile was measured to corrupt them
        // (BLOCK_T 128).  Overlap comes from the other consumer warpgroup(s) instead.

        // smem -> registers: the thread's 8 step code words and its row pair's scale words.  Shared
        // addresses and ld.shared (LDS.128 with immediate offsets) rather than generic pointers,
        // which compiled to 64-bit address math and LD.E.128; volatile keeps them after the wait.
        const uint32_t codes_addr = cute::cast_smem_ptr_to_uint(smem_codes) + (cw * 2 * 128 + wg_tid) * 16;
        const uint32_t scales_addr = cute::cast_smem_ptr_to_uint(smem_scales) + row_pair * Block::kScaleBytesPerRowPair;
        auto load_block = [&](uint32_t (&codes)[8], uint32_t (&scales)[4]) {
            full[stage].wait(phase);
            const uint32_t c = codes_addr + stage * kCodeBytes;
            asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];"
                         : "=r"(codes[0]), "=r"(codes[1]), "=r"(codes[2]), "=r"(codes[3]) : "r"(c));
            asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4 + %5];"   // steps 4..7, 128 uint4 further
                         : "=r"(codes[4]), "=r"(codes[5]), "=r"(codes[6]), "=r"(codes[7]) : "r"(c), "n"(128 * 16));
            const uint32_t sa = scales_addr + stage * Layout::kScaleBytes;
            if constexpr (kFmt == sm90::WeightFormat::NVFP4) {
                asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];"
                             : "=r"(scales[0]), "=r"(scales[1]), "=r"(scales[2]), "=r"(scales[3]) : "r"(sa));
            } else {
                asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];" : "=r"(scales[0]), "=r"(scales[1]) : "r"(sa));
                scales[2] = 0, scales[3] = 0;
            }
        };
        // Steps [kFirst, kFirst + kCount) of the current block: dequant into `a`, then async wgmmas.
        // Descriptors as plain 64-bit adds to a uniform base: one UIADD3.64 per wgmma (a 32-bit add
        // joined by mov.b64 cost a uniform add and two moves each).
        const uint64_t desc_base = sm90::make_kmajor_sw128_desc(cute::cast_smem_ptr_to_uint(smem_tokens));
        auto mma_steps = [&](auto first_tag, auto count_tag, int kb, const uint32_t (&codes)[8],
                             const uint32_t (&scales)[4], auto& a) {
            constexpr int kFirst = decltype(first_tag)::value, kCount = decltype(count_tag)::value;
            Block::template dequant<kFirst, kCount>(codes, scales, a);
            const uint64_t desc0 = desc_base + static_cast<uint32_t>(stage * (Layout::kTokenBytes >> 4));
            #pragma unroll
            for (int i = 0; i < MMA::kNumAccum; ++i) cute::warpgroup_fence_operand(acc[i]);
            cute::warpgroup_arrive();
            #pragma unroll
            for (int j = kFirst; j < kFirst + kCount; ++j) {
                constexpr int kStride = kBlockT * 128;
                MMA::mma(a[j - kFirst], desc0 + (((j / 4) * kStride + (j % 4) * 32) >> 4), acc, kb > 0 || j > 0);
            }
            cute::warpgroup_commit_batch();
        };
        using C0 = std::integral_constant<int, 0>;
        using C4 = std::integral_constant<int, 4>;
        using C8 = std::integral_constant<int, 8>;
        auto release = [&](int s) { if (wg_tid == 0) empty[s].arrive(); };
        auto advance = [&]() { if (++stage == kNumStages) stage = 0, phase ^= 1; };

        for (int t = blockIdx.x; t < num_tiles; t += gridDim.x) {
            const auto tile = sched.get(t);
            if constexpr (kCTAsPerSM == 1) {
                uint32_t a[8][4];
                for (int kb = 0; kb < num_k_blocks; ++kb) {
                    uint32_t codes[8], scales[4];
                    load_block(codes, scales);
                    mma_steps(C0{}, C8{}, kb, codes, scales, a);
                    cute::warpgroup_wait<0>();
                    release(stage);
                    advance();
                }
            } else {
                // Two CTAs per SM (80 registers at compile time): half a block of A at a time.
                uint32_t a[4][4];
                for (int kb = 0; kb < num_k_blocks; ++kb) {
                    uint32_t codes[8], scales[4];
                    load_block(codes, scales);
                    mma_steps(C0{}, C4{}, kb, codes, scales, a);
                    cute::warpgroup_wait<0>();
                    mma_steps(C4{}, C4{}, kb, codes, scales, a);
                    cute::warpgroup_wait<0>();
                    release(stage);
                    advance();
                }
            }
            #pragma unroll
            for (int i = 0; i < MMA::kNumAccum; ++i) cute::warpgroup_fence_operand(acc[i]);

            // ---------------- epilogue ----------------
            // acc[4j + {0,1}] = (row r0, tokens 8j + 2q + {0,1}), acc[4j + {2,3}] = (row r0 + 8, same tokens)
            const int r0 = cw * 64 + wg_warp * 16 + g;
            const float* alpha = p.alpha + tile.expert * p.alpha_stride;
            #pragma unroll
            for (int j = 0; j < kBlockT / 8; ++j) {
                #pragma unroll
                for (int c = 0; c < 2; ++c) {
                    const int tok = 8 * j + 2 * q + c;
                    if (tok >= tile.num_tokens) continue;
                    const size_t row = size_t(tile.row_start) + tok;
                    if constexpr (kEpilogue == Epilogue::Plain) {
                        const float a0 = __ldg(alpha) * Block::kCompensation;
                        __nv_bfloat16* dst = p.out + row * p.n + tile.row_tile * kBlockN + r0;
                        dst[0] = __float2bfloat16_rn(acc[4 * j + c] * a0);
                        dst[8] = __float2bfloat16_rn(acc[4 * j + 2 + c] * a0);
                    } else {
                        const float gate = acc[4 * j + c] * (__ldg(alpha) * Block::kCompensation);
                        const float up = acc[4 * j + 2 + c] * (__ldg(alpha + 1) * Block::kCompensation);
                        float h = swiglu<kFastMath>(gate, up, p.clamp);
                        if (p.route_weights != nullptr) h *= __ldg(p.route_weights + row);
                        const int chan = tile.row_tile * (kBlockN / 2) + cw * 32 + wg_warp * 8 + g;
                        p.out[row * (p.n / 2) + chan] = __float2bfloat16_rn(h);
                    }
                }
            }
        }
    }
#endif
}

}  // namespace deep_gemm
