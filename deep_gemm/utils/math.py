"""Upstream DeepGEMM's ``deep_gemm.utils`` helpers, with upstream's signatures and outputs.

Callers written for upstream (its Mega MoE tests, vLLM, SGLang) build their inputs with these:

* :func:`ceil_to_ue8m0`, :func:`pack_ue8m0_to_int`, :func:`unpack_ue8m0_from_int`: power-of-two
  scales and their UE8M0 bytes, four per int32 word, byte ``j`` of word ``p`` = group ``4 p + j``;
* :func:`per_token_cast_to_fp4`: upstream's MXFP4-style activation / weight cast (UE8M0 or float32
  scale ``amax / 6`` per ``gran_k``);
* :func:`per_token_cast_to_nvfp4`: NVFP4 (UE4M3 per 16, optional global scale), the W4A4 format of
  ``fp4_fp4_mega_moe`` (upstream keeps this cast in its test; ours is public);
* :func:`cast_back_from_fp4`, :func:`align`, :func:`ceil_div`.

``per_token_cast_to_fp8`` (same signature as upstream's) lives in :mod:`deep_gemm.utils.quant`.

Rounding, as upstream: float32 arithmetic; ``amax`` clamped below at ``1e-4`` for the MXFP4/FP8
casts (an all-zero group gets the scale ``ceil_to_ue8m0(1e-4 / 6)``, not 1); E2M1 codes of
:func:`per_token_cast_to_fp4` round ties towards zero (upstream's bucketize), those of
:func:`per_token_cast_to_nvfp4` to even (what ``cvt.rn.satfinite.e2m1x2.f32`` and upstream's NVFP4
test do); a value that rounds to zero gets the code +0 in both.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

__all__ = ['align', 'ceil_div', 'ceil_to_ue8m0', 'pack_ue8m0_to_int', 'unpack_ue8m0_from_int',
           'per_token_cast_to_fp4', 'per_token_cast_to_nvfp4', 'cast_back_from_fp4']

#: The midpoints between neighbouring E2M1 magnitudes {0, .5, 1, 1.5, 2, 3, 4, 6}.
_E2M1_MIDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def align(x: int, y: int) -> int:
    return ceil_div(x, y) * y


def ceil_div(x: int, y: int) -> int:
    return (x + y - 1) // y


def ceil_to_ue8m0(x: torch.Tensor) -> torch.Tensor:
    """The smallest power of two >= ``|x|`` (float32), kept in ``[2^-126, 2^127]``; exact powers of two
    are unchanged."""
    bits = x.abs().float().contiguous().view(torch.int32)
    exp = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(torch.int32)
    return (exp.clamp(1, 254) << 23).view(torch.float32)


def pack_ue8m0_to_int(x: torch.Tensor) -> torch.Tensor:
    """Positive power-of-two float32 scales ``[..., G]`` (``G % 4 == 0``) -> int32 ``[..., G / 4]``."""
    if x.dtype != torch.float32:
        raise TypeError(f'x: expected float32 scales, got {x.dtype}')
    if x.shape[-1] % 4:
        raise ValueError(f'x: the number of scale groups ({x.shape[-1]}) must be a multiple of 4')
    bits = x.contiguous().view(torch.int32)
    if bool(((bits & 0x807FFFFF) != 0).any()):
        raise ValueError('x: UE8M0 packing needs non-negative powers of two (cast with use_ue8m0=True)')
    return (bits >> 23).to(torch.uint8).view(torch.int32)


def unpack_ue8m0_from_int(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_ue8m0_to_int`: int32 ``[..., W]`` -> float32 ``[..., 4 W]``."""
    if packed.dtype != torch.int32:
        raise TypeError(f'packed: expected int32, got {packed.dtype}')
    return (packed.new_empty(packed.shape).copy_(packed).view(torch.uint8).to(torch.int32) << 23).view(torch.float32)


def _check_x(x, check_finite: bool = True) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f'x: expected a floating-point tensor, got {getattr(x, "dtype", type(x))}')
    if x.dim() != 2:
        raise ValueError(f'x: expected [m, n], got shape {tuple(x.shape)}')
    if check_finite and x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError('x: must be finite (NaN or Inf found)')


def _check_flags(use_ue8m0, gran_k, use_packed_ue8m0) -> None:
    if not isinstance(use_ue8m0, bool):
        raise TypeError(f'use_ue8m0: expected a bool (upstream order: (x, use_ue8m0, gran_k=128, '
                        f'use_packed_ue8m0=False)), got {type(use_ue8m0).__name__}')
    if isinstance(gran_k, bool) or not isinstance(gran_k, int) or gran_k <= 0:
        raise ValueError(f'gran_k: expected a positive int, got {gran_k!r}')
    if use_packed_ue8m0 and not use_ue8m0:
        raise ValueError('use_packed_ue8m0: packed UE8M0 scales need use_ue8m0=True')


def _pad(x: torch.Tensor, gran: int) -> torch.Tensor:
    """``x [m, n]`` zero-padded to ``[m, align(n, gran)]`` in its own dtype (upstream's padding)."""
    m, n = x.shape
    n_pad = align(n, gran)
    if n_pad == n:
        return x
    xp = torch.zeros(m, n_pad, dtype=x.dtype, device=x.device)
    xp[:, :n] = x
    return xp


