"""Argument checks used by every Python entry point.

Conventions: a wrong **type or dtype** raises ``TypeError``; a wrong shape, device, layout
(contiguity) or value range raises ``ValueError``.  Every message starts with the argument's
name, so ``pytest.raises(ValueError, match='topk_idx')`` style checks work.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

__all__ = ['check_tensor', 'check_expert_ids', 'check_multiple', 'check_positive_int', 'same_device',
           'check_finite', 'check_scales', 'check_activation_clamp', 'bad_ue4m3_bytes']


def same_device(a: Union[torch.device, str], b: Union[torch.device, str]) -> bool:
    """``cuda`` and ``cuda:<current>`` compare equal; otherwise type and index must match."""
    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    if a.index is None or b.index is None:
        if a.type == 'cuda' and torch.cuda.is_available():
            cur = torch.cuda.current_device()
            return (a.index if a.index is not None else cur) == (b.index if b.index is not None else cur)
        return True
    return a.index == b.index


def check_tensor(name: str, t, dtype: Optional[Union[torch.dtype, Sequence[torch.dtype]]] = None,
                 ndim: Optional[int] = None, shape: Optional[Sequence[Optional[int]]] = None,
                 device: Optional[Union[torch.device, str]] = None, contiguous: bool = True) -> torch.Tensor:
    """Check a tensor argument; ``shape`` entries that are ``None`` match any size.

    Raises ``TypeError`` if ``t`` is not a tensor or has the wrong dtype, ``ValueError`` for a
    wrong number of dimensions, shape, device or a non-contiguous tensor (when ``contiguous``).
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f'{name}: expected a torch.Tensor, got {type(t).__name__}')
    if dtype is not None:
        dtypes = (dtype,) if isinstance(dtype, torch.dtype) else tuple(dtype)
        if t.dtype not in dtypes:
            want = ' or '.join(str(d) for d in dtypes)
            raise TypeError(f'{name}: expected dtype {want}, got {t.dtype}')
    if shape is not None and ndim is None:
        ndim = len(shape)
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f'{name}: expected {ndim} dimensions, got shape {tuple(t.shape)}')
    if shape is not None:
        for i, (got, want) in enumerate(zip(t.shape, shape)):
            if want is not None and got != want:
                want_s = '(' + ', '.join('*' if s is None else str(s) for s in shape) + ')'
                raise ValueError(f'{name}: expected shape {want_s}, got {tuple(t.shape)} (dimension {i})')
    if device is not None and not same_device(t.device, device):
        raise ValueError(f'{name}: expected a tensor on {torch.device(device)}, got {t.device}')
    if contiguous and not t.is_contiguous():
        raise ValueError(f'{name}: expected a contiguous tensor')
    return t


def check_expert_ids(name: str, topk_idx: torch.Tensor, num_experts: int) -> None:
    """Every id must be -1 (masked slot) or in ``[0, num_experts)``."""
    if not isinstance(topk_idx, torch.Tensor):
        raise TypeError(f'{name}: expected a torch.Tensor, got {type(topk_idx).__name__}')
    if topk_idx.is_floating_point() or topk_idx.is_complex() or topk_idx.dtype == torch.bool:
        raise TypeError(f'{name}: expected an integer tensor, got {topk_idx.dtype}')
    if topk_idx.numel() == 0:
        return
    lo, hi = int(topk_idx.min()), int(topk_idx.max())
    if lo < -1 or hi >= num_experts:
        bad = lo if lo < -1 else hi
        raise ValueError(f'{name}: expert id {bad} out of range: ids must be -1 (masked) or in [0, {num_experts})')


def check_multiple(name: str, value: int, m: int) -> int:
    """``value`` must be a positive integer multiple of ``m``."""
    check_positive_int(name, value)
    if value % m:
        raise ValueError(f'{name}: {value} must be a multiple of {m}')
    return value


def check_positive_int(name: str, value, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f'{name}: expected an int, got {type(value).__name__}')
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f'{name}: expected a {"non-negative" if allow_zero else "positive"} integer, got {value}')
    return value


def check_finite(name: str, t: torch.Tensor) -> torch.Tensor:
    """No NaN or Inf in ``t`` (a host sync on a device tensor)."""
    if t.numel() and not bool(torch.isfinite(t).all()):
        bad = t[~torch.isfinite(t)].flatten()[0].item()
        raise ValueError(f'{name}: must be finite, found {bad}')
    return t


def check_scales(name: str, t: torch.Tensor) -> torch.Tensor:
    """Global scales and alphas: finite and positive (a zero, negative, NaN or Inf multiplier would
    silently give zero, sign-flipped, NaN or saturated outputs)."""
    check_finite(name, t)
    if t.numel() and not bool((t > 0).all()):
        raise ValueError(f'{name}: must be positive, found {t[t <= 0].flatten()[0].item()}')
    return t


def check_activation_clamp(value) -> None:
    """``activation_clamp``: None or ``c >= 0`` (upstream's rule; ``inf`` means no clamp)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f'activation_clamp: expected a float or None, got {type(value).__name__}')
    if math.isnan(value) or value < 0:
        raise ValueError(f'activation_clamp: expected a value >= 0 (or None / inf: no clamp), got {value}')


def bad_ue4m3_bytes(b: torch.Tensor) -> torch.Tensor:
    """Per byte of UE4M3 block scales (uint8): True where the sign bit is set or the code is NaN
    (0x7F / 0xFF); an unsigned E4M3 scale is neither."""
    return ((b & 0x80) != 0) | ((b & 0x7F) == 0x7F)
