#pragma once
// Device building blocks of the sm100 kernels (tcgen05 / TMEM / TMA), and `DeviceOps`, the device
// policy of scheduler/sm100_gemm_plan.cuh's Ops interface.  CuTe's SM100 atoms where one exists:
//   TMEM alloc / dealloc / relinquish   cute::TMEM::Allocator1Sm
//   tcgen05.mma kind::mxf4nvf4 .block16 cute::SM100_MMA_MXF4_SS<..., VS = 16, ...> (spells .block16 with nvcc >= 12.9)
//   tcgen05.cp 32x128b.warpx4           cute::SM100::TMEM::UTCCP::SM100_UTCCP_4x32dp128bit_1cta
//   tcgen05.ld                          cute::SM100::TMEM::LOAD::SM100_TMEM_LOAD_32dp32b16x / SM100_TMEM_LOAD_16dp256b4x
//   tcgen05.st (exact recipe)           cute::SM100::TMEM::STORE::SM100_TMEM_STORE_32dp32b16x
//   tcgen05.wait::st                    cutlass::arch::fence_view_async_tmem_store
//   tcgen05.mma kind::f16 TS / SS       cute::SM100_MMA_F16BF16_TS / SM100_MMA_F16BF16_SS (BF16 x BF16 -> F32)
//   tcgen05.wait::ld                    cutlass::arch::fence_view_async_tmem_load
//   tcgen05.commit                      cutlass::arch::umma_arrive
//   TMA / bulk copies, mbarriers        cute::SM90_TMA_LOAD_2D, cute::SM90_BULK_COPY_G2S, cutlass::arch barriers
// Hand PTX where CuTe has none: tcgen05.fence::{before,after}_thread_sync, and
// tcgen05.mma kind::mxf8f6f4.block_scale.block32 (CuTe's SM100_MMA_MXF8F6F4_SS omits the .block32
// suffix; we spell it, as the PTX ISA allows).
#include <cstdint>
#include <cuda.h>

#include <cute/arch/copy_sm100.hpp>
#include <cute/arch/copy_sm90_tma.hpp>
#include <cute/arch/mma_sm100_umma.hpp>
#include <cute/arch/tmem_allocator_sm100.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/numeric_types.h>

#include <deep_gemm/common/sm100_dequant.cuh>
#include <deep_gemm/common/sm100_umma.cuh>
#include <deep_gemm/scheduler/sm100_gemm_plan.cuh>

namespace deep_gemm::sm100 {

__device__ __forceinline__ void tcgen05_fence_before_thread_sync() {
    asm volatile("tcgen05.fence::before_thread_sync;" ::: "memory");
}
__device__ __forceinline__ void tcgen05_fence_after_thread_sync() {
    asm volatile("tcgen05.fence::after_thread_sync;" ::: "memory");
}

__device__ __forceinline__ void tmem_alloc(uint32_t* smem_slot, int num_columns) {
    cute::TMEM::Allocator1Sm().allocate(num_columns, smem_slot);
}
__device__ __forceinline__ void tmem_relinquish() { cute::TMEM::Allocator1Sm().release_allocation_lock(); }
__device__ __forceinline__ void tmem_dealloc(uint32_t taddr, int num_columns) {
    cute::TMEM::Allocator1Sm().free(taddr, num_columns);
}

// tcgen05.mma.cta_group::1.kind::mxf8f6f4.block_scale.block32: one thread issues.
__device__ __forceinline__ void umma_mxf8f6f4_block32(uint64_t adesc, uint64_t bdesc, uint32_t d_taddr, uint32_t idesc,
                                                      uint32_t sfa_taddr, uint32_t sfb_taddr, bool accumulate) {
    asm volatile(
        "{\n\t.reg .pred p;\n\t"
        "setp.ne.b32 p, %4, 0;\n\t"
        "tcgen05.mma.cta_group::1.kind::mxf8f6f4.block_scale.block32 [%0], %1, %2, %3, [%5], [%6], p;\n\t}\n"
        :: "r"(d_taddr), "l"(adesc), "l"(bdesc), "r"(idesc), "r"(uint32_t(accumulate)), "r"(sfa_taddr), "r"(sfb_taddr));
}

// The device policy of GemmPlan (see the Ops interface in scheduler/sm100_gemm_plan.cuh).  `smem` is
// the generic pointer of the plan's aligned base, `smem_base` its shared-window address.
template <int kBlockN>
struct DeviceOps {
    uint8_t* smem;
    uint32_t smem_base;
    uint64_t* bars;
    const CUtensorMap* a_map;
    const CUtensorMap* b_map;
    const uint8_t* sfa;
    const uint8_t* sfb;

