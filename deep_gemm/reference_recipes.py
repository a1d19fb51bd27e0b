"""Reference numerics of upstream DeepGEMM's three Mega MoE entry points (one function, three recipes).

:func:`reference_recipe_moe` computes the layer for ``recipe`` in

* ``'fp8xfp4'`` / ``'fp8xfp8'`` -- ``fp8_fp4_mega_moe``: FP8 activations with power-of-two scales
  per 32, MXFP4 or FP8 weights with UE8M0 scales per 32;
* ``'bf16xbf16'`` -- ``bf16_mega_moe``;
* ``'fp4xfp4'`` -- ``fp4_fp4_mega_moe``: NVFP4 activations and weights (E2M1 x UE4M3 per 16),
  per-expert alphas, per-expert L2-input global scale ``a2``, routed scaling factor, BF16 shared
  experts;

from the *exact dequantized* operands (float32 tensors holding the values E2M1 x scale, FP8 x 2^k,
BF16, ...), on one process or across the ranks of a ``torch.distributed`` group.

Model
-----
The tensor-core accumulations are modelled as exact sums (see :func:`exact_rows_matmul`); every
operation of the kernels' epilogues and combine is modelled with the rounding of the instruction
the kernel uses (``bf16()`` = RNE to BF16, ``f32()`` = RNE to float32, i.e. an IEEE float32
operation).  ``fast_math`` is not modelled: exponential and divisions are the accurate ones.
For each (token t, slot j) with ``e = topk_idx[t, j] >= 0`` (``e`` local to the rank that owns it)
and ``w = topk_weights[t, j]``:

1. L1: ``acc = x[t] @ W1[e]^T`` (exact), ``gate = acc[:I]``, ``up = acc[I:]``.
2. BF16 gate/up:

   * fp8 / bf16 recipes: ``g = bf16(gate)``, ``u = bf16(up)`` (one rounding of the exact sum);
   * fp4xfp4: ``g = bf16(f32(gate * alpha_g))``, ``u = bf16(f32(up * alpha_u))``
     (``l1_alphas[e] = (alpha_g, alpha_u)``, default 1; the product is formed in float64 from the
     float64 accumulation and rounded to float32 once, then to BF16).
3. Clamp, if ``activation_clamp = c`` is given: ``cb = bf16(f32(c))`` (the kernel takes ``c`` as a
   float32 constant and converts it to BF16), ``g = min(g, cb)``, ``u = min(max(u, -cb), cb)``.
4. ``s = f32(g / (1 + exp(-g)))``: evaluated in float64 (``math.exp``; ``exp`` overflowing to
   ``+inf`` gives ``-0.0``) and rounded once to float32.  ``g`` is a BF16 value, so ``s`` is a
   65536-entry table (:func:`silu_f32`).
5. The L2 input ``h`` and the slot row ``o`` (BF16 ``[H]``):

   * fp8xfp4 / fp8xfp8: ``a = f32(f32(s * u) * w)``; FP8 requantization per 32 consecutive
     intermediate channels (:func:`quantize_fp8_pow2_rows`): ``sf = ceil_pow2(f32(max(amax32,
     f32(1e-4)) / 448))``, ``q = e4m3_rne_satfinite(a / sf)``, ``h = q * sf``;
     ``o = bf16(h @ W2[e]^T)``.
   * bf16xbf16: ``h = bf16(f32(f32(s * u) * w))``; ``o = bf16(h @ W2[e]^T)``.
   * fp4xfp4: ``a = f32(s * u)`` (**unweighted**); NVFP4 requantization per 16 consecutive
     intermediate channels with ``inv_a2 = f32(1 / a2[e])`` (:func:`quantize_nvfp4_rows`):
     ``sf8 = e4m3_rne_satfinite(max(f32(f32(amax16 * f32(1/6)) * inv_a2), 2^-9))``,
     ``q = e2m1_rne_satfinite(f32(a * f32(inv_a2 / sf8)))``, ``h = q * sf8`` (no ``a2``);
     ``p = bf16(f32(L2acc * f32(l2_alpha[e] * a2[e])))`` with ``L2acc = h @ W2[e]^T``;
     then the top-k weight **after** L2: ``o = bf16(f32(p * w))``.
6. Shared expert (``shared_w1`` ``[2S, H]``, ``shared_w2`` ``[H, S]``, input ``x_shared``; one
   expert of intermediate size ``S``), computed on the token's own rank, weight 1, no alphas:
   the fp8 recipes use path 5 of the fp8 recipes (FP8 requant per 32 of ``f32(s * u)``), the
   bf16xbf16 and fp4xfp4 recipes the BF16 path: ``h = bf16(f32(s * u))``,
   ``shared = bf16(h @ W2s^T)``.
7. Combine on the token's rank, slots in increasing ``j`` (masked slots skipped), float32 adds
   starting from +0:

   * fp8 / bf16 recipes: ``r = sum_j f32(o_j)``, then ``r = f32(r + shared)``; ``y = bf16(r)``.
   * fp4xfp4: ``r = sum_j f32(o_j)``; with shared experts or ``f32(rsf) != 1``: ``r = bf16(r)``;
     if ``f32(rsf) != 1``: ``r = bf16(f32(r * f32(rsf)))``; with shared experts
     ``r = f32(r + shared)``; ``y = bf16(r)``.  ``rsf`` does not scale the shared row.

``cumulative_local_expert_recv_stats`` (int32 ``[E_l]``) is incremented by the number of
(token, slot) pairs each local expert received from all ranks.  Overflow beyond the BF16/FP32
range is not modelled (BF16 roundings of float64 values saturate; float32 products may give inf).

Determinism.  Every result row depends only on its own token's values: L1/L2 products are formed
band by band with exact partial sums (:func:`exact_rows_matmul`), everything else is element-wise
or per row.  So a multi-rank run equals the single-process run on the concatenated tokens bit for
bit.  This needs operands with at most 8 significant bits, which holds for every recipe's format
(E2M1 x UE4M3: 6, FP8 x 2^k: 4, BF16: 8); the inputs are checked to be BF16-representable.
"""
from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Optional, Tuple

