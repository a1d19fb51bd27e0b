#pragma once
// BF16 wgmma with A from registers (the dequantized weights) and B (tokens) from 128B-swizzled,
// K-major shared memory, over CuTe's RS atoms.
#include <cstdint>
#include <utility>
#include <cute/arch/mma_sm90_desc.hpp>
#include <cute/arch/mma_sm90_gmma.hpp>
#include <cute/arch/mma_sm90_gmma_ext.hpp>   // N not a power of two (partial token tiles)

namespace deep_gemm::sm90 {

template <int N> struct RSAtom;
#define DG_RS_ATOM(N_) \
    template <> struct RSAtom<N_> { \
        using type = cute::SM90::GMMA::MMA_64x##N_##x16_F32BF16BF16_RS<cute::SM90::GMMA::Major::K, cute::SM90::GMMA::Major::K>; };
DG_RS_ATOM(8) DG_RS_ATOM(16) DG_RS_ATOM(24) DG_RS_ATOM(32) DG_RS_ATOM(40) DG_RS_ATOM(48) DG_RS_ATOM(56) DG_RS_ATOM(64)
DG_RS_ATOM(80) DG_RS_ATOM(96) DG_RS_ATOM(112) DG_RS_ATOM(128) DG_RS_ATOM(160) DG_RS_ATOM(192) DG_RS_ATOM(224)
DG_RS_ATOM(256)
#undef DG_RS_ATOM

// d += A(64 x 16, registers) * B(N x 16, smem)^T ; the whole warpgroup calls this.  d may be the
// accumulators of a wider tile: the first N / 2 floats per thread are this N's (same layout).
template <int N>
struct WgmmaRS {
    static constexpr int kNumAccum = N / 2;  // floats per thread
    template <int M, size_t... I>
    __device__ __forceinline__ static void call(const uint32_t (&a)[4], uint64_t desc_b, float (&d)[M],
                                                bool accumulate, std::index_sequence<I...>) {
        RSAtom<N>::type::fma(a[0], a[1], a[2], a[3], desc_b, d[I]...,
                             accumulate ? cute::SM90::GMMA::ScaleOut::One : cute::SM90::GMMA::ScaleOut::Zero);
    }
    template <int M>
    __device__ __forceinline__ static void mma(const uint32_t (&a)[4], uint64_t desc_b, float (&d)[M],
                                               bool accumulate) {
        static_assert(M >= kNumAccum, "accumulator array narrower than the MMA");
        call(a, desc_b, d, accumulate, std::make_index_sequence<kNumAccum>{});
    }
};

// Descriptor of a K-major tile whose rows are 128 bytes (64 bf16), swizzled 128B, 8-row groups
// 1024 bytes apart; smem_addr must be 1024-aligned (plus the k offset inside the 128-byte row).
__device__ __forceinline__ uint64_t make_kmajor_sw128_desc(uint32_t smem_addr) {
    cute::GmmaDescriptor desc;
    desc.bitfield.start_address_ = smem_addr >> 4;
    desc.bitfield.leading_byte_offset_ = 1;    // unused for swizzled K-major
    desc.bitfield.stride_byte_offset_ = 1024 >> 4;
    desc.bitfield.base_offset_ = 0;
    desc.bitfield.layout_type_ = 1;            // SWIZZLE_128B
    return desc.desc_;
}

}  // namespace deep_gemm::sm90
