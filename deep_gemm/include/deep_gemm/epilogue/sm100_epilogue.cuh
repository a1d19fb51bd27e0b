#pragma once
// The per-element and per-block math of the sm100 TMEM epilogues, one home for both kernels that use them:
// the grouped GEMM (impls/sm100_fp4_grouped_gemm.cuh) and the fused Mega MoE kernel
// (impls/sm100_fp8_nvfp4_mega_moe.cuh: L1 swiglu_quant_chunk + quantize_l2_input into the L2 input,
// L2 plain_rows_chunk with the post-L2 top-k weight into the combine rows), composed from the arch-neutral epilogue/moe_math.cuh (swiglu) and epilogue/moe_l2_input.cuh (the L2-input
// quantizations).  DG_HOST_DEVICE: the kernel's epilogue callbacks call these, and so does the host check
// program tests/cpp/sm100_epilogue_check.cpp (driven by tests/test_sm100_model.py against
// deep_gemm.reference_recipes), so the rounding points checked on the host are the kernel's.
// Where the host path differs from the device path (and so is not what the check proves):
//   * BF16 rounding: software RNE here, __float2bfloat16_rn on the device (the same IEEE rounding; NaN quieted);
//   * exp: std::exp on the host, expf / __expf (kFastMath) on the device (moe_math.cuh; bit-equal only
//     where the result does not depend on exp's last bits);
//   * float -> E4M3: moe_l2_input.cuh's software conversion on the host, cvt.rn.satfinite on sm_89+.
// Index maps (which accumulator goes where) are GemmPlan's (scheduler/sm100_gemm_plan.cuh).
#include <cstdint>

#include <deep_gemm/common/host_device.cuh>
#include <deep_gemm/epilogue/moe_l2_input.cuh>
#include <deep_gemm/epilogue/moe_math.cuh>
#include <deep_gemm/scheduler/sm100_gemm_plan.cuh>
#if defined(__CUDACC__)
#include <cuda_bf16.h>
#endif

namespace deep_gemm::sm100::epi {

// BF16 bits of round-to-nearest-even(x).
DG_HOST_DEVICE uint16_t bf16_bits(float x) {
#if defined(__CUDA_ARCH__)
    return __bfloat16_as_ushort(__float2bfloat16_rn(x));
#else
    const uint32_t u = l2_input::float_bits(x);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);   // NaN: quiet
    return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
#endif
}
// bf16(x) as a float32
DG_HOST_DEVICE float bf16_round(float x) { return l2_input::bits_float(static_cast<uint32_t>(bf16_bits(x)) << 16); }

// Epilogue::Plain: out = bf16(acc * a), a = f32(alpha[e] * b_scale)
DG_HOST_DEVICE uint16_t plain_bits(float acc, float a) { return bf16_bits(acc * a); }
// The same with the top-k weight after it (the fused fp4 x fp4 kernel's L2; sm90 epilogue_weighted's
// roundings): out = bf16(f32(bf16(acc * a)) * w)
DG_HOST_DEVICE uint16_t weighted_bits(float acc, float a, float w) { return bf16_bits(bf16_round(acc * a) * w); }

// Epilogue::SwiGLU: out = bf16(f32(swiglu(acc_g * ag, acc_u * au, clamp)) * *w) (w: the token's route
// weight, or nullptr: unweighted)
template <bool kFastMath>
DG_HOST_DEVICE uint16_t swiglu_bits(float acc_g, float acc_u, float ag, float au, float clamp, const float* w) {
    float h = swiglu<kFastMath>(acc_g * ag, acc_u * au, clamp);
    if (w != nullptr) h *= *w;
    return bf16_bits(h);
}

