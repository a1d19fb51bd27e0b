"""Quantizers and exact dequantizers for the number formats of ``docs/design.md``.

Conventions (all of them follow the design contract):

* **E2M1** (FP4): 4-bit codes ``s e1 e0 m`` with magnitudes ``{0, .5, 1, 1.5, 2, 3, 4, 6}`` for
  codes ``0..7``; bit 3 is the sign (code 8 is negative zero).  Two codes per byte, the
  **low nibble holds the even element** (``k = 2i``), the high nibble the odd one.
* **NVFP4** (ModelOpt form): ``packed`` uint8 ``[..., N, K/2]``, ``scale`` float8_e4m3fn
  ``[..., N, K/16]`` (UE4M3, never negative), ``global_scale`` float32 (``weight_scale_2``).
  ``w = e2m1 * float(scale) * global_scale``.
* **MXFP4**: the same packing with a UE8M0 scale byte ``b`` (value ``2^(b - 127)``) per 32 along K.
* **FP8 activations**: float8_e4m3fn ``[T, K]`` with float32 scales ``[T, K / gran_k]``.

Every rounding is round-to-nearest-even and is computed in float64 by :func:`round_to_format`
(torch's own float -> float8 cast does not saturate and may double-round from float64), so each
quantizer equals a direct float64 computation bit for bit.
"""
from __future__ import annotations

from typing import Tuple

import torch

__all__ = [
    'E2M1_VALUES', 'round_to_format', 'round_to_e4m3', 'round_to_bf16',
    'e2m1_to_float', 'float_to_e2m1', 'pack_e2m1', 'unpack_e2m1',
    'cast_to_nvfp4', 'cast_to_nvfp4_experts', 'dequant_nvfp4',
    'cast_to_mxfp4', 'dequant_mxfp4',
    'per_token_cast_to_fp8', 'dequant_fp8', 'pack_ue8m0', 'unpack_ue8m0',
]

#: Value of each of the 16 E2M1 codes (code 8 is -0.0).
E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                            -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=torch.float64)

E2M1_MAX = 6.0
E4M3_MAX = 448.0
NVFP4_BLOCK = 16
MXFP4_BLOCK = 32


def round_to_format(x: torch.Tensor, sig_bits: int, min_exp: int, max_value: float) -> torch.Tensor:
    """Round float64 ``x`` to a binary floating-point format, RNE, saturating at ``max_value``.

    ``sig_bits`` counts the significand bits including the implicit one; ``min_exp`` is the
    ``torch.frexp`` exponent of the smallest normal number (values below it are subnormal and are
    rounded on that binade's grid).  Returns float64 values that are exactly representable.
    The sign (also of zero) is kept.
    """
    x = x.to(torch.float64)
    a = x.abs().clamp(max=max_value)
    _, e = torch.frexp(a)
    quantum = torch.ldexp(torch.ones_like(a), e.clamp(min=min_exp) - sig_bits)
    r = torch.round(a / quantum) * quantum  # exact scaling by powers of two; torch.round is RNE
    r = r.clamp(max=max_value)
    return torch.where(torch.signbit(x), -r, r)


def round_to_e4m3(x: torch.Tensor) -> torch.Tensor:
    """RNE to float8_e4m3fn values (subnormals included), saturating at +-448; float64 result."""
    return round_to_format(x, 4, -5, E4M3_MAX)


def round_to_bf16(x: torch.Tensor) -> torch.Tensor:
    """Single RNE rounding of float64 to BF16 (torch's float64 -> bf16 cast goes through float32)."""
    r = round_to_format(x, 8, -125, float(torch.finfo(torch.bfloat16).max))
    return r.to(torch.bfloat16)  # exact: r is representable


