"""The functional model of the sm100 grouped GEMM's kind::f16 recipes (issue #27), on top of interp.py.

* ``Recipe::NVFP4_EXACT``: the dequant warpgroup reads a stage's packed E2M1 codes and UE4M3 scale atoms
  from shared memory (``lds``), forms BF16 ``code * scale * 2^-7`` (``dequant_chunk``: emulated bit for
  bit, every integer operation of common/sm100_dequant.cuh + common/fp4_bits.cuh replayed on uint32
  words and every bf16 multiply checked to be exact, tests/test_fp4_bits.py's emulation), stores it
  into TMEM (``tmem_st``: tcgen05.st 32x32b, thread t -> lane base + t, register j -> column base + j,
  only the warp's lane quarter), and the MMA warp issues ``tcgen05.mma.cta_group::1.kind::f16`` with A
  from TMEM (``mma_ts``: row m = lane m, k = 32-bit column k / 2, half k % 2; the layout that
  tests/cpp/sm100_f16_conformance.cpp checks against CuTe) and B (BF16 tokens) from shared memory.
* ``Recipe::BF16``: ``mma`` with kind "f16", both operands BF16 K-major SW128 in shared memory.

The f16 instruction descriptor is decoded here from the PTX ISA's table (kind::f16: D format 4-5
(1 = F32), A / B format 7-9 / 10-12 (1 = BF16), negate 13 / 14, transpose (major) 15 / 16, N >> 3 at
17-22, M >> 4 at 24-28); K = 16 per MMA.  Not modelled (errors): F16 operands, MN-major, M != 128,
F16 accumulators, saturation, sparsity.  Hazards checked on top of interp.Machine's: a tcgen05.st into
TMEM columns an uncommitted MMA reads as A; an MMA reading A columns that no tcgen05.st wrote, or that
hold an accumulator; tcgen05.st outside the warp's lane quarter.

The data: NVFP4 weights by the package's ModelOpt cast, FP8 E4M3 tokens with UE8M0 per 32 (upstream's
cast) converted exactly to BF16 (deep_gemm.gemm_sm100.fp8_tokens_to_bf16); the reference is the
float64 product of the same quantized values (times 2^-7 for the exact recipe: the model stores raw
accumulators, the epilogue's compensation is not part of the stream).
"""
from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from . import interp
from .build import CPP, build
from .problem import T_D, T_GATE, T_UP, Problem, l1_kernel_rows

EMIT_F16_SRC = CPP / 'sm100_f16_model_emit.cpp'
COMPENSATION = 128.0


def emit_f16_exe() -> Path:
    # the emitter #includes tests/cpp/sm100_model_emit.cpp, which build()'s cache key (the source and
    # deep_gemm/include) does not cover: its hash goes in as a define so that a change rebuilds
    return build(EMIT_F16_SRC, cute=False, defines=[f'DG_EMIT_BASE_HASH={_base_hash()}'])


def _base_hash() -> str:
    import hashlib
    return hashlib.sha256((CPP / 'sm100_model_emit.cpp').read_bytes()).hexdigest()[:12]


# ------------------------------------------------------------------------------ the dequant, bit for bit
def _fp4_bits():
    from tests import test_fp4_bits as fb   # the emulation of common/fp4_bits.cuh's operations
    return fb


