// MegaMoEWork::build_warp (one warp, the fused kernel's path) against build() (one thread, which
// tests/cpp/mega_moe_work_sim.cu checks on the host), one case per block:
//   params[8 b ..]: num_experts, block_t, l1_row_tiles, l2_row_tiles, lookahead_experts,
//                   lookahead_units, l1_token_group, l2_token_group
//   counts[kMaxExperts b ..]
//   out[2 (kWords + 1) b ..]: build_warp's struct and result, then build()'s; both structs start
//   poisoned, so a field that one of them leaves unset differs.  (Past num_active, and in an order
//   that build refuses, the arrays hold whatever each left there.)
// tests/gpu/test_mega_scheduler_gpu.py compiles it with the JIT and compares the halves; CPU CI
// compiles it for sm_90a and sm_100a (tests/test_mega_scheduler.py).
#include <deep_gemm/scheduler/mega_moe_work.cuh>

namespace {

constexpr int kMaxExperts = 256;
using Work = deep_gemm::MegaMoEWork<kMaxExperts>;
constexpr int kWords = sizeof(Work) / 4;

}  // namespace

extern "C" __global__ void __launch_bounds__(64) mega_moe_work_build_warp(const int* params, const int* counts, int* out) {
    __shared__ Work work[2];
    const int* p = params + 8 * blockIdx.x;
    const int* c = counts + kMaxExperts * blockIdx.x;
    int* words = reinterpret_cast<int*>(work);
    for (int i = threadIdx.x; i < 2 * kWords; i += blockDim.x) words[i] = 0x7eadbeef;
    __syncthreads();
    __shared__ int ok[2];
    if (threadIdx.x < 32) {
        const bool r = work[0].build_warp(c, p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], threadIdx.x);
        if (threadIdx.x == 0) ok[0] = r;
    } else if (threadIdx.x == 32) {
        ok[1] = work[1].build(c, p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7]);
    }
    __syncthreads();
    int* o = out + 2 * (kWords + 1) * blockIdx.x;
    for (int i = threadIdx.x; i < kWords; i += blockDim.x) {
        o[i] = words[i];
        o[kWords + 1 + i] = words[kWords + i];
    }
    if (threadIdx.x == 0) o[kWords] = ok[0], o[2 * kWords + 1] = ok[1];
}
