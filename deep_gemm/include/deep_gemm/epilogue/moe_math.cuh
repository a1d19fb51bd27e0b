#pragma once
// Arch-neutral epilogue math shared by the grouped GEMM and the fused Mega MoE kernels.
#include <cmath>

namespace deep_gemm {

// Upstream clamp semantics: up in [-c, c], gate clamped above at c; then silu(gate) * up.
template <bool kFastMath>
__device__ __forceinline__ float swiglu(float gate, float up, float clamp) {
    up = fminf(fmaxf(up, -clamp), clamp);
    gate = fminf(gate, clamp);
    const float e = kFastMath ? __expf(-gate) : expf(-gate);
    return gate / (1.0f + e) * up;
}

}  // namespace deep_gemm