// Epilogue::SwiGLUQuant, first pass (sm90 SwiGLUFP8's rounding points): g = bf16(acc_g * ag),
// u = bf16(acc_u * au), a = f32(swiglu(g, u, cb)) (x *w unless w is nullptr); cb = clamp_bf16(clamp).
DG_HOST_DEVICE float clamp_bf16(float clamp) { return bf16_round(clamp); }
template <bool kFastMath>
DG_HOST_DEVICE float swiglu_quant_value(float acc_g, float acc_u, float ag, float au, float cb, const float* w) {
    const float g = bf16_round(acc_g * ag);
    const float u = bf16_round(acc_u * au);
    float a = swiglu<kFastMath>(g, u, cb);
    if (w != nullptr) a *= *w;
    return a;
}

// Epilogue::SwiGLUQuant, second pass: one scale block of one token (elements src[i * kStride],
// i < kGran = the recipe's granularity) in the L2 GEMM's token format:
//   NVFP4     : words[0..1] = 16 packed E2M1 codes (element i in nibble i of the 8 bytes, low nibble first),
//               sf = l2_input::nvfp4_block(amax, l2_inv_global).sf8 (UE4M3)
//   MXFP4_FP8 : words[0..7] = 32 E4M3 codes (element i in byte i), sf = fp8_pow2_sf_biased(amax) (UE8M0)
// amax = max |src| over the block.  kAmaxGran is kGran in the kernel; another value exists only so the
// tests can show that a wrong block size is caught (tests/cpp/sm100_epilogue_check.cpp).
template <Recipe kRecipe>
struct L2Block {
    static constexpr int kWords = kRecipe == Recipe::NVFP4 ? 2 : 8;
    uint32_t words[kWords];
    uint8_t sf;
};

template <Recipe kRecipe, int kStride, int kAmaxGran = RecipeTraits<kRecipe>::kGran>
DG_HOST_DEVICE L2Block<kRecipe> quantize_l2_block(const float* src, float l2_inv_global) {
    constexpr int kGran = RecipeTraits<kRecipe>::kGran;
    static_assert(kAmaxGran <= kGran, "the amax cannot span more than the block");
    float amax = 0.0f;
    #pragma unroll
    for (int i = 0; i < kAmaxGran; ++i) amax = fmaxf(amax, fabsf(src[i * kStride]));
    L2Block<kRecipe> b;
    if constexpr (kRecipe == Recipe::NVFP4) {
        const l2_input::Nvfp4Block nb = l2_input::nvfp4_block(amax, l2_inv_global);
        b.words[0] = 0u, b.words[1] = 0u;
        #pragma unroll
        for (int i = 0; i < 16; ++i)
            b.words[i / 8] |= static_cast<uint32_t>(l2_input::nvfp4_code(src[i * kStride], nb)) << (4 * (i % 8));
        b.sf = nb.sf8;
    } else {
        const l2_input::Fp8Pow2Block fb = l2_input::fp8_pow2_block(amax);
        #pragma unroll
        for (int w = 0; w < 8; ++w) {
            b.words[w] = 0u;
            #pragma unroll
            for (int i = 0; i < 4; ++i)
                b.words[w] |= static_cast<uint32_t>(l2_input::fp8_pow2_code(src[(4 * w + i) * kStride], fb)) << (8 * i);
        }
        b.sf = static_cast<uint8_t>(l2_input::fp8_pow2_sf_biased(amax));
    }
    return b;
}

// ------------------------------------------------------------------------------------------------------
// The epilogue callbacks of the kernel, one tcgen05.ld chunk each (GemmPlan::epilogue's `epi`), over a store
// policy: the kernel stores to global / shared memory, the host check program into arrays.  Index maps:
// GemmPlan::plain_out / swiglu_out / l2_block_out.

// Non-coherent load of a read-only scalar (alpha); a plain load on the host.
DG_HOST_DEVICE float ld_nc(const float* p) {
#if defined(__CUDA_ARCH__)
    return __ldg(p);
#else
    return *p;
#endif
}
// alpha[e * stride + which] * b_scale (which: 0 = gate / the only alpha, 1 = up)
DG_HOST_DEVICE float tile_alpha(const float* alpha, int stride, int expert, int which, float b_scale) {
    return ld_nc(alpha + expert * stride + which) * b_scale;
}

