"""The fused sm100 Mega MoE kernel's compute on the functional model: one or more emulated ranks.

Recipes: NVFP4 and MXFP4_FP8 (block-scaled, interp.Machine) and the kind::f16 ones, NVFP4_EXACT (dequant
warpgroup, TS MMA) and BF16 (SS), on f16.F16Machine; the f16 recipes' token rows are BF16 at the unpadded
rows and their L2 input is the BF16 h of the stream's h ops; NVFP4_EXACT is checked against deep_gemm.reference
(check_exact), the others against deep_gemm.reference_recipes (check).

tests/cpp/sm100_fused_model_emit.cpp runs one rank's roles (the kernel's work order, plan steps,
padded rows and epilogues, host-device code) under a cooperative scheduler and prints their op stream;
this driver executes it as it comes on the interpreter (interp.Machine, one per CTA), answers each
tcgen05.ld with the registers the interpreter computed, and keeps the rank's global memory: the padded
L1 input (written by the stream's gather ops from the source ranks' tokens), the L2 input (written by
the stream's l2x ops: the bytes quantize_l2_input stored), the combine rows (cstore) and, with pushes,
the sources' combine_in (push).  Ranks run one after the other (barrier 0 before any rank starts,
barrier 1 after all have finished: the phases of the protocol, not interleaved); then every rank's
tokens are reduced from their combine sources (mega::reduce_tokens' rule, written here: slots in
increasing order in float32, one BF16 rounding) and compared with deep_gemm.reference_recipes.

Checks made while the stream runs (ModelError): the interpreter's (barriers, copies, MMAs, TMEM), every
TMA / bulk copy of the L1 or L2 input reads only written bytes at the rows of valid tokens (this
module's own padded layout: token tile i at rows [i block_t, (i + 1) block_t)), every unit starts once,
in claim order, an L1 unit only after its rows were gathered and an L2 unit only after all L1 units of
its (expert, token tile) were done, each combine element written once.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from . import interp
from .build import CPP, build

EMIT_SRC = CPP / 'sm100_fused_model_emit.cpp'
T_L1_B, T_L1_SFB, T_L2_B, T_L2_SFB = 2, 3, 10, 11


def emit_exe(faults: bool = False) -> Path:
    if faults:
        return build(EMIT_SRC, cute=False, defines=['DG_EMIT_FAULTS'], name='sm100_fused_model_emit_faults')
    return build(EMIT_SRC, cute=False)


def _f32bits(v) -> int:
    return int(np.float32(v).view(np.uint32))


def _bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits, dtype=np.uint32) << 16).view(np.float32)


def _f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(torch.bfloat16).view(torch.int16).numpy().astype(np.uint16)


@dataclass
class FusedProblem:
    recipe: str = 'nvfp4'              # nvfp4 (fp4xfp4) | mxfp4_fp8 (fp8xfp4) | nvfp4_exact (fp8_nvfp4) | bf16
    ranks: int = 1
    experts_per_rank: int = 4
    hidden: int = 512
    inter: int = 256
    topk: int = 2
    tokens: tuple = (40,)              # per rank
    empty_experts: tuple = (1,)        # global experts that receive no pair
    block_t: int = 32
    stages: int = 2
    ctas: int = 1
    seed: int = 0
    lookahead_experts: int = 0
    lookahead_units: int = 0
    push: int = 0

    # filled by build()
    data: dict = field(default_factory=dict)

    @property
    def nvfp4(self) -> bool:
        return self.recipe == 'nvfp4'

    @property
    def f16(self) -> bool:
        """The kind::f16 recipes: BF16 token rows at the unpadded rows, BF16 h as the L2 input."""
        return self.recipe in ('nvfp4_exact', 'bf16')

    @property
    def gran(self) -> int:
        return 16 if self.nvfp4 else 32

    def row_base(self, tile: int, first_row: int) -> int:
        """The first kernel row of a token tile: padded (tile x block_t) or, f16 recipes, its own first row."""
        return first_row if self.f16 else tile * self.block_t

    # ------------------------------------------------------------------------------ data
    def build(self) -> 'FusedProblem':
        from deep_gemm import weights_sm100 as w100
        from deep_gemm.utils import cast_to_mxfp4, cast_to_nvfp4_experts, per_token_cast_to_fp8, per_token_cast_to_nvfp4
        from deep_gemm.utils.quant import e2m1_to_float, unpack_e2m1
        g = torch.Generator().manual_seed(7000 + self.seed)
        R, El, H, I, k = self.ranks, self.experts_per_rank, self.hidden, self.inter, self.topk
        E = R * El
        assert len(self.tokens) == R
        allowed = [e for e in range(E) if e not in self.empty_experts]
        xs, x_codes, x_sf, x_dq, idx, wts = [], [], [], [], [], []
        for r in range(R):
            t = self.tokens[r]
            x = torch.randn(t, H, generator=g) * torch.exp(torch.randn(t, 1, generator=g) * 0.5)
            if self.f16:
                if self.recipe == 'bf16':
                    xb = x.to(torch.bfloat16)
                    c, sb = xb, torch.zeros(t, 0)
                else:   # FP8 E4M3 with UE8M0 per 32 (exact in BF16: the gather's Fp8ToBf16Row)
                    from deep_gemm.gemm_sm100 import fp8_tokens_to_bf16
                    c, s = per_token_cast_to_fp8(x, use_ue8m0=True, gran_k=32)
                    _, ex = torch.frexp(s)
                    xb = fp8_tokens_to_bf16(c, (ex - 1 + 127).to(torch.uint8))
                    sb = s
                dq = xb.to(torch.float64)
                xs.append(c)
                c = xb.view(torch.int16).numpy().view(np.uint8)   # the gathered BF16 row bytes
                c = torch.from_numpy(c.copy())
            elif self.nvfp4:
                c, s = per_token_cast_to_nvfp4(x, use_packed_sf=False)
                c = c.view(torch.uint8)
                sb = s.to(torch.float8_e4m3fn).view(torch.uint8)
                dq = e2m1_to_float(unpack_e2m1(c), torch.float64) * s.to(torch.float64).repeat_interleave(16, -1)
            else:
                c, s = per_token_cast_to_fp8(x, use_ue8m0=True, gran_k=32)
                _, ex = torch.frexp(s)
                sb = (ex - 1 + 127).to(torch.uint8)
                dq = c.to(torch.float64) * s.to(torch.float64).repeat_interleave(32, -1)
                c = c.view(torch.uint8)
            # skewed routing: non-uniform counts, the empty experts never chosen
            pref = torch.tensor([2.0 ** (-(e % 3)) for e in allowed])
            ti = torch.stack([torch.multinomial(pref, k, replacement=False, generator=g) for _ in range(t)]) if t else \
                torch.zeros(0, k, dtype=torch.int64)
            ti = torch.tensor(allowed)[ti].to(torch.int64)
            tw = (torch.randint(1, 8, (t, k), generator=g).float() / 4.0)     # exact small weights
            x_codes.append(c.numpy()), x_sf.append(sb.numpy()), x_dq.append(dq.to(torch.float32)), idx.append(ti), wts.append(tw)
        # weights of all experts (rank r owns [r El, (r + 1) El))
        w1 = torch.randn(E, 2 * I, H, generator=g) * torch.exp(torch.randn(E, 2 * I, 1, generator=g) * 0.3)
        w2 = torch.randn(E, H, I, generator=g) * torch.exp(torch.randn(E, H, 1, generator=g) * 0.3)
        if self.f16:
            w1_dq, w2_dq, t1, t2, l1_alphas, l2_alphas, a2 = self._f16_weights(w1, w2)
        elif self.nvfp4:
            p1, s1, _ = cast_to_nvfp4_experts(w1)
            p2, s2, _ = cast_to_nvfp4_experts(w2)
            dq = lambda p, s: e2m1_to_float(unpack_e2m1(p), torch.float64) * s.to(torch.float64).repeat_interleave(16, -1)
            w1_dq, w2_dq = dq(p1, s1), dq(p2, s2)
            t1 = w100.transform_nvfp4_weights_for_sm100(p1, s1, torch.ones(E, 2), kind='l1')
            t2 = w100.transform_nvfp4_weights_for_sm100(p2, s2, torch.ones(E), kind='l2')
            l1_alphas = torch.tensor([[1.0, 0.5] if e % 2 else [0.5, 2.0] for e in range(E)], dtype=torch.float32)
            l2_alphas = torch.full((E,), 0.25, dtype=torch.float32)
            a2 = torch.tensor([2.0 if e % 2 else 4.0 for e in range(E)], dtype=torch.float32)
        else:
            p1, s1 = cast_to_mxfp4(w1)
            p2, s2 = cast_to_mxfp4(w2)
            dq = lambda p, s: e2m1_to_float(unpack_e2m1(p), torch.float64) * torch.ldexp(
                torch.ones_like(s, dtype=torch.float64), s.long() - 127).repeat_interleave(32, -1)
            w1_dq, w2_dq = dq(p1, s1), dq(p2, s2)
            t1 = w100.transform_mxfp4_weights_for_sm100(p1, s1, kind='l1')
            t2 = w100.transform_mxfp4_weights_for_sm100(p2, s2, kind='l2')
            l1_alphas = torch.ones(E, 2)
            l2_alphas = torch.ones(E)
            a2 = torch.ones(E)
        self.data = dict(x_fp8=xs, x_codes=x_codes, x_sf=x_sf, x_dq=x_dq, idx=idx, wts=wts, w1_dq=w1_dq, w2_dq=w2_dq,
                         t1=t1, t2=t2, l1_alphas=l1_alphas, l2_alphas=l2_alphas, a2=a2)
        self._route()
        return self

    def _f16_weights(self, w1, w2):
        """The f16 recipes' weights: NVFP4 (ModelOpt cast) in the exact recipe's layout (to_sm100_exact), with
        power-of-two alphas; or BF16 (transform_bf16_weights_for_sm100), alphas 1."""
        from deep_gemm import weights_sm100 as w100
        from deep_gemm.utils import cast_to_nvfp4_experts
        from deep_gemm.utils.quant import e2m1_to_float, unpack_e2m1
        E = w1.shape[0]
        if self.recipe == 'bf16':
            w1b, w2b = w1.to(torch.bfloat16), w2.to(torch.bfloat16)
            t1 = w100.transform_bf16_weights_for_sm100(w1b, kind='l1')
            t2 = w100.transform_bf16_weights_for_sm100(w2b, kind='l2')
            return (w1b.to(torch.float64), w2b.to(torch.float64), t1, t2, torch.ones(E, 2), torch.ones(E), torch.ones(E))
        p1, s1, _ = cast_to_nvfp4_experts(w1)
        p2, s2, _ = cast_to_nvfp4_experts(w2)
        dq = lambda p, s: e2m1_to_float(unpack_e2m1(p), torch.float64) * s.to(torch.float64).repeat_interleave(16, -1)
        t1 = w100.to_sm100_exact(w100.transform_nvfp4_weights_for_sm100(p1, s1, torch.ones(E, 2), kind='l1'))
        t2 = w100.to_sm100_exact(w100.transform_nvfp4_weights_for_sm100(p2, s2, torch.ones(E), kind='l2'))
        # power-of-two alphas of about the global scales (the weights' block dequantization is w / global scale, ~2^9 w):
        # the gates stay well inside FP32 expf's range (the kernel's silu is -0 for a gate below about -88, where
        # reference.py's float64 silu gives a tiny negative value)
        l1_alphas = torch.tensor([[2.0 ** -9, 2.0 ** -10] if e % 2 else [2.0 ** -10, 2.0 ** -8] for e in range(E)],
                                 dtype=torch.float32)
        l2_alphas = torch.tensor([2.0 ** -8 if e % 2 else 2.0 ** -10 for e in range(E)], dtype=torch.float32)
        return dq(p1, s1), dq(p2, s2), t1, t2, l1_alphas, l2_alphas, torch.ones(E)

    def _route(self):
        """Rows of each owner rank: local expert by local expert, pairs in (source rank, token, slot)
        order (one legal order of the routing's atomics); pair_row on the sources."""
        d, El, k = self.data, self.experts_per_rank, self.topk
        d['row_src'], d['counts'] = [], []
        d['pair_row'] = [np.full(self.tokens[s] * k, -1, dtype=np.int64) for s in range(self.ranks)]
        for o in range(self.ranks):
            rows, counts = [], []
            for e in range(El):
                ge = o * El + e
                n0 = len(rows)
                for s in range(self.ranks):
                    for t in range(self.tokens[s]):
                        for j in range(k):
                            if int(d['idx'][s][t, j]) == ge:
                                d['pair_row'][s][t * k + j] = len(rows)
                                rows.append((s, t, j))
                counts.append(len(rows) - n0)
            d['row_src'].append(rows)
            d['counts'].append(counts)

    # ------------------------------------------------------------------------------ reference
    def reference(self):
        """(y per rank, bf16 bits; per-slot rows {(s, t, j): bf16 bits [H]}; receive stats [E])."""
        from deep_gemm.reference_recipes import recipe_expert_forward, reference_recipe_moe
        d, E = self.data, self.ranks * self.experts_per_rank
        if self.recipe == 'nvfp4_exact':
            return self._reference_exact()
        x = torch.cat(d['x_dq'])
        idx, wts = torch.cat(d['idx']), torch.cat(d['wts'])
        stats = torch.zeros(E, dtype=torch.int32)
        kw = dict(l1_alphas=d['l1_alphas'], l2_alphas=d['l2_alphas'], a2_scales=d['a2']) if self.nvfp4 else {}
        recipe = 'fp4xfp4' if self.nvfp4 else 'bf16xbf16' if self.recipe == 'bf16' else 'fp8xfp4'
        y = reference_recipe_moe(recipe, x, idx, wts, d['w1_dq'].float(), d['w2_dq'].float(), num_experts=E,
                                 cumulative_local_expert_recv_stats=stats, **kw)
        ys, off = [], 0
        for t in self.tokens:
            ys.append(y[off:off + t].view(torch.int16).numpy().astype(np.uint16))
            off += t
        slots = {}
        path = 'nvfp4' if self.nvfp4 else 'bf16' if self.recipe == 'bf16' else 'fp8'
        for ge in range(E):
            pairs = [(s, t, j) for s in range(self.ranks) for t in range(self.tokens[s]) for j in range(self.topk)
                     if int(d['idx'][s][t, j]) == ge]
            if not pairs:
                continue
            xe = torch.stack([d['x_dq'][s][t] for s, t, _ in pairs])
            we = torch.tensor([float(d['wts'][s][t, j]) for s, t, j in pairs], dtype=torch.float32)
            ekw = dict(l1_alpha=tuple(d['l1_alphas'][ge].tolist()), l2_alpha=float(d['l2_alphas'][ge]),
                       a2_scale=float(d['a2'][ge])) if self.nvfp4 else {}
            out = recipe_expert_forward(path, xe, d['w1_dq'][ge].float(), d['w2_dq'][ge].float(), we, None, **ekw)
            bits = out.view(torch.int16).numpy().astype(np.uint16)
            for i, p in enumerate(pairs):
                slots[p] = bits[i]
        return ys, slots, stats.numpy()

    def _reference_exact(self):
        """fp8_nvfp4_mega_moe's numerics: deep_gemm.reference.reference_moe_forward (FP8 tokens with their float32
        scales, the weights' block dequantization, the alphas) on every rank's tokens, combine_slots for y."""
        from deep_gemm.reference import combine_slots, reference_moe_forward
        d, E = self.data, self.ranks * self.experts_per_rank
        x, x_sf = torch.cat(d['x_fp8']), torch.cat([torch.from_numpy(v) for v in d['x_sf']])
        idx, wts = torch.cat(d['idx']), torch.cat(d['wts'])
        out, st = reference_moe_forward(x, x_sf, idx, wts, d['w1_dq'], d['l1_alphas'], d['w2_dq'],
                                        d['l2_alphas'].reshape(E, 1), num_experts=E)
        y = combine_slots(out, idx)
        ys, slots, off = [], {}, 0
        for s, t in enumerate(self.tokens):
            ys.append(y[off:off + t].view(torch.int16).numpy().astype(np.uint16))
            for tt in range(t):
                for j in range(self.topk):
                    slots[(s, tt, j)] = out[off + tt, j].view(torch.int16).numpy().astype(np.uint16)
            off += t
        return ys, slots, st['recv_count'].numpy()

    # ------------------------------------------------------------------------------ one rank's run
    def problem_file(self, rank: int) -> str:
        d, El = self.data, self.experts_per_rank
        rows = d['row_src'][rank]
        code = {'nvfp4': 0, 'mxfp4_fp8': 1, 'nvfp4_exact': 2, 'bf16': 3}[self.recipe]
        head = [code, self.block_t, self.stages, self.hidden, self.inter, El, self.ctas, self.seed,
                self.lookahead_experts, self.lookahead_units, self.push, rank]
        vals = head + d['counts'][rank] + [len(rows)] + [s for s, _, _ in rows]
        vals += [_f32bits(d['wts'][s][t, j]) for s, t, j in rows]
        for e in range(El):
            ge = rank * El + e
            if self.nvfp4:
                a2 = np.float32(d['a2'][ge])
                vals += [_f32bits(d['l1_alphas'][ge, 0]), _f32bits(d['l1_alphas'][ge, 1]),
                         _f32bits(np.float32(d['l2_alphas'][ge]) * a2), _f32bits(np.float32(1.0) / a2)]
            elif self.recipe == 'nvfp4_exact':   # l1 gate, up; l2 (the emitter multiplies the 2^7 in)
                vals += [_f32bits(d['l1_alphas'][ge, 0]), _f32bits(d['l1_alphas'][ge, 1]), _f32bits(d['l2_alphas'][ge]),
                         _f32bits(1.0)]
            else:
                vals += [_f32bits(1.0)] * 4
        return ' '.join(map(str, vals)) + '\n'

    def tensors(self, rank: int, token_tiles: int, rng: np.random.Generator) -> Dict[int, interp.GTensor]:
        d, El, H, I = self.data, self.experts_per_rank, self.hidden, self.inter
        sl = slice(rank * El, (rank + 1) * El)
        if self.f16:
            return self._tensors_f16(rank, rng)
        out = {}
        for base, t, n, k in ((0, d['t1'], 2 * I, H), (8, d['t2'], H, I)):
            codes = t.codes[sl].reshape(El * n, k // 2).numpy()
            if self.nvfp4:
                out[base] = interp.GTensor(codes, dims=[k // 2, El * n], strides=[k // 2], dtype='u8')
            else:
                out[base] = interp.GTensor(codes, dims=[k, El * n], strides=[k // 2], dtype='u4_align16b')
            sc = t.scales[sl].reshape(-1).numpy()
            out[base + 1] = interp.GTensor(sc, dims=[sc.size], strides=[])
        prows = max(128, -(-token_tiles * self.block_t // 128) * 128)
        for tb, k in ((T_L1_B, H), (T_L2_B, I)):
            row_bytes = k // 2 if self.nvfp4 else k
            # stale memory: valid but arbitrary codes and scales (what padding rows hold)
            stale = rng.integers(0, 256, prows * row_bytes) if self.nvfp4 else rng.integers(0, 0x70, prows * row_bytes)
            dims = [k // 2 if self.nvfp4 else k, prows]
            out[tb] = interp.GTensor(stale.astype(np.uint8), dims=dims, strides=[row_bytes], dtype='u8' if self.nvfp4 else 'e4m3')
            nsf = prows // 128 * (-(-(k // self.gran) // 4)) * 512
            sf = rng.integers(0x30, 0x40, nsf) if self.nvfp4 else rng.integers(120, 130, nsf)
            out[tb + 1] = interp.GTensor(sf.astype(np.uint8), dims=[nsf], strides=[])
        return out

    def _tensors_f16(self, rank: int, rng: np.random.Generator) -> Dict[int, interp.GTensor]:
        """Weights (NVFP4 codes + scale atoms of the exact layout, or BF16) and the BF16 token tensors at the
        unpadded rows (one tile's worth of stale finite BF16 rows past the last)."""
        d, El, H, I = self.data, self.experts_per_rank, self.hidden, self.inter
        sl = slice(rank * El, (rank + 1) * El)
        out = {}
        for base, t, n, k in ((0, d['t1'], 2 * I, H), (8, d['t2'], H, I)):
            if self.recipe == 'bf16':
                codes = t.codes[sl].reshape(El * n, k).view(torch.int16).numpy().view(np.uint8)
                out[base] = interp.GTensor(codes, dims=[k, El * n], strides=[2 * k], dtype='u16')
            else:
                codes = t.codes[sl].reshape(El * n, k // 2).numpy()
                out[base] = interp.GTensor(codes, dims=[k // 2, El * n], strides=[k // 2], dtype='u8')
                sc = t.scales[sl].reshape(-1).numpy()
                out[base + 1] = interp.GTensor(sc, dims=[sc.size], strides=[])
        rows = len(d['row_src'][rank]) + self.block_t
        for tb, k in ((T_L1_B, H), (T_L2_B, I)):
            stale = torch.from_numpy(rng.standard_normal(rows * k).astype(np.float32)).to(torch.bfloat16)
            out[tb] = interp.GTensor(stale.view(torch.int16).numpy().view(np.uint8).copy(), dims=[k, rows], strides=[2 * k],
                                     dtype='u16')
        return out


class RankRun:
    """One rank's stream through the interpreter, with the driver's global memory and checks."""

    def __init__(self, p: FusedProblem, rank: int, fault: Optional[str] = None, check_order: bool = True,
                 mutate=None):
        """``mutate``: a name of tests/sm100_model/f16.py's MUTATIONS applied to each op as it comes (a broken
        dequant or TS MMA: a negative control of the f16 recipes)."""
        self.p, self.rank, self.fault, self.check_order = p, rank, fault, check_order
        self.mutate = None
        if mutate is not None:
            from .f16 import MUTATIONS
            self.mutate = MUTATIONS[mutate]
        self.rows = p.data['row_src'][rank]
        self.combine = np.zeros((len(self.rows), p.hidden), dtype=np.uint16)
        self.combine_ok = np.zeros((len(self.rows), p.hidden), dtype=bool)
        self.pushes: List[int] = []
        self.units_started: Dict[int, dict] = {}
        self.machines: Dict[int, interp.Machine] = {}

    def _expected_tiles(self):
        """This module's own padded layout: (tile index, first unpadded row, rows) of each token tile."""
        p, out, tile, row = self.p, [], 0, 0
        for c in p.data['counts'][self.rank]:
            for tt in range(-(-c // p.block_t)):
                out.append((tile, row + tt * p.block_t, min(p.block_t, c - tt * p.block_t)))
                tile += 1
            row += c
        return out

    def run(self, timeout: float = 300.0):
        p = self.p
        exe = emit_exe(self.fault is not None)
        tiles = self._expected_tiles()
        self.tensors = p.tensors(self.rank, len(tiles), np.random.default_rng(100 + self.rank))
        # bytes of valid token rows (padded numbering) in the four token tensors, and written masks
        valid_rows = np.zeros(self.tensors[T_L1_B].dims[1], dtype=bool)
        for t, r0, n in tiles:
            valid_rows[p.row_base(t, r0): p.row_base(t, r0) + n] = True
        self.valid_rows = valid_rows
        self.written, self._need_cache, self.current = {}, {}, {}
        self.tile_first = {t: r0 for t, r0, _ in tiles}
        for t_ in (T_L1_B, T_L1_SFB, T_L2_B, T_L2_SFB):
            if t_ not in self.tensors:
                continue
            self.written[t_] = np.zeros(self.tensors[t_].data.size, dtype=bool)
        self.tile_rows = {t: n for t, _, n in tiles}
        self.gathered = {t: 0 for t, _, _ in tiles}
        self.l1_done = {t: 0 for t, _, _ in tiles}
        self.l2_done = {t: 0 for t, _, _ in tiles}
        env = dict(os.environ)
        if self.fault is not None:
            env['DG_FUSED_FAULT'] = self.fault
        with tempfile.NamedTemporaryFile('w', suffix='.txt', delete=False) as f:
            f.write(p.problem_file(self.rank))
            path = f.name
        proc = subprocess.Popen([str(exe), path], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=env, bufsize=1)
        self.head, self.claims, self.ops = None, [], 0
        ended = False
        try:
            for i, line in enumerate(proc.stdout):
                op = json.loads(line)
                if self.mutate is not None:
                    op = self.mutate([op])[0]
                self.ops += 1
                reply = self._step(i, op)
                if reply is not None:
                    proc.stdin.write(reply + '\n')
                    proc.stdin.flush()
                if op['op'] == 'end':
                    ended = True
            rc = proc.wait(timeout=timeout)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            os.unlink(path)
        err = proc.stderr.read()
        if rc != 0 or not ended:
            raise interp.ModelError(f'rank {self.rank}: emit program failed ({rc}): {err.strip()[-1500:]}')
        for m in self.machines.values():
            m.finish()
        self._final_checks()
        return self

    # ------------------------------------------------------------------------------ one op
    def _machine(self, cta: int) -> interp.Machine:
        m = self.machines.get(cta)
        if m is None:
            if self.p.f16:
                from .f16 import F16Machine
                m = self.machines[cta] = F16Machine(self.tensors)
            else:
                m = self.machines[cta] = interp.Machine(self.tensors)
        return m

    def _need(self, tid: int, tile: int) -> np.ndarray:
        """Bytes of token tile ``tile``'s valid rows in token tensor ``tid`` (this module's padded layout)."""
        key = (tid, tile)
        if key not in self._need_cache:
            p = self.p
            rows = p.row_base(tile, self.tile_first[tile]) + np.arange(self.tile_rows[tile])
            base = tid if tid in (T_L1_B, T_L2_B) else tid - 1
            k = p.hidden if base == T_L1_B else p.inter
            need = np.zeros(self.tensors[tid].data.size, dtype=bool)
            if tid == base:
                rb = self.tensors[tid].strides[0]
                need[(rows[:, None] * rb + np.arange(rb)[None, :]).reshape(-1)] = True
            else:
                kb = k // p.gran
                m_i, k_i = np.meshgrid(rows, np.arange(kb), indexing='ij')
                need[interp.sf_global_offset(m_i, k_i, kb).reshape(-1)] = True
            self._need_cache[key] = need
        return self._need_cache[key]

    def _check_read(self, op):
        tid = int(op['tensor'])
        if tid not in self.written:
            return
        t = self.tensors[tid]
        if op['op'] == 'tma_load':
            c0, c1 = (int(c) for c in op['coords'])
            b0, b1 = (int(b) for b in op['box'])
            rb = t.strides[0]
            ebytes = 2 if t.dtype == 'u16' else 1            # u8 / e4m3 elements, BF16
            rows = np.arange(c1, min(c1 + b1, t.dims[1]))
            idx = (rows[:, None] * rb + c0 * ebytes + np.arange(b0 * ebytes)[None, :]).reshape(-1)
        else:
            g, n = int(op['gofs']), int(op['bytes'])
            idx = np.arange(g, min(g + n, t.data.size))
        cur = self.current.get(int(op['cta']))
        if cur is None:
            raise interp.ModelError(f'{op["op"]} of tensor {tid} before any unit started on CTA {op["cta"]}')
        need = self._need(tid, cur['tile_index'])
        bad = need[idx] & ~self.written[tid][idx]
        if bad.any():
            raise interp.ModelError(f'{op["op"]} of tensor {tid} reads {int(bad.sum())} bytes of valid token rows '
                                    'that nothing wrote yet (gather / L2-input dependency)')

    def _step(self, i: int, op: dict) -> Optional[str]:
        name = op['op']
        p, d = self.p, self.p.data
        if name == 'problem':
            self.head = op
            if op['token_tiles'] != len(self.tile_rows):
                raise interp.ModelError('the work order has a different number of token tiles than the counts')
            return None
        if name in ('tma_load', 'bulk_copy'):
            self._check_read(op)
        if name in ('init_barrier', 'wait', 'arrive', 'arrive_expect_tx', 'tma_load', 'bulk_copy', 'fence_after',
                    'fence_before', 'utccp', 'mma', 'commit', 'tmem_ld', 'tmem_ld_wait',
                    'lds', 'dequant_chunk', 'tmem_st', 'tmem_st_wait', 'mma_ts'):
            m = self._machine(int(op['cta']))
            m.step(i, op, f', rank {self.rank} cta {op["cta"]}')
            if name == 'tmem_ld':
                regs = np.asarray(m.regs[(int(op['warp']), int(op['lane']))], dtype=np.float32).view(np.uint32)
                return ' '.join(map(str, regs.tolist()))
            return None
        if name == 'claim':
            if self.claims and op['unit'] <= self.claims[-1]:
                raise interp.ModelError('units claimed out of order')
            self.claims.append(op['unit'])
        elif name == 'unit_start':
            u = op['unit']
            if u in self.units_started:
                raise interp.ModelError(f'unit {u} started twice')
            self.units_started[u] = op
            self.current[int(op['cta'])] = op          # the producer's unit: its copies follow
            t = op['tile_index']
            if not self.check_order:      # (a negative control: only the data checks below remain)
                pass
            elif op['phase'] == 0 and self.gathered[t] < self.tile_rows[t]:
                raise interp.ModelError(f'L1 unit {u} starts before its token tile {t} was gathered')
            elif op['phase'] == 1 and self.l1_done[t] < self.head['l1_row_tiles']:
                raise interp.ModelError(f'L2 unit {u} starts after {self.l1_done[t]} of its '
                                        f'{self.head["l1_row_tiles"]} L1 units (token tile {t})')
        elif name == 'unit_done':
            t = op['tile_index']
            (self.l1_done if op['phase'] == 0 else self.l2_done)[t] += 1
        elif name == 'gather':
            row, prow = int(op['row']), int(op['prow'])
            s, t, _ = self.rows[row]
            H = p.hidden
            cb = self.tensors[T_L1_B]
            rb = cb.strides[0]
            cb.data[prow * rb:(prow + 1) * rb] = d['x_codes'][s][t].reshape(-1)
            self.written[T_L1_B][prow * rb:(prow + 1) * rb] = True
            if not p.f16:
                kb = H // p.gran
                sfo = interp.sf_global_offset(np.full(kb, prow), np.arange(kb), kb)
                self.tensors[T_L1_SFB].data[sfo] = d['x_sf'][s][t]
                self.written[T_L1_SFB][sfo] = True
            tile = next(ti for ti, r0, n in self._expected_tiles() if r0 <= row < r0 + n)
            if prow != p.row_base(tile, self.tile_first[tile]) + (row - self.tile_first[tile]):
                raise interp.ModelError(f'row {row} gathered to padded row {prow}, not its token tile\'s')
            self.gathered[tile] += 1
        elif name == 'h':          # the f16 recipes' L1 epilogue: BF16 h [rows, inter] (element index, bits)
            i = np.asarray(op['idx'], dtype=np.int64)
            v = np.asarray(op['vals'], dtype=np.uint16)
            t = self.tensors[T_L2_B]
            if i.size and 2 * int(i.max()) + 1 >= t.data.size:
                raise interp.ModelError('h store past the L2 input')
            t.data[2 * i], t.data[2 * i + 1] = (v & 0xFF).astype(np.uint8), (v >> 8).astype(np.uint8)
            self.written[T_L2_B][2 * i] = self.written[T_L2_B][2 * i + 1] = True
        elif name == 'l2x':
            cb, sb = int(op['cbyte']), int(op['sbyte'])
            codes = np.asarray(op['codes'], dtype=np.uint8)
            self.tensors[T_L2_B].data[cb:cb + codes.size] = codes
            self.written[T_L2_B][cb:cb + codes.size] = True
            self.tensors[T_L2_SFB].data[sb] = op['sf']
            self.written[T_L2_SFB][sb] = True
        elif name == 'cstore':
            r, c = np.asarray(op['rows']), np.asarray(op['cols'])
            if r.size and (r.max() >= self.combine.shape[0] or c.max() >= p.hidden):
                raise interp.ModelError('combine store outside the combine rows')
            if self.combine_ok[r, c].any():
                raise interp.ModelError('combine element written twice')
            self.combine[r, c] = np.asarray(op['vals'], dtype=np.uint16)
            self.combine_ok[r, c] = True
        elif name == 'push':
            row = int(op['row'])
            if not self.combine_ok[row].all():
                raise interp.ModelError(f'push of combine row {row} before it was fully written')
            self.pushes.append(row)
        return None

    def _final_checks(self):
        n = self.head['units']
        if sorted(self.units_started) != list(range(n)):
            raise interp.ModelError(f'{len(self.units_started)} of {n} units ran')
        # the units are exactly the (phase, expert, row tile, token tile) set of the counts (this module's own)
        want = set()
        for e, c in enumerate(self.p.data['counts'][self.rank]):
            for tt in range(-(-c // self.p.block_t)):
                want |= {(0, e, rt, tt) for rt in range(self.head['l1_row_tiles'])}
                want |= {(1, e, rt, tt) for rt in range(self.head['l2_row_tiles'])}
        got = {(u['phase'], u['expert'], u['row_tile'], u['token_tile']) for u in self.units_started.values()}
        if got != want or len(got) != n:
            raise interp.ModelError('the units run differ from the (expert, row tile, token tile) tiles of the counts')


def run_all(p: FusedProblem, fault: Optional[str] = None, fault_rank: int = 0, check_order: bool = True,
            mutate: Optional[str] = None):
    """Every rank's stream, then the combine of every rank's tokens.  Returns (runs, y bits per rank).
    ``check_order=False`` leaves out the unit-order check (unit_start against gathered rows / L1 done
    counts), so that a control can show the data checks catch a missing dependency on their own."""
    runs = [RankRun(p, r, fault if r == fault_rank else None, check_order, mutate if r == fault_rank else None).run()
            for r in range(p.ranks)]
    return runs, reduce(p, runs)


def reduce(p: FusedProblem, runs, pair_row=None):
    """After barrier 1: every rank's tokens from their combine sources (the pushed copy in combine_in,
    an own expert's row, or without pushes the owner's row at pair_row), slots in increasing order in
    float32, one BF16 rounding (mega::reduce_tokens' rule).  ``pair_row``: per source rank, the owner's
    row of each pair (default: the routing's)."""
    d, k = p.data, p.topk
    pair_row = d['pair_row'] if pair_row is None else pair_row
    # pushes: the owners' combine rows to their sources' combine_in [T k, H]
    combine_in = [np.zeros((t * k, p.hidden), dtype=np.uint16) for t in p.tokens]
    pushed = [np.zeros(t * k, dtype=bool) for t in p.tokens]
    for o, run in enumerate(runs):
        for row in run.pushes:
            s, t, j = run.rows[row]
            combine_in[s][t * k + j] = run.combine[row]
            pushed[s][t * k + j] = True
    ys = []
    for s in range(p.ranks):
        acc = np.zeros((p.tokens[s], p.hidden), dtype=np.float32)
        for t in range(p.tokens[s]):
            for j in range(k):                         # slots in increasing order, float32
                ge = int(d['idx'][s][t, j])
                owner = ge // p.experts_per_rank
                row = int(pair_row[s][t * k + j])
                if p.push and owner != s:
                    if not pushed[s][t * k + j]:
                        raise interp.ModelError(f'rank {s} token {t} slot {j}: no push arrived')
                    src = combine_in[s][t * k + j]
                else:
                    if not runs[owner].combine_ok[row].all():
                        raise interp.ModelError(f'combine row {row} of rank {owner} never written')
                    src = runs[owner].combine[row]
                acc[t] = acc[t] + _bf16_to_f32(src)
        ys.append(_f32_to_bf16_bits(acc))
    return ys


def check(p: FusedProblem, runs, ys):
    """y of every rank equal to reference_recipe_moe bit for bit, every combine row equal to the
    reference's slot row, the receive counts equal to the reference's statistics."""
    ref_y, slots, stats = p.reference()
    for o, run in enumerate(runs):
        for row, (s, t, j) in enumerate(run.rows):
            if not np.array_equal(run.combine[row], slots[(s, t, j)]):
                bad = int((run.combine[row] != slots[(s, t, j)]).sum())
                raise AssertionError(f'rank {o} combine row {row} (rank {s} token {t} slot {j}): {bad} of '
                                     f'{p.hidden} values differ from the reference')
    for s in range(p.ranks):
        if not np.array_equal(ys[s], ref_y[s]):
            bad = int((ys[s] != ref_y[s]).sum())
            raise AssertionError(f'rank {s}: y differs from reference_recipe_moe at {bad} of {ys[s].size} values')
    counts = np.concatenate([np.asarray(c) for c in p.data['counts']])
    if not np.array_equal(counts, stats):
        raise AssertionError(f'receive counts {counts} != reference statistics {stats}')


def check_exact(p: FusedProblem, runs, ys, max_h_ulp_frac: float = 0.01):
    """fp8_nvfp4_mega_moe (NVFP4_EXACT) against deep_gemm.reference: the kernel's SwiGLU is FP32
    (epilogue/moe_math.cuh swiglu: expf, a divide) where reference.py's is float64, so h (the BF16 L2 input the
    L1 epilogue wrote) may differ from reference.py's h by one BF16 ulp where the two land on either side of a
    rounding boundary: every h value must equal the reference's or be one ulp off (at most ``max_h_ulp_frac``
    of them); then every combine row must equal reference.py's L2 (banded float64 matmul, alpha, one BF16
    rounding) of the h the kernel wrote, bit for bit, y the reduction of those rows, and where no h of the
    problem is off, y equal to reference_moe_forward + combine_slots (check)."""
    from deep_gemm.reference import _l1_exact, _l2_banded
    from deep_gemm.utils.quant import round_to_bf16
    d, H, I, El = p.data, p.hidden, p.inter, p.experts_per_rank
    off_ulp = 0
    total = 0
    for o, run in enumerate(runs):
        if not run.rows:
            continue
        h_model = run.tensors[T_L2_B].data[:len(run.rows) * I * 2].view(np.uint16).reshape(len(run.rows), I)
        for e in range(El):
            ge = o * El + e
            rows = [r for r, (s, t, j) in enumerate(run.rows) if int(d['idx'][s][t, j]) == ge]
            if not rows:
                continue
            xq = torch.stack([d['x_fp8'][run.rows[r][0]][run.rows[r][1]] for r in rows]).to(torch.float64)
            sf = torch.stack([torch.from_numpy(d['x_sf'][run.rows[r][0]][run.rows[r][1]]) for r in rows]).to(torch.float64)
            acc = _l1_exact(xq, sf, d['w1_dq'][ge], H // sf.shape[1])
            a1 = d['l1_alphas'][ge].to(torch.float64)
            gate, up = acc[:, :I] * a1[0], acc[:, I:] * a1[1]
            tw = torch.tensor([float(d['wts'][s][t, j]) for s, t, j in (run.rows[r] for r in rows)], dtype=torch.float64)
            h_ref = round_to_bf16(torch.nn.functional.silu(gate) * up * tw[:, None]).view(torch.int16).numpy().astype(np.uint16)
            hm = h_model[rows]
            equal = _bf16_to_f32(hm) == _bf16_to_f32(h_ref)          # -0 and +0 alike (a product that underflows)
            diff = np.where(equal, 0, np.abs(hm.astype(np.int64) - h_ref.astype(np.int64)))
            same_sign = (hm >> 15) == (h_ref >> 15)
            bad = (diff > 1) | ((diff == 1) & ~same_sign)
            if bad.any():
                raise AssertionError(f'rank {o} expert {e}: h differs from reference.py by more than one BF16 ulp '
                                     f'at {int(bad.sum())} values')
            off_ulp += int((diff == 1).sum())
            total += diff.size
            hv = torch.from_numpy(_bf16_to_f32(hm).astype(np.float64))
            o_ref = round_to_bf16(_l2_banded(hv, d['w2_dq'][ge]) * float(d['l2_alphas'][ge]))
            o_ref = o_ref.view(torch.int16).numpy().astype(np.uint16)
            for i, r in enumerate(rows):
                if not np.array_equal(run.combine[r], o_ref[i]):
                    raise AssertionError(f'rank {o} combine row {r}: {int((run.combine[r] != o_ref[i]).sum())} of {H} '
                                         'values differ from reference.py\'s L2 of the kernel\'s h')
    if off_ulp > max_h_ulp_frac * max(total, 1):
        raise AssertionError(f'{off_ulp} of {total} h values one ulp off reference.py')
    if off_ulp == 0:
        check(p, runs, ys)
    return off_ulp, total