    __device__ __forceinline__ void* smem_ptr(uint32_t addr) const { return smem + (addr - smem_base); }

    __device__ __forceinline__ void init_barrier(int id, int count) const {
        cutlass::arch::ClusterBarrier::init(bars + id, uint32_t(count));
    }
    __device__ __forceinline__ void wait(int id, uint32_t phase) const {
        cutlass::arch::ClusterBarrier::wait(bars + id, phase);
    }
    __device__ __forceinline__ void arrive(int id) const { cutlass::arch::ClusterBarrier::arrive(bars + id); }
    __device__ __forceinline__ void arrive_expect_tx(int id, uint32_t bytes) const {
        cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(bars + id, bytes);
    }
    // The box is baked into the tensor map (the host encodes it as the plan's box).
    __device__ __forceinline__ void tma_load(int tensor_id, const int32_t (&coords)[2], const uint32_t (&)[2],
                                             uint32_t smem_addr, int, int mbar_id) const {
        const CUtensorMap* map = tensor_id == kTensorA ? a_map : b_map;
        cute::SM90_TMA_LOAD_2D::copy(map, bars + mbar_id, static_cast<uint64_t>(cute::TMA::CacheHintSm90::EVICT_NORMAL),
                                     smem_ptr(smem_addr), coords[0], coords[1]);
    }
    __device__ __forceinline__ void bulk_copy(int tensor_id, uint64_t offset, uint32_t bytes, uint32_t smem_addr,
                                              int mbar_id) const {
        const uint8_t* base = tensor_id == kTensorSFA ? sfa : sfb;
        cute::SM90_BULK_COPY_G2S::copy(base + offset, bars + mbar_id, smem_ptr(smem_addr), int32_t(bytes));
    }
    __device__ __forceinline__ void fence_after_sync() const { tcgen05_fence_after_thread_sync(); }
    __device__ __forceinline__ void fence_before_sync() const { tcgen05_fence_before_thread_sync(); }

    // MMA-warp operations: the whole warp calls them, one lane issues.
    __device__ __forceinline__ void utccp(uint64_t desc, uint32_t taddr, UtccpShape) const {
        if (cute::elect_one_sync()) cute::SM100::TMEM::UTCCP::SM100_UTCCP_4x32dp128bit_1cta::copy(desc, taddr);
    }
    __device__ __forceinline__ void mma(MmaKind kind, uint32_t idesc, uint64_t adesc, uint64_t bdesc, uint32_t d_taddr,
                                        uint32_t sfa_taddr, uint32_t sfb_taddr, bool accumulate) const {
        if (kind == MmaKind::MXF4NVF4_BLOCK16) {
            // elects one lane itself; the descriptor travels in the upper half of its 64-bit argument
            cute::SM100_MMA_MXF4_SS<cutlass::float_e2m1_t, cutlass::float_e2m1_t, float, cutlass::float_ue4m3_t,
                                    128, kBlockN, 16, cute::UMMA::Major::K, cute::UMMA::Major::K>::
                fma(adesc, bdesc, d_taddr, uint32_t(accumulate), uint64_t(idesc) << 32, sfa_taddr, sfb_taddr);
        } else if (kind == MmaKind::F16) {
            // kind::f16 SS (Recipe::BF16): BF16 x BF16 -> FP32, both operands K-major in shared memory;
            // elects one lane itself
            cute::SM100_MMA_F16BF16_SS<cutlass::bfloat16_t, cutlass::bfloat16_t, float, 128, kBlockN, cute::UMMA::Major::K,
                                       cute::UMMA::Major::K>::fma(adesc, bdesc, d_taddr, uint32_t(accumulate), uint64_t(idesc) << 32);
        } else {
            if (cute::elect_one_sync()) umma_mxf8f6f4_block32(adesc, bdesc, d_taddr, idesc, sfa_taddr, sfb_taddr, accumulate);
        }
    }
    // kind::f16 TS (Recipe::NVFP4_EXACT): A (BF16, K-major) from TMEM at a_taddr, B by descriptor
    __device__ __forceinline__ void mma_ts(uint32_t idesc, uint32_t a_taddr, uint64_t bdesc, uint32_t d_taddr,
                                           bool accumulate) const {
        cute::SM100_MMA_F16BF16_TS<cutlass::bfloat16_t, cutlass::bfloat16_t, float, 128, kBlockN, cute::UMMA::Major::K,
                                   cute::UMMA::Major::K>::fma(a_taddr, bdesc, d_taddr, uint32_t(accumulate), uint64_t(idesc) << 32);
    }

