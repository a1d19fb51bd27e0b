"""A small grouped expert GEMM for the functional model: real quantized data, the global tensors of
scheduler/sm100_gemm_plan.cuh's tensor_id comment, the op stream of tests/cpp/sm100_model_emit.cpp,
and the float64 reference of the same quantized values.

Every layout here is this package's own (interp.sf_global_offset, the L1 row interleave written out
below), not the kernel's: the model compares two independent readings of the documented layouts.
"""
from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from deep_gemm.reference_recipes import exact_rows_matmul
from deep_gemm.utils import cast_to_mxfp4, cast_to_nvfp4_experts, per_token_cast_to_fp8, per_token_cast_to_nvfp4
from deep_gemm.utils.quant import e2m1_to_float, unpack_e2m1

from . import interp
from .build import CPP, build

EMIT_SRC = CPP / 'sm100_model_emit.cpp'
T_D, T_GATE, T_UP = 4, 10, 11


def emit_exe() -> Path:
    return build(EMIT_SRC, cute=False)


def l1_kernel_rows(n: int) -> np.ndarray:
    """Original L1 row (gate rows [0, n/2), up rows [n/2, n)) of each kernel row: kernel rows 16 G + [0, 8)
    are gate rows 8 G + [0, 8), kernel rows 16 G + [8, 16) the up rows of the same channels."""
    r = np.arange(n)
    g, w = r // 16, r % 16
    chan = 8 * g + w % 8
    return np.where(w < 8, chan, n // 2 + chan)


@dataclass
class Problem:
    recipe: str
    block_n: int
    stages: int
    epilogue: str
    mode: str
    n: int
    k: int
    counts: Sequence[int]
    max_rows: int = 0
    ctas: int = 1
    seed: int = 0

    # filled by build_data()
    tensors: Optional[Dict[int, interp.GTensor]] = None
    w_dq: Optional[np.ndarray] = None       # float64 [E, N, K], original row order
    x_dq: Optional[np.ndarray] = None       # float64 [total_rows, K]
    starts: Optional[List[int]] = None
    total_rows: int = 0

    def emit(self, exe: Optional[Path] = None, token_group: Optional[int] = None) -> List[dict]:
        exe = exe or emit_exe()
        args = [self.recipe, self.block_n, self.stages, self.epilogue, self.mode, self.n, self.k, self.max_rows,
                self.ctas, self.seed, ','.join(map(str, self.counts))]
        if token_group is not None:
            args.append(token_group)
        proc = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise interp.ModelError(f'emit failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}')
        ops = [json.loads(l) for l in proc.stdout.splitlines()]
        head = ops[0]
        assert head['op'] == 'problem'
        self.starts, self.total_rows = head['starts'], head['total_rows']
        # the kernel's rows per expert (contiguous layouts: padded to a multiple of 128, all computed)
        self.counts = list(head['counts'])
        return ops

    # ------------------------------------------------------------------------------ data
    def random_weights_tokens(self, seed_base: int):
        """Random weights [E, N, K] (per-row magnitudes) and tokens [total_rows, K] (per-token magnitudes),
        drawn from a generator seeded seed_base + seed; returns (weights, tokens)."""
        assert self.starts is not None, 'emit() first (row starts)'
        gen = torch.Generator().manual_seed(seed_base + self.seed)
        e_num, n, k, rows = len(self.counts), self.n, self.k, self.total_rows
        w = torch.randn(e_num, n, k, generator=gen) * torch.exp(torch.randn(e_num, n, 1, generator=gen) * 0.5)
        x = torch.randn(max(rows, 1), k, generator=gen) * torch.exp(torch.randn(max(rows, 1), 1, generator=gen))
        x = x[:rows]
        return w, x

    def build_data(self):
        """Random weights and tokens, quantized by the package's own casts (ModelOpt NVFP4 / MXFP4 /
        upstream's FP8 cast), laid out as the plan header's global tensors."""
        w, x = self.random_weights_tokens(1000)
        e_num, n, k, rows = len(self.counts), self.n, self.k, self.total_rows
        order = l1_kernel_rows(n) if self.epilogue == 'swiglu' else np.arange(n)
        if self.recipe == 'nvfp4':
            packed, scale, _ = cast_to_nvfp4_experts(w)                       # [E, N, K/2], e4m3 [E, N, K/16]
            sbytes = scale.view(torch.uint8)
            w_dq = e2m1_to_float(unpack_e2m1(packed), torch.float64) * scale.to(torch.float64).repeat_interleave(16, -1)
            xp, xs = per_token_cast_to_nvfp4(x, use_packed_sf=False)          # int8 [T, K/2], float32 [T, K/16]
            xp = xp.view(torch.uint8)
            xs_bytes = xs.to(torch.float8_e4m3fn).view(torch.uint8)
            assert torch.equal(xs_bytes.view(torch.float8_e4m3fn).float(), xs), 'token scales must be UE4M3 values'
            x_dq = e2m1_to_float(unpack_e2m1(xp), torch.float64) * xs.to(torch.float64).repeat_interleave(16, -1)
            a_codes = packed[:, torch.from_numpy(order)].reshape(e_num * n, k // 2)
            a = interp.GTensor(a_codes.numpy(), dims=[k // 2, e_num * n], strides=[k // 2], dtype='u8')
            b = interp.GTensor(xp.numpy(), dims=[k // 2, rows], strides=[k // 2], dtype='u8')
            gran = 16
        else:
            packed, sb = cast_to_mxfp4(w)                                     # [E, N, K/2], uint8 [E, N, K/32]
            sbytes = sb
            w_dq = e2m1_to_float(unpack_e2m1(packed), torch.float64) * torch.ldexp(
                torch.ones_like(sb, dtype=torch.float64), sb.long() - 127).repeat_interleave(32, -1)
            xq, xsf = per_token_cast_to_fp8(x, use_ue8m0=True, gran_k=32)     # e4m3 [T, K], float32 pow2 [T, K/32]
            _, ex = torch.frexp(xsf)
            xs_bytes = (ex - 1 + 127).to(torch.uint8)
            assert torch.equal(torch.ldexp(torch.ones_like(xsf), ex - 1), xsf)
            x_dq = xq.to(torch.float64) * xsf.to(torch.float64).repeat_interleave(32, -1)
            a_codes = packed[:, torch.from_numpy(order)].reshape(e_num * n, k // 2)
            a = interp.GTensor(a_codes.numpy(), dims=[k, e_num * n], strides=[k // 2], dtype='u4_align16b')
            b = interp.GTensor(xq.view(torch.uint8).numpy(), dims=[k, rows], strides=[k], dtype='e4m3')
            gran = 32
        kb = k // gran
        # scale matrices in the same (kernel) row order as the codes, then CUTLASS atoms
        sfa_rows = sbytes[:, torch.from_numpy(order)].reshape(e_num * n, kb).numpy()
        sfa = np.zeros(e_num * n // 128 * (-(-kb // 4)) * 512, dtype=np.uint8)
        m_i, k_i = np.meshgrid(np.arange(e_num * n), np.arange(kb), indexing='ij')
        sfa[interp.sf_global_offset(m_i, k_i, kb)] = sfa_rows
        rows_pad = -(-max(rows, 1) // 128) * 128
        sfb = np.zeros(rows_pad // 128 * (-(-kb // 4)) * 512, dtype=np.uint8)
        if rows:
            m_i, k_i = np.meshgrid(np.arange(rows), np.arange(kb), indexing='ij')
            sfb[interp.sf_global_offset(m_i, k_i, kb)] = xs_bytes.numpy()
        # the kernel's weight transform (deep_gemm.weights_sm100) must produce exactly these bytes; the
        # model then runs on the transform's output
        from deep_gemm import weights_sm100 as w100
        kind = 'l1' if self.epilogue == 'swiglu' else 'l2'
        if self.recipe == 'nvfp4':
            gs = torch.ones(e_num, 2) if kind == 'l1' else torch.ones(e_num)    # global scales: not the GEMM's
            ws = w100.transform_nvfp4_weights_for_sm100(packed, scale, gs, kind=kind)
        else:
            ws = w100.transform_mxfp4_weights_for_sm100(packed, sbytes, kind=kind)
        t_codes = ws.codes.reshape(e_num * n, k // 2).numpy()
        t_sfa = ws.scales.reshape(-1).numpy()
        if not (np.array_equal(t_codes, a_codes.numpy()) and np.array_equal(t_sfa, sfa)):
            raise AssertionError('deep_gemm.weights_sm100 differs from the layout of the plan header read by the model')
        if rows:
            t_sfb = w100.to_sm100_sf_layout(xs_bytes).reshape(-1).numpy()
            if not np.array_equal(t_sfb, sfb):
                raise AssertionError('weights_sm100.to_sm100_sf_layout (token scales) differs from the model\'s layout')
        a.data = np.ascontiguousarray(t_codes).reshape(-1).view(np.uint8)
        sfa = t_sfa
        self.tensors = {0: a, 1: interp.GTensor(sfa, dims=[sfa.size], strides=[]), 2: b,
                        3: interp.GTensor(sfb, dims=[sfb.size], strides=[])}
        self.w_dq, self.x_dq = w_dq.numpy(), x_dq.numpy()
        return self

    # ------------------------------------------------------------------------------ reference
    def expert_rows(self, e: int) -> np.ndarray:
        return self.starts[e] + np.arange(self.counts[e])

    def reference(self) -> Dict[int, np.ndarray]:
        """float64 accumulators (exact sums) at every output element a correct plan writes; NaN elsewhere."""
        n, rows = self.n, self.total_rows
        if self.epilogue == 'plain':
            out = {T_D: np.full((rows, n), np.nan)}
        else:
            out = {T_GATE: np.full((rows, n // 2), np.nan), T_UP: np.full((rows, n // 2), np.nan)}
        order = l1_kernel_rows(n) if self.epilogue == 'swiglu' else np.arange(n)
        for e in range(len(self.counts)):
            r = self.expert_rows(e)
            if not r.size:
                continue
            acc = exact_rows_matmul(torch.from_numpy(self.x_dq[r]), torch.from_numpy(self.w_dq[e])).numpy()   # [cnt, N] original rows
            if self.epilogue == 'plain':
                out[T_D][r] = acc[:, order]
            else:
                out[T_GATE][r] = acc[:, : n // 2]
                out[T_UP][r] = acc[:, n // 2:]
        return out

    def output_shapes(self):
        if self.epilogue == 'plain':
            return {T_D: (self.total_rows, self.n)}
        return {T_GATE: (self.total_rows, self.n // 2), T_UP: (self.total_rows, self.n // 2)}


def run_model(p: Problem, ops: List[dict]):
    outs, written, machines = interp.run_stream(ops, p.tensors, p.output_shapes())
    return outs, written, machines


def compare(p: Problem, outs) -> Dict[str, float]:
    """Raises AssertionError unless every output the reference defines is written, nothing else is,
    and each value is within 1e-5 relative (and equal to float32 of the exact sum)."""
    ref = p.reference()
    worst = 0.0
    for tid, r in ref.items():
        o = outs[tid]
        want = ~np.isnan(r)
        got = ~np.isnan(o)
        if not np.array_equal(want, got):
            missing, extra = int((want & ~got).sum()), int((got & ~want).sum())
            raise AssertionError(f'tensor {tid}: {missing} outputs never written, {extra} written outside the tokens')
        if want.any():
            rv, ov = r[want], o[want]
            rel = np.abs(ov - rv) / np.maximum(np.abs(rv), 1e-300)
            rel[(rv == 0) & (ov == 0)] = 0
            worst = max(worst, float(rel.max()))
            if not (rel <= 1e-5).all():
                i = int(np.argmax(rel))
                raise AssertionError(f'tensor {tid}: {int((rel > 1e-5).sum())} of {rv.size} outputs off by more than 1e-5 '
                                     f'relative (worst {rel[i]:.3g}: model {ov[i]!r}, reference {rv[i]!r})')
            f32 = rv.astype(np.float32).astype(np.float64)
            if not np.array_equal(ov, f32):
                raise AssertionError(f'tensor {tid}: not float32 of the exact sum at {int((ov != f32).sum())} outputs')
    return {'worst_rel': worst}
