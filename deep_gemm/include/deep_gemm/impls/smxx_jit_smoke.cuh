#pragma once

// Tiny kernels that exercise the JIT path end to end (render, nvcc, cache, load, launch, TMA).
// Self-contained on purpose: no CUTLASS, so a broken include path shows up elsewhere, not here.

#include <cuda.h>
#include <cuda_bf16.h>
#include <cstdint>

namespace deep_gemm {

// y[i] = a * x[i] + b
template <typename T, uint32_t kNumThreads>
__global__ void __launch_bounds__(kNumThreads, 1)
smxx_jit_smoke_axpb(T* __restrict__ y, const T* __restrict__ x, float a, float b, uint32_t n) {
    const uint32_t i = blockIdx.x * kNumThreads + threadIdx.x;
    if (i < n)
        y[i] = static_cast<T>(a * static_cast<float>(x[i]) + b);
}

// Same math over a row-major [rows, cols] matrix, but `x` arrives through a TMA descriptor:
// one [kBoxRows, kBoxCols] box per CTA, loaded by one thread, awaited on an mbarrier.
// `kSwizzleBytes` must match the descriptor; the box's row must span exactly the swizzle width
// (or use no swizzle) so the un-swizzle below is the plain XOR of address bits [4, 7) by [7, 10).
template <typename T, uint32_t kBoxRows, uint32_t kBoxCols, uint32_t kSwizzleBytes, uint32_t kNumThreads>
__global__ void __launch_bounds__(kNumThreads, 1)
smxx_jit_smoke_tma(T* __restrict__ y, const __grid_constant__ CUtensorMap tensor_map_x,
                   float a, float b, uint32_t rows, uint32_t cols) {
    constexpr uint32_t kRowBytes = kBoxCols * sizeof(T);
    constexpr uint32_t kBoxBytes = kBoxRows * kRowBytes;
    static_assert(kSwizzleBytes == 0 or kRowBytes == kSwizzleBytes, "box row must equal the swizzle span");
    static_assert(kRowBytes % 16 == 0, "TMA inner box must be a multiple of 16 bytes");

    // Swizzle patterns repeat every 1024 B and are computed from the absolute smem address, so
    // align the box by hand (the launcher adds 1 KiB of slack) instead of trusting `__align__`
    extern __shared__ __align__(1024) uint8_t smem_buffer[];
    __shared__ __align__(8) uint64_t full_barrier;
    const auto raw_addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem_buffer));
    const auto smem = smem_buffer + ((1024 - raw_addr % 1024) % 1024);
    const auto smem_addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
    const auto bar_addr = static_cast<uint32_t>(__cvta_generic_to_shared(&full_barrier));

    const uint32_t col0 = blockIdx.x * kBoxCols, row0 = blockIdx.y * kBoxRows;
    if (threadIdx.x == 0) {
        asm volatile("prefetch.tensormap [%0];" :: "l"(&tensor_map_x) : "memory");
        asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" :: "r"(bar_addr));
        // Make the initialised barrier visible to the async (TMA) proxy
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(bar_addr), "r"(kBoxBytes) : "memory");
        asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];"
                     :: "r"(smem_addr), "l"(&tensor_map_x), "r"(col0), "r"(row0), "r"(bar_addr) : "memory");
    }
    __syncthreads();

    // Phase 0 completes once all kBoxBytes have landed
    asm volatile("{\n"
                 ".reg .pred p;\n"
                 "WAIT:\n"
                 "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], 0;\n"
                 "@!p bra WAIT;\n"
                 "}" :: "r"(bar_addr) : "memory");

    for (uint32_t i = threadIdx.x; i < kBoxRows * kBoxCols; i += kNumThreads) {
        const uint32_t r = i / kBoxCols, c = i % kBoxCols;
        uint32_t offset = r * kRowBytes + c * static_cast<uint32_t>(sizeof(T));
        if constexpr (kSwizzleBytes > 0)
            offset ^= ((offset >> 7) & (kSwizzleBytes / 16 - 1)) << 4;
        const T value = *reinterpret_cast<const T*>(smem + offset);
        if (row0 + r < rows and col0 + c < cols)
            y[static_cast<uint64_t>(row0 + r) * cols + col0 + c] = static_cast<T>(a * static_cast<float>(value) + b);
    }
}

} // namespace deep_gemm