    // Dequant-warpgroup operations (GemmPlan::dequant, Recipe::NVFP4_EXACT): every thread calls them.
    __device__ __forceinline__ void lds128(uint32_t addr, uint32_t (&v)[4]) const {
        asm volatile("ld.shared.v4.b32 {%0, %1, %2, %3}, [%4];" : "=r"(v[0]), "=r"(v[1]), "=r"(v[2]), "=r"(v[3]) : "r"(addr));
    }
    __device__ __forceinline__ uint32_t lds32(uint32_t addr) const {
        uint32_t v;
        asm volatile("ld.shared.b32 %0, [%1];" : "=r"(v) : "r"(addr));
        return v;
    }
    __device__ __forceinline__ void warp_arrive(int id, int lane) const {
        __syncwarp();
        if (lane == 0) arrive(id);
    }
    __device__ __forceinline__ void dequant_chunk(const uint32_t (&codes)[4], uint32_t scale_word, int first_byte,
                                                  uint32_t (&regs)[16]) const {
        dequant_chunk_nvfp4(codes, scale_word, first_byte, regs);
    }
    template <int kNum>
    __device__ __forceinline__ void tmem_st(int, int, uint32_t taddr, const uint32_t (&r)[kNum]) const {
        static_assert(kNum == 16, "only .x16 of 32x32b is wired");
        cute::SM100::TMEM::STORE::SM100_TMEM_STORE_32dp32b16x::copy(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9],
                                                                   r[10], r[11], r[12], r[13], r[14], r[15], taddr);
    }
    __device__ __forceinline__ void tmem_st_wait() const { cutlass::arch::fence_view_async_tmem_store(); }
    __device__ __forceinline__ void commit(int mbar_id) const { cutlass::arch::umma_arrive(bars + mbar_id); }

    template <TmemLdShape kShape, int kNum>
    __device__ __forceinline__ void tmem_ld(int, int, uint32_t taddr, uint32_t (&r)[kTmemLdRegs<kShape, kNum>]) const {
        if constexpr (kShape == TmemLdShape::K32x32B) {
            static_assert(kNum == 16, "only .x16 of 32x32b is wired");
            cute::SM100::TMEM::LOAD::SM100_TMEM_LOAD_32dp32b16x::copy(taddr, r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9],
                                                   r[10], r[11], r[12], r[13], r[14], r[15]);
        } else {
            static_assert(kNum == 4, "only .x4 of 16x256b is wired");
            cute::SM100::TMEM::LOAD::SM100_TMEM_LOAD_16dp256b4x::copy(taddr, r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9],
                                                   r[10], r[11], r[12], r[13], r[14], r[15]);
        }
    }
    __device__ __forceinline__ void tmem_ld_wait() const { cutlass::arch::fence_view_async_tmem_load(); }
};

}  // namespace deep_gemm::sm100
