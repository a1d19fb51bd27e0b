#pragma once
// E2M1 (+ UE4M3 / UE8M0 block scale) -> BF16 register fragments, exactly.
//
// Why bit tricks and not a conversion instruction: sm_90 has no e2m1 cvt, and the decode GEMM
// is bound by these integer ops, so each bf16x2 costs one shift and two LOP3s.  A nibble
// `s e1 e0 m` placed at bf16 bits {15, 8, 7, 6} is the E2M1 value times 2^-126 (a bf16
// subnormal for e = 0, which half-precision multiplies keep).  One multiply by the block scale,
// pre-biased by 2^119, brings it to value * scale * 2^-7, a normal bf16 for every E2M1 x UE4M3
// pair (E2M1 has 2 significant bits, E4M3 4, BF16 8: the product is exact).  The 2^7 goes back
// in the FP32 epilogue (kNvfp4Compensation).
#include <cstdint>
#include <cuda_bf16.h>

namespace deep_gemm::sm90 {

// Multiply the accumulator by this in the epilogue for NVFP4 (MXFP4 needs none).
constexpr float kNvfp4Compensation = 128.0f;

__device__ __forceinline__ __nv_bfloat162 as_bf162(uint32_t x) {
    return *reinterpret_cast<__nv_bfloat162*>(&x);
}
__device__ __forceinline__ uint32_t as_u32(__nv_bfloat162 x) {
    return *reinterpret_cast<uint32_t*>(&x);
}

// The nibbles at bits 12 and 28 of `w` -> bf16x2 holding value * 2^-126.
__device__ __forceinline__ uint32_t e2m1x2_bits(uint32_t w) {
    return (w & 0x80008000u) | ((w >> 6) & 0x01C001C0u);
}

// UE4M3 bytes 0 and 2 (kOdd = false) or 1 and 3 (kOdd = true) of `w` -> bf16x2 scale * 2^119.
// `(b & 0x7f) << 4` is the scale times 2^-120 as a bf16 (subnormal for UE4M3 subnormals too);
// two exact power-of-two multiplies rebias it without overflowing the bf16 range.
template <bool kOdd>
__device__ __forceinline__ __nv_bfloat162 ue4m3x2_to_bf16x2_biased(uint32_t w) {
    const uint32_t bits = kOdd ? ((w >> 4) & 0x07F007F0u) : ((w & 0x007F007Fu) << 4);
    const __nv_bfloat162 two120 = as_bf162(0x7B807B80u), two119 = as_bf162(0x7B007B00u);
    return __hmul2(__hmul2(as_bf162(bits), two120), two119);
}

// UE8M0 bytes 0 and 2 (kOdd = false) or 1 and 3 of `w` -> bf16x2 2^(b - 127) (code 0 -> 0).
template <bool kOdd>
__device__ __forceinline__ __nv_bfloat162 ue8m0x2_to_bf16x2(uint32_t w) {
    return as_bf162(kOdd ? ((w >> 1) & 0x7F807F80u) : ((w & 0x00FF00FFu) << 7));
}

// One k16 step of the A fragment (a0..a3 of wgmma m64nNk16) from the step's code word.
// s_lo / s_hi: the scale of rows g and g + 8, already broadcast to both halves.
__device__ __forceinline__ void dequant_step_nvfp4(uint32_t w, __nv_bfloat162 s_lo, __nv_bfloat162 s_hi,
                                                   uint32_t (&a)[4]) {
    a[0] = as_u32(__hmul2(as_bf162(e2m1x2_bits(w)), s_lo));
    a[1] = as_u32(__hmul2(as_bf162(e2m1x2_bits(w << 4)), s_hi));
    a[2] = as_u32(__hmul2(as_bf162(e2m1x2_bits(w << 8)), s_lo));
    a[3] = as_u32(__hmul2(as_bf162(e2m1x2_bits(w << 12)), s_hi));
}

// MXFP4: the UE8M0 scale can be as large as 2^127, so the 2^126 rebias goes on the code
// first (exact: E2M1 values are normal bf16s), then the scale.
__device__ __forceinline__ void dequant_step_mxfp4(uint32_t w, __nv_bfloat162 s_lo, __nv_bfloat162 s_hi,
                                                   uint32_t (&a)[4]) {
    const __nv_bfloat162 two126 = as_bf162(0x7E807E80u);
    a[0] = as_u32(__hmul2(__hmul2(as_bf162(e2m1x2_bits(w)), two126), s_lo));
    a[1] = as_u32(__hmul2(__hmul2(as_bf162(e2m1x2_bits(w << 4)), two126), s_hi));
    a[2] = as_u32(__hmul2(__hmul2(as_bf162(e2m1x2_bits(w << 8)), two126), s_lo));
    a[3] = as_u32(__hmul2(__hmul2(as_bf162(e2m1x2_bits(w << 12)), two126), s_hi));
}

enum class WeightFormat : int { NVFP4 = 0, MXFP4 = 1 };

// Scale bytes per row pair per 128-wide k block, and the fragment for all 8 k16 steps of a block.
template <WeightFormat kFmt>
struct FP4Block {
    static constexpr int kScaleBytesPerRowPair = kFmt == WeightFormat::NVFP4 ? 16 : 8;
    static constexpr int kScaleChunkBytes = 64 * kScaleBytesPerRowPair;
    static constexpr float kCompensation = kFmt == WeightFormat::NVFP4 ? kNvfp4Compensation : 1.0f;

    // Steps [kFirst, kFirst + kCount) of a block: codes[j] is step j's word, scales the thread's
    // row-pair scale words of the whole block; a[j - kFirst] receives step j's fragment.
    template <int kFirst, int kCount>
    __device__ __forceinline__ static void dequant(const uint32_t (&codes)[8], const uint32_t (&scales)[4],
                                                   uint32_t (&a)[kCount][4]) {
        #pragma unroll
        for (int j = kFirst; j < kFirst + kCount; ++j) {
            __nv_bfloat162 s;
            if constexpr (kFmt == WeightFormat::NVFP4) {
                s = (j & 1) ? ue4m3x2_to_bf16x2_biased<true>(scales[j / 2])
                            : ue4m3x2_to_bf16x2_biased<false>(scales[j / 2]);
                dequant_step_nvfp4(codes[j], __low2bfloat162(s), __high2bfloat162(s), a[j - kFirst]);
            } else {
                s = ((j / 2) & 1) ? ue8m0x2_to_bf16x2<true>(scales[j / 4])
                                  : ue8m0x2_to_bf16x2<false>(scales[j / 4]);
                dequant_step_mxfp4(codes[j], __low2bfloat162(s), __high2bfloat162(s), a[j - kFirst]);
            }
        }
    }
};

}  // namespace deep_gemm::sm90