def dequant_chunk(codes: np.ndarray, scale_word: int, first_byte: int, wrong_scale_byte: bool = False) -> np.ndarray:
    """common/sm100_dequant.cuh dequant_chunk_nvfp4: 4 code words + a scale word -> 16 bf16x2 words."""
    fb = _fp4_bits()
    M32 = fb.M32

    def scale(b):
        byte = (np.uint64(scale_word) >> np.uint64(8 * b)) & np.uint64(0xFF)   # __byte_perm(w, 0, b|4<<4|b<<8|4<<12)
        spread = byte | (byte << np.uint64(16))
        return fb.ue4m3x2_to_bf16x2_biased(np.asarray([(int(spread) << 4) & M32], dtype=np.uint64), False)

    s0, s1 = scale(first_byte + (1 if wrong_scale_byte else 0)), scale(first_byte + 1)
    # all 16 lanes at once: x[w, i] = bf16x2 pair i of code word w, times word w's scale (s0: w < 2, s1: w >= 2)
    x = np.stack(fb.e2m1x8_to_bf16x8_bits(np.asarray([int(c) for c in codes], dtype=np.uint64)), axis=1)   # [4, 4]
    lo = np.asarray([s0[0][0], s0[0][0], s1[0][0], s1[0][0]], dtype=np.uint64)[:, None]
    hi = np.asarray([s0[1][0], s0[1][0], s1[1][0], s1[1][0]], dtype=np.uint64)[:, None]
    return fb.hmul2(x, lo, hi).reshape(-1).astype(np.uint64)                                           # 4 w + i


def bf16_bits_to_f64(h: np.ndarray) -> np.ndarray:
    return (np.asarray(h, dtype=np.uint64).astype(np.uint32) << np.uint32(16)).view(np.float32).astype(np.float64)


def decode_idesc_f16(d: int) -> Dict[str, int]:
    d = int(d)
    if d >> 32:
        raise interp.ModelError('instruction descriptor wider than 32 bits')
    b = interp._bits
    return dict(sparse_id2=b(d, 0, 2), sparse=b(d, 2, 1), saturate=b(d, 3, 1), d_fmt=b(d, 4, 2), bit6=b(d, 6, 1),
                a_fmt=b(d, 7, 3), b_fmt=b(d, 10, 3), a_neg=b(d, 13, 1), b_neg=b(d, 14, 1), a_major=b(d, 15, 1),
                b_major=b(d, 16, 1), n=b(d, 17, 6) << 3, bit23=b(d, 23, 1), m=b(d, 24, 5) << 4, bit29=b(d, 29, 1),
                max_shift=b(d, 30, 2))


