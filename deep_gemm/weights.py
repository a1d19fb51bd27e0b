"""Kernel-side expert weights: NVFP4 / MXFP4 bits re-ordered (never re-quantized) for the kernels.

The Hopper kernels make the weights the *register* operand of BF16 ``wgmma`` (swap A/B: weight
rows are the M side, tokens the N side).  Each consumer thread therefore needs, per k16 step,
the 8 E2M1 codes of its A fragment (rows g and g+8 of its warp's 16 rows, k = 2q, 2q+1, 2q+8,
2q+9) in one 32-bit word, and the block scales of those two rows.  The transform below only
permutes nibbles, bits inside 32-bit words and scale bytes, so that every thread reads its
fragment with 16-byte, conflict-free shared-memory loads and turns it into BF16 with as few
integer instructions as possible; ``dequantize()`` inverts the permutation exactly.

Layout (per expert ``e``, row tile ``rt`` of ``BLOCK_N = 128`` kernel rows, k block ``kb`` of
``BLOCK_K = 128``):

* ``codes[e, rt, kb]`` -- 8192 bytes = 2048 little-endian 32-bit words.  Word
  ``(wg * 2 + half) * 512 + tid * 4 + jj`` belongs to thread ``tid`` of consumer warpgroup ``wg``
  for k16 step ``j = 4 * half + jj``.  With ``warp = tid // 32``, ``g = lane // 4``,
  ``q = lane % 4``, ``r0 = 64 * wg + 16 * warp + g`` and ``r1 = r0 + 8``, the word holds the
  8 codes of the wgmma A fragment registers ``a[o]``, ``o = 0..3``, each a bf16 pair ``h = 0, 1``:
  ``a0: (r0, 2q + h)``, ``a1: (r1, 2q + h)``, ``a2: (r0, 2q + 8 + h)``, ``a3: (r1, 2q + 8 + h)``
  (k relative to ``16 j``).  Bit ``c`` of code ``(o, h)`` (``c = 0: m, 1: e0, 2: e1, 3: sign``)
  sits at word bit ``_WORD_BIT_CELL[o][h][c]``: the cell from which the kernel's
  ``a0 = w & T``, ``a1 = (w << 4) & T``, ``a2 = rotl(w, 10) & T``,
  ``a3 = ((w << 6) & T_mes) | ((w >> 2) & T_e1)`` move it to bf16 bit
  ``16 h + (6, 7, 8, 15)[c]`` (see ``sm90_fp4.cuh``).  Built in two steps: ``_code_index()`` puts
  code ``(o, h)`` in nibble ``2 o + h`` of the word, then ``_CODE_WORD_PERM`` (the same map, by
  nibble bit ``4 (2 o + h) + c``) permutes the bits.
* ``scales[e, rt, kb]`` -- NVFP4: 1024 bytes, 16 per row pair ``(r0, r1)`` at
  ``(wg * 32 + warp * 8 + g) * 16``: word ``jp`` holds UE4M3 ``[s(r0, 2jp), s(r0, 2jp+1),
  s(r1, 2jp), s(r1, 2jp+1)]`` as bytes 0..3, then its bits are permuted by
  ``_NVFP4_SCALE_WORD_PERM`` so that ``w & 0x07F007F0`` is the even step's bf16x2 scale bits and
  ``rotr(w, 7) & 0x07F007F0`` the odd step's (the always-zero sign bits fill the 4 cells left).
  MXFP4: 512 bytes, 8 per row pair: word ``wd`` holds
  ``[s(r0, 2wd), s(r0, 2wd+1), s(r1, 2wd), s(r1, 2wd+1)]`` (UE8M0 bytes, unchanged).

L1 (gate/up) rows are interleaved by 8 so that one thread's accumulator holds gate *and* up of
the same intermediate channel: kernel row ``16 G + r`` is gate row ``8 G + r`` for ``r < 8`` and
up row ``8 G + r - 8`` otherwise.  L2 rows keep their order.

BF16 weights (``bf16_mega_moe``, shared experts) keep their values and take the same row order; each
128 x 128 block (``codes[e, rt, kb]``, 16384 bfloat16) holds the wgmma A fragments in load order:
element ``((j * 2 + wg) * 128 + tid) * 8 + 2 o + h`` is register ``a[o]`` half ``h`` of k16 step ``j``
of thread ``tid`` of consumer warpgroup ``wg`` (rows and k as above), so a thread loads a step with
one conflict-free 16-byte ``ld.shared``.

The global scales stay FP32 (``alpha``): ``[E, 2]`` (gate, up) for L1 and ``[E, 1]`` for L2;
they are applied in FP32 in the epilogue, never folded into the block scales.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Tuple, Union

import torch

from .utils.validation import bad_ue4m3_bytes

BLOCK_N = 128
BLOCK_K = 128
CODE_BYTES = BLOCK_N * BLOCK_K // 2
SCALE_BYTES = {'nvfp4': BLOCK_N * BLOCK_K // 16, 'mxfp4': BLOCK_N * BLOCK_K // 32}
SCALE_GRAN = {'nvfp4': 16, 'mxfp4': 32}
DENSE_FORMATS = ('fp8', 'bf16')

_E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                             -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=torch.float32)


# bf16 bit of code bit c (m, e0, e1, sign) in half h of a fragment register.
_BF16_BIT = (6, 7, 8, 15)


def _word_bit_cell(o: int, h: int, c: int) -> int:
    p = 16 * h + _BF16_BIT[c]
    if o == 0:
        return p                     # w & T
    if o == 1:
        return p - 4                 # (w << 4) & T
    if o == 2:
        return (p - 10) % 32         # rotl(w, 10) & T
    return p + 2 if c == 2 else p - 6  # e1 from (w >> 2), the rest from (w << 6)


#: ``_WORD_BIT_CELL[o][h][c]``: word bit holding bit ``c`` of the code of fragment register
#: ``o``, half ``h`` (mirrors ``e2m1x8_to_bf16x8_bits`` in ``sm90_fp4.cuh``).
_WORD_BIT_CELL = tuple(tuple(tuple(_word_bit_cell(o, h, c) for c in range(4)) for h in range(2)) for o in range(4))
# canonical word bit 4 * (2 o + h) + c -> cell
_CODE_WORD_PERM = tuple(_WORD_BIT_CELL[n // 8][(n // 4) % 2][n % 4] for n in range(32))
# canonical scale word bit 8 * b + i (UE4M3 byte b, bit i) -> cell: bytes 0 / 2 (even step, rows
# r0 / r1) at bf16 bits 4..10 of each half, bytes 1 / 3 (odd step) 7 bits higher, cyclically.
_NVFP4_SCALE_WORD_PERM = tuple(
    (16 * (b // 2) + 4 + i + 7 * (b % 2)) % 32 if i < 7 else (2, 3, 18, 19)[b] for b in range(4) for i in range(8))


@functools.lru_cache(maxsize=None)
def _code_index() -> torch.Tensor:
    """For each nibble of a code chunk (16384 nibbles), the flat index ``row * 128 + k`` in the tile.

    Nibble order: byte-major, low nibble first, so nibble ``n`` of a word is code ``(o, h) =
    (n // 2, n % 2)``, before the bits are permuted by ``_CODE_WORD_PERM``.
    """
    wg, half, tid, jj, n = torch.meshgrid(torch.arange(2), torch.arange(2), torch.arange(128),
                                          torch.arange(4), torch.arange(8), indexing='ij')
    warp, lane = tid // 32, tid % 32
    g, q = lane // 4, lane % 4
    o, h = n // 2, n % 2
    r0 = 64 * wg + 16 * warp + g
    row = torch.where(o % 2 == 0, r0, r0 + 8)
    k = 16 * (4 * half + jj) + 2 * q + torch.where(o >= 2, 8, 0) + h
    return (row * BLOCK_K + k).reshape(-1)


def _permute_word_bits(data: torch.Tensor, perm: Sequence[int], inverse: bool = False) -> torch.Tensor:
    """uint8 ``[..., 4 m]`` read as little-endian 32-bit words: bit ``i`` of each word moves to bit
    ``perm[i]`` (or back, with ``inverse``).  One mask-and-shift per distinct distance."""
    moves = [(perm[i], i) if inverse else (i, perm[i]) for i in range(32)]
    words = data.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    out = torch.zeros_like(words)
    by_shift = {}
    for src, dst in moves:
        by_shift[dst - src] = by_shift.get(dst - src, 0) | (1 << src)
    for shift, mask in by_shift.items():
        part = words & mask
        out |= (part << shift) if shift >= 0 else (part >> -shift)
    out = torch.where(out >= 1 << 31, out - (1 << 32), out).to(torch.int32)
    return out.view(torch.uint8).reshape(data.shape)


@functools.lru_cache(maxsize=None)
def _bf16_index() -> torch.Tensor:
    """For each element of a BF16 block (16384), the flat index ``row * 128 + k`` in the tile."""
    j, wg, tid, o, h = torch.meshgrid(torch.arange(8), torch.arange(2), torch.arange(128), torch.arange(4),
                                      torch.arange(2), indexing='ij')
    warp, lane = tid // 32, tid % 32
    g, q = lane // 4, lane % 4
    r0 = 64 * wg + 16 * warp + g
    row = torch.where(o % 2 == 0, r0, r0 + 8)
    k = 16 * j + 2 * q + torch.where(o >= 2, 8, 0) + h
    return (row * BLOCK_K + k).reshape(-1)


def _bf16_blocks(w: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """BF16 ``[E, N, K]`` -> ``[E, N / 128, K / 128, 16384]`` in kernel row order and fragment order."""
    e, n, k = w.shape
    tn, tk = n // BLOCK_N, k // BLOCK_K
    idx = _bf16_index().to(w.device)
    out = torch.empty(e, tn, tk, BLOCK_N * BLOCK_K, dtype=torch.bfloat16, device=w.device)
    for i in range(e):
        t = w[i].index_select(0, rows).reshape(tn, BLOCK_N, tk, BLOCK_K).permute(0, 2, 1, 3)
        out[i] = t.reshape(tn, tk, BLOCK_N * BLOCK_K)[..., idx]
    return out


@functools.lru_cache(maxsize=None)
def _scale_index(fmt: str) -> torch.Tensor:
    """For each byte of a scale chunk, the flat index ``row * groups + group`` in the tile."""
    groups = BLOCK_K // SCALE_GRAN[fmt]
    rp, word, b = torch.meshgrid(torch.arange(64), torch.arange(groups // 2), torch.arange(4), indexing='ij')
    wg, warp, g = rp // 32, (rp // 8) % 4, rp % 8
    r0 = 64 * wg + 16 * warp + g
    row = torch.where(b >= 2, r0 + 8, r0)
    group = 2 * word + (b % 2)
    return (row * groups + group).reshape(-1)


def _l1_kernel_row_order(n: int) -> torch.Tensor:
    """Original L1 row for each kernel row (gate rows [0, n/2), up rows [n/2, n))."""
    inter = n // 2
    r = torch.arange(n)
    grp, within = r // 16, r % 16
    chan = 8 * grp + within % 8
    return torch.where(within < 8, chan, inter + chan)


@dataclass
class ExpertWeights:
    """One MoE projection (L1 = gate+up or L2 = down) for the local experts, in kernel layout.

    ``fmt`` 'nvfp4' / 'mxfp4': the Hopper layout of the module docstring; 'bf16' (``bf16_mega_moe``,
    shared experts): ``codes`` bfloat16 ``[E, N / 128, K / 128, 16384]``, the same row order, fragment
    order inside a block, ``scales`` empty.  'fp8' (E4M3 with UE8M0 per 32, upstream's ``fp8xfp8``)
    keeps the weights as given: ``codes`` float8_e4m3fn ``[E, N, K]`` in the original row order,
    ``scales`` the UE8M0 bytes ``[E, N, K / 32]``; no Hopper kernel reads them yet."""
    fmt: str                 # 'nvfp4', 'mxfp4', 'fp8' or 'bf16'
    kind: str                # 'l1' or 'l2'
    codes: torch.Tensor      # uint8 [E, N / 128, K / 128, 8192] (fp4 formats)
    scales: torch.Tensor     # uint8 [E, N / 128, K / 128, 1024 (nvfp4) | 512 (mxfp4)]
    alpha: torch.Tensor      # float32 [E, 2] (l1: gate, up) or [E, 1] (l2)
    num_experts: int
    n: int
    k: int

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def __repr__(self) -> str:
        return (f'ExpertWeights(fmt={self.fmt!r}, kind={self.kind!r}, experts={self.num_experts}, n={self.n}, '
                f'k={self.k}, device={self.device}, bytes={self.codes.numel() * self.codes.element_size() + self.scales.numel()})')

    @classmethod
    def cat(cls, parts: Sequence['ExpertWeights']) -> 'ExpertWeights':
        """The experts of several transforms of one projection, in order (e.g. transformed in chunks
        to show progress, or loaded shard by shard)."""
        if not parts:
            raise ValueError('parts: expected at least one ExpertWeights')
        first = parts[0]
        for i, p in enumerate(parts):
            if (p.fmt, p.kind, p.n, p.k, p.device) != (first.fmt, first.kind, first.n, first.k, first.device):
                raise ValueError(f'parts[{i}]: {p!r} does not match parts[0] {first!r}')
        return cls(fmt=first.fmt, kind=first.kind, codes=torch.cat([p.codes for p in parts]),
                   scales=torch.cat([p.scales for p in parts]), alpha=torch.cat([p.alpha for p in parts]),
                   num_experts=sum(p.num_experts for p in parts), n=first.n, k=first.k)

    def row_order(self) -> torch.Tensor:
        """Original row index of each kernel row."""
        return _l1_kernel_row_order(self.n) if self.kind == 'l1' and self.fmt != 'fp8' else torch.arange(self.n)

    def dequantize(self, experts: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Block-dequantized weights WITHOUT the global scale, float32 ``[E, N, K]``, original row order.

        Exact: an E2M1 value times a UE4M3 (or UE8M0) scale is representable in float32.
        """
        experts = range(self.num_experts) if experts is None else experts
        return torch.stack([self._dequantize_one(e) for e in experts]) if len(experts) else \
            torch.empty(0, self.n, self.k, dtype=torch.float32)

    def _dequantize_one(self, e: int) -> torch.Tensor:
        n, k, fmt = self.n, self.k, self.fmt
        if fmt == 'bf16':
            tn, tk = n // BLOCK_N, k // BLOCK_K
            tile = torch.empty(tn, tk, BLOCK_N * BLOCK_K, dtype=torch.float32)
            tile[..., _bf16_index()] = self.codes[e].float().cpu()
            w = tile.reshape(tn, tk, BLOCK_N, BLOCK_K).permute(0, 2, 1, 3).reshape(n, k)
            out = torch.empty_like(w)
            out[self.row_order()] = w
            return out
        if fmt == 'fp8':
            sf = torch.exp2(self.scales[e].float() - 127.0).repeat_interleave(32, dim=-1)
            return (self.codes[e].float() * sf).cpu()
        tn, tk = n // BLOCK_N, k // BLOCK_K
        chunk = _permute_word_bits(self.codes[e].cpu().reshape(tn * tk, CODE_BYTES), _CODE_WORD_PERM, inverse=True)
        nib = torch.stack([chunk & 0xF, chunk >> 4], dim=-1).reshape(tn * tk, -1).long()
        tile = torch.empty(tn * tk, BLOCK_N * BLOCK_K, dtype=torch.long)
        tile[:, _code_index()] = nib
        vals = _E2M1_VALUES[tile].reshape(tn, tk, BLOCK_N, BLOCK_K)
        groups = BLOCK_K // SCALE_GRAN[fmt]
        sch = self.scales[e].cpu().reshape(tn * tk, -1)
        if fmt == 'nvfp4':
            sch = _permute_word_bits(sch, _NVFP4_SCALE_WORD_PERM, inverse=True)
        st = torch.empty(tn * tk, BLOCK_N * groups, dtype=torch.uint8)
        st[:, _scale_index(fmt)] = sch
        st = st.reshape(tn, tk, BLOCK_N, groups)
        if fmt == 'nvfp4':
            sv = st.view(torch.float8_e4m3fn).float()
        else:
            sv = torch.exp2(st.float() - 127.0)
        sv = sv.repeat_interleave(SCALE_GRAN[fmt], dim=-1)
        w = (vals * sv).permute(0, 2, 1, 3).reshape(n, k)
        out = torch.empty_like(w)
        out[self.row_order()] = w
        return out


def _as_tensor_dict(obj, what: str) -> Mapping[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        return obj
    if isinstance(obj, (tuple, list)):
        names = ('weight', 'weight_scale', 'weight_scale_2', 'input_scale')
        if not 2 <= len(obj) <= 4:
            raise ValueError(f'{what}: expected (weight, weight_scale[, weight_scale_2[, input_scale]]), '
                             f'got a sequence of {len(obj)}')
        return dict(zip(names, obj))
    raise TypeError(f'{what}: expected a dict of ModelOpt tensors or a tuple, got {type(obj).__name__}')


def _check(cond: bool, exc, msg: str):
    if not cond:
        raise exc(msg)


@dataclass
class _Parsed:
    """One projection's checked inputs, before the permutation."""
    what: str
    kind: str
    fmt: str
    weight: torch.Tensor     # uint8 [E, N, K/2]
    scale_bytes: torch.Tensor  # uint8 [E, N, K/gran]
    alpha: torch.Tensor      # float32 [E, 1 | 2]
    e: int
    n: int
    k: int


def _transform_one(obj, what: str, kind: str, fmt: str) -> ExpertWeights:
    return _permute(_parse(obj, what, kind, fmt))


def _parse(obj, what: str, kind: str, fmt: str) -> _Parsed:
    """Every check of one projection's tensors (types, shapes, finite scales), no work."""
    d = _as_tensor_dict(obj, what)
    for key in ('weight', 'weight_scale'):
        _check(key in d, ValueError, f'{what}: missing `{key}`')
    w, s = d['weight'], d['weight_scale']
    _check(isinstance(w, torch.Tensor) and w.dtype == torch.uint8, TypeError,
           f'{what}.weight: expected uint8 (two E2M1 per byte), got {getattr(w, "dtype", type(w))}')
    _check(w.dim() == 3, ValueError, f'{what}.weight: expected [E, N, K/2], got shape {tuple(w.shape)}')
    e, n, k2 = w.shape
    k = 2 * k2
    gran = SCALE_GRAN[fmt]
    want_sdtype = torch.float8_e4m3fn if fmt == 'nvfp4' else torch.uint8
    _check(isinstance(s, torch.Tensor) and s.dtype == want_sdtype, TypeError,
           f'{what}.weight_scale: expected {want_sdtype}, got {getattr(s, "dtype", type(s))}')
    _check(tuple(s.shape) == (e, n, k // gran), ValueError,
           f'{what}.weight_scale: expected shape {(e, n, k // gran)}, got {tuple(s.shape)}')
    _check(s.device == w.device, ValueError, f'{what}.weight_scale: on {s.device}, weight on {w.device}')
    _check(n % BLOCK_N == 0, ValueError, f'{what}.weight: N = {n} must be a multiple of {BLOCK_N}')
    _check(k % BLOCK_K == 0, ValueError, f'{what}.weight: K = {k} must be a multiple of {BLOCK_K}')
    if kind == 'l1':
        _check(n % 16 == 0, ValueError, f'{what}.weight: 2 * intermediate = {n} must be a multiple of 16')
    sbytes = s.contiguous().view(torch.uint8)
    if fmt == 'nvfp4':
        _check(not bool(bad_ue4m3_bytes(sbytes).any()), ValueError,
               f'{what}.weight_scale: UE4M3 scales must be non-negative and finite (found sign bit or NaN)')

    # global scales -> alpha
    num_alpha = 2 if kind == 'l1' else 1
    if fmt == 'nvfp4':
        _check('weight_scale_2' in d, ValueError, f'{what}: missing `weight_scale_2` (per-expert FP32 global scale)')
        g = d['weight_scale_2']
        _check(isinstance(g, torch.Tensor) and g.dtype == torch.float32, TypeError,
               f'{what}.weight_scale_2: expected float32, got {getattr(g, "dtype", type(g))}')
        g = g.reshape(e, -1) if g.numel() in (e, 2 * e) else None
        _check(g is not None, ValueError, f'{what}.weight_scale_2: expected [E] or [E, 2] with E = {e}')
        if kind == 'l2':
            _check(g.shape[1] == 1, ValueError, f'{what}.weight_scale_2: expected one global scale per expert')
        if g.numel() and not bool((torch.isfinite(g) & (g > 0)).all()):
            bad = g[~(torch.isfinite(g) & (g > 0))].flatten()[0].item()
            raise ValueError(f'{what}.weight_scale_2: global scales must be finite and positive, found {bad}')
        alpha = g.expand(e, num_alpha).contiguous().to(torch.float32)
    else:
        alpha = torch.ones(e, num_alpha, dtype=torch.float32, device=w.device)
    return _Parsed(what, kind, fmt, w, sbytes, alpha, e, n, k)


def _permute(p: _Parsed) -> ExpertWeights:
    """Bytes into kernel layout (see the module docstring)."""
    kind, fmt, w, sbytes, alpha, e, n, k = p.kind, p.fmt, p.weight, p.scale_bytes, p.alpha, p.e, p.n, p.k
    gran = SCALE_GRAN[fmt]
    tn, tk = n // BLOCK_N, k // BLOCK_K
    groups = BLOCK_K // gran
    code_idx = _code_index().to(w.device)
    scale_idx = _scale_index(fmt).to(w.device)
    rows = (_l1_kernel_row_order(n) if kind == 'l1' else torch.arange(n)).to(w.device)
    codes = torch.empty(e, tn, tk, CODE_BYTES, dtype=torch.uint8, device=w.device)
    scales = torch.empty(e, tn, tk, SCALE_BYTES[fmt], dtype=torch.uint8, device=w.device)
    for i in range(e):  # one expert at a time keeps peak memory at one expert's nibbles
        wi = w[i].index_select(0, rows)
        nib = torch.stack([wi & 0xF, wi >> 4], dim=-1).reshape(tn, BLOCK_N, tk, BLOCK_K)
        nib = nib.permute(0, 2, 1, 3).reshape(tn * tk, BLOCK_N * BLOCK_K)[:, code_idx]
        nib = nib.reshape(tn, tk, CODE_BYTES, 2)
        codes[i] = _permute_word_bits(nib[..., 0] | (nib[..., 1] << 4), _CODE_WORD_PERM)
        si = sbytes[i].index_select(0, rows).reshape(tn, BLOCK_N, tk, groups)
        si = si.permute(0, 2, 1, 3).reshape(tn * tk, BLOCK_N * groups)[:, scale_idx]
        si = si.reshape(tn, tk, -1)
        scales[i] = _permute_word_bits(si, _NVFP4_SCALE_WORD_PERM) if fmt == 'nvfp4' else si
    return ExpertWeights(fmt=fmt, kind=kind, codes=codes, scales=scales, alpha=alpha,
                         num_experts=e, n=n, k=k)


def _check_pair(l1: _Parsed, l2: _Parsed) -> None:
    """L1 (gate+up, ``[E, 2I, H]``) and L2 (down, ``[E, H, I]``) of one layer must agree."""
    a, b = l1.what, l2.what
    if l1.e != l2.e:
        raise ValueError(f'{b}.weight: {l2.e} experts, {a}.weight has {l1.e}')
    if l2.n != l1.k:
        raise ValueError(f'{b}.weight: N = {l2.n} (hidden) must equal {a}.weight\'s K = {l1.k}')
    if 2 * l2.k != l1.n:
        raise ValueError(f'{b}.weight: K = {l2.k} (intermediate) must be half of {a}.weight\'s N = {l1.n} '
                         f'(gate and up rows)')
    if l1.weight.device != l2.weight.device:
        raise ValueError(f'{b}.weight: on {l2.weight.device}, {a}.weight on {l1.weight.device}')


def _transform_pair(l1, l2, names: Tuple[str, str], fmt: str) -> Tuple[ExpertWeights, ExpertWeights]:
    p1, p2 = _parse(l1, names[0], 'l1', fmt), _parse(l2, names[1], 'l2', fmt)
    _check_pair(p1, p2)
    return _permute(p1), _permute(p2)


def transform_nvfp4_weights_for_mega_moe(l1, l2) -> Tuple[ExpertWeights, ExpertWeights]:
    """ModelOpt NVFP4 expert weights -> kernel layout, bit-exact (bytes permuted, never re-quantized).

    ``l1`` / ``l2``: dict (or tuple in this order) with ``weight`` uint8 ``[E, N, K/2]`` (two E2M1
    per byte, low nibble = even k), ``weight_scale`` float8_e4m3fn ``[E, N, K/16]``,
    ``weight_scale_2`` float32 ``[E]`` or, for L1, ``[E, 2]`` (gate, up may differ), optional
    ``input_scale`` (unused: activations arrive as FP8 with block scales).  L1 rows are gate rows
    ``[0, I)`` then up rows ``[I, 2I)``.
    """
    return _transform_pair(l1, l2, ('l1', 'l2'), 'nvfp4')


def _upstream_form(obj, what: str):
    """Upstream DeepGEMM's weight arguments -> ``(fmt, obj, two_d)`` with ``obj`` in the form ``_parse``
    takes (fp4 formats) or the dense tensors.  Upstream passes, per projection ``[E, N, K]`` (or 2-D
    ``[N, K]`` for shared experts):

    * ``(int8 [E, N, K/2], int32 [E, N, K/128])``: MXFP4, four UE8M0 bytes per word (any strides:
      upstream's MN-major scales are read by value);
    * ``(int8 [E, N, K/2], int32 [E, N, K/64])``: NVFP4, four UE4M3 bytes per word, no global scale
      (upstream passes it as ``l1_alphas`` / ``l2_alphas`` to the call);
    * ``(float8_e4m3fn [E, N, K], int32 [E, N, K/128])``: FP8 weights with UE8M0 per 32;
    * ``bfloat16 [E, N, K]``: BF16 weights;
    * ours: ``(uint8 [E, N, K/2], uint8 [E, N, K/32])`` MXFP4, or a ModelOpt dict (NVFP4).
    """
    if isinstance(obj, Mapping):
        return 'nvfp4', obj, False
    if isinstance(obj, torch.Tensor):
        _check(obj.dtype == torch.bfloat16, TypeError,
               f'{what}: a single tensor must be BF16 weights, got {obj.dtype} (FP4/FP8 weights come as (weight, scale))')
        _check(obj.dim() in (2, 3), ValueError, f'{what}: expected [E, N, K] or [N, K], got shape {tuple(obj.shape)}')
        two_d = obj.dim() == 2
        return 'bf16', (obj[None] if two_d else obj, None), two_d
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise TypeError(f'{what}: expected (weight, scale), a BF16 tensor or a ModelOpt dict, got {type(obj).__name__}')
    w, sf = obj
    for name, t in (('weight', w), ('scale', sf)):
        _check(isinstance(t, torch.Tensor), TypeError, f'{what}: {name} must be a tensor, got {type(t).__name__}')
    _check(w.dim() in (2, 3) and sf.dim() == w.dim(), ValueError,
           f'{what}: expected weight [E, N, *] and scale [E, N, *] (or 2-D), got {tuple(w.shape)} and {tuple(sf.shape)}')
    two_d = w.dim() == 2
    if two_d:
        w, sf = w[None], sf[None]
    if w.dtype == torch.uint8 and sf.dtype == torch.uint8:
        return 'mxfp4', (w, sf), two_d
    _check(sf.dtype == torch.int32, TypeError,
           f'{what}: scale must be int32 (four packed scale bytes per word, upstream) or uint8 UE8M0, got {sf.dtype}')
    # byte j of word p = scale group 4p + j; a fresh row-major copy (a size-1 last dimension can keep
    # an MN-major stride through .contiguous(), and a byte view needs stride 1)
    sb = sf.new_empty(sf.shape).copy_(sf).view(torch.uint8)
    if w.dtype == torch.float8_e4m3fn:
        k = w.shape[-1]
        _check(sb.shape[-1] * 32 == k, ValueError,
               f'{what}: FP8 weights with K = {k} need [.., K/128] = {k // 128} scale words, got {sf.shape[-1]}')
        return 'fp8', (w, sb), two_d
    _check(w.dtype in (torch.int8, torch.uint8), TypeError,
           f'{what}: weight must be packed E2M1 (int8/uint8), float8_e4m3fn or bfloat16, got {w.dtype}')
    k = 2 * w.shape[-1]
    wb = w.view(torch.uint8)
    if sb.shape[-1] * 32 == k:
        return 'mxfp4', (wb, sb), two_d
    if sb.shape[-1] * 16 == k:
        ones = torch.ones(w.shape[0], dtype=torch.float32, device=w.device)
        return 'nvfp4', {'weight': wb, 'weight_scale': sb.view(torch.float8_e4m3fn), 'weight_scale_2': ones}, two_d
    raise ValueError(f'{what}: {sf.shape[-1]} scale words per row fit neither MXFP4 (K/128 = {k // 128}) nor '
                     f'NVFP4 (K/64 = {k // 64}) for K = {k}')


def _dense(fmt: str, obj, what: str, kind: str) -> _Parsed:
    w, sb = obj
    _check(w.dim() == 3, ValueError, f'{what}: expected [E, N, K], got shape {tuple(w.shape)}')
    e, n, k = w.shape
    if fmt == 'fp8':
        _check(tuple(sb.shape) == (e, n, k // 32), ValueError,
               f'{what}: scale: expected [E, N, K/128] words for weight {tuple(w.shape)}, got {tuple(sb.shape)} bytes')
    else:
        sb = torch.empty(e, n, 0, dtype=torch.uint8, device=w.device)
    if fmt == 'bf16':
        _check(n % BLOCK_N == 0 and k % BLOCK_K == 0, ValueError,
               f'{what}: N = {n} and K = {k} must be multiples of {BLOCK_N} (the kernels\' weight blocks)')
    _check(n % 16 == 0 and k % 128 == 0, ValueError, f'{what}: N = {n} must be a multiple of 16 and K = {k} of 128')
    alpha = torch.ones(e, 2 if kind == 'l1' else 1, dtype=torch.float32, device=w.device)
    return _Parsed(what, kind, fmt, w.contiguous(), sb.contiguous(), alpha, e, n, k)


def _parse_any(obj, what: str, kind: str) -> Tuple[_Parsed, bool]:
    fmt, form, two_d = _upstream_form(obj, what)
    return (_dense(fmt, form, what, kind) if fmt in DENSE_FORMATS else _parse(form, what, kind, fmt)), two_d


def transform_weights_for_mega_moe(l1_weights, l2_weights, activation: str = 'swiglu'
                                   ) -> Tuple[ExpertWeights, ExpertWeights]:
    """Upstream DeepGEMM's weight transform: routed experts (``[E, N, K]``) or shared experts (2-D
    ``[N, K]``, returned with one expert) in any of upstream's forms (see ``_upstream_form``: MXFP4 or
    NVFP4 as (int8 codes, int32 packed scales, any strides), FP8 + UE8M0, BF16) or ours (MXFP4 with
    uint8 UE8M0 scales, ModelOpt NVFP4 dicts).  L1 rows are ``[gate rows | up rows]``.

    Returns :class:`ExpertWeights` (bytes permuted for the kernels, never re-quantized): pass them to
    the entry point of the same format (``fp8_fp4_mega_moe``, ``fp4_fp4_mega_moe``, ``bf16_mega_moe``,
    ``fp8_nvfp4_mega_moe``).  Upstream's NVFP4 tuples carry no global scale: ``alpha`` is 1 and the
    call's ``l1_alphas`` / ``l2_alphas`` apply.
    """
    if activation != 'swiglu':
        raise ValueError(f"activation: only 'swiglu' is supported, got {activation!r}")
    (p1, d1), (p2, d2) = _parse_any(l1_weights, 'l1_weights', 'l1'), _parse_any(l2_weights, 'l2_weights', 'l2')
    if (p1.fmt, d1) != (p2.fmt, d2):
        raise ValueError(f'l2_weights: {p2.fmt}{" 2-D" if d2 else ""} weights, l1_weights are '
                         f'{p1.fmt}{" 2-D" if d1 else ""}: both projections must have one format')
    _check_pair(p1, p2)
    return tuple(_permute(p) if p.fmt not in DENSE_FORMATS else _dense_weights(p) for p in (p1, p2))


def _dense_weights(p: _Parsed) -> ExpertWeights:
    codes = p.weight
    if p.fmt == 'bf16':
        rows = (_l1_kernel_row_order(p.n) if p.kind == 'l1' else torch.arange(p.n)).to(codes.device)
        codes = _bf16_blocks(codes, rows)
    return ExpertWeights(fmt=p.fmt, kind=p.kind, codes=codes, scales=p.scale_bytes, alpha=p.alpha,
                         num_experts=p.e, n=p.n, k=p.k)


def transform_nvfp4_weights_for_grouped_gemm(weight, weight_scale, weight_scale_2) -> ExpertWeights:
    """A single projection (no gate/up interleave) for the stand-alone grouped GEMM."""
    return _transform_one({'weight': weight, 'weight_scale': weight_scale, 'weight_scale_2': weight_scale_2},
                          'weights', 'l2', 'nvfp4')


def transform_mxfp4_weights_for_grouped_gemm(weight, weight_scale) -> ExpertWeights:
    return _transform_one((weight, weight_scale), 'weights', 'l2', 'mxfp4')