# ----------------------------------------------------------------------------------------- E2M1
def e2m1_to_float(codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """E2M1 codes (uint8 in ``[0, 16)``) -> values (code 8 gives -0.0)."""
    if codes.dtype != torch.uint8:
        raise TypeError(f'codes: expected uint8, got {codes.dtype}')
    return E2M1_VALUES.to(codes.device)[(codes & 0xF).long()].to(dtype)


def float_to_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Values -> E2M1 codes (uint8), round-to-nearest-even on the E2M1 grid, saturating at +-6.

    The sign bit follows ``x`` (negative values that round to zero give code 8, as the hardware
    ``cvt.rn.satfinite.e2m1x2.f32`` does).  NaN is not supported.
    """
    r = round_to_format(x.to(torch.float64), 2, 1, E2M1_MAX)
    a = r.abs()
    # magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6 -> codes 0..7
    mag = torch.where(a < 2, a * 2, torch.where(a < 4, a + 2, a / 2 + 4)).to(torch.uint8)
    return mag | (torch.signbit(r).to(torch.uint8) << 3)


def pack_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes ``[..., K]`` -> bytes ``[..., K/2]``; low nibble = even element."""
    if codes.shape[-1] % 2:
        raise ValueError(f'codes: last dimension must be even, got {codes.shape[-1]}')
    c = codes.to(torch.uint8) & 0xF
    return (c[..., 0::2] | (c[..., 1::2] << 4)).contiguous()


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """bytes ``[..., K/2]`` -> uint8 codes ``[..., K]`` (inverse of :func:`pack_e2m1`)."""
    if packed.dtype != torch.uint8:
        raise TypeError(f'packed: expected uint8, got {packed.dtype}')
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2)


