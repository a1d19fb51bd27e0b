"""Quantizers and exact dequantizers for the number formats of ``docs/design.md``.

Formats:

* **E2M1** (FP4): 4-bit codes ``s e1 e0 m`` with magnitudes ``{0, .5, 1, 1.5, 2, 3, 4, 6}`` for
  codes ``0..7``; bit 3 is the sign (code 8 is negative zero).  Two codes per byte, the
  **low nibble holds the even element** (``k = 2i``), the high nibble the odd one.
* **NVFP4** (ModelOpt form): ``packed`` uint8 ``[..., N, K/2]``, ``scale`` float8_e4m3fn
  ``[..., N, K/16]`` (UE4M3, never negative), ``global_scale`` float32 (``weight_scale_2``).
  ``w = e2m1 * float(scale) * global_scale``.
* **MXFP4**: the same packing with a UE8M0 scale byte ``b`` (value ``2^(b - 127)``) per 32 along K.
* **FP8 activations**: float8_e4m3fn ``[T, K]`` with float32 scales ``[T, K / gran_k]`` (or packed UE8M0).

Rounding conventions (each one is what the function's docstring spells out, step by step):

* **E2M1** is always round-to-nearest, ties to the even code: the decision points are the
  midpoints ``0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5``; a value exactly on ``0.25, 1.25, 2.5, 5``
  rounds down (to code 0, 2, 4, 6), one exactly on ``0.75, 1.75, 3.5`` rounds up (to code 2, 4, 6);
  magnitudes above 5 saturate to 6 (code 7).  The fast code compares the quotient, in the dtype it
  was computed in, against these midpoints (``<=`` or ``<``), so no further rounding is involved.
* :func:`cast_to_nvfp4` / :func:`cast_to_nvfp4_experts` reproduce NVIDIA ModelOpt's NVFP4 weight
  quantizer (``modelopt.torch.quantization.qtensor.NVFP4QTensor.quantize``, the code that writes
  ModelOpt checkpoints) **bit for bit**, including its float32 arithmetic: that is what a user who
  re-quantizes a BF16 checkpoint expects.  Global and block scales are computed in float32, the
  E4M3 block scale is torch's float32 -> float8_e4m3fn cast (RNE) after a clamp to
  ``[2^-9, 448]``, and the element quotient ``w / (scale * global_scale)`` is one float32 division
  for BF16/FP16/float32 input (float64 for float64 input, by torch's type promotion, as in
  ModelOpt).  BF16 weights whose quotient lands exactly on a tie (e.g. 0.75) round to even, as in
  ModelOpt.  The one deliberate deviation: an all-zero matrix (global amax 0, or a float32
  ``amax / 2688`` that underflows to 0) gets ``global_scale = 1.0`` where ModelOpt divides by zero
  and writes NaN scales.
* :func:`cast_to_mxfp4` is defined by single RNE roundings of the float64 quotient; the fast code
  works in float32 and is bit for bit equal to that definition (the divisor is a power of two).
* :func:`per_token_cast_to_fp8` is upstream DeepGEMM's cast, signature and arithmetic alike (float32
  reciprocal times ``x``, torch's saturating RNE cast, ``amax`` clamped at ``1e-4``).
* :func:`round_to_format` (and :func:`round_to_e4m3`, :func:`round_to_bf16`) is the slow float64
  reference rounding: RNE, saturating, subnormals included.

Non-finite input (NaN or +-Inf) is rejected with a ``ValueError`` naming the argument, before any
output is produced.  The quantizers work on row chunks of about ``_CHUNK_ELEMS`` elements so that
the intermediates stay in cache (one 3072 x 7168 expert takes well under a second on one core).
"""
from __future__ import annotations

import math
import sys
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
E4M3_MIN_SUBNORMAL = 2.0 ** -9
NVFP4_BLOCK = 16
MXFP4_BLOCK = 32

#: E2M1 rounding midpoints and whether a value exactly on one rounds up (True) or down (False):
#: ties go to the even code.
E2M1_MIDPOINTS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))