class F16Machine(interp.Machine):
    def __post_init__(self):
        super().__post_init__()
        self.tags: Dict[int, int] = {}                      # register tag -> 32-bit value
        self.a_busy = np.zeros((interp.TMEM_LANES, interp.TMEM_COLS), dtype=bool)   # A of an uncommitted MMA
        self.a_written = np.zeros((interp.TMEM_LANES, interp.TMEM_COLS), dtype=bool)

    # ---------------------------------------------------------------- the dequant warpgroup
    def _op_lds(self, op):
        addr, n = int(op['addr']), int(op['bytes'])
        if addr % n:
            raise interp.ModelError(f'ld.shared of {n} bytes at {addr:#x}: misaligned')
        b = self._smem_read(addr + np.arange(n), 'ld.shared').astype(np.uint64).reshape(-1, 4)
        words = b[:, 0] | b[:, 1] << np.uint64(8) | b[:, 2] << np.uint64(16) | b[:, 3] << np.uint64(24)
        tags = op['tags']
        if len(tags) != words.size:
            raise interp.ModelError('ld.shared: tag count differs from the words read')
        for t, w in zip(tags, words):
            self.tags[int(t)] = int(w)

    def _val(self, t) -> int:
        v = self.tags.get(int(t))
        if v is None:
            raise interp.ModelError(f'register tag {t} read before it was written')
        return v

    def _op_dequant_chunk(self, op):
        codes = np.asarray([self._val(t) for t in op['codes']], dtype=np.uint64)
        fb = int(op['first_byte'])
        if fb not in (0, 2):
            raise interp.ModelError(f'dequant_chunk first_byte {fb}: a chunk covers scale bytes 0-1 or 2-3')
        out = dequant_chunk(codes, self._val(op['scale']), fb, bool(op.get('wrong_scale_byte')))
        for t, v in zip(op['out'], out):
            self.tags[int(t)] = int(v)

    def _op_tmem_st(self, op):
        if op.get('shape') != '32x32b':
            raise interp.ModelError(f'tcgen05.st shape {op.get("shape")} is not modelled')
        warp, lane, num = int(op['warp']), int(op['lane']), int(op['num'])
        lane0, col0 = self._taddr(op['taddr'])
        q = warp % 4
        if lane0 != 32 * q:
            raise interp.ModelError(f'warp {warp} stores to lane base {lane0}: its quarter starts at {32 * q}')
        ln = lane0 + lane
        cols = col0 + np.arange(num)
        if cols.max() >= interp.TMEM_COLS:
            raise interp.ModelError('tcgen05.st past the last TMEM column')
        if np.any(self.a_busy[ln, cols]):
            raise interp.ModelError('tcgen05.st overwrites A columns that an uncommitted MMA reads')
        if np.any(self.acc_pending[ln, cols]) or np.any(self.acc_ok[ln, cols]):
            raise interp.ModelError('tcgen05.st into accumulator columns')
        self.tmem[ln, cols] = np.asarray([self._val(t) for t in op['regs']], dtype=np.uint64).astype(np.uint32)
        self.tmem_ok[ln, cols] = True
        self.a_written[ln, cols] = True

    def _op_tmem_st_wait(self, op):
        pass

    # ---------------------------------------------------------------- kind::f16
    def _check_f16(self, op):
        idesc = decode_idesc_f16(int(op['idesc']))
        if idesc['sparse'] or idesc['saturate'] or idesc['max_shift'] or idesc['bit6'] or idesc['bit23'] or idesc['bit29']:
            raise interp.ModelError(f'f16 descriptor fields not modelled / reserved: {idesc}')
        if idesc['d_fmt'] != 1:
            raise interp.ModelError(f'D format {idesc["d_fmt"]} (only F32 = 1 is modelled)')
        if idesc['a_fmt'] != 1 or idesc['b_fmt'] != 1:
            raise interp.ModelError(f'A / B formats {idesc["a_fmt"]} / {idesc["b_fmt"]} (only BF16 = 1 is modelled)')
        if idesc['a_major'] or idesc['b_major']:
            raise interp.ModelError('MN-major operands are not modelled')
        if idesc['m'] != 128 or not interp.ptx_legal_shape(idesc['m'], idesc['n']):
            raise interp.ModelError(f'shape M {idesc["m"]} N {idesc["n"]}')
        return idesc

    def _bf16_operand(self, desc_word, rows: int, what: str) -> np.ndarray:
        d = interp.decode_smem_desc(int(desc_word))
        if d['version'] != 1 or d['reserved'] or d['lbo_mode'] or d['base_offset']:
            raise interp.ModelError(f'{what} descriptor fields {d}')
        if d['layout'] != 2:
            raise interp.ModelError(f'{what}: layout type {d["layout"]} (only SWIZZLE_128B K-major is modelled)')
        span = 128
        if (d['start'] >> 7) & 7:
            raise interp.ModelError(f'{what}: start {d["start"]:#x} not in the first row of a swizzle atom')
        if (d['start'] % span) + 32 > span:
            raise interp.ModelError(f'{what}: the 32-byte K run crosses the swizzle row')
        r, kb = np.arange(rows)[:, None], np.arange(32)[None, :]
        addr = interp.kmajor_sw_addr(d['start'], d['sbo'], r, kb, span)
        b = self._smem_read(addr, what).astype(np.uint64)
        h = b[:, 0::2] | (b[:, 1::2] << np.uint64(8))                 # [rows, 16] bf16 bits
        self.smem_busy[addr] = True
        v = bf16_bits_to_f64(h)
        if not np.isfinite(v).all():
            raise interp.ModelError(f'{what}: non-finite BF16 operand')
        return v

    def _accumulate(self, op, prod, n):
        lane, col = self._taddr(op['d'])
        if lane != 0 or col + n > interp.TMEM_COLS:
            raise interp.ModelError(f'D address lane {lane} column {col}')
        cols = slice(col, col + n)
        if np.any(self.a_written[:128, cols]):
            raise interp.ModelError('D columns overlap A columns of the dequant')
        if op['acc']:
            if not np.all(self.acc_ok[:128, cols]):
                raise interp.ModelError('accumulate into TMEM columns that hold no accumulator')
            self.acc[:128, cols] += prod
        else:
            self.acc[:128, cols] = prod
        self.acc_ok[:128, cols] = True
        self.acc_pending[:128, cols] = True
        self.tmem_ok[:128, cols] = True
        self.tmem[:128, cols] = self.acc[:128, cols].astype(np.float32).view(np.uint32)

    def _op_mma(self, op):
        if op.get('kind') != 'f16':
            return super()._op_mma(op)
        idesc = self._check_f16(op)
        a = self._bf16_operand(op['adesc'], 128, 'A')
        b = self._bf16_operand(op['bdesc'], idesc['n'], 'B')
        self._accumulate(op, (-a if idesc['a_neg'] else a) @ (-b if idesc['b_neg'] else b).T, idesc['n'])

    def _op_mma_ts(self, op):
        idesc = self._check_f16(op)
        lane, col = self._taddr(op['a'])
        if lane != 0:
            raise interp.ModelError(f'A TMEM address lane {lane} (M = 128 reads lanes 0..127)')
        cols = col + np.arange(8)
        if cols.max() >= interp.TMEM_COLS:
            raise interp.ModelError('A columns past the end of TMEM')
        if not np.all(self.a_written[:128, cols]):
            raise interp.ModelError('A from TMEM: columns that no tcgen05.st wrote')
        if np.any(self.acc_ok[:128, cols]) or np.any(self.acc_pending[:128, cols]):
            raise interp.ModelError('A from TMEM: columns hold an accumulator')
        w = self.tmem[:128, cols].astype(np.uint64)                            # [128, 8]
        h = np.stack([w & np.uint64(0xFFFF), w >> np.uint64(16)], axis=-1).reshape(128, 16)   # k = 2 c + half
        a = bf16_bits_to_f64(h)
        if not np.isfinite(a).all():
            raise interp.ModelError('A from TMEM: non-finite BF16')
        b = self._bf16_operand(op['bdesc'], idesc['n'], 'B')
        self.a_busy[:128, cols] = True
        self._accumulate(op, (-a if idesc['a_neg'] else a) @ (-b if idesc['b_neg'] else b).T, idesc['n'])

    def _op_commit(self, op):
        self.a_busy[:] = False
        super()._op_commit(op)

    def finish(self):
        super().finish()
        if np.any(self.a_busy):
            raise interp.ModelError('MMAs reading A from TMEM never committed')
        return self