import torch

from .reference import _group_size, combine_slots, gather_tokens, return_rows
from .utils.quant import e2m1_to_float, float_to_e2m1, round_to_bf16, round_to_e4m3
from .utils.validation import check_activation_clamp, check_expert_ids, check_finite, check_scales, check_tensor

__all__ = ['RECIPES', 'reference_recipe_moe', 'recipe_expert_forward', 'combine_recipe',
           'quantize_nvfp4_rows', 'dequantize_nvfp4_rows', 'quantize_fp8_pow2_rows',
           'exact_rows_matmul', 'silu_f32', 'fp8_pow2_scale']

#: Recipe string -> path of the routed experts' epilogues.
RECIPES = {'fp8xfp4': 'fp8', 'fp8xfp8': 'fp8', 'bf16xbf16': 'bf16', 'fp4xfp4': 'nvfp4'}
#: Path of the shared expert per routed path.
_SHARED_PATH = {'fp8': 'fp8', 'bf16': 'bf16', 'nvfp4': 'bf16'}

FP8_GRAN = 32
NVFP4_GRAN = 16
_F32 = torch.float32
_F64 = torch.float64
_FP8_AMAX_FLOOR = torch.tensor(1e-4, dtype=_F32)        # f32(1e-4), the host cast's clamp
_FP8_MAX = torch.tensor(448.0, dtype=_F32)
_SIXTH = torch.tensor(1.0 / 6.0, dtype=_F32)             # f32(1/6) == the kernel's 1.0f / 6.0f
_MIN_SF8 = torch.tensor(2.0 ** -9, dtype=_F32)           # smallest E4M3 subnormal
_SIG_BITS = 8                                            # significant bits of every operand (BF16)
_NO_BAND = -(1 << 30)


# ------------------------------------------------------------------------------------ SiLU
_SILU_LUT: Optional[torch.Tensor] = None


def _silu_table() -> torch.Tensor:
    global _SILU_LUT
    if _SILU_LUT is None:
        bits = torch.arange(65536, dtype=torch.int64)
        vals = torch.where(bits >= 32768, bits - 65536, bits).to(torch.int16).view(torch.bfloat16)
        out = []
        for g in vals.to(_F64).tolist():
            try:
                e = math.exp(-g)
            except OverflowError:
                e = math.inf
            out.append(g / (1.0 + e) if g == g else g)
        _SILU_LUT = torch.tensor(out, dtype=_F64).to(_F32)  # one RNE rounding float64 -> float32
    return _SILU_LUT


def silu_f32(g: torch.Tensor) -> torch.Tensor:
    """``f32(g / (1 + exp(-g)))`` for BF16-valued ``g`` (any float dtype; values must be BF16):
    the quotient is evaluated in float64 with ``math.exp`` (``+inf`` where ``exp`` overflows, so
    ``g << 0`` gives ``-0.0``) and rounded once to float32.  Returns float32, ``g``'s shape."""
    idx = g.to(torch.bfloat16).view(torch.int16).to(torch.int64) & 0xFFFF
    lut = _silu_table().to(g.device)
    return lut[idx]


# ------------------------------------------------------------------------------- exact matmul
def _bands(v: torch.Tensor, width: int) -> torch.Tensor:
    _, e = torch.frexp(v)
    b = torch.div(e, width, rounding_mode='floor')
    return torch.where(v == 0, torch.full_like(b, _NO_BAND), b)


