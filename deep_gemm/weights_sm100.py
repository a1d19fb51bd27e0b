"""Blackwell (sm100) expert weights: NVFP4 / MXFP4 bytes re-ordered (never re-quantized) for the tcgen05
grouped GEMM (``impls/sm100_fp4_grouped_gemm.cuh``, its plan in ``scheduler/sm100_gemm_plan.cuh``).

The tcgen05 kernel reads the weight codes with TMA (128 rows x 128 bytes of K per stage, SWIZZLE_128B:
the hardware swizzles, so the codes keep their ModelOpt byte order inside a row) and the block scales
with bulk copies into shared memory, from where ``tcgen05.cp 32x128b.warpx4`` moves them to TMEM.  So
the transform only

* re-orders the **rows**: L1 (gate/up) rows are interleaved by 8 exactly as the sm90 transform does
  (kernel row ``16 G + r`` is gate row ``8 G + r`` for ``r < 8`` and up row ``8 G + r - 8`` otherwise),
  so that one 128-row tile holds gate and up of the same 64 channels and one epilogue thread's
  ``tcgen05.ld 16x256b`` fragment holds gate (TMEM lane l) and up (lane l + 8) of one channel;
  L2 rows keep their order;
* permutes the **scale bytes** into 512-byte atoms (Sm1xxBlockScaledConfig-style): per expert, row
  tile ``rt`` of 128 rows and group ``j`` of 4 scale blocks, the atom holds row ``m`` and block ``b`` at
  byte ``16 (m % 32) + 4 (m // 32) + b`` (``sm100_umma.cuh`` ``sf_atom_byte``).

Codes: uint8 ``[E, N, K/2]`` (two E2M1 per byte, low nibble = even k), rows in kernel order.  MXFP4
codes are read by TMA as ``16U4_ALIGN16B`` from the same packed bytes; in shared memory that type is
*not* one code per byte: per cuda.h (CUDA 13.0, ``cuTensorMapEncodeTiled``) it "copies '16 x U4' packed
values to memory aligned as 16 bytes. There are 8 byte gaps between every 8 byte chunk of packed
values", i.e. per 16 codes 8 packed bytes (low nibble = even code) then an 8-byte gap, so 128 codes
still fill the 128 bytes of a stage row.  This reading (and that the mxf8f6f4 MMA reads E2M1 in exactly
that padded format) is unverified on hardware; the CPU model (tests/sm100_model) shares it.  Scales: uint8 ``[E, N/128, K/(4 g), 512]``.  Global scales stay FP32 in ``alpha`` (``[E, 2]``
gate/up for L1, ``[E, 1]`` for L2; MXFP4: ones), applied in the epilogue.

:func:`untransform_sm100` inverts the transform bit for bit (back to the ModelOpt / upstream tensors).
:func:`to_sm100_sf_layout` / :func:`from_sm100_sf_layout` are the same scale layout for any ``[rows,
blocks]`` scale matrix (the token side's scales: rows padded to 128, blocks to 4).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

from .weights import _CODE_WORD_PERM, _check, _check_pair, _l1_kernel_row_order, _parse, _Parsed, _permute_word_bits

__all__ = ['Sm100ExpertWeights', 'transform_nvfp4_weights_for_sm100', 'transform_mxfp4_weights_for_sm100',
           'transform_nvfp4_weights_for_sm100_mega_moe', 'untransform_sm100', 'to_sm100_sf_layout',
           'from_sm100_sf_layout', 'dequantize_sm100', 'to_sm100_exact', 'transform_bf16_weights_for_sm100',
           'SM100_BLOCK_M', 'SM100_STAGE_K',
           'SF_ATOM_BYTES']

SM100_BLOCK_M = 128
#: K per pipeline stage (128 bytes of one row in shared memory): NVFP4 packed (2 codes per byte), MXFP4
#: 16U4_ALIGN16B (16 bytes per 16 codes: 8 packed bytes and an 8-byte gap; unverified on hardware),
#: the exact recipe's NVFP4 packed, BF16 two bytes per weight
SM100_STAGE_K = {'nvfp4': 256, 'mxfp4': 128, 'nvfp4_exact': 256, 'bf16': 64}
SCALE_GRAN = {'nvfp4': 16, 'mxfp4': 32, 'nvfp4_exact': 16, 'bf16': 0}
SF_ATOM_BYTES = 512


def _sf_atoms(s: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., R, B]`` (R % 128 == 0, B % 4 == 0) -> ``[..., R / 128, B / 4, 512]``."""
    *lead, r, b = s.shape
    x = s.reshape(*lead, r // 128, 4, 32, b // 4, 4)            # (.., rt, m // 32, m % 32, j, b % 4)
    n = len(lead)
    perm = list(range(n)) + [n, n + 3, n + 2, n + 1, n + 4]     # (.., rt, j, m % 32, m // 32, b % 4)
    return x.permute(*perm).reshape(*lead, r // 128, b // 4, SF_ATOM_BYTES)


def _sf_unatoms(a: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_sf_atoms`: ``[..., RT, J, 512]`` -> ``[..., 128 RT, 4 J]``."""
    *lead, rt, j, _ = a.shape
    x = a.reshape(*lead, rt, j, 32, 4, 4)                       # (.., rt, j, m % 32, m // 32, b % 4)
    n = len(lead)
    perm = list(range(n)) + [n, n + 3, n + 2, n + 1, n + 4]     # (.., rt, m // 32, m % 32, j, b % 4)
    return x.permute(*perm).reshape(*lead, 128 * rt, 4 * j)


def to_sm100_sf_layout(sf: torch.Tensor) -> torch.Tensor:
    """A ``[rows, blocks]`` scale matrix (1-byte scales: uint8 / float8_e4m3fn / float8_e8m0fnu) -> uint8
    ``[ceil(rows / 128), ceil(blocks / 4), 512]`` atoms; padding bytes are 0."""
    _check(isinstance(sf, torch.Tensor) and sf.dim() == 2 and sf.element_size() == 1, ValueError,
           f'sf: expected a 2-D tensor of 1-byte scales, got {getattr(sf, "shape", type(sf))}')
    rows, blocks = sf.shape
    pr, pb = -(-rows // 128) * 128, -(-blocks // 4) * 4
    padded = torch.zeros(pr, pb, dtype=torch.uint8, device=sf.device)
    padded[:rows, :blocks] = sf.contiguous().view(torch.uint8)
    return _sf_atoms(padded)


def from_sm100_sf_layout(atoms: torch.Tensor, rows: int, blocks: int) -> torch.Tensor:
    """Inverse of :func:`to_sm100_sf_layout` (uint8 ``[rows, blocks]``)."""
    return _sf_unatoms(atoms)[:rows, :blocks].contiguous()


@dataclass
class Sm100ExpertWeights:
    """One MoE projection for the local experts in the sm100 kernel layout (module docstring)."""
    fmt: str                 # 'nvfp4', 'mxfp4' or 'nvfp4_exact' (NVFP4, code bits permuted: to_sm100_exact)
    kind: str                # 'l1' (gate/up interleaved) or 'l2'
    codes: torch.Tensor      # uint8 [E, N, K/2], rows in kernel order
    scales: torch.Tensor     # uint8 [E, N/128, K/(4 g), 512]
    alpha: torch.Tensor      # float32 [E, 2] (l1) or [E, 1] (l2)
    num_experts: int
    n: int
    k: int

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def gran(self) -> int:
        return SCALE_GRAN[self.fmt]

    def dequantize(self, experts: Optional[Sequence[int]] = None) -> torch.Tensor:
        """``dequantize_sm100(self, experts)``: float32 ``[E', N, K]``, original row order, no global scale
        (the interface of ``ExpertWeights.dequantize``, which the reference backend calls)."""
        return dequantize_sm100(self, experts)

    def row_order(self) -> torch.Tensor:
        """Original row of each kernel row."""
        return _l1_kernel_row_order(self.n) if self.kind == 'l1' else torch.arange(self.n)


def _permute_sm100(p: _Parsed) -> Sm100ExpertWeights:
    stage_k = SM100_STAGE_K[p.fmt]
    _check(p.k % stage_k == 0, ValueError,
           f'{p.what}.weight: K = {p.k} must be a multiple of {stage_k} for the sm100 {p.fmt} kernel')
    rows = (_l1_kernel_row_order(p.n) if p.kind == 'l1' else torch.arange(p.n)).to(p.weight.device)
    codes = p.weight.index_select(1, rows).contiguous()
    scales = _sf_atoms(p.scale_bytes.index_select(1, rows).contiguous())
    return Sm100ExpertWeights(fmt=p.fmt, kind=p.kind, codes=codes, scales=scales, alpha=p.alpha,
                              num_experts=p.e, n=p.n, k=p.k)


def transform_nvfp4_weights_for_sm100(weight, weight_scale, weight_scale_2, kind: str = 'l2') -> Sm100ExpertWeights:
    """ModelOpt NVFP4 tensors of one projection (``weight`` uint8 ``[E, N, K/2]``, ``weight_scale``
    float8_e4m3fn ``[E, N, K/16]``, ``weight_scale_2`` float32 ``[E]`` or ``[E, 2]`` for L1) -> sm100 layout.
    ``kind='l1'``: rows are gate rows ``[0, N/2)`` then up rows, interleaved for the SwiGLU epilogue."""
    _check(kind in ('l1', 'l2'), ValueError, f"kind: expected 'l1' or 'l2', got {kind!r}")
    return _permute_sm100(_parse({'weight': weight, 'weight_scale': weight_scale, 'weight_scale_2': weight_scale_2},
                                 'weights', kind, 'nvfp4'))


def transform_mxfp4_weights_for_sm100(weight, weight_scale, kind: str = 'l2') -> Sm100ExpertWeights:
    """MXFP4 tensors of one projection (``weight`` uint8 ``[E, N, K/2]``, ``weight_scale`` uint8 UE8M0
    ``[E, N, K/32]``) -> sm100 layout."""
    _check(kind in ('l1', 'l2'), ValueError, f"kind: expected 'l1' or 'l2', got {kind!r}")
    return _permute_sm100(_parse((weight, weight_scale), 'weights', kind, 'mxfp4'))


def transform_nvfp4_weights_for_sm100_mega_moe(l1, l2) -> Tuple[Sm100ExpertWeights, Sm100ExpertWeights]:
    """``transform_nvfp4_weights_for_mega_moe``'s inputs (ModelOpt dicts of L1 and L2) -> sm100 layout."""
    p1, p2 = _parse(l1, 'l1', 'l1', 'nvfp4'), _parse(l2, 'l2', 'l2', 'nvfp4')
    _check_pair(p1, p2)
    return _permute_sm100(p1), _permute_sm100(p2)


def to_sm100_exact(w: Sm100ExpertWeights) -> Sm100ExpertWeights:
    """NVFP4 sm100 weights -> the exact recipe's (``Recipe::NVFP4_EXACT``, FP8/BF16 tokens x NVFP4
    weights with the UE4M3 scales applied exactly by a dequant to BF16): the same rows and scale atoms;
    inside every little-endian 32-bit word of a row's codes (8 consecutive k, nibble ``n`` = k ``8 w + n``)
    the bits are permuted by the Hopper map ``_CODE_WORD_PERM`` (nibble ``n`` = code ``(o, h) = (n // 2,
    n % 2)``), so that ``common/fp4_bits.cuh``'s ``e2m1x8_to_bf16x8_bits`` yields register ``o`` = (k
    ``2 o``, ``2 o + 1``) of the word.  A pure bit permutation: :func:`untransform_sm100` inverts it."""
    _check(isinstance(w, Sm100ExpertWeights) and w.fmt == 'nvfp4', ValueError,
           'w: expected NVFP4 Sm100ExpertWeights (transform_nvfp4_weights_for_sm100)')
    codes = _permute_word_bits(w.codes, _CODE_WORD_PERM).view(torch.uint8).reshape(w.codes.shape)
    return Sm100ExpertWeights(fmt='nvfp4_exact', kind=w.kind, codes=codes.contiguous(), scales=w.scales, alpha=w.alpha,
                              num_experts=w.num_experts, n=w.n, k=w.k)


def transform_bf16_weights_for_sm100(weight: torch.Tensor, kind: str = 'l2') -> Sm100ExpertWeights:
    """BF16 expert weights ``[E, N, K]`` (``bf16_mega_moe``, ``Recipe::BF16``) -> the sm100 layout: rows in
    kernel order (L1 gate/up interleaved by 8 as the other recipes), values untouched, no block scales,
    ``alpha`` ones.  The kernel reads 64 K per stage (one 128-byte SW128 row)."""
    _check(kind in ('l1', 'l2'), ValueError, f"kind: expected 'l1' or 'l2', got {kind!r}")
    _check(isinstance(weight, torch.Tensor) and weight.dtype == torch.bfloat16 and weight.dim() == 3, TypeError,
           f'weight: expected a bfloat16 [E, N, K] tensor, got {getattr(weight, "dtype", type(weight))}')
    e, n, k = weight.shape
    _check(n % SM100_BLOCK_M == 0 and k % SM100_STAGE_K['bf16'] == 0, ValueError,
           f'weight: N = {n} must be a multiple of 128 and K = {k} of {SM100_STAGE_K["bf16"]}')
    rows = (_l1_kernel_row_order(n) if kind == 'l1' else torch.arange(n)).to(weight.device)
    codes = weight.index_select(1, rows).contiguous()
    alpha = torch.ones(e, 2 if kind == 'l1' else 1, dtype=torch.float32, device=weight.device)
    return Sm100ExpertWeights(fmt='bf16', kind=kind, codes=codes, scales=torch.zeros(0, dtype=torch.uint8, device=weight.device),
                              alpha=alpha, num_experts=e, n=n, k=k)


def untransform_sm100(w: Sm100ExpertWeights):
    """The original tensors, bit for bit: NVFP4 -> ``(weight, weight_scale (float8_e4m3fn), alpha)``,
    MXFP4 -> ``(weight, weight_scale (uint8), alpha)``, BF16 -> ``(weight, None, alpha)`` (alpha ``[E, 2]`` /
    ``[E, 1]``)."""
    _check(isinstance(w, Sm100ExpertWeights), TypeError, f'w: expected Sm100ExpertWeights, got {type(w).__name__}')
    order = w.row_order().to(w.device)
    inv = torch.empty_like(order)
    inv[order] = torch.arange(w.n, device=w.device)
    codes = w.codes
    if w.fmt == 'nvfp4_exact':
        codes = _permute_word_bits(codes, _CODE_WORD_PERM, inverse=True).view(torch.uint8).reshape(codes.shape)
    weight = codes.index_select(1, inv).contiguous()
    if w.fmt == 'bf16':   # no block scales
        return weight, None, w.alpha
    s = _sf_unatoms(w.scales)[:, :, : w.k // w.gran].index_select(1, inv).contiguous()
    if w.fmt in ('nvfp4', 'nvfp4_exact'):
        s = s.view(torch.float8_e4m3fn)
    return weight, s, w.alpha


def dequantize_sm100(w: Sm100ExpertWeights, experts: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Block-dequantized weights WITHOUT the global scale (as ``ExpertWeights.dequantize``), float32
    ``[E', N, K]``, original row order.  Exact: E2M1 x UE4M3 / UE8M0 is representable in float32."""
    weight, s, _ = untransform_sm100(w)
    idx = list(range(w.num_experts)) if experts is None else list(experts)
    if w.fmt == 'bf16':   # BF16 values: exact in float32
        return weight[idx].to(torch.float32)
    e2m1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
                        dtype=torch.float32, device=w.device)
    out = []
    for e in idx:
        b = weight[e].to(torch.int64)
        vals = torch.stack([e2m1[b & 0xF], e2m1[b >> 4]], dim=-1).reshape(w.n, w.k)
        sc = s[e].to(torch.float32) if w.fmt != 'mxfp4' else torch.exp2(s[e].to(torch.float32) - 127.0)
        out.append(vals * sc.repeat_interleave(w.gran, dim=1))
    return torch.stack(out) if out else torch.empty(0, w.n, w.k, dtype=torch.float32, device=w.device)