#: Elements per row chunk of the quantizers (a few hundred KiB of float32 intermediates).
_CHUNK_ELEMS = 1 << 17


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


def _e2m1_codes(q: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """E2M1 codes (uint8) of the values ``q`` (any float dtype) with sign bits ``neg`` (bool).

    The magnitude code is ``7 - #{midpoints m : |q| <= m}`` (``<`` for the midpoints that round
    up), i.e. RNE with ties to the even code and saturation at 6; a NaN compares false everywhere
    and gives magnitude 7, as ModelOpt's ``searchsorted`` does.  ``q`` is overwritten.
    """
    a = q.abs_()
    below = torch.empty(a.shape, dtype=torch.uint8, device=a.device)
    torch.le(a, E2M1_MIDPOINTS[0][0], out=below)
    for m, up in E2M1_MIDPOINTS[1:]:
        below += (a < m) if up else (a <= m)
    code = neg.to(torch.uint8).mul_(8).add_(7)
    return code.sub_(below)


@torch.no_grad()
def float_to_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Values -> E2M1 codes (uint8), round-to-nearest-even on the E2M1 grid, saturating at +-6.

    The comparison against the midpoints is exact in the input's own dtype (ties: see
    ``E2M1_MIDPOINTS``).  The sign bit follows ``x`` (``torch.signbit``: ``-0.0`` and negative
    values that round to zero give code 8, as the hardware ``cvt.rn.satfinite.e2m1x2.f32`` does).
    NaN is not supported (it gives magnitude 7).
    """
    if not x.is_floating_point():
        x = x.to(torch.float64)
    return _e2m1_codes(x.clone(), torch.signbit(x))


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


def _pack_rows(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes ``[R, K]`` (K even, each < 16) -> bytes ``[R, K/2]``, low nibble = even element."""
    if sys.byteorder != 'little':
        return pack_e2m1(codes)
    c = codes.contiguous().view(torch.int16)  # little endian: low byte = even element
    return (c | (c >> 4)).to(torch.uint8)  # low byte: even | odd << 4