def exact_rows_matmul(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``a @ w^T`` in float64 (``a [R, K]``, ``w [N, K]``, both with at most 8 significant bits per
    element, e.g. BF16 values), such that row ``r`` of the result depends only on ``a[r]`` and ``w``.

    Both operands are split into exponent bands of ``B = (53 - 16 - ceil(log2 K)) // 2`` binades
    (``torch.frexp`` exponent // B).  For one band of ``a`` and one band of ``w`` every product is a
    multiple of ``Q = 2^((ba + bw) B - 16)`` below ``Q 2^(2B + 16)``, so any partial sum of K of them
    is exact in float64, whatever order or blocking the matmul uses.  The band-pair products are
    added element-wise in increasing ``(ba + bw, ba)``: exact when the row's sum fits in 53 bits
    (the usual case for FP8 / FP4 operands), otherwise float64-accurate, and in every case the same
    bits for a row whatever the other rows are.
    """
    if a.dtype != _F64 or w.dtype != _F64:
        raise TypeError(f'a, w: expected float64, got {a.dtype}, {w.dtype}')
    r, k = a.shape
    n = w.shape[0]
    if w.shape[1] != k:
        raise ValueError(f'w: expected [N, {k}], got {tuple(w.shape)}')
    acc = torch.zeros(r, n, dtype=_F64, device=a.device)
    if r == 0 or n == 0 or k == 0:
        return acc
    width = (53 - 2 * _SIG_BITS - (k - 1).bit_length()) // 2
    if width < 1:
        raise ValueError(f'a: K = {k} is too large for exact band products')
    ba, bw = _bands(a, width), _bands(w, width)
    a_ids = [b for b in torch.unique(ba).tolist() if b != _NO_BAND]
    w_ids = [b for b in torch.unique(bw).tolist() if b != _NO_BAND]
    zero_a, zero_w = torch.zeros_like(a), torch.zeros_like(w)
    a_parts = {b: torch.where(ba == b, a, zero_a) for b in a_ids}
    w_parts = {b: torch.where(bw == b, w, zero_w).t() for b in w_ids}
    for sa, sw in sorted(((sa, sw) for sa in a_ids for sw in w_ids), key=lambda p: (p[0] + p[1], p[0])):
        acc = acc + a_parts[sa] @ w_parts[sw]
    return acc


# --------------------------------------------------------------------------- requantization
def fp8_pow2_scale(amax: torch.Tensor) -> torch.Tensor:
    """Upstream's host rule for a power-of-two FP8 scale from a float32 block amax:
    ``ceil_pow2(f32(max(amax, f32(1e-4)) / 448))`` -- the float32 clamp, one float32 division,
    then the smallest power of two >= the quotient (exponent kept within 2^-126 .. 2^127, as
    ``ceil_to_ue8m0``).  An all-zero block gets ``2^-22``.  Returns float32."""
    ratio = torch.maximum(amax.to(_F32), _FP8_AMAX_FLOOR.to(amax.device)) / _FP8_MAX.to(amax.device)
    bits = ratio.view(torch.int32)
    exp = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(torch.int32)
    return (exp.clamp(1, 254) << 23).view(_F32)


def _fp8_pow2(a: torch.Tensor, gran: int) -> Tuple[torch.Tensor, torch.Tensor]:
    r, k = a.shape
    blocks = a.reshape(r, k // gran, gran)
    sf = fp8_pow2_scale(blocks.abs().amax(-1))
    q = round_to_e4m3(blocks.to(_F64) / sf.to(_F64).unsqueeze(-1))  # exact division by 2^k, one RNE
    return q.reshape(r, k).to(torch.float8_e4m3fn), sf


def quantize_fp8_pow2_rows(a: torch.Tensor, gran: int = FP8_GRAN) -> Tuple[torch.Tensor, torch.Tensor]:
    """FP8 E4M3 with one power-of-two scale per ``gran`` consecutive elements of a row (the L2-input
    requantization of ``fp8_fp4_mega_moe``, and upstream's ``per_token_cast_to_fp8(x,
    use_ue8m0=True, gran_k=gran)`` on float32 input).

    ``sf = fp8_pow2_scale(amax)`` (see there: float32 clamp at ``f32(1e-4)``, float32 division by
    448, smallest power of two >= it); ``q = e4m3_rne_satfinite(a / sf)`` -- one RNE rounding of the
    exact quotient (``1/sf`` is a power of two), subnormals included, sign kept, saturating at 448
    (never reached: ``|a| / sf <= 448``).  ``a``: float32 ``[R, K]``, ``K % gran == 0``, finite.
    Returns ``(q float8_e4m3fn [R, K], sf float32 [R, K / gran])``; ``a == q * sf`` up to FP8 rounding.
    """
    check_tensor('a', a, dtype=_F32, ndim=2, contiguous=False)
    if isinstance(gran, bool) or not isinstance(gran, int) or gran <= 0:
        raise ValueError(f'gran: expected a positive int, got {gran!r}')
    if a.shape[1] % gran:
        raise ValueError(f'a: K = {a.shape[1]} must be a multiple of gran = {gran}')
    check_finite('a', a)
    return _fp8_pow2(a, gran)


def _nvfp4(a: torch.Tensor, inv: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``a`` float32 ``[R, K]``, ``inv`` float32 ``[R]`` (``f32(1 / global_scale)``)."""
    r, k = a.shape
    blocks = a.reshape(r, k // NVFP4_GRAN, NVFP4_GRAN)
    dev = a.device
    amax = blocks.abs().amax(-1)
    inv = inv.reshape(r, 1)
    t = amax * _SIXTH.to(dev)                         # f32(amax * f32(1/6))
    t = t * inv                                       # f32(... * inv_a2)
    t = torch.maximum(t, _MIN_SF8.to(dev))            # never below 2^-9: sf8 > 0
    sf8 = round_to_e4m3(t.to(_F64)).to(_F32)          # RNE, satfinite (448)
    sf_inv = inv / sf8                                # f32(inv_a2 / sf8)
    scaled = blocks * sf_inv.unsqueeze(-1)            # f32(a * sf_inv)
    codes = float_to_e2m1(scaled.reshape(r, k))       # RNE ties to even code, saturating at 6
    return codes, sf8.to(torch.float8_e4m3fn)


def _inv_global(global_scale, rows: int, device) -> torch.Tensor:
    if global_scale is None:
        return torch.ones(rows, dtype=_F32, device=device)
    if isinstance(global_scale, bool):
        raise TypeError('global_scale: expected a float, a float32 tensor or None, got bool')
    if isinstance(global_scale, (int, float)):
        gs = torch.full((rows,), float(global_scale), dtype=_F32, device=device)
    elif isinstance(global_scale, torch.Tensor):
        check_tensor('global_scale', global_scale, dtype=_F32, contiguous=False)
        if global_scale.dim() == 0:
            gs = global_scale.reshape(1).expand(rows).to(device)
        elif global_scale.shape == (rows,):
            gs = global_scale.to(device)
        else:
            raise ValueError(f'global_scale: expected a scalar or shape ({rows},), got {tuple(global_scale.shape)}')
    else:
        raise TypeError(f'global_scale: expected a float, a float32 tensor or None, got {type(global_scale).__name__}')
    check_scales('global_scale', gs)
    return torch.ones_like(gs) / gs                   # f32(1 / global_scale)


def quantize_nvfp4_rows(a: torch.Tensor, global_scale=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """NVFP4 with one UE4M3 scale per 16 consecutive elements of a row, normalized by a global scale
    (the L2-input requantization of ``fp4_fp4_mega_moe``, with ``global_scale = a2``), float32 steps:

    1. ``inv = f32(1 / global_scale)`` (1 for ``None``);
    2. ``t = f32(f32(amax16 * f32(1/6)) * inv)`` -- multiplication by the float32 constant ``1/6``
       first, as the kernel does (``amax * (1.0f / 6.0f) * inv_global``; not a division by 6);
    3. ``sf8 = e4m3_rne_satfinite(max(t, 2^-9))`` -- RNE (ties to even mantissa), E4M3 subnormals
       included, saturating at 448; never 0;
    4. ``code = e2m1_rne_satfinite(f32(a * f32(inv / sf8)))`` -- decision points 0.25, 0.75, 1.25,
       1.75, 2.5, 3.5, 5 with ties to the even code (0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2,
       2.5 -> 2, 3.5 -> 4, 5 -> 4), magnitudes above 5 give 6; sign bit = ``signbit`` (a negative
       value that rounds to 0 gives code 8, -0).

    The dequantized value is ``e2m1(code) * sf8 * global_scale`` (the kernel's L2 applies
    ``global_scale`` through its alpha).  ``a``: float32 ``[R, K]``, ``K % 16 == 0``, finite;
    ``global_scale``: None, a positive finite scalar, or float32 ``[R]`` (one per row).
    Returns ``(codes uint8 [R, K], sf8 float8_e4m3fn [R, K / 16])``.
    """
    check_tensor('a', a, dtype=_F32, ndim=2, contiguous=False)
    if a.shape[1] % NVFP4_GRAN:
        raise ValueError(f'a: K = {a.shape[1]} must be a multiple of {NVFP4_GRAN}')
    check_finite('a', a)
    inv = _inv_global(global_scale, a.shape[0], a.device)
    return _nvfp4(a, inv)


def dequantize_nvfp4_rows(codes: torch.Tensor, sf8: torch.Tensor) -> torch.Tensor:
    """``e2m1(codes) * sf8`` (per 16 along a row) as float32 (exact); no global scale."""
    check_tensor('codes', codes, dtype=torch.uint8, ndim=2, contiguous=False)
    check_tensor('sf8', sf8, dtype=torch.float8_e4m3fn, shape=(codes.shape[0], codes.shape[1] // NVFP4_GRAN),
                 contiguous=False)
    if codes.shape[1] % NVFP4_GRAN:
        raise ValueError(f'codes: K = {codes.shape[1]} must be a multiple of {NVFP4_GRAN}')
    v = e2m1_to_float(codes, _F64) * sf8.to(_F64).repeat_interleave(NVFP4_GRAN, dim=1)
    return v.to(_F32)


# ------------------------------------------------------------------------------ one expert
def _clamp_bf16(c) -> Optional[float]:
    """``bf16(f32(c))`` as a Python float, or None for no clamp."""
    if c is None or c == math.inf:
        return None
    return float(torch.tensor(float(c), dtype=_F32).to(torch.bfloat16).item())


def recipe_expert_forward(path: str, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                          topk_weights: Optional[torch.Tensor] = None, activation_clamp=None,
                          l1_alpha: Tuple[float, float] = (1.0, 1.0), l2_alpha: float = 1.0,
                          a2_scale: float = 1.0) -> torch.Tensor:
    """Rows of one expert (steps 1-5 of the module docstring), no argument checks.

    ``path``: ``'fp8'`` (fp8xfp4 / fp8xfp8 and their shared expert), ``'bf16'`` (bf16xbf16, and
    the shared expert of bf16xbf16 and fp4xfp4) or ``'nvfp4'`` (fp4xfp4 routed).  ``x`` ``[r, H]``,
    ``w1`` ``[2I, H]`` (gate rows then up rows), ``w2`` ``[H, I]``: BF16-representable values.
    ``topk_weights``: float32 ``[r]`` or None (weight 1: the shared expert).  ``l1_alpha``,
    ``l2_alpha``, ``a2_scale``: float32 values (Python floats), used by ``'nvfp4'`` only.
    Returns bf16 ``[r, H]``.
    """
    r = x.shape[0]
    hidden = w2.shape[0]
    if r == 0:
        return torch.zeros(0, hidden, dtype=torch.bfloat16, device=x.device)
    w1 = torch.as_tensor(w1).to(device=x.device, dtype=_F64)
    w2 = torch.as_tensor(w2).to(device=x.device, dtype=_F64)
    inter = w1.shape[0] // 2
    acc = exact_rows_matmul(x.to(_F64), w1)
    gate, up = acc[:, :inter], acc[:, inter:]
    if path == 'nvfp4':
        g = (gate * float(l1_alpha[0])).to(_F32).to(torch.bfloat16).to(_F32)
        u = (up * float(l1_alpha[1])).to(_F32).to(torch.bfloat16).to(_F32)
    else:
        g = round_to_bf16(gate).to(_F32)
        u = round_to_bf16(up).to(_F32)
    cb = _clamp_bf16(activation_clamp)
    if cb is not None:
        g = torch.clamp(g, max=cb)
        u = torch.clamp(u, min=-cb, max=cb)
    a = silu_f32(g) * u                                                   # f32(s * u)
    wt = None if topk_weights is None else topk_weights.to(device=x.device, dtype=_F32).reshape(r, 1)
    if path == 'fp8':
        if wt is not None:
            a = a * wt                                                    # f32(a * w)
        q, sf = _fp8_pow2(a, FP8_GRAN)
        h = q.to(_F64) * sf.to(_F64).repeat_interleave(FP8_GRAN, dim=1)
    elif path == 'bf16':
        if wt is not None:
            a = a * wt
        h = a.to(torch.bfloat16).to(_F64)
    elif path == 'nvfp4':
        a2 = torch.tensor(float(a2_scale), dtype=_F32)
        inv = (torch.ones((), dtype=_F32) / a2).to(x.device).expand(r)
        codes, sf8 = _nvfp4(a, inv)
        h = e2m1_to_float(codes, _F64) * sf8.to(_F64).repeat_interleave(NVFP4_GRAN, dim=1)
    else:
        raise ValueError(f'path: expected fp8, bf16 or nvfp4, got {path!r}')
    acc2 = exact_rows_matmul(h, w2)
    if path != 'nvfp4':
        return round_to_bf16(acc2)
    l2s = float(torch.tensor(float(l2_alpha), dtype=_F32) * a2)           # f32(l2_alpha * a2)
    p = (acc2 * l2s).to(_F32).to(torch.bfloat16)
    if wt is not None:
        p = (p.to(_F32) * wt).to(torch.bfloat16)                          # top-k weight after L2
    return p


def combine_recipe(rows: torch.Tensor, topk_idx: torch.Tensor, shared: Optional[torch.Tensor] = None,
                   routed_scaling_factor: float = 1.0, nvfp4: bool = False) -> torch.Tensor:
    """Step 7 of the module docstring.  ``rows`` bf16 ``[T, k, H]`` (masked slots ignored),
    ``topk_idx`` ``[T, k]``, ``shared`` bf16 ``[T, H]`` or None.  With ``nvfp4=False`` (fp8 / bf16
    recipes) the shared row is the last float32 add and ``routed_scaling_factor`` must be 1."""
    t, _, hidden = rows.shape
    if not nvfp4:
        if routed_scaling_factor != 1.0:
            raise ValueError('routed_scaling_factor: only the fp4xfp4 combine has one')
        if shared is None:
            return combine_slots(rows, topk_idx)
        ones = torch.zeros(t, 1, dtype=topk_idx.dtype, device=topk_idx.device)
        return combine_slots(torch.cat([rows, shared.unsqueeze(1)], 1), torch.cat([topk_idx, ones], 1))
    r = combine_slots(rows, topk_idx)                 # bf16(sum of routed slots in float32)
    rsf = torch.tensor(float(routed_scaling_factor), dtype=_F32)
    if shared is None and float(rsf) == 1.0:
        return r
    if float(rsf) != 1.0:
        r = (r.to(_F32) * rsf.to(r.device)).to(torch.bfloat16)
    if shared is None:
        return r
    return (r.to(_F32) + shared.to(_F32)).to(torch.bfloat16)


# ------------------------------------------------------------------------------- validation
def _check_bf16_values(name: str, t: torch.Tensor) -> None:
    check_finite(name, t)
    if t.numel() and not torch.equal(t.to(torch.bfloat16).to(t.dtype), t):
        raise ValueError(f'{name}: values must be exactly representable in BF16 (the exact dequantized '
                         f'operands of the recipe: FP8 x 2^k, E2M1 x scale, BF16)')


def _check_weight(name: str, w, shape) -> torch.Tensor:
    w = torch.as_tensor(w) if not isinstance(w, torch.Tensor) else w
    if not w.is_floating_point():
        raise TypeError(f'{name}: expected a floating-point tensor, got {w.dtype}')
    if tuple(w.shape) != tuple(shape):
        raise ValueError(f'{name}: expected shape {tuple(shape)}, got {tuple(w.shape)}')
    _check_bf16_values(name, w)
    return w


def _check_alphas(name: str, t, shape):
    if t is None:
        return None
    check_tensor(name, t, dtype=_F32, shape=shape, contiguous=False)
    check_scales(name, t)
    return t


def _validate(recipe, x, topk_idx, topk_weights, w1, w2, world, num_experts, l1_alphas, l2_alphas,
              a2_scales, routed_scaling_factor, shared_w1, shared_w2, x_shared, activation_clamp, stats):
    if not isinstance(recipe, str):
        raise TypeError(f'recipe: expected a str, got {type(recipe).__name__}')
    if recipe not in RECIPES:
        raise ValueError(f'recipe: expected one of {", ".join(RECIPES)}, got {recipe!r}')
    path = RECIPES[recipe]
    check_tensor('x', x, dtype=_F32, ndim=2, contiguous=False)
    t, hidden = x.shape
    if hidden == 0:
        raise ValueError('x: hidden size must be positive')
    _check_bf16_values('x', x)
    check_tensor('topk_idx', topk_idx, dtype=torch.int64, ndim=2, shape=(t, None), device=x.device,
                 contiguous=False)
    k = topk_idx.shape[1]
    if k == 0:
        raise ValueError('topk_idx: expected at least one slot per token')
    check_tensor('topk_weights', topk_weights, dtype=_F32, shape=(t, k), device=x.device, contiguous=False)
    check_finite('topk_weights', topk_weights[topk_idx >= 0])
    for name, w in (('w1', w1), ('w2', w2)):
        if isinstance(w, torch.Tensor) and w.dim() != 3:
            raise ValueError(f'{name}: expected [E_local, N, K], got shape {tuple(w.shape)}')
        if not hasattr(w, '__len__') or not hasattr(w, '__getitem__'):
            raise TypeError(f'{name}: expected per-expert weights (a tensor [E_local, N, K] or a sequence), '
                            f'got {type(w).__name__}')
    e_local = len(w1)
    if e_local == 0:
        raise ValueError('w1: expected at least one local expert')
    if len(w2) != e_local:
        raise ValueError(f'w2: {len(w2)} experts, w1 has {e_local}')
    if num_experts is None:
        num_experts = e_local * world
    if isinstance(num_experts, bool) or not isinstance(num_experts, int):
        raise TypeError(f'num_experts: expected an int, got {type(num_experts).__name__}')
    if num_experts != e_local * world:
        raise ValueError(f'num_experts: {num_experts} != {e_local} local experts x {world} ranks')
    check_expert_ids('topk_idx', topk_idx, num_experts)
    w0 = torch.as_tensor(w1[0])
    if w0.dim() != 2 or w0.shape[0] % 2 or w0.shape[0] == 0:
        raise ValueError(f'w1[0]: expected [2I, H] with I > 0, got shape {tuple(w0.shape)}')
    inter = w0.shape[0] // 2
    gran = {'fp8': FP8_GRAN, 'nvfp4': NVFP4_GRAN}.get(path)
    if gran is not None and inter % gran:
        raise ValueError(f'w1: intermediate size I = {inter} must be a multiple of {gran} for {recipe} '
                         f'(the L2-input requantization block)')
    for e in range(e_local):
        _check_weight(f'w1[{e}]', w1[e], (2 * inter, hidden))
        _check_weight(f'w2[{e}]', w2[e], (hidden, inter))
    if path != 'nvfp4':
        for name, v in (('l1_alphas', l1_alphas), ('l2_alphas', l2_alphas), ('a2_scales', a2_scales)):
            if v is not None:
                raise ValueError(f'{name}: the {recipe} recipe has no alphas or global scales (MXFP4/FP8/BF16 '
                                 f'weights carry none); pass None')
    _check_alphas('l1_alphas', l1_alphas, (e_local, 2))
    _check_alphas('l2_alphas', l2_alphas, (e_local,))
    _check_alphas('a2_scales', a2_scales, (e_local,))
    if isinstance(routed_scaling_factor, bool) or not isinstance(routed_scaling_factor, (int, float)):
        raise TypeError(f'routed_scaling_factor: expected a float, got {type(routed_scaling_factor).__name__}')
    if not math.isfinite(routed_scaling_factor):
        raise ValueError(f'routed_scaling_factor: must be finite, got {routed_scaling_factor}')
    if path != 'nvfp4' and routed_scaling_factor != 1.0:
        raise ValueError(f'routed_scaling_factor: the {recipe} recipe has none (must be 1.0), '
                         f'got {routed_scaling_factor}')
    given = [v is not None for v in (shared_w1, shared_w2, x_shared)]
    if any(given) and not all(given):
        raise ValueError('shared_w1, shared_w2, x_shared: must be given together (or all None)')
    if all(given):
        check_tensor('x_shared', x_shared, dtype=_F32, shape=(t, hidden), device=x.device, contiguous=False)
        _check_bf16_values('x_shared', x_shared)
        if not isinstance(shared_w1, torch.Tensor):
            raise TypeError(f'shared_w1: expected a tensor, got {type(shared_w1).__name__}')
        if shared_w1.dim() != 2 or shared_w1.shape[0] % 2 or shared_w1.shape[0] == 0:
            raise ValueError(f'shared_w1: expected [2S, H] with S > 0, got shape {tuple(shared_w1.shape)}')
        s_inter = shared_w1.shape[0] // 2
        if _SHARED_PATH[path] == 'fp8' and s_inter % FP8_GRAN:
            raise ValueError(f'shared_w1: shared intermediate size S = {s_inter} must be a multiple of {FP8_GRAN} '
                             f'for {recipe}')
        _check_weight('shared_w1', shared_w1, (2 * s_inter, hidden))
        if not isinstance(shared_w2, torch.Tensor):
            raise TypeError(f'shared_w2: expected a tensor, got {type(shared_w2).__name__}')
        _check_weight('shared_w2', shared_w2, (hidden, s_inter))
    check_activation_clamp(activation_clamp)
    if stats is not None:
        check_tensor('cumulative_local_expert_recv_stats', stats, dtype=torch.int32, shape=(e_local,),
                     device=x.device)
    return SimpleNamespace(path=path, t=t, hidden=hidden, k=k, e_local=e_local, num_experts=num_experts,
                           shared=all(given))


# ---------------------------------------------------------------------------------- layer
def _local_rows(cfg, x, topk_idx, topk_weights, w1, w2, offset, activation_clamp, l1_alphas, l2_alphas,
                a2_scales):
    """Slot rows bf16 ``[T, k, H]`` of the pairs routed to the local experts (zero elsewhere) and the
    number of pairs per local expert."""
    t = x.shape[0]
    out = torch.zeros(t, cfg.k, cfg.hidden, dtype=torch.bfloat16, device=x.device)
    recv = torch.zeros(cfg.e_local, dtype=torch.int64, device=x.device)
    ids = topk_idx - offset
    local = (topk_idx >= offset) & (topk_idx < offset + cfg.e_local)
    for e in range(cfg.e_local):
        rows = ((ids == e) & local).nonzero()
        recv[e] = rows.shape[0]
        if rows.shape[0] == 0:
            continue
        ti, ji = rows[:, 0], rows[:, 1]
        kw = {}
        if cfg.path == 'nvfp4':
            kw = dict(l1_alpha=(1.0, 1.0) if l1_alphas is None else tuple(l1_alphas[e].tolist()),
                      l2_alpha=1.0 if l2_alphas is None else float(l2_alphas[e]),
                      a2_scale=1.0 if a2_scales is None else float(a2_scales[e]))
        out[ti, ji] = recipe_expert_forward(cfg.path, x[ti], w1[e], w2[e], topk_weights[ti, ji],
                                            activation_clamp, **kw)
    return out, recv


def reference_recipe_moe(recipe: str, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                         w1, w2, group=None, *, num_experts: Optional[int] = None,
                         l1_alphas: Optional[torch.Tensor] = None, l2_alphas: Optional[torch.Tensor] = None,
                         a2_scales: Optional[torch.Tensor] = None, routed_scaling_factor: float = 1.0,
                         shared_w1: Optional[torch.Tensor] = None, shared_w2: Optional[torch.Tensor] = None,
                         x_shared: Optional[torch.Tensor] = None, activation_clamp: Optional[float] = None,
                         cumulative_local_expert_recv_stats: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The Mega MoE layer of ``recipe`` on this rank's tokens (semantics: the module docstring).

    Args:
        recipe: ``'fp8xfp4'``, ``'fp8xfp8'``, ``'bf16xbf16'`` or ``'fp4xfp4'``.
        x: float32 ``[T, H]``, the exact dequantized activations (FP8 x 2^k, BF16, E2M1 x UE4M3);
            ``T`` may differ per rank, including 0.
        topk_idx: int64 ``[T, k]`` global expert ids, -1 = masked slot.
        topk_weights: float32 ``[T, k]`` (any sign; masked slots are ignored).
        w1, w2: this rank's experts (``E_l = len(w1)``; rank r owns ``[r E_l, (r+1) E_l)``):
            ``w1[e]`` ``[2I, H]`` (gate rows ``[0, I)`` then up rows), ``w2[e]`` ``[H, I]``, exact
            block-dequantized values (no global scale), float; a tensor or any sequence.
        group: ``torch.distributed`` group or None (one process).
        num_experts: global number of experts, ``E_l x world`` (the default).
        l1_alphas: float32 ``[E_l, 2]`` (gate, up), ``l2_alphas``: float32 ``[E_l]``, ``a2_scales``:
            float32 ``[E_l]``: fp4xfp4 only (None = all 1; finite and > 0).
        routed_scaling_factor: a finite float (any sign; compared with 1 after rounding to float32);
            must be 1.0 for the other recipes.
        shared_w1, shared_w2, x_shared: the shared expert(s) as one expert of intermediate ``S``
            (``[2S, H]``, ``[H, S]``) and its input ``[T, H]`` (fp4xfp4: ``x_bf16``; fp8 recipes: the
            FP8 ``x`` with the shared scales); all three or none.
        activation_clamp: None (or inf) for no clamp, else ``c >= 0``.
        cumulative_local_expert_recv_stats: int32 ``[E_l]``, incremented in place.

    Returns bf16 ``[T, H]``.  Across ranks, every rank gathers all tokens, computes its experts'
    slot rows, returns them to their source ranks (``all_to_all_single`` of bytes) and combines
    its own tokens; the shared expert runs on each rank for its own tokens.  The result equals the
    single-process result on the concatenated tokens bit for bit.
    """
    world = _group_size(group)
    cfg = _validate(recipe, x, topk_idx, topk_weights, w1, w2, world, num_experts, l1_alphas, l2_alphas,
                    a2_scales, routed_scaling_factor, shared_w1, shared_w2, x_shared, activation_clamp,
                    cumulative_local_expert_recv_stats)
    t, k, hidden = cfg.t, cfg.k, cfg.hidden
    extra = (activation_clamp, l1_alphas, l2_alphas, a2_scales)
    if world == 1:
        routed, recv = _local_rows(cfg, x, topk_idx, topk_weights, w1, w2, 0, *extra)
    else:
        import torch.distributed as dist
        counts, (gx, gidx, gw) = gather_tokens(group, [x, topk_idx, topk_weights])
        out, recv = _local_rows(cfg, gx, gidx, gw, w1, w2, dist.get_rank(group) * cfg.e_local, *extra)
        routed = return_rows(group, out, counts, topk_idx, cfg.e_local)
    shared = None
    if cfg.shared:
        shared = recipe_expert_forward(_SHARED_PATH[cfg.path], x_shared, shared_w1, shared_w2, None,
                                       activation_clamp)
    y = combine_recipe(routed, topk_idx, shared, routed_scaling_factor, nvfp4=cfg.path == 'nvfp4')
    if cumulative_local_expert_recv_stats is not None:
        cumulative_local_expert_recv_stats += recv.to(torch.int32)
    return y
