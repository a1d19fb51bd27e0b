"""The error measure every kernel check and benchmark reports."""
import torch

__all__ = ['relative_error']


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64.  NaN in ``out`` raises ``ValueError``: a NaN would
    otherwise make every comparison with a tolerance false without saying why."""
    out, ref = out.double(), ref.double()
    if torch.isnan(out).any():
        raise ValueError('out: NaN in output')
    return ((out - ref).norm() / ref.norm()).item()