# ---------------------------------------------------------------------------------------- NVFP4
def _nvfp4_with_global(w: torch.Tensor, gs: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``w [..., N, K]`` (float64) with global scale ``gs`` (float64, broadcastable to
    ``[..., 1, 1]``)."""
    *lead, n, k = w.shape
    blocks = w.reshape(*lead, n, k // NVFP4_BLOCK, NVFP4_BLOCK)
    amax = blocks.abs().amax(dim=-1)
    scale = round_to_e4m3(amax / 6.0 / gs)  # UE4M3 RNE, saturating at 448
    denom = (scale * gs).unsqueeze(-1)  # exact in float64 (4-bit x 24-bit significands)
    safe = torch.where(denom == 0, torch.ones_like(denom), denom)
    q = torch.where(denom == 0, torch.zeros_like(blocks), blocks / safe)
    codes = float_to_e2m1(q).reshape(*lead, n, k)
    return pack_e2m1(codes), scale.to(torch.float8_e4m3fn)


def _check_nvfp4_input(w: torch.Tensor, ndim: int, name: str = 'w'):
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise TypeError(f'{name}: expected a floating-point tensor, got {getattr(w, "dtype", type(w))}')
    if w.dim() != ndim:
        raise ValueError(f'{name}: expected {ndim} dimensions, got shape {tuple(w.shape)}')
    if w.shape[-1] % NVFP4_BLOCK:
        raise ValueError(f'{name}: K = {w.shape[-1]} must be a multiple of {NVFP4_BLOCK}')


def _global_scale(amax: torch.Tensor) -> torch.Tensor:
    """ModelOpt ``weight_scale_2 = amax / (6 * 448)`` in float32; 1.0 where amax == 0."""
    gs = (amax.to(torch.float32) / (E2M1_MAX * E4M3_MAX)).to(torch.float32)
    return torch.where(amax == 0, torch.ones_like(gs), gs)


def cast_to_nvfp4(w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``w [N, K]`` to NVFP4 in ModelOpt form.

    * ``global_scale = amax(|w|) / (6 * 448)`` in float32 (``1.0`` if ``amax == 0``), a 0-dim tensor;
    * per 16 along K, ``scale = UE4M3_RNE(block_amax / 6 / global_scale)``, saturating at 448
      (UE4M3 subnormals included), computed in float64;
    * ``e2m1 = E2M1_RNE(w / (scale * global_scale))`` saturating at +-6; a zero scale gives
      zero elements.

    Returns ``(packed uint8 [N, K/2], scale float8_e4m3fn [N, K/16], global_scale float32 [])``;
    low nibble = even element.
    """
    _check_nvfp4_input(w, 2)
    w64 = w.to(torch.float64)
    gs = _global_scale(w64.abs().amax() if w64.numel() else torch.zeros((), dtype=torch.float64))
    packed, scale = _nvfp4_with_global(w64, gs.to(torch.float64))
    return packed, scale, gs


def cast_to_nvfp4_experts(w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-expert :func:`cast_to_nvfp4` of ``w [E, N, K]``: returns ``(packed uint8 [E, N, K/2],
    scale float8_e4m3fn [E, N, K/16], global_scale float32 [E])``."""
    _check_nvfp4_input(w, 3)
    w64 = w.to(torch.float64)
    amax = w64.abs().flatten(1).amax(dim=1) if w64.numel() else torch.zeros(w.shape[0], dtype=torch.float64)
    gs = _global_scale(amax)
    packed, scale = _nvfp4_with_global(w64, gs.to(torch.float64).reshape(-1, 1, 1))
    return packed, scale, gs


def dequant_nvfp4(packed: torch.Tensor, scale: torch.Tensor, global_scale=None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """NVFP4 -> float: ``e2m1 * scale * global_scale``, computed in float64 and rounded once to ``dtype``.

    ``global_scale`` may be ``None`` (block-scaled values only, what the kernels' ``dequantize()``
    returns: always exact in float32), a scalar, or a tensor broadcastable to the leading
    dimensions (e.g. ``[E]`` for ``[E, N, K/2]``).  With a global scale the float32 result is the
    correctly rounded product (exact in float64).
    """
    if scale.dtype != torch.float8_e4m3fn:
        raise TypeError(f'scale: expected float8_e4m3fn, got {scale.dtype}')
    vals = e2m1_to_float(unpack_e2m1(packed), torch.float64)
    if scale.shape[-1] * NVFP4_BLOCK != vals.shape[-1] or scale.shape[:-1] != vals.shape[:-1]:
        raise ValueError(f'scale: shape {tuple(scale.shape)} does not match packed {tuple(packed.shape)}')
    out = vals * scale.to(torch.float64).repeat_interleave(NVFP4_BLOCK, dim=-1)
    if global_scale is not None:
        g = torch.as_tensor(global_scale, dtype=torch.float64, device=out.device)
        if g.dim():
            g = g.reshape(*g.shape, *([1] * (out.dim() - g.dim())))
        out = out * g
    return out.to(dtype)


# ---------------------------------------------------------------------------------------- MXFP4
def cast_to_mxfp4(w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``w [..., N, K]`` to MXFP4: per 32 along K, ``scale = 2^ceil(log2(block_amax / 6))``
    as a UE8M0 byte ``b = clamp(exponent + 127, 0, 254)`` (a zero block gets ``b = 0``), and
    ``e2m1 = E2M1_RNE(w / scale)`` saturating at +-6.  Returns ``(packed uint8 [..., N, K/2],
    scale uint8 [..., N, K/32])``."""
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise TypeError(f'w: expected a floating-point tensor, got {getattr(w, "dtype", type(w))}')
    if w.dim() < 1 or w.shape[-1] % MXFP4_BLOCK:
        raise ValueError(f'w: K must be a multiple of {MXFP4_BLOCK}, got shape {tuple(w.shape)}')
    w64 = w.to(torch.float64)
    blocks = w64.reshape(*w.shape[:-1], w.shape[-1] // MXFP4_BLOCK, MXFP4_BLOCK)
    amax = blocks.abs().amax(dim=-1) / E2M1_MAX
    m, e = torch.frexp(amax)  # amax = m * 2^e, m in [0.5, 1)
    ceil_log2 = torch.where(m == 0.5, e - 1, e)  # exact ceil(log2(amax)) for amax > 0
    b = torch.where(amax == 0, torch.zeros_like(e), (ceil_log2 + 127).clamp(0, 254))
    s = torch.ldexp(torch.ones_like(amax), b - 127).unsqueeze(-1)
    codes = float_to_e2m1(blocks / s).reshape(w.shape)
    return pack_e2m1(codes), b.to(torch.uint8)


def dequant_mxfp4(packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """MXFP4 -> float: ``e2m1 * 2^(scale - 127)`` (exact in float32)."""
    if scale.dtype != torch.uint8:
        raise TypeError(f'scale: expected uint8 (UE8M0), got {scale.dtype}')
    vals = e2m1_to_float(unpack_e2m1(packed), torch.float64)
    if scale.shape[-1] * MXFP4_BLOCK != vals.shape[-1] or scale.shape[:-1] != vals.shape[:-1]:
        raise ValueError(f'scale: shape {tuple(scale.shape)} does not match packed {tuple(packed.shape)}')
    s = torch.ldexp(torch.ones(scale.shape, dtype=torch.float64, device=scale.device), scale.long() - 127)
    return (vals * s.repeat_interleave(MXFP4_BLOCK, dim=-1)).to(dtype)


# ------------------------------------------------------------------------------ FP8 activations
def per_token_cast_to_fp8(x: torch.Tensor, gran_k: int = 128, use_ue8m0: bool = False
                          ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x [T, K]`` to FP8 E4M3 with one float32 scale per token per ``gran_k`` along K.

    ``sf = block_amax / 448`` (float32; ``1.0`` for an all-zero block), rounded UP to a power of
    two when ``use_ue8m0``; ``x_fp8 = E4M3_RNE(x / sf)`` (float64 division, saturating at 448).
    Returns ``(float8_e4m3fn [T, K], float32 [T, K / gran_k])``.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f'x: expected a floating-point tensor, got {getattr(x, "dtype", type(x))}')
    if x.dim() != 2:
        raise ValueError(f'x: expected [T, K], got shape {tuple(x.shape)}')
    if gran_k <= 0 or x.shape[1] % gran_k:
        raise ValueError(f'gran_k: K = {x.shape[1]} must be a multiple of gran_k = {gran_k}')
    t, k = x.shape
    blocks = x.to(torch.float64).reshape(t, k // gran_k, gran_k)
    amax = blocks.abs().amax(dim=-1)
    sf = (amax / E4M3_MAX).to(torch.float32).to(torch.float64)
    if use_ue8m0:
        m, e = torch.frexp(sf)
        sf = torch.ldexp(torch.ones_like(sf), torch.where(m == 0.5, e - 1, e))
    sf = torch.where(amax == 0, torch.ones_like(sf), sf)
    q = round_to_e4m3(blocks / sf.unsqueeze(-1)).reshape(t, k)
    return q.to(torch.float8_e4m3fn), sf.to(torch.float32)


def dequant_fp8(x: torch.Tensor, sf: torch.Tensor, gran_k: int = 128, dtype: torch.dtype = torch.float32
                ) -> torch.Tensor:
    """``x_fp8 [T, K] * sf [T, K / gran_k]`` computed in float64 (exact) and rounded once to ``dtype``."""
    if x.dtype != torch.float8_e4m3fn:
        raise TypeError(f'x: expected float8_e4m3fn, got {x.dtype}')
    if sf.shape[-1] * gran_k != x.shape[-1]:
        raise ValueError(f'sf: shape {tuple(sf.shape)} does not match x {tuple(x.shape)} with gran_k {gran_k}')
    return (x.to(torch.float64) * sf.to(torch.float64).repeat_interleave(gran_k, dim=-1)).to(dtype)


def pack_ue8m0(sf: torch.Tensor) -> torch.Tensor:
    """Power-of-two float32 scales ``[T, G]`` -> int32 ``[T, ceil(G / 4)]``: the exponent byte of
    group ``g`` lands in byte ``g % 4`` (little endian) of word ``g // 4``; padding bytes are 0."""
    if sf.dtype != torch.float32:
        raise TypeError(f'sf: expected float32, got {sf.dtype}')
    if sf.dim() != 2:
        raise ValueError(f'sf: expected [T, G], got shape {tuple(sf.shape)}')
    bits = sf.contiguous().view(torch.int32)
    if bool(((bits & 0x807FFFFF) != 0).any()) or bool(((bits >> 23) & 0xFF == 0xFF).any()):
        raise ValueError('sf: UE8M0 packing needs positive finite powers of two (use use_ue8m0=True)')
    t, g = sf.shape
    exp = ((bits >> 23) & 0xFF).to(torch.uint8)
    pad = (-g) % 4
    if pad:
        exp = torch.cat([exp, torch.zeros(t, pad, dtype=torch.uint8, device=sf.device)], dim=1)
    b = exp.reshape(t, -1, 4).to(torch.int64)
    words = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def unpack_ue8m0(packed: torch.Tensor, num_groups: int = None) -> torch.Tensor:
    """Inverse of :func:`pack_ue8m0`: int32 ``[T, W]`` -> float32 ``[T, num_groups]`` (default ``4 W``)."""
    if packed.dtype != torch.int32:
        raise TypeError(f'packed: expected int32, got {packed.dtype}')
    t, w = packed.shape
    num_groups = 4 * w if num_groups is None else num_groups
    p = packed.to(torch.int64) & 0xFFFFFFFF
    b = torch.stack([(p >> (8 * i)) & 0xFF for i in range(4)], dim=-1).reshape(t, 4 * w)[:, :num_groups]
    return torch.ldexp(torch.ones(b.shape, dtype=torch.float64, device=b.device), b - 127).to(torch.float32)
