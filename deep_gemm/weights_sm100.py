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
codes are read by TMA as ``16U4_ALIGN16B`` (one code per byte in shared memory) from the same packed
bytes.  Scales: uint8 ``[E, N/128, K/(4 g), 512]``.  Global scales stay FP32 in ``alpha`` (``[E, 2]``
gate/up for L1, ``[E, 1]`` for L2; MXFP4: ones), applied in the epilogue.

:func:`untransform_sm100` inverts the transform bit for bit (back to the ModelOpt / upstream tensors).
:func:`to_sm100_sf_layout` / :func:`from_sm100_sf_layout` are the same scale layout for any ``[rows,
blocks]`` scale matrix (the token side's scales: rows padded to 128, blocks to 4).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

from .weights import _check, _check_pair, _l1_kernel_row_order, _parse, _Parsed

__all__ = ['Sm100ExpertWeights', 'transform_nvfp4_weights_for_sm100', 'transform_mxfp4_weights_for_sm100',
           'transform_nvfp4_weights_for_sm100_mega_moe', 'untransform_sm100', 'to_sm100_sf_layout',
           'from_sm100_sf_layout', 'dequantize_sm100', 'SM100_BLOCK_M', 'SM100_STAGE_K', 'SF_ATOM_BYTES']

SM100_BLOCK_M = 128
#: K per pipeline stage (128 bytes of one row in shared memory): NVFP4 packed, MXFP4 one code per byte
SM100_STAGE_K = {'nvfp4': 256, 'mxfp4': 128}
SCALE_GRAN = {'nvfp4': 16, 'mxfp4': 32}
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
    fmt: str                 # 'nvfp4' or 'mxfp4'
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


def untransform_sm100(w: Sm100ExpertWeights):
    """The original tensors, bit for bit: NVFP4 -> ``(weight, weight_scale (float8_e4m3fn), alpha)``,
    MXFP4 -> ``(weight, weight_scale (uint8), alpha)`` (alpha ``[E, 2]`` / ``[E, 1]``)."""
    _check(isinstance(w, Sm100ExpertWeights), TypeError, f'w: expected Sm100ExpertWeights, got {type(w).__name__}')
    order = w.row_order().to(w.device)
    inv = torch.empty_like(order)
    inv[order] = torch.arange(w.n, device=w.device)
    weight = w.codes.index_select(1, inv).contiguous()
    s = _sf_unatoms(w.scales)[:, :, : w.k // w.gran].index_select(1, inv).contiguous()
    if w.fmt == 'nvfp4':
        s = s.view(torch.float8_e4m3fn)
    return weight, s, w.alpha


def dequantize_sm100(w: Sm100ExpertWeights, experts: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Block-dequantized weights WITHOUT the global scale (as ``ExpertWeights.dequantize``), float32
    ``[E', N, K]``, original row order.  Exact: E2M1 x UE4M3 / UE8M0 is representable in float32."""
    weight, s, _ = untransform_sm100(w)
    idx = list(range(w.num_experts)) if experts is None else list(experts)
    e2m1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
                        dtype=torch.float32, device=w.device)
    out = []
    for e in idx:
        b = weight[e].to(torch.int64)
        vals = torch.stack([e2m1[b & 0xF], e2m1[b >> 4]], dim=-1).reshape(w.n, w.k)
        sc = s[e].to(torch.float32) if w.fmt == 'nvfp4' else torch.exp2(s[e].to(torch.float32) - 127.0)
        out.append(vals * sc.repeat_interleave(w.gran, dim=1))
    return torch.stack(out) if out else torch.empty(0, w.n, w.k, dtype=torch.float32, device=w.device)
