#pragma once
// TMEM epilogues of the sm100 expert kernels, one tcgen05.ld chunk at a time (the `epi` callbacks of
// scheduler/sm100_gemm_plan.cuh): shared by the grouped GEMM (impls/sm100_fp4_grouped_gemm.cuh) and
// the fused Mega MoE kernel (impls/sm100_fp8_nvfp4_mega_moe.cuh), which differ only in where a tile's
// rows live (the grouped GEMM: its tile's row_start; the fused kernel: the unit's rows for the
// routing weights and combine rows, the token tile's padded rows for the L2 input).
//   store_rows_chunk  Plain / Weighted (K32x32B: thread = weight row): out[token, row] = bf16(acc * a)
//                     or, kWeighted (fp4xfp4's L2: the top-k weight after L2, on the BF16 partial),
//                     bf16(f32(bf16(acc * a)) * w[token]) (sm90 epilogue_weighted's roundings)
//   swiglu_stage_chunk / quantize_l2_input  SwiGLUQuant (K16x256B): the L1 SwiGLU staged as
//                     float [64 channels][kBlockN tokens] in shared memory, then per (token, block)
//                     the L2 GEMM's tokens in the recipe's format (epilogue/moe_l2_input.cuh)
#include <cstdint>
#include <cuda_bf16.h>

#include <deep_gemm/common/sm100_umma.cuh>
#include <deep_gemm/epilogue/moe_l2_input.cuh>
#include <deep_gemm/epilogue/moe_math.cuh>
#include <deep_gemm/scheduler/sm100_gemm_plan.cuh>

namespace deep_gemm::sm100 {

// One K32x32B chunk (16 token columns from `col`) of weight row `row` (thread = row): tokens
// tok < num_tokens go to out[(row0 + tok) * ld + row]; w: the tile's routing weights (kWeighted).
template <bool kWeighted>
__device__ __forceinline__ void store_rows_chunk(const uint32_t (&regs)[16], uint32_t col, int l, int num_tokens,
                                                 float a, const float* w, __nv_bfloat16* out, size_t row0, size_t ld,
                                                 int row) {
    #pragma unroll
    for (int j = 0; j < 16; ++j) {
        const TmemCoord c = tmem_ld_coord(TmemLdShape::K32x32B, uint32_t(l), uint32_t(j));
        const int tok = int(col + c.column);
        if (tok < num_tokens) {
            float v = __uint_as_float(regs[j]) * a;
            if constexpr (kWeighted) v = __bfloat162float(__float2bfloat16_rn(v)) * w[tok];
            out[(row0 + size_t(tok)) * ld + size_t(row)] = __float2bfloat16_rn(v);
        }
    }
}

// One K16x256B chunk of the L1 accumulator (kernel rows 16 G + [0, 8): gate rows of channels
// 8 G + [0, 8); 16 G + [8, 16): their up rows): per token and channel of the tile,
// g = bf16(acc_g * ag), u = bf16(acc_u * au), a = f32(f32(swiglu(g, u, cb)) * w) (w: the tile's
// routing weights or nullptr: unweighted), staged at scratch[chan * kBlockN + tok].
template <int kBlockN, bool kFastMath>
__device__ __forceinline__ void swiglu_stage_chunk(const uint32_t (&regs)[16], uint32_t lane_base, uint32_t col, int l,
                                                   int num_tokens, float ag, float au, float cb, const float* w,
                                                   float* scratch) {
    #pragma unroll
    for (int j = 0; j < 16; ++j) {
        if ((j % 4) >= 2) continue;                      // registers r = 2, 3: the up rows
        const TmemCoord c = tmem_ld_coord(TmemLdShape::K16x256B, uint32_t(l), uint32_t(j));
        const int tok = int(col + c.column);
        const int kernel_row = int(lane_base + c.lane);
        const int chan = (kernel_row / 16) * 8 + kernel_row % 8;      // within the tile's 64
        if (tok < num_tokens) {
            const float g = __bfloat162float(__float2bfloat16_rn(__uint_as_float(regs[j]) * ag));
            const float u = __bfloat162float(__float2bfloat16_rn(__uint_as_float(regs[j + 2]) * au));
            float a = swiglu<kFastMath>(g, u, cb);
            if (w != nullptr) a *= w[tok];
            scratch[chan * kBlockN + tok] = a;
        }
    }
}

// The staged 64 channels of weight-row tile row_tile (channels 64 row_tile + [0, 64)) as the L2
// GEMM's tokens, rows row0 + tok of `codes` / `out_sf` (inter channels per row); thread tid of
// the 128 epilogue threads, between two syncs of them (the caller's):
//   NVFP4 recipe:     packed E2M1 (uint8 [rows, inter / 2]) and UE4M3 = nvfp4_block(amax, inv_g) per 16
//   MXFP4_FP8 recipe: E4M3 codes (uint8 [rows, inter]) and UE8M0 = fp8_pow2_sf_biased per 32
// the scales in the 512-byte atom layout over token rows (sf_global_offset).
template <Recipe kRecipe, int kBlockN>
__device__ __forceinline__ void quantize_l2_input(const float* scratch, int num_tokens, size_t row0, int row_tile,
                                                  int inter, uint8_t* codes, uint8_t* out_sf, float inv_g, int tid) {
    constexpr int kGran = kRecipe == Recipe::NVFP4 ? 16 : 32;
    constexpr int kBlocks = 64 / kGran;
    for (int p = tid; p < kBlocks * kBlockN; p += 128) {
        const int blk = p / kBlockN, tok = p % kBlockN;
        if (tok >= num_tokens) continue;
        const float* src = scratch + blk * kGran * kBlockN + tok;
        float amax = 0.0f;
        #pragma unroll
        for (int i = 0; i < kGran; ++i) amax = fmaxf(amax, fabsf(src[i * kBlockN]));
        const size_t row = row0 + size_t(tok);
        const int gblock = row_tile * kBlocks + blk;              // scale block in the row
        if constexpr (kRecipe == Recipe::NVFP4) {
            const l2_input::Nvfp4Block nb = l2_input::nvfp4_block(amax, inv_g);
            uint32_t packed[2] = {0u, 0u};
            #pragma unroll
            for (int i = 0; i < 16; ++i)
                packed[i / 8] |= uint32_t(l2_input::nvfp4_code(src[i * kBlockN], nb)) << (4 * (i % 8));
            *reinterpret_cast<uint2*>(codes + row * size_t(inter / 2) + size_t(gblock) * 8) = make_uint2(packed[0], packed[1]);
            out_sf[sf_global_offset(row, uint64_t(gblock), uint64_t(inter / 16))] = nb.sf8;
        } else {
            const l2_input::Fp8Pow2Block fb = l2_input::fp8_pow2_block(amax);
            uint32_t packed[8];
            #pragma unroll
            for (int w = 0; w < 8; ++w) {
                packed[w] = 0u;
                #pragma unroll
                for (int i = 0; i < 4; ++i)
                    packed[w] |= uint32_t(l2_input::fp8_pow2_code(src[(4 * w + i) * kBlockN], fb)) << (8 * i);
            }
            uint4* dst = reinterpret_cast<uint4*>(codes + row * size_t(inter) + size_t(gblock) * 32);
            dst[0] = make_uint4(packed[0], packed[1], packed[2], packed[3]);
            dst[1] = make_uint4(packed[4], packed[5], packed[6], packed[7]);
            out_sf[sf_global_offset(row, uint64_t(gblock), uint64_t(inter / 32))] = uint8_t(l2_input::fp8_pow2_sf_biased(amax));
        }
    }
}

}  // namespace deep_gemm::sm100