def _e2m1_codes(s: torch.Tensor, ties_to_even: bool) -> torch.Tensor:
    """float32 -> E2M1 codes (uint8), saturating at 6; +0 for anything that rounds to zero.  Ties to
    even (``quant._e2m1_codes``), or towards zero (upstream's bucketize in ``per_token_cast_to_fp4``)."""
    from .quant import _e2m1_codes as rne_codes
    if ties_to_even:
        code = rne_codes(s.clone(), s < 0)
    else:
        a = s.abs()
        code = torch.zeros(s.shape, dtype=torch.uint8, device=s.device)
        for mid in _E2M1_MIDS:
            code += (a > mid).to(torch.uint8)
        code |= (s < 0).to(torch.uint8) << 3
    return torch.where(code == 8, torch.zeros_like(code), code)


def _pack_nibbles(code: torch.Tensor) -> torch.Tensor:
    from .quant import pack_e2m1
    return pack_e2m1(code).view(torch.int8)


def per_token_cast_to_fp4(x: torch.Tensor, use_ue8m0: bool, gran_k: int = 128, use_packed_ue8m0: bool = False
                          ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Upstream's FP4 cast of ``x [m, n]``: per ``gran_k`` channels ``sf = max(amax, 1e-4) / 6`` (float32,
    rounded up to a power of two when ``use_ue8m0``), codes ``E2M1(x * (1 / sf))`` with ties towards zero.

    Returns ``(int8 [m, n / 2]`` two codes per byte, low nibble = even element``, scales)``: float32
    ``[m, ceil(n / gran_k)]``, or int32 ``[m, ceil(n / gran_k) / 4]`` with ``use_packed_ue8m0``.
    """
    _check_x(x)
    _check_flags(use_ue8m0, gran_k, use_packed_ue8m0)
    m, n = x.shape
    if n % 2:
        raise ValueError(f'x: n = {n} must be even (two codes per byte)')
    blocks = _pad(x, gran_k).view(m, -(-n // gran_k), gran_k)
    sf = blocks.abs().float().amax(dim=-1).clamp(min=1e-4) / 6.0
    if use_ue8m0:
        sf = ceil_to_ue8m0(sf)
    code = _e2m1_codes(blocks * (1.0 / sf).unsqueeze(-1), ties_to_even=False).view(m, blocks.shape[1] * gran_k)
    packed = _pack_nibbles(code)[:, :n // 2].contiguous()
    return packed, (pack_ue8m0_to_int(sf) if use_packed_ue8m0 else sf)


def per_token_cast_to_nvfp4(x: torch.Tensor, global_scale: Optional[Union[float, torch.Tensor]] = None,
                            use_packed_sf: bool = True, *, check_finite: bool = True
                            ) -> Tuple[torch.Tensor, torch.Tensor]:
    """NVFP4 cast of ``x [m, n]`` (``n % 64 == 0``), the activation format of ``fp4_fp4_mega_moe``.

    Per 16 channels: ``sf = UE4M3_RNE(max(amax / 6 * (1 / global_scale), 2^-9))`` (float32 steps; 2^-9 is
    the smallest UE4M3 subnormal, so no scale is 0; saturating at 448), codes
    ``E2M1_RNE(x / (sf * global_scale))`` (ties to even, saturating at 6).  ``global_scale`` (a
    positive finite float or 0-dim tensor, None = 1) is not stored: it belongs in ``l1_alphas``.

    Returns ``(int8 [m, n / 2]``, low nibble = even element``, scales)``: with ``use_packed_sf`` int32
    ``[m, n / 64]`` (four UE4M3 bytes per word, byte ``j`` = group ``4 p + j``: ``sym_buffer.x_sf``'s
    format), else float32 ``[m, n / 16]``.  ``check_finite=False`` (ours) skips the NaN / Inf check of
    ``x`` and its host sync, e.g. inside a CUDA graph capture.
    """
    from .quant import round_to_e4m3
    _check_x(x, check_finite)
    m, n = x.shape
    if n % 64:
        raise ValueError(f'x: n = {n} must be a multiple of 64 (four UE4M3 scales per int32 word)')
    g = 1.0 if global_scale is None else float(global_scale)
    if not (g > 0 and g != float('inf')):
        raise ValueError(f'global_scale: must be finite and positive, got {global_scale!r}')
    blocks = x.float().view(m, n // 16, 16)
    inv_g = torch.tensor(1.0 / g, dtype=torch.float32)
    t = (blocks.abs().amax(dim=-1) / 6.0 * inv_g).clamp(min=2.0 ** -9)
    sf = round_to_e4m3(t).to(torch.float32)          # one RNE rounding of the float32 value, saturating
    elem = sf if global_scale is None else sf * torch.tensor(g, dtype=torch.float32)
    code = _e2m1_codes(blocks / elem.unsqueeze(-1), ties_to_even=True).reshape(m, n)
    packed = _pack_nibbles(code).contiguous()
    if use_packed_sf:
        return packed, sf.to(torch.float8_e4m3fn).view(torch.uint8).view(torch.int32)
    return packed, sf


def cast_back_from_fp4(packed: torch.Tensor, sf: torch.Tensor, gran_k: int = 128,
                       use_packed_ue8m0: bool = False) -> torch.Tensor:
    """Upstream's inverse of :func:`per_token_cast_to_fp4`: float32 ``[m, n]`` (exact)."""
    from .quant import e2m1_to_float, unpack_e2m1
    vals = e2m1_to_float(unpack_e2m1(packed.view(torch.uint8)))
    if use_packed_ue8m0:
        sf = unpack_ue8m0_from_int(sf)
    n = vals.shape[1]
    return vals * sf.float().repeat_interleave(gran_k, dim=1)[:, :n]