def run_stream_f16(ops, tensors, outputs):
    """interp.run_stream with F16Machine per CTA."""
    return interp.run_stream(ops, tensors, outputs, machine_cls=F16Machine)


# ------------------------------------------------------------------------------ problems
@dataclass
class F16Problem(Problem):
    """Problem with recipe 'nvfp4_exact' or 'bf16' (tensors as scheduler/sm100_gemm_plan.cuh's comment:
    kTensorA NVFP4 codes (bits permuted by weights_sm100.to_sm100_exact) or BF16 weights, kTensorSFA the
    weight scale atoms (exact recipe), kTensorB BF16 tokens)."""

    def emit(self, exe: Optional[Path] = None) -> List[dict]:
        return super().emit(exe or emit_f16_exe())

    def build_data(self):
        from deep_gemm import weights_sm100 as w100
        from deep_gemm.gemm_sm100 import fp8_tokens_to_bf16
        from deep_gemm.utils import cast_to_nvfp4_experts, per_token_cast_to_fp8
        from deep_gemm.utils.quant import e2m1_to_float, unpack_e2m1
        w, x = self.random_weights_tokens(2000)
        e_num, n, k, rows = len(self.counts), self.n, self.k, self.total_rows
        # tokens: upstream's FP8 cast (E4M3, UE8M0 per 32), then exactly to BF16 (the gather's conversion)
        xq, xsf = per_token_cast_to_fp8(x, use_ue8m0=True, gran_k=32)
        _, ex = torch.frexp(xsf)
        xb = fp8_tokens_to_bf16(xq, (ex - 1 + 127).to(torch.uint8))
        self.x_dq = xb.to(torch.float64).numpy()
        b = interp.GTensor(xb.view(torch.int16).numpy().view(np.uint8), dims=[k, rows], strides=[2 * k], dtype='u16')
        kind = 'l1' if self.epilogue == 'swiglu' else 'l2'
        if self.recipe == 'nvfp4_exact':
            packed, scale, _ = cast_to_nvfp4_experts(w)
            self.w_dq = (e2m1_to_float(unpack_e2m1(packed), torch.float64)
                         * scale.to(torch.float64).repeat_interleave(16, -1)).numpy() / COMPENSATION
            gs = torch.ones(e_num, 2) if kind == 'l1' else torch.ones(e_num)
            ws = w100.to_sm100_exact(w100.transform_nvfp4_weights_for_sm100(packed, scale, gs, kind=kind))
            a = interp.GTensor(ws.codes.reshape(e_num * n, k // 2).numpy(), dims=[k // 2, e_num * n], strides=[k // 2],
                               dtype='u8')
            sfa = ws.scales.reshape(-1).numpy()
            self.tensors = {0: a, 1: interp.GTensor(sfa, dims=[sfa.size], strides=[]), 2: b}
        else:
            wb = w.to(torch.bfloat16)
            self.w_dq = wb.to(torch.float64).numpy()
            ws = w100.transform_bf16_weights_for_sm100(wb, kind=kind)
            a = interp.GTensor(ws.codes.reshape(e_num * n, k).view(torch.int16).numpy().view(np.uint8),
                               dims=[k, e_num * n], strides=[2 * k], dtype='u16')
            self.tensors = {0: a, 2: b}
        return self


def run_model_f16(p: F16Problem, ops: List[dict]):
    return run_stream_f16(ops, p.tensors, p.output_shapes())


# ------------------------------------------------------------------------------ broken plans (stream mutations)
def _copy(ops):
    return [dict(o) for o in ops]


def a_chunks_swapped(ops):
    """The dequant stores chunk c at chunk c ^ 1's columns (a wrong A layout in TMEM)."""
    out = _copy(ops)
    for o in out:
        if o['op'] == 'tmem_st':
            o['taddr'] = int(o['taddr']) ^ 16
    return out


def a_kk_offset(ops):
    """The MMA reads A of MMA kk at column 8 kk + 4 (half a k16 step off)."""
    out = _copy(ops)
    for o in out:
        if o['op'] == 'mma_ts':
            o['a'] = int(o['a']) + 4
    return out


def wrong_scale_byte(ops):
    """The first 16 k of every chunk use the second block's scale."""
    out = _copy(ops)
    for o in out:
        if o['op'] == 'dequant_chunk':
            o['wrong_scale_byte'] = True
    return out


def a_empty_never_committed(ops):
    """No tcgen05.commit to the A slots' empty barriers: the dequant's wait cannot complete."""
    def is_a_empty(o, head):
        s = head['stages']
        return o['op'] == 'commit' and int(o['mbar']) >= 2 * s + 6
    head = ops[0]
    return [o for o in ops if not is_a_empty(o, head)]


def st_before_commit(ops):
    """A tcgen05.st of the second use of A slot 0 moved before the tcgen05.commit that ends the slot's first
    MMAs (the overwrite that the a_empty wait prevents)."""
    out = _copy(ops)
    first_mma = next(i for i, o in enumerate(out) if o['op'] == 'mma_ts')
    a0 = int(out[first_mma]['a']) & 0xFFFF                       # slot 0's first column
    commit = next(i for i, o in enumerate(out) if i > first_mma and o['op'] == 'commit')
    j = next(i for i, o in enumerate(out) if i > commit and o['op'] == 'tmem_st'
             and a0 <= (int(o['taddr']) & 0xFFFF) < a0 + 128)
    out.insert(commit, out.pop(j))
    return out


MUTATIONS = {'a_chunks_swapped': a_chunks_swapped, 'a_kk_offset': a_kk_offset, 'wrong_scale_byte': wrong_scale_byte,
             'a_empty_never_committed': a_empty_never_committed, 'st_before_commit': st_before_commit}
