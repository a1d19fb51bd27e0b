// Compile-only check that deep_gemm/scheduler/mega_moe_work.cuh builds in a plain C++ translation
// unit (no CUDA compiler: DG_HOST_DEVICE is plain inline).
#include <deep_gemm/scheduler/mega_moe_work.cuh>

int mega_moe_work_first_rows(const int* counts, int num_experts) {
    deep_gemm::MegaMoEWork<64> work;
    if (!work.build(counts, num_experts, 16, 48, 56, 2, 264) || work.num_units() == 0) return 0;
    return work.get(0).num_rows + work.wait_for(work.get(work.num_units() - 1)).target;
}
