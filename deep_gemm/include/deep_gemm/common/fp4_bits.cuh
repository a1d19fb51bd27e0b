#pragma once
// Arch-neutral E2M1 (+ UE4M3 / UE8M0 block scale) -> BF16 bit tricks, exact: shared by the Hopper
// dequant (common/sm90_fp4.cuh, the wgmma A fragments) and the Blackwell exact recipe (the dequant
// warpgroup of impls/sm100_fp4_grouped_gemm.cuh, which stores the BF16 A operand into TMEM).  Nothing
// here depends on an architecture: 32-bit integer ops, mul.wide.u32, max.u16x2 and bf16x2 multiplies
// (sm_80+).  Moved verbatim from sm90_fp4.cuh (namespace deep_gemm::fp4; sm90_fp4.cuh re-exports the
// names into deep_gemm::sm90).
//
// Why bit tricks and not a conversion instruction: sm_90 has no e2m1 cvt, and at decode these
// ops set the energy per weight, which the board's power limit turns into time (perf-notes v7,
// v8).  A nibble `s e1 e0 m` placed at bf16 bits {15, 8, 7, 6} is the
// E2M1 value times 2^-126 (a bf16 subnormal for e = 0, which half-precision multiplies keep).
// One multiply by the block scale, pre-biased by 2^119, brings it to value * scale * 2^-7, a
// normal bf16 for every E2M1 x UE4M3 pair (E2M1 has 2 significant bits, E4M3 4, BF16 8: the
// product is exact).  The 2^7 goes back in the FP32 epilogue (kNvfp4Compensation).
//
// Code word layout (chosen by the weight transform, a pure bit permutation): the word's 8 codes are
// placed so that the four bf16x2 registers are
//     a0 = w & T,   a1 = (w << 4) & T,   a2 = rotl(w, 10) & T,
//     a3 = ((w << 6) & T_mes) | ((w >> 2) & T_e1),        T = {6, 7, 8, 15} + {0, 16}
// (T_e1 = the e1 bits {8, 24}, T_mes = the rest of T).  Every mask is one LOP3, so a word costs
// 5 LOP3 + 4 shifts instead of 8 LOP3 + 7 shifts; no layout gets one shift + one mask for all
// four registers (searched exhaustively, also with funnel shifts across up to 4 words).  The
// shifts are written so that ptxas can put them on the FMA pipe (IMAD.SHL, IMAD.WIDE for the
// rotate), next to the LOP3s on the ALU pipe.  deep_gemm/weights.py holds the same map
// (_WORD_BIT_CELL) and tests/test_fp4_bits.py emulates these exact operations.  Which codes a word
// holds is the caller's: sm90 puts the 8 codes of a wgmma A fragment (two rows) in it, sm100 the 8
// consecutive k of one row (a0 = k 0, 1; a1 = k 2, 3; a2 = k 4, 5; a3 = k 6, 7).
#include <cstdint>
#include <cuda_bf16.h>

