#pragma once
// Arch-neutral epilogue math shared by the grouped GEMM and the fused Mega MoE kernels.
// DG_HOST_DEVICE: host programs (tests/cpp/sm100_epilogue_check.cpp) call the same function; on the host
// exp is std::exp (kFastMath's __expf is device-only), so host and device agree bit for bit only where
// the result does not depend on exp's last bits (e.g. gate >= 18, where 1 + exp(-gate) rounds to 1).
#include <cmath>

#include <deep_gemm/common/host_device.cuh>

namespace deep_gemm {

// Upstream clamp semantics: up in [-c, c], gate clamped above at c; then silu(gate) * up.
template <bool kFastMath>
DG_HOST_DEVICE float swiglu(float gate, float up, float clamp) {
    up = fminf(fmaxf(up, -clamp), clamp);
    gate = fminf(gate, clamp);
#if defined(__CUDA_ARCH__)
    const float e = kFastMath ? __expf(-gate) : expf(-gate);
#else
    const float e = std::exp(-gate);
#endif
    return gate / (1.0f + e) * up;
}

}  // namespace deep_gemm
