#pragma once
// Row moves of dispatch and combine, shared by the kernel sequence (smxx_moe_dispatch_gather,
// smxx_moe_combine) and the fused kernel (sm90_fp8_nvfp4_mega_moe).
#include <cstdint>
#include <cuda_bf16.h>

#include <deep_gemm/comm/symm.cuh>
#include <deep_gemm/common/fp8.cuh>
#include <deep_gemm/epilogue/moe_l2_input.cuh>

namespace deep_gemm::comm {

// Dispatch: dst = BF16(x x sf) for one FP8 row of `num_v` x 16 elements (sf: one FP32 per kGranK),
// uint4 v = first, first + kStride, ...; kChunks loads in flight per thread before any store.
template <int kGranK, int kStride, int kChunks>
__device__ __forceinline__ void gather_fp8_row(const uint4* x, const float* sf, uint4* dst, int num_v, int first) {
    static_assert(kGranK % 16 == 0, "a thread's 16 elements must share one scale");
    for (int v0 = first; v0 < num_v; v0 += kStride * kChunks) {
        uint4 in[kChunks];
        float scale[kChunks];
        #pragma unroll
        for (int c = 0; c < kChunks; ++c) {
            const int v = v0 + kStride * c;
            if (v < num_v) in[c] = x[v], scale[c] = sf[v * 16 / kGranK];
        }
        #pragma unroll
        for (int c = 0; c < kChunks; ++c) {
            const int v = v0 + kStride * c;
            if (v < num_v) {
                uint4 res[2];
                e4m3x16_to_bf16x16(in[c], scale[c], res);
                dst[2 * v] = res[0];
                dst[2 * v + 1] = res[1];
            }
        }
    }
}

// Dispatch of NVFP4 tokens (fp4_fp4_mega_moe): dst = BF16(e2m1 x ue4m3) for one row of num_v x 32
// elements, 16 code bytes (low nibble first) and their two UE4M3 scales per uint4 v = first,
// first + kStride, ...  Exact: E2M1 x UE4M3 has at most 5 significant bits and lies in [2^-10, 2688],
// so the float32 product and its BF16 rounding are the value itself (no global scale here: it is in
// the L1 alphas).  Half the NVLink bytes of an FP8 row.
template <int kStride>
__device__ __forceinline__ void gather_nvfp4_row(const uint4* codes, const uint16_t* sf, uint4* dst, int num_v,
                                                 int first) {
    for (int v = first; v < num_v; v += kStride) {
        const uint4 c = codes[v];
        const uint16_t s2 = sf[v];
        const uint32_t words[4] = {c.x, c.y, c.z, c.w};
        #pragma unroll
        for (int h = 0; h < 2; ++h) {
            const float scale = l2_input::e4m3_to_float(static_cast<uint8_t>(s2 >> (8 * h)));
            uint32_t out[8];
            #pragma unroll
            for (int i = 0; i < 8; ++i) {
                const uint32_t byte = (words[2 * h + i / 4] >> (8 * (i % 4))) & 0xFFu;
                const __nv_bfloat162 b = __floats2bfloat162_rn(
                    l2_input::e2m1_to_float(static_cast<uint8_t>(byte & 0xFu)) * scale,
                    l2_input::e2m1_to_float(static_cast<uint8_t>(byte >> 4)) * scale);
                out[i] = *reinterpret_cast<const uint32_t*>(&b);
            }
            dst[4 * v + 2 * h] = make_uint4(out[0], out[1], out[2], out[3]);
            dst[4 * v + 2 * h + 1] = make_uint4(out[4], out[5], out[6], out[7]);
        }
    }
}

// Combine: the L2 output row (as uint4) of a pair routed to global expert e; nullptr for masked or
// out-of-range ids and overflowed pairs.  Not pushed: where its owner wrote it, at `row` of the
// owner's `combine` region (pulled).  Pushed (the fused kernel): the owners copied the rows of
// remote pairs into this rank's `combine_in` at row `pair` (token x k + slot); rows of this rank's
// own experts are read in place.  Offsets, not pointers: the fused combine runs under warpgroup 0's
// 56 registers, where one more live pointer spilled.
__device__ __forceinline__ const uint4* combine_source_row(const PeerBuffers peers, uint64_t combine_offset,
                                                           uint64_t combine_in_offset, bool pushed, int64_t e,
                                                           int row, size_t pair, int rank, int num_local_experts,
                                                           int num_ranks, int hidden) {
    if (e < 0 || e >= int64_t(num_ranks) * num_local_experts || row < 0) return nullptr;
    const int owner = int(e / num_local_experts);
    const bool in = pushed && owner != rank;
    return peers.at<const uint4>(in ? rank : owner, in ? combine_in_offset + uint64_t(pair) * hidden * 2
                                                       : combine_offset + uint64_t(row) * hidden * 2);
}

// Combine without pushes (the kernel sequence): the row where its owner wrote it.
__device__ __forceinline__ const uint4* expert_output_row(const PeerBuffers peers, uint64_t combine_offset,
                                                          int64_t e, int row, int num_local_experts, int num_ranks,
                                                          int hidden) {
    return combine_source_row(peers, combine_offset, 0, false, e, row, 0, 0, num_local_experts, num_ranks, hidden);
}

// Combine push: one BF16 row of num_v uint4 from src to dst (a peer's memory), uint4 v = first,
// first + kStride, ...; kChunks loads in flight per thread before its stores.  src is read with
// plain loads (written during the launch by other CTAs, ordered by the caller's acquire).
template <int kStride, int kChunks>
__device__ __forceinline__ void copy_row(const uint4* src, uint4* dst, int num_v, int first) {
    for (int v0 = first; v0 < num_v; v0 += kStride * kChunks) {
        uint4 in[kChunks];
        #pragma unroll
        for (int c = 0; c < kChunks; ++c)
            if (v0 + kStride * c < num_v) in[c] = src[v0 + kStride * c];
        #pragma unroll
        for (int c = 0; c < kChunks; ++c)
            if (v0 + kStride * c < num_v) dst[v0 + kStride * c] = in[c];
    }
}

// Combine: acc += 8 BF16 of one expert output row (FP32, in the caller's slot order).
__device__ __forceinline__ void add_bf16x8(float (&acc)[8], const uint4 w) {
    const uint32_t words[4] = {w.x, w.y, w.z, w.w};
    #pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float2 f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&words[i]));
        acc[2 * i] += f.x;
        acc[2 * i + 1] += f.y;
    }
}