// Route weights: `w` below is the tile's, w[tok] for token tok of the tile (tile.row_start + tok in the
// grouped GEMM; the fused kernel's routing weights keep the unit's unpadded rows), or nullptr: unweighted.

// Epilogue::Plain, rows form: store(tok, out_col, bf16 bits) for every valid register (tok: the tile's
// token, out_col: the weight row of the expert); kWeighted: weighted_bits with w[tok], else plain_bits.
template <class Plan, bool kWeighted, class Store>
DG_HOST_DEVICE void plain_rows_chunk(const PlanTile& tile, uint32_t lane_base, uint32_t col, int lane,
                                     const uint32_t (&regs)[16], float a, const float* w, Store&& store) {
    #pragma unroll
    for (int j = 0; j < 16; ++j) {
        const auto o = Plan::plain_out(tile, lane_base, col, lane, j);
        if (o.valid) {
            const float acc = l2_input::bits_float(regs[j]);
            if constexpr (kWeighted) store(o.tok, o.out_col, weighted_bits(acc, a, w[o.tok]));
            else store(o.tok, o.out_col, plain_bits(acc, a));
        }
    }
}

// Epilogue::Plain: store(index into D [T, n], bf16 bits) for every valid register.
template <class Plan, class Store>
DG_HOST_DEVICE void plain_chunk(const PlanTile& tile, uint32_t lane_base, uint32_t col, int lane, const uint32_t (&regs)[16],
                                float a, int n, Store&& store) {
    plain_rows_chunk<Plan, false>(tile, lane_base, col, lane, regs, a, nullptr, [&](int tok, int out_col, uint16_t v) {
        store(size_t(tile.row_start + tok) * size_t(n) + size_t(out_col), v);
    });
}

// The SwiGLU epilogues' loop over one tcgen05.ld chunk: f(o, acc_gate, acc_up, w) for every valid
// register (o: GemmPlan::SwiGLUOut; w: the token's route weight or nullptr).
template <class Plan, class F>
DG_HOST_DEVICE void swiglu_each(const PlanTile& tile, uint32_t lane_base, uint32_t col, int lane, const uint32_t (&regs)[16],
                                const float* w, F&& f) {
    #pragma unroll
    for (int j = 0; j < 16; ++j) {
        const auto o = Plan::swiglu_out(tile, lane_base, col, lane, j);
        if (o.valid)
            f(o, l2_input::bits_float(regs[o.gate_reg]), l2_input::bits_float(regs[o.up_reg]),
              w != nullptr ? w + o.tok : nullptr);
    }
}

// Epilogue::SwiGLU: store(index into the activations [T, n / 2], bf16 bits); w: the tile's route weights.
template <class Plan, bool kFastMath, class Store>
DG_HOST_DEVICE void swiglu_chunk(const PlanTile& tile, uint32_t lane_base, uint32_t col, int lane, const uint32_t (&regs)[16],
                                 float ag, float au, float clamp, const float* w, int n, Store&& store) {
    swiglu_each<Plan>(tile, lane_base, col, lane, regs, w, [&](const auto& o, float g, float u, const float* wt) {
        store(size_t(o.token_row) * size_t(n / 2) + size_t(o.chan), swiglu_bits<kFastMath>(g, u, ag, au, clamp, wt));
    });
}

// bf16_mega_moe's L1 (sm90 epilogue_swiglu_requant<L2Input::BF16>, SwiGLUQuant's first pass then one BF16
// rounding): store(index into the activations [T, n / 2], bf16(swiglu_quant_value(...))); cb = clamp_bf16(clamp).
template <class Plan, bool kFastMath, class Store>
DG_HOST_DEVICE void swiglu_bf16_chunk(const PlanTile& tile, uint32_t lane_base, uint32_t col, int lane,
                                      const uint32_t (&regs)[16], float ag, float au, float cb, const float* w, int n,
                                      Store&& store) {
    swiglu_each<Plan>(tile, lane_base, col, lane, regs, w, [&](const auto& o, float g, float u, const float* wt) {
        store(size_t(o.token_row) * size_t(n / 2) + size_t(o.chan),
              bf16_bits(swiglu_quant_value<kFastMath>(g, u, ag, au, cb, wt)));
    });
}

