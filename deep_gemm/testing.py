"""Upstream DeepGEMM's test helpers that its callers import (``deep_gemm.testing``)."""
import torch

__all__ = ['calc_diff']


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """Upstream's similarity measure ``1 - 2 sum(x y) / sum(x^2 + y^2)`` in float64 (0 for equal
    tensors).  Our own checks report ``||out - ref|| / ||ref||`` (``deep_gemm.utils.relative_error``)."""
    x, y = x.double(), y.double()
    denominator = (x * x + y * y).sum()
    if float(denominator) == 0.0:
        return 0.0
    return float(1 - 2 * (x * y).sum() / denominator)