// Combine, upstream's recipes (docs/design.md, "Upstream's entry points"): the steps after the routed
// sums `acc` of one uint4 v of a token (smxx_moe_combine and the fused kernel's reduce_tokens):
//   nvfp4 (fp4_fp4_mega_moe): r = bf16(sum), then r = bf16(f32(r x rsf)) if rsf != 1, then the shared
//     row added in float32 (r rounded by the caller's pack once where neither applies);
//   otherwise: the shared row (if any) is the last float32 add; rsf must be 1.
// shared_row: the token's BF16 shared-expert row, or nullptr.
__device__ __forceinline__ void combine_upstream_tail(float (&acc)[8], const __nv_bfloat16* shared_row, int v,
                                                      float rsf, bool nvfp4) {
    if (shared_row != nullptr || (nvfp4 && rsf != 1.0f)) {
        if (nvfp4) {
            #pragma unroll
            for (int i = 0; i < 8; ++i) {
                float r = __bfloat162float(__float2bfloat16_rn(acc[i]));
                if (rsf != 1.0f) r = __bfloat162float(__float2bfloat16_rn(r * rsf));
                acc[i] = r;
            }
        }
        if (shared_row != nullptr) add_bf16x8(acc, reinterpret_cast<const uint4*>(shared_row)[v]);
    }
}

// Combine: the one BF16 rounding of the sums, or NaN for a call whose barrier timed out.
__device__ __forceinline__ uint4 pack_bf16x8(const float (&acc)[8], bool nan) {
    uint32_t res[4];
    #pragma unroll
    for (int i = 0; i < 4; ++i) {
        const __nv_bfloat162 b = nan ? __float2bfloat162_rn(__int_as_float(0x7fc00000))
                                     : __floats2bfloat162_rn(acc[2 * i], acc[2 * i + 1]);
        res[i] = *reinterpret_cast<const uint32_t*>(&b);
    }
    return make_uint4(res[0], res[1], res[2], res[3]);
}

}  // namespace deep_gemm::comm