// Epilogue::SwiGLUQuant, first pass: the activations into scratch [kBlockM / 2 channels][kTileN tokens];
// w: the tile's route weights.
template <class Plan, bool kFastMath>
DG_HOST_DEVICE void swiglu_quant_chunk(const PlanTile& tile, uint32_t lane_base, uint32_t col, int lane, const uint32_t (&regs)[16],
                                       float ag, float au, float cb, const float* w, float* scratch) {
    swiglu_each<Plan>(tile, lane_base, col, lane, regs, w, [&](const auto& o, float g, float u, const float* wt) {
        scratch[o.tile_chan * Plan::kTileN + o.tok] = swiglu_quant_value<kFastMath>(g, u, ag, au, cb, wt);
    });
}

// Epilogue::SwiGLUQuant, second pass (thread tid of nthreads, after the first pass of every thread):
// store(const L2BlockOut&, const L2Block&) for each valid (scale block, token) of the tile.
template <class Plan, class Store, int kAmaxGran = Plan::kL2Gran>
DG_HOST_DEVICE void l2_quant_tile(const PlanTile& tile, int tid, int nthreads, const float* scratch, int inter,
                                  float l2_inv_global, Store&& store) {
    for (int p = tid; p < Plan::kL2Blocks * Plan::kTileN; p += nthreads) {
        const auto o = Plan::l2_block_out(tile, p, inter);
        if (!o.valid) continue;
        store(o, quantize_l2_block<Plan::kTileRecipe, Plan::kTileN, kAmaxGran>(scratch + o.src, l2_inv_global));
    }
}

// The second pass into the L2 GEMM's token tensors (its kTensorB codes and kTensorSFB scales; rows
// tile.row_start + tok): one 8-byte (NVFP4) or two 16-byte (MXFP4_FP8) stores of codes per block, one
// scale byte.  The grouped GEMM's SwiGLUQuant epilogue and the fused kernel's L1 epilogue; on the host
// (the fused kernel's functional model, tests/cpp/sm100_fused_model_emit.cpp) the same words stored
// byte by byte, little-endian as on the device.
template <class Plan>
DG_HOST_DEVICE void quantize_l2_input(const PlanTile& tile, int tid, int nthreads, const float* scratch, int inter,
                                      float l2_inv_global, uint8_t* codes, uint8_t* sf) {
    l2_quant_tile<Plan>(tile, tid, nthreads, scratch, inter, l2_inv_global,
        [&](const typename Plan::L2BlockOut& o, const L2Block<Plan::kTileRecipe>& b) {
#if !defined(__CUDA_ARCH__)
            for (int w = 0; w < L2Block<Plan::kTileRecipe>::kWords; ++w)
                for (int i = 0; i < 4; ++i) codes[o.code_byte + uint64_t(4 * w + i)] = static_cast<uint8_t>(b.words[w] >> (8 * i));
#else
            if constexpr (Plan::kTileRecipe == Recipe::NVFP4) {
                *reinterpret_cast<uint2*>(codes + o.code_byte) = make_uint2(b.words[0], b.words[1]);
            } else {
                uint4* dst = reinterpret_cast<uint4*>(codes + o.code_byte);
                dst[0] = make_uint4(b.words[0], b.words[1], b.words[2], b.words[3]);
                dst[1] = make_uint4(b.words[4], b.words[5], b.words[6], b.words[7]);
            }
#endif
            sf[o.sf_byte] = b.sf;
        });
}

}  // namespace deep_gemm::sm100::epi
