// Compile-only check (tests/test_mega_scheduler.py, sm_90a and sm_100a) that
// deep_gemm/scheduler/mega_moe_work.cuh builds as device code, used the way a persistent kernel
// would: the schedule in shared memory, units claimed through one global counter.
#include <deep_gemm/scheduler/mega_moe_work.cuh>

namespace {

constexpr int kMaxExperts = 64;

__global__ void claim_units(const int* counts, int num_experts, int* next, int4* units, int2* waits) {
    __shared__ deep_gemm::MegaMoEWork<kMaxExperts> work;
    __shared__ int claimed;
    if (threadIdx.x < 32) work.build_warp(counts, num_experts, 64, 48, 56, 1, 2 * gridDim.x, 2, 5, threadIdx.x);
    __syncthreads();
    for (;;) {
        if (threadIdx.x == 0) claimed = atomicAdd(next, 1);
        __syncthreads();
        const int i = claimed;
        __syncthreads();
        if (i >= work.num_units()) break;
        const deep_gemm::MegaUnit u = work.get(i);
        const deep_gemm::MegaWait w = work.wait_for(u);
        if (threadIdx.x == 0) {
            units[i] = make_int4(int(u.phase) * 1024 + u.expert, u.row_tile, u.row_start, u.num_rows);
            waits[i] = make_int2(w.counter, w.target);
        }
    }
}

}  // namespace

void* mega_moe_work_device_kernel() { return reinterpret_cast<void*>(&claim_units); }
