#pragma once
// E2M1 (+ UE4M3 / UE8M0 block scale) -> BF16 register fragments, exactly, for the Hopper kernels.
//
// The bit tricks themselves (why, the code word layout, the scale rebias) are arch-neutral and live
// in common/fp4_bits.cuh (namespace deep_gemm::fp4), shared with the sm100 exact recipe; this header
// re-exports them into deep_gemm::sm90 and adds the wgmma-fragment specifics: the weight formats and
// FP4Block (the 8 k16 steps of a 128 x 128 block).  deep_gemm/weights.py holds the word and scale
// bit maps (_WORD_BIT_CELL, _NVFP4_SCALE_WORD_PERM) and tests/test_fp4_bits.py emulates the ops.
#include <cstdint>
#include <cuda_bf16.h>

#include <deep_gemm/common/fp4_bits.cuh>

namespace deep_gemm::sm90 {

using fp4::kNvfp4Compensation;
using fp4::kE2M1Mask;
using fp4::kE2M1MaskE1;
using fp4::kE2M1MaskMES;
using fp4::as_bf162;
using fp4::as_u32;
using fp4::shl_wide;
using fp4::e2m1x8_to_bf16x8_bits;
using fp4::ue4m3x2_to_bf16x2_biased;
using fp4::ue8m0x2_to_bf16x2;
using fp4::dequant_step_nvfp4;
using fp4::dequant_step_mxfp4;

// BF16: dense weights (upstream's bf16_mega_moe, shared experts), stored by the transform already in
// fragment order (deep_gemm/weights.py): the consumer loads its A registers straight from shared
// memory, nothing to dequantize, no scales (FP4Consumer::mma_steps).
enum class WeightFormat : int { NVFP4 = 0, MXFP4 = 1, BF16 = 2 };

// Code and scale bytes per 128 x 128 weight block, and the fragment for all 8 k16 steps of a block.
template <WeightFormat kFmt>
struct FP4Block {
    static constexpr bool kDense = kFmt == WeightFormat::BF16;
    static constexpr int kCodeBytes = kDense ? 128 * 128 * 2 : 128 * 128 / 2;
    static constexpr int kScaleBytesPerRowPair = kFmt == WeightFormat::NVFP4 ? 16 : (kDense ? 0 : 8);
    static constexpr int kScaleChunkBytes = 64 * kScaleBytesPerRowPair;
    static constexpr float kCompensation = kFmt == WeightFormat::NVFP4 ? kNvfp4Compensation : 1.0f;
    static_assert(kDense || kCodeBytes == 8192, "FP4 blocks are 8 KB of codes");
    // NVFP4: the consumer hands over each step's scales already expanded (bf16x2 [s(r0, j), s(r1, j)]
    // * 2^119, ue4m3x2_to_bf16x2_biased); MXFP4: the row pair's two raw UE8M0 words.
    static constexpr bool kExpandScales = kFmt == WeightFormat::NVFP4;
    static constexpr int kScaleRegs = kExpandScales ? 8 : 2;   // (BF16: unused)

    // Steps [kFirst, kFirst + kCount) of a block: codes[j] is step j's word; a[j - kFirst] receives
    // step j's fragment.
    template <int kFirst, int kCount>
    __device__ __forceinline__ static void dequant(const uint32_t (&codes)[8], const uint32_t (&scales)[kScaleRegs],
                                                   uint32_t (&a)[kCount][4]) {
        #pragma unroll
        for (int j = kFirst; j < kFirst + kCount; ++j) {
            static_assert(!kDense, "BF16 fragments are loaded, not dequantized");
            if constexpr (kFmt == WeightFormat::NVFP4) {
                const __nv_bfloat162 s = as_bf162(scales[j]);
                dequant_step_nvfp4(codes[j], __low2bfloat162(s), __high2bfloat162(s), a[j - kFirst]);
            } else {
                const __nv_bfloat162 s = ((j / 2) & 1) ? ue8m0x2_to_bf16x2<true>(scales[j / 4])
                                                       : ue8m0x2_to_bf16x2<false>(scales[j / 4]);
                dequant_step_mxfp4(codes[j], __low2bfloat162(s), __high2bfloat162(s), a[j - kFirst]);
            }
        }
    }
};

}  // namespace deep_gemm::sm90
