#pragma once
// The L2-input quantizations of upstream's Mega MoE recipes, one element or one block at a time
// (arch-neutral; the sm90 grouped-GEMM epilogue calls them, and the sm100 epilogue can).  Every
// function is __host__ __device__ and plain integer / IEEE float32 arithmetic, so a host C++
// program computes the same bits (tests/cpp/moe_l2_input_host.cpp, driven by
// tests/test_l2_input_host.py against deep_gemm.reference_recipes).  The one device-only piece is the
// float -> E4M3 conversion, which uses the hardware cvt.rn.satfinite.e4m3x2.f32 on sm_89 and newer:
// the same RNE-saturating rounding as the software version below (PTX ISA, cvt: ".satfinite: a value
// beyond the format's range, infinity included, becomes its largest finite value"; NaN stays NaN).
//
// fp8xfp4 / fp8xfp8 (FP8 E4M3, one power-of-two scale per 32 channels), upstream's kernel formula:
//   E  = biased exponent of amax (float32 bits 23..30)
//   E' = E + (mantissa bits of amax > mantissa bits of 1.75f)
//   sf_biased = max(E', 113) - 8,  scale = 2^(sf_biased - 127)   (in [2^-22, 2^120])
//   q = e4m3_rn_satfinite(a * 2^(127 - sf_biased))               (exact power-of-two reciprocal)
//   L2 input = q * scale
// That is deep_gemm.reference_recipes.fp8_pow2_scale: ceil_pow2(f32(max(amax, f32(1e-4)) / 448)) for
// every finite amax >= 0 (448 = 1.75 x 2^8: amax / 448 has amax's mantissa over 1.75's, so it is a
// power of two exactly when the mantissa is 1.75's, and above the next lower one whenever the mantissa
// exceeds it; f32(1e-4) = 1.6384 x 2^-14 has E = 113 and a mantissa below 1.75's, so every amax up to
// 1.75 x 2^-14 gets 2^(113 - 135) = 2^-22, an all-zero block included).
// Exactness: the product a x 2^(127 - sf_biased) is exact (2^(127 - sf_biased) is a normal float32 in
// [2^-120, 2^22], and |a x 2^k| <= 448 so it neither overflows nor, where it matters, underflows: a
// float32 product below 2^-126 rounds to a signed zero in E4M3 either way); q x scale (4 significant
// bits) is exact in float32 and in BF16 as long as it lies below 2^128: a nonzero |q x scale| is at least
// 2^-9 x 2^-22 = 2^-31 (normal in both formats).  The one extreme: amax >= 1.75 x 2^127 (E' = 255, scale 2^120) lets q
// round up to 256 when |a| x 2^-120 >= 248, and q x scale = 2^128 is +-inf in float32 and BF16 (the
// reference, in float64, keeps 2^128).  amax = +inf or NaN is not a block of finite values: the scale
// is then 2^120 / 2^121 and the elements saturate (inf -> +-448 x 2^120) or stay NaN (NaN -> 0x7F).
//
// fp4xfp4 (NVFP4, one UE4M3 scale per 16 channels, global scale g, inv_g = f32(1 / g)):
//   sf8 = e4m3_rn_satfinite(max(f32(f32(amax * f32(1/6)) * inv_g), 2^-9)),
//   code = e2m1_rn_satfinite(f32(a * f32(inv_g / sf8)));  L2 input = e2m1(code) x sf8 (x g in L2's alpha)
// as deep_gemm.reference_recipes.quantize_nvfp4_rows (finite inputs).
#include <cstdint>
#if !defined(__CUDA_ARCH__)
#include <cstring>
#endif

#include <deep_gemm/common/host_device.cuh>

namespace deep_gemm::l2_input {

DG_HOST_DEVICE uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
    return __float_as_uint(x);
#else
    uint32_t u;
    std::memcpy(&u, &x, sizeof(u));
    return u;
#endif
}

DG_HOST_DEVICE float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
    return __uint_as_float(u);
#else
    float x;
    std::memcpy(&x, &u, sizeof(x));
    return x;
#endif
}

// ------------------------------------------------------------------------------------------ E4M3
constexpr uint8_t kE4M3MaxCode = 0x7E;     // 448
constexpr uint8_t kE4M3NaN = 0x7F;

// float32 -> E4M3 (bias 7, 3 mantissa bits, subnormals m x 2^-9, max 448, no infinities), round to
// nearest even, saturating: |x| beyond 448 (and +-inf) -> +-448; NaN -> 0x7F.  The sign is kept, also
// for values that round to zero (-0 -> 0x80).  Bit-exact software version (host, and pre-sm_89 devices).
DG_HOST_DEVICE uint8_t e4m3_rn_satfinite_soft(float x) {
    const uint32_t u = float_bits(x);
    const uint8_t sign = static_cast<uint8_t>((u >> 24) & 0x80u);
    const uint32_t a = u & 0x7FFFFFFFu;
    if (a > 0x7F800000u) return kE4M3NaN;
    const int be = static_cast<int>(a >> 23);              // biased float32 exponent
    if (be == 0) return sign;                              // |x| < 2^-126: rounds to zero
    const int e = be - 127;
    if (e > 8) return sign | kE4M3MaxCode;                 // >= 512 (and inf)
    const int te = e < -6 ? -6 : e;                        // E4M3 exponent of the result's binade
    const int shift = 20 + (te - e);                       // float32 significand bits dropped
    if (shift > 25) return sign;                           // below half the smallest subnormal
    const uint32_t mant = (a & 0x7FFFFFu) | 0x800000u;     // 24-bit significand
    uint32_t r = mant >> shift;                            // units of 2^(te - 3)
    const uint32_t rem = mant & ((1u << shift) - 1u), half = 1u << (shift - 1);
    r += (rem > half || (rem == half && (r & 1u))) ? 1u : 0u;
    // r in [0, 16]: r < 8 only in the subnormal binade (te = -6); r = 16 carries into the next binade.
    // Either way the code is ((te + 6) << 3) + r (te = -6: exponent field 0 for r < 8, 1 for r >= 8).
    const int code = ((te + 6) << 3) + static_cast<int>(r);
    return sign | static_cast<uint8_t>(code > kE4M3MaxCode ? kE4M3MaxCode : code);
}