namespace deep_gemm::fp4 {

// Multiply the accumulator by this in the epilogue for NVFP4 (MXFP4 needs none).
constexpr float kNvfp4Compensation = 128.0f;

constexpr uint32_t kE2M1Mask = 0x81C081C0u;       // T: bits {15, 8, 7, 6} of both halves
constexpr uint32_t kE2M1MaskE1 = 0x01000100u;     // T_e1
constexpr uint32_t kE2M1MaskMES = kE2M1Mask & ~kE2M1MaskE1;

__device__ __forceinline__ __nv_bfloat162 as_bf162(uint32_t x) {
    return *reinterpret_cast<__nv_bfloat162*>(&x);
}
__device__ __forceinline__ uint32_t as_u32(__nv_bfloat162 x) {
    return *reinterpret_cast<uint32_t*>(&x);
}

// w * 2^k as its two 32-bit halves: (w << k, w >> (32 - k)), one IMAD.WIDE on the FMA pipe; a
// mask LOP3 that ORs the halves makes it a rotate for free, where an SHF.L.W would use the ALU.
template <int kShift>
__device__ __forceinline__ void shl_wide(uint32_t w, uint32_t& lo, uint32_t& hi) {
    uint64_t p;
    asm("mul.wide.u32 %0, %1, %2;" : "=l"(p) : "r"(w), "n"(1u << kShift));
    lo = static_cast<uint32_t>(p), hi = static_cast<uint32_t>(p >> 32);
}

// A step's code word -> the four bf16x2 fragment registers, each value * 2^-126 (see above).
__device__ __forceinline__ void e2m1x8_to_bf16x8_bits(uint32_t w, uint32_t (&x)[4]) {
    uint32_t lo, hi;
    shl_wide<10>(w, lo, hi);
    x[0] = w & kE2M1Mask;
    x[1] = (w << 4) & kE2M1Mask;
    x[2] = (lo | hi) & kE2M1Mask;
    x[3] = ((w << 6) & kE2M1MaskMES) | ((w >> 2) & kE2M1MaskE1);
}

// A scale word (UE4M3 [s(r0, 2jp), s(r0, 2jp+1), s(r1, 2jp), s(r1, 2jp+1)], bits permuted by the
// transform) -> bf16x2 [s(r0, j), s(r1, j)] * 2^119 for step j = 2jp (kOdd = false) or 2jp + 1.
// The even step's 7-bit codes sit at bf16 bits 4..10 of each half, the odd step's 7 bits higher
// (cyclically), so one mask or one rotate + mask extracts them.  A code at bits 4..10 is the
// scale times 2^-120 as a bf16 (subnormal for UE4M3 subnormals too); two exact power-of-two
// multiplies rebias it without overflowing the bf16 range (one cannot: 2^239 is not a bf16).
template <bool kOdd>
__device__ __forceinline__ __nv_bfloat162 ue4m3x2_to_bf16x2_biased(uint32_t w) {
    uint32_t bits = w;
    if constexpr (kOdd) {
        uint32_t lo, hi;
        shl_wide<25>(w, lo, hi);      // rotr(w, 7) = (w << 25) | (w >> 7)
        bits = lo | hi;
    }
    bits &= 0x07F007F0u;
    const __nv_bfloat162 two120 = as_bf162(0x7B807B80u), two119 = as_bf162(0x7B007B00u);
    return __hmul2(__hmul2(as_bf162(bits), two120), two119);
}

// UE8M0 bytes 0 and 2 (kOdd = false) or 1 and 3 of `w` -> bf16x2 2^(b - 127).  b << 7 is that
// for b >= 1; b = 0 (2^-127) is the bf16 subnormal 0x0040, which the u16x2 max supplies.
template <bool kOdd>
__device__ __forceinline__ __nv_bfloat162 ue8m0x2_to_bf16x2(uint32_t w) {
    uint32_t d;
    asm("max.u16x2 %0, %1, %2;" : "=r"(d) : "r"(kOdd ? ((w >> 1) & 0x7F807F80u) : ((w & 0x00FF00FFu) << 7)),
                                            "r"(0x00400040u));
    return as_bf162(d);
}

// One k16 step of the A fragment (a0..a3 of wgmma m64nNk16) from the step's code word.
// s_lo / s_hi: the scale of rows g and g + 8, already broadcast to both halves.
__device__ __forceinline__ void dequant_step_nvfp4(uint32_t w, __nv_bfloat162 s_lo, __nv_bfloat162 s_hi,
                                                   uint32_t (&a)[4]) {
    uint32_t x[4];
    e2m1x8_to_bf16x8_bits(w, x);
    a[0] = as_u32(__hmul2(as_bf162(x[0]), s_lo));
    a[1] = as_u32(__hmul2(as_bf162(x[1]), s_hi));
    a[2] = as_u32(__hmul2(as_bf162(x[2]), s_lo));
    a[3] = as_u32(__hmul2(as_bf162(x[3]), s_hi));
}

// MXFP4: the UE8M0 scale can be as large as 2^127, so the 2^126 rebias goes on the code
// first (exact: E2M1 values are normal bf16s), then the scale.
__device__ __forceinline__ void dequant_step_mxfp4(uint32_t w, __nv_bfloat162 s_lo, __nv_bfloat162 s_hi,
                                                   uint32_t (&a)[4]) {
    const __nv_bfloat162 two126 = as_bf162(0x7E807E80u);
    uint32_t x[4];
    e2m1x8_to_bf16x8_bits(w, x);
    #pragma unroll
    for (int i = 0; i < 4; ++i)
        a[i] = as_u32(__hmul2(__hmul2(as_bf162(x[i]), two126), (i & 1) ? s_hi : s_lo));
}

}  // namespace deep_gemm::fp4
