#pragma once
// The NVFP4 -> BF16 dequant of the sm100 exact recipe (Recipe::NVFP4_EXACT, GemmPlan::dequant): one
// thread owns one weight row; a 16-byte chunk of its codes (32 consecutive k, 4 code words of 8 k each,
// bits permuted inside each word by deep_gemm.weights_sm100 (exact=True) for the common/fp4_bits.cuh
// trick) and the row's UE4M3 scales of the chunk's two blocks become 16 bf16x2 registers, register
// 4 w + i = (k 8 w + 2 i, k 8 w + 2 i + 1) of the chunk (low half the even k), each value
// code * scale * 2^-7, exact (the 2^7 goes back in the FP32 epilogue: fp4::kNvfp4Compensation).
//
// Cost per 8 weights (one code word): the arch-neutral e2m1x8_to_bf16x8_bits (5 LOP3 + 4 shifts,
// shared with sm90) and 4 HMUL2.BF16; per 16 weights one scale: PRMT + shift + LOP3 + 2 HMUL2.
#include <cstdint>
#include <cuda_bf16.h>

#include <deep_gemm/common/fp4_bits.cuh>

namespace deep_gemm::sm100 {

// UE4M3 byte `b` of a scale word -> bf16x2 (scale, scale) * 2^119: the byte goes to bits 4..11 of both
// halves (PRMT: bytes 0 and 2 <- byte b, bytes 1 and 3 <- 0; then << 4), from where the arch-neutral
// ue4m3x2_to_bf16x2_biased<false> masks the 7 code bits (bf16 bits 4..10: scale * 2^-120) and rebiases.
__device__ __forceinline__ __nv_bfloat162 ue4m3_byte_to_bf16x2_biased(uint32_t word, int b) {
    const uint32_t spread = __byte_perm(word, 0u, uint32_t(b) | (4u << 4) | (uint32_t(b) << 8) | (4u << 12));
    return fp4::ue4m3x2_to_bf16x2_biased<false>(spread << 4);
}

// One 32-k chunk of a row: codes[w] is the word of k 8 w .. 8 w + 7; blocks first_byte (k 0..15) and
// first_byte + 1 (k 16..31) of scale_word.
__device__ __forceinline__ void dequant_chunk_nvfp4(const uint32_t (&codes)[4], uint32_t scale_word, int first_byte,
                                                    uint32_t (&regs)[16]) {
    const __nv_bfloat162 s0 = ue4m3_byte_to_bf16x2_biased(scale_word, first_byte);
    const __nv_bfloat162 s1 = ue4m3_byte_to_bf16x2_biased(scale_word, first_byte + 1);
    #pragma unroll
    for (int w = 0; w < 4; ++w) {
        uint32_t a[4];
        const __nv_bfloat162 s = w < 2 ? s0 : s1;
        fp4::dequant_step_nvfp4(codes[w], s, s, a);
        #pragma unroll
        for (int i = 0; i < 4; ++i) regs[4 * w + i] = a[i];
    }
}

}  // namespace deep_gemm::sm100