DG_HOST_DEVICE uint8_t e4m3_rn_satfinite(float x) {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 890)
    uint16_t r;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(0.0f), "f"(x));   // low byte = x
    return static_cast<uint8_t>(r & 0xFFu);
#else
    return e4m3_rn_satfinite_soft(x);
#endif
}

// E4M3 code -> its value (exact); 0x7F / 0xFF -> NaN.
DG_HOST_DEVICE float e4m3_to_float(uint8_t c) {
    const uint32_t sign = static_cast<uint32_t>(c & 0x80u) << 24;
    const uint32_t exp = (c >> 3) & 0xFu, man = c & 0x7u;
    if ((c & 0x7Fu) == 0x7Fu) return bits_float(0x7FC00000u | sign);
    if (exp == 0) return bits_float(float_bits(static_cast<float>(man) * 0.001953125f) | sign);   // m x 2^-9
    return bits_float(sign | ((exp + 120u) << 23) | (man << 20));
}

// ------------------------------------------------------------------ FP8 with power-of-two scales
constexpr int kFp8Pow2MinExponent = 113;       // biased exponent of f32(1e-4)
constexpr uint32_t kMantissa175 = 0x600000u;   // mantissa bits of 1.75f

// The biased exponent of the block scale (scale = 2^(result - 127)) of a block with amax >= 0.
DG_HOST_DEVICE int fp8_pow2_sf_biased(float amax) {
    const uint32_t u = float_bits(amax) & 0x7FFFFFFFu;
    int e = static_cast<int>(u >> 23);
    e += (u & 0x7FFFFFu) > kMantissa175 ? 1 : 0;
    return (e > kFp8Pow2MinExponent ? e : kFp8Pow2MinExponent) - 8;
}

struct Fp8Pow2Block {
    float scale;        // 2^(sf_biased - 127)
    float inv_scale;    // 2^(127 - sf_biased), exact
};

DG_HOST_DEVICE Fp8Pow2Block fp8_pow2_block(float amax) {
    const int b = fp8_pow2_sf_biased(amax);    // in [105, 248]: both powers of two are normal float32
    Fp8Pow2Block blk;
    blk.scale = bits_float(static_cast<uint32_t>(b) << 23);
    blk.inv_scale = bits_float(static_cast<uint32_t>(254 - b) << 23);
    return blk;
}

DG_HOST_DEVICE uint8_t fp8_pow2_code(float a, const Fp8Pow2Block& blk) {
    return e4m3_rn_satfinite(a * blk.inv_scale);
}

// q x scale as a float32 (exact; BF16 holds it exactly too, see the header comment for the extremes).
DG_HOST_DEVICE float fp8_pow2_value(float a, const Fp8Pow2Block& blk) {
    return e4m3_to_float(fp8_pow2_code(a, blk)) * blk.scale;
}

// ------------------------------------------------------------------------------------------ E2M1
// float32 -> E2M1 code (s e1 e0 m: 0, .5, 1, 1.5, 2, 3, 4, 6), round to nearest with ties to the even
// code, saturating at 6; the sign bit is x's (a negative value that rounds to 0 gives code 8); NaN gives
// magnitude 7, as deep_gemm.utils.quant's float_to_e2m1 (every comparison is false).
DG_HOST_DEVICE uint8_t e2m1_rn_satfinite(float x) {
    const float m = x < 0.0f ? -x : x;
    const int below = (m <= 0.25f) + (m < 0.75f) + (m <= 1.25f) + (m < 1.75f) + (m <= 2.5f) + (m < 3.5f) + (m <= 5.0f);
    const uint8_t sign = static_cast<uint8_t>((float_bits(x) >> 28) & 0x8u);
    return sign | static_cast<uint8_t>(7 - below);
}

DG_HOST_DEVICE float e2m1_to_float(uint8_t c) {
    const uint32_t mag = c & 0x7u;
    const float v = mag < 4 ? 0.5f * static_cast<float>(mag) : (mag == 7 ? 6.0f : static_cast<float>(mag - 2));
    return bits_float(float_bits(v) | (static_cast<uint32_t>(c & 0x8u) << 28));
}

// ------------------------------------------------------------------ NVFP4 with a global scale
struct Nvfp4Block {
    uint8_t sf8;        // the UE4M3 block scale's code
    float mult;         // f32(inv_g / sf8): element multiplier before the E2M1 rounding
};

DG_HOST_DEVICE Nvfp4Block nvfp4_block(float amax, float inv_g) {
    float t = amax * (1.0f / 6.0f);
    t = t * inv_g;
    t = t > 0.001953125f ? t : 0.001953125f;       // 2^-9, the smallest E4M3 subnormal: sf8 > 0
    Nvfp4Block blk;
    blk.sf8 = e4m3_rn_satfinite(t);
    blk.mult = inv_g / e4m3_to_float(blk.sf8);
    return blk;
}

DG_HOST_DEVICE uint8_t nvfp4_code(float a, const Nvfp4Block& blk) {
    return e2m1_rn_satfinite(a * blk.mult);
}

}  // namespace deep_gemm::l2_input
