// Compile-only check (tests/test_mega_roles.py, sm_90a and sm_100a) that the shared roles of the
// fused Mega MoE kernels (deep_gemm/include/deep_gemm/mega/) build as device code for both targets
// around an MMA core that is not Hopper's: here a stub with no MMA at all, whose issuing thread
// claims each unit, waits for its inputs and reports it done as one part (kParts = 1), the way a
// tcgen05 core's issuing and epilogue threads would.  The same call sequence as
// impls/sm90_fp8_nvfp4_mega_moe.cuh, with another thread layout: 256 threads, warp 0 builds the
// order and issues, warps 1-2 are the comm warps, warps 3-7 only reduce.
#include <cstdint>
#include <cuda_bf16.h>
#include <cutlass/arch/barrier.h>

#include <deep_gemm/mega/barriers.cuh>
#include <deep_gemm/mega/combine.cuh>
#include <deep_gemm/mega/comm_warps.cuh>
#include <deep_gemm/mega/row_ranges.cuh>
#include <deep_gemm/mega/state.cuh>
#include <deep_gemm/mega/trace.cuh>
#include <deep_gemm/mega/units.cuh>

namespace {

using namespace deep_gemm;

constexpr int kThreads = 256, kBlockT = 32, kMaxExperts = 16, kGranK = 32, kParts = 1;
using Comm = mega::CommWarps<2, 1>;

__global__ void __launch_bounds__(kThreads, 1)
stub_mega_moe(const uint64_t* bases, mega::Regions off, __nv_bfloat16* l1_x, comm::RowSource* row_src,
              float* row_weight, __nv_bfloat16* combine, int* expert_offsets, int* meta, int* flags, int* work_ws,
              const int64_t* topk_idx, const int* pair_row, __nv_bfloat16* y, int* stats, int rank, int num_ranks,
              int num_tokens, int max_tokens, int topk, int num_experts, int max_rows, int hidden, int inter,
              int push_combine, uint64_t timeout_ns, comm::CommError* error, uint64_t* trace) {
    __shared__ mega::Shared<kMaxExperts> sh;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, grid = gridDim.x;
    const comm::PeerBuffers peers{bases};
    const mega::WorkRegion ws{work_ws, num_experts, max_rows + num_experts};
    if (tid == 0) {
        mega::begin_call(sh, meta, num_tokens);
        cutlass::arch::ClusterBarrier::init(&sh.work_built, 32);
        cutlass::arch::fence_barrier_init();
    }
    for (int e = tid; e < num_experts; e += kThreads) sh.count[e] = 0;
    __syncthreads();
    const int epoch0 = sh.epoch0, epoch1 = sh.epoch1;
    const mega::Call call = mega::open_call(sh, peers, off, ws, meta, error, timeout_ns, rank, num_ranks);
    const mega::Pairs pairs = mega::prologue<kThreads, kBlockT, true>(
        sh, call, flags, epoch0, num_tokens, max_tokens, topk, num_experts, max_rows, expert_offsets, stats, grid, tid,
        warp, lane, trace);

    const int l1_row_tiles = 2 * inter / 128, l2_row_tiles = hidden / 128;
    const mega::Barrier1 barrier1 = mega::barrier1_of<kParts>(call, sh, l2_row_tiles, grid, epoch1);
    const mega::Units<kParts> units{call, barrier1};
    if (warp == 0) {
        mega::build_work_order<kBlockT, true>(sh, num_experts, l1_row_tiles, l2_row_tiles, 2, 2 * grid, 1 << 30,
                                              1 << 30, lane, trace);
        if (lane == 0) {
            const int num_units = sh.work.num_units();
            for (;;) {
                const int u = units.claim();
                if (u >= num_units) break;
                const MegaUnit unit = sh.work.get(u);
                const MegaWait w = sh.work.wait_for(unit);
                units.wait_inputs(unit, w);
                mega::fence_proxy_async_global();
                // (an MMA core computes the tile here; its epilogue writes h or the combine rows)
                if (unit.phase == MegaPhase::L1) units.l1_done(unit);
                else units.l2_done(unit);
            }
        }
        __syncwarp();
    } else if (warp <= Comm::kNumWarps) {
        mega::run_comm_warps<Comm, kBlockT, kGranK, 2, 1, kParts, true>(
            sh, call, pairs, barrier1, row_src, row_weight, l1_x, combine, max_rows, topk, hidden, l2_row_tiles,
            push_combine, grid, warp - 1, lane, tid == 32, trace);
    }
    mega::wait_barrier1(call, sh.aborted, flags, epoch1, lane);
    mega::reduce_tokens<kThreads>(call, topk_idx, pair_row, y, push_combine != 0, num_tokens, topk, num_experts,
                                  hidden, grid, warp, lane);
    __syncthreads();
    mega::finish_call<kThreads>(sh, ws, meta, tid, num_experts, grid, epoch0, epoch1);
}

}  // namespace

void* mega_roles_device_kernel() { return reinterpret_cast<void*>(&stub_mega_moe); }