# ---------------------------------------------------------------------------------------- NVFP4
def _row_chunks(rows: int, k: int):
    step = max(1, _CHUNK_ELEMS // max(k, 1))
    for r0 in range(0, rows, step):
        yield r0, min(rows, r0 + step)


def _block_amax(w2: torch.Tensor, block: int) -> torch.Tensor:
    """Per-block ``max |w|`` of ``w2 [R, K]`` over ``block`` along K, in ``w2``'s dtype (exact;
    NaN propagates, so the result also tells whether the input was finite)."""
    r, k = w2.shape
    out = torch.empty(r, k // block, dtype=w2.dtype, device=w2.device)
    if out.numel():
        for r0, r1 in _row_chunks(r, k):
            torch.amax(w2[r0:r1].reshape(r1 - r0, k // block, block).abs(), dim=-1, out=out[r0:r1])
    return out


def _check_finite(amax: torch.Tensor, name: str):
    if amax.numel() and not bool(torch.isfinite(amax).all()):
        raise ValueError(f'{name}: contains NaN or Inf (only finite values can be quantized)')


def _check_float(w, name: str):
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise TypeError(f'{name}: expected a floating-point tensor, got {getattr(w, "dtype", type(w))}')


def _check_nvfp4_input(w: torch.Tensor, ndim: int, name: str = 'w'):
    _check_float(w, name)
    if w.dim() != ndim:
        raise ValueError(f'{name}: expected {ndim} dimensions, got shape {tuple(w.shape)}')
    if w.shape[-1] % NVFP4_BLOCK:
        raise ValueError(f'{name}: K = {w.shape[-1]} must be a multiple of {NVFP4_BLOCK}')


def _global_scale(amax: torch.Tensor) -> torch.Tensor:
    """ModelOpt ``weight_scale_2 = amax.float() / (6 * 448)``, one float32 division; ``1.0`` where
    that is 0 (all-zero input, or an amax so small that the quotient underflows)."""
    gs = amax.to(torch.float32) / (E2M1_MAX * E4M3_MAX)
    return torch.where(gs == 0, torch.ones_like(gs), gs)


def _nvfp4(w: torch.Tensor, experts: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ModelOpt NVFP4 of ``w [..., N, K]`` with one global scale per ``experts`` leading slices."""
    *lead, n, k = w.shape
    rows, nb = math.prod(lead) * n, k // NVFP4_BLOCK
    w2 = w.reshape(rows, k)
    bamax = _block_amax(w2, NVFP4_BLOCK)  # [rows, K/16], w's dtype (exact)
    _check_finite(bamax, 'w')
    if bamax.numel():
        gmax = bamax.reshape(experts, -1).amax(dim=1)
    else:
        gmax = torch.zeros(experts, dtype=w.dtype, device=w.device)
    gs = _global_scale(gmax)  # float32 [E]

    # per-block scale, float32 throughout (ModelOpt's get_weights_scaling_factor)
    six_gs = (E2M1_MAX * gs).reshape(experts, 1, 1)  # float32 product, rounded
    s = bamax.to(torch.float32).reshape(experts, n, nb) / six_gs
    s = torch.where(s == 0, torch.ones_like(s), s)  # all-zero block -> 1.0
    scale = s.clamp(min=E4M3_MIN_SUBNORMAL, max=E4M3_MAX).to(torch.float8_e4m3fn)  # torch cast: RNE
    denom = scale.to(torch.float32) * gs.reshape(experts, 1, 1)  # float32 product, rounded
    work = torch.promote_types(w.dtype, torch.float32)  # dtype of ModelOpt's `input / denom`
    denom = denom.reshape(rows, nb, 1).to(work)

    packed = torch.empty(rows, k // 2, dtype=torch.uint8, device=w.device)
    for r0, r1 in _row_chunks(rows, k):
        x = w2[r0:r1].reshape(r1 - r0, nb, NVFP4_BLOCK)
        q = torch.div(x.to(work), denom[r0:r1]).reshape(r1 - r0, k)  # one rounding in `work`
        codes = _e2m1_codes(q, q < 0)  # ModelOpt's sign: (q < 0), so -0.0 gives code 0
        packed[r0:r1] = _pack_rows(codes)
    return (packed.reshape(*lead, n, k // 2), scale.reshape(*lead, n, nb), gs)


@torch.no_grad()
def cast_to_nvfp4(w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``w [N, K]`` to NVFP4 exactly as ModelOpt's ``NVFP4QTensor.quantize(w, 16)``.

    Every step, with the dtype it is computed in (``amax`` values are exact in ``w``'s dtype):

    1. ``global_scale = float32(amax|w|) / 2688.0`` -- one float32 division (2688 = 6 * 448);
       ``1.0`` if that is 0 (all-zero ``w``; ModelOpt would divide by zero there).  0-dim tensor.
    2. per 16 along K: ``s = float32(block_amax) / float32(6 * global_scale)`` -- the product and the
       quotient each rounded to float32 (RNE); ``s = 1.0`` for an all-zero block.
    3. ``scale = float8_e4m3fn(clamp(s, 2^-9, 448))`` -- torch's cast, RNE (UE4M3 subnormals
       included; a non-zero block never gets scale 0).
    4. ``q = w / float32(float32(scale) * global_scale)`` -- the denominator product rounded to
       float32, the division done once in float32 for BF16/FP16/float32 ``w`` (float64 for
       float64 ``w``).
    5. ``e2m1 = E2M1_RNE(q)`` on ``|q|``, ties to the even code (0.25 -> 0, 0.75 -> 1.0,
       1.25 -> 1.0, 1.75 -> 2.0, 2.5 -> 2.0, 3.5 -> 4.0, 5 -> 4.0), saturating at 6; sign bit
       ``q < 0`` (so ``-0.0`` gives code 0, a small negative value code 8).

    Returns ``(packed uint8 [N, K/2], scale float8_e4m3fn [N, K/16], global_scale float32 [])``;
    low nibble = even element.  Raises ``ValueError`` for NaN or Inf in ``w``.
    """
    _check_nvfp4_input(w, 2)
    packed, scale, gs = _nvfp4(w, 1)
    return packed, scale, gs.reshape(())


@torch.no_grad()
def cast_to_nvfp4_experts(w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-expert :func:`cast_to_nvfp4` of ``w [E, N, K]`` (each expert its own global scale, as
    ModelOpt quantizes each expert's linear layer): returns ``(packed uint8 [E, N, K/2],
    scale float8_e4m3fn [E, N, K/16], global_scale float32 [E])``."""
    _check_nvfp4_input(w, 3)
    return _nvfp4(w, w.shape[0])


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
@torch.no_grad()
def cast_to_mxfp4(w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``w [..., N, K]`` to MXFP4: per 32 along K, ``scale = 2^ceil(log2(block_amax / 6))``
    as a UE8M0 byte ``b = clamp(exponent + 127, 0, 254)`` (a zero block gets ``b = 0``), and
    ``e2m1 = E2M1_RNE(w / scale)`` saturating at +-6, ties to the even code, sign bit
    ``signbit(w)`` (``-0.0`` gives code 8).  Returns ``(packed uint8 [..., N, K/2],
    scale uint8 [..., N, K/32])``.

    ``block_amax / 6`` and the exponent are computed in float64 (``frexp``, exact).  The quotient
    ``w / 2^(b - 127)`` is a division by a power of two, done in float32 for BF16/FP16/float32
    ``w`` (float64 for float64 ``w``): it is exact except where it underflows below ``2^-126``,
    which is far below the first E2M1 midpoint and keeps the sign, so the codes are those of the
    exact quotient.  Raises ``ValueError`` for NaN or Inf in ``w``.
    """
    _check_float(w, 'w')
    if w.dim() < 1 or w.shape[-1] % MXFP4_BLOCK:
        raise ValueError(f'w: K must be a multiple of {MXFP4_BLOCK}, got shape {tuple(w.shape)}')
    k = w.shape[-1]
    rows, nb = math.prod(w.shape[:-1]), k // MXFP4_BLOCK
    w2 = w.reshape(rows, k)
    bamax = _block_amax(w2, MXFP4_BLOCK)
    _check_finite(bamax, 'w')
    amax = bamax.to(torch.float64) / E2M1_MAX
    m, e = torch.frexp(amax)  # amax = m * 2^e, m in [0.5, 1)
    ceil_log2 = torch.where(m == 0.5, e - 1, e)  # exact ceil(log2(amax)) for amax > 0
    b = torch.where(amax == 0, torch.zeros_like(e), (ceil_log2 + 127).clamp(0, 254))
    work = torch.promote_types(w.dtype, torch.float32)
    s = torch.ldexp(torch.ones_like(amax), b - 127).to(work).unsqueeze(-1)  # exact: 2^-127 .. 2^127

    packed = torch.empty(rows, k // 2, dtype=torch.uint8, device=w.device)
    for r0, r1 in _row_chunks(rows, k):
        x = w2[r0:r1].reshape(r1 - r0, nb, MXFP4_BLOCK)
        q = torch.div(x.to(work), s[r0:r1]).reshape(r1 - r0, k)
        packed[r0:r1] = _pack_rows(_e2m1_codes(q, torch.signbit(q)))
    return packed.reshape(*w.shape[:-1], k // 2), b.to(torch.uint8).reshape(*w.shape[:-1], nb)


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
@torch.no_grad()
@torch.no_grad()
def per_token_cast_to_fp8(x: torch.Tensor, use_ue8m0: bool, gran_k: int = 128, use_packed_ue8m0: bool = False,
                          *, check_finite: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """Upstream DeepGEMM's activation cast, same signature and outputs: ``x [m, n]`` -> FP8 E4M3 with
    one scale per token per ``gran_k`` channels (``n`` is zero-padded to a multiple of ``gran_k``).

    ``amax = max(block max |x|, 1e-4)`` (float32), ``sf = amax / 448`` (float32), rounded up to a
    power of two when ``use_ue8m0`` (:func:`deep_gemm.utils.ceil_to_ue8m0`); ``x_fp8 =
    E4M3_RNE(x * (1 / sf))`` (the float32 reciprocal, then torch's saturating RNE cast; with
    ``use_ue8m0`` the product is exact).  An all-zero block gets ``sf = 1e-4 / 448`` (or 2^-22).

    Returns ``(float8_e4m3fn [m, n], sf)``: float32 ``[m, ceil(n / gran_k)]``, or with
    ``use_packed_ue8m0`` (needs ``use_ue8m0``) int32 ``[m, ceil(n / gran_k) / 4]``, four UE8M0 bytes
    per word, byte ``j`` = group ``4 p + j`` (the ``x_sf`` of an ``'fp8xfp4'`` buffer:
    ``per_token_cast_to_fp8(x, True, 32, True)``; an ``'fp8xnvfp4'`` buffer takes
    ``per_token_cast_to_fp8(x, False, 32)``).  Raises ``ValueError`` for NaN or Inf in ``x`` (a host
    sync; ``check_finite=False``, ours, skips it: device work only, e.g. inside a CUDA graph capture).
    """
    from .math import _check_flags, _pad, ceil_to_ue8m0, pack_ue8m0_to_int
    _check_float(x, 'x')
    if x.dim() != 2:
        raise ValueError(f'x: expected [m, n], got shape {tuple(x.shape)}')
    _check_flags(use_ue8m0, gran_k, use_packed_ue8m0)
    m, n = x.shape
    blocks = _pad(x, gran_k).view(m, -(-n // gran_k), gran_k)
    amax = blocks.abs().float().amax(dim=-1)
    if check_finite:
        _check_finite(amax, 'x')
    sf = amax.clamp(min=1e-4) / E4M3_MAX
    if use_ue8m0:
        sf = ceil_to_ue8m0(sf)
    q = (blocks * (1.0 / sf).unsqueeze(-1)).to(torch.float8_e4m3fn).view(m, blocks.shape[1] * gran_k)[:, :n]
    q = q.contiguous()
    return q, (pack_ue8m0_to_int(sf) if use_packed_ue8m0 else sf)


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
    group ``g`` lands in byte ``g % 4`` (little endian) of word ``g // 4``; padding bytes are 0.
    (Upstream's :func:`deep_gemm.utils.pack_ue8m0_to_int`, for any ``G``.)"""
    from .math import pack_ue8m0_to_int
    if sf.dtype != torch.float32:
        raise TypeError(f'sf: expected float32, got {sf.dtype}')
    if sf.dim() != 2:
        raise ValueError(f'sf: expected [T, G], got shape {tuple(sf.shape)}')
    bits = sf.contiguous().view(torch.int32)
    if bool(((bits & 0x807FFFFF) != 0).any()) or bool(((bits >> 23) & 0xFF == 0xFF).any()):
        raise ValueError('sf: UE8M0 packing needs positive finite powers of two (use use_ue8m0=True)')
    pad = (-sf.shape[1]) % 4
    if pad:
        sf = torch.cat([sf, torch.zeros(sf.shape[0], pad, dtype=sf.dtype, device=sf.device)], dim=1)
    return pack_ue8m0_to_int(sf)


def unpack_ue8m0(packed: torch.Tensor, num_groups: int = None) -> torch.Tensor:
    """Inverse of :func:`pack_ue8m0`: int32 ``[T, W]`` -> float32 ``[T, num_groups]`` (default ``4 W``)."""
    if packed.dtype != torch.int32:
        raise TypeError(f'packed: expected int32, got {packed.dtype}')
    t, w = packed.shape
    num_groups = 4 * w if num_groups is None else num_groups
    p = packed.to(torch.int64) & 0xFFFFFFFF
    b = torch.stack([(p >> (8 * i)) & 0xFF for i in range(4)], dim=-1).reshape(t, 4 * w)[:, :num_groups]
    return torch.ldexp(torch.ones(b.shape, dtype=torch.float64, device=b.device), b - 127).to(torch.float32)
