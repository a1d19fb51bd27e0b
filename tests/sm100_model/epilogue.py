"""The epilogue math of the sm100 grouped GEMM on the host, against deep_gemm.reference_recipes.

tests/cpp/sm100_epilogue_check.cpp runs the kernel's epilogue loop (GemmPlan::epilogue) with the kernel's
callbacks (epilogue/sm100_epilogue.cuh over epilogue/moe_math.cuh and epilogue/moe_l2_input.cuh) on given
TMEM accumulators, tiles from the kernel's GroupedTiles.  This module makes accumulators on which every
step is exact or one IEEE rounding that the reference performs identically (see
/work/shared/sm100-proof-notes.md, "Limits"): integers times float32 alphas, gates after BF16 in {0} or
>= 18 (1 + exp(-g) rounds to 1 in float32 and float64 -> float32, so silu(g) = g whatever exp's last bits)
or <= -128 (silu rounds to -0 on both sides), and compares

* plain        : bf16(f32(acc * f32(alpha * b_scale)))  (recipe_expert_forward's last step of 'nvfp4')
* swiglu       : recipe_expert_forward('bf16', ...) with identity x and W2 (its output = h = bf16(f32(s u) w))
* swiglu_quant : the codes and scales against quantize_nvfp4_rows / quantize_fp8_pow2_rows of
                 a = f32(silu_f32(g) * u) (x w), g = bf16(f32(acc_g * alpha_g)) ... (recipe_expert_forward's
                 rounding points), and the dequantized L2 input against recipe_expert_forward('nvfp4' / 'fp8')
                 with identity x and W2 (its output = bf16(h x a2) / bf16(h), exact here);
                 every output byte a correct epilogue writes is written, no other.
The layouts on the reference side are this package's (problem.l1_kernel_rows, interp.sf_global_offset).
"""
from __future__ import annotations

import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from deep_gemm.reference_recipes import quantize_fp8_pow2_rows, quantize_nvfp4_rows, recipe_expert_forward, silu_f32
from deep_gemm.utils.quant import e2m1_to_float

from . import interp
from .build import CPP, build
from .problem import l1_kernel_rows

SRC = CPP / 'sm100_epilogue_check.cpp'
F32 = torch.float32


def exe(faults: bool = False) -> Path:
    return build(SRC, cute=False, defines=['DG_EPI_FAULTS'] if faults else (),
                 name='sm100_epilogue_check_faults' if faults else None)


def bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(F32).to(torch.bfloat16).to(F32)


@dataclass
class Case:
    recipe: str             # nvfp4 | mxfp4_fp8
    epilogue: str           # plain | swiglu | swiglu_quant
    block_n: int
    mode: str               # contiguous | masked
    n: int
    counts: Sequence[int]
    max_rows: int = 0
    weighted: bool = False
    seed: int = 0
    clamp: float = 640.0

    # ------------------------------------------------------------------ data
    def __post_init__(self):
        gen = torch.Generator().manual_seed(7000 + self.seed)
        e_num, n = len(self.counts), self.n
        if self.mode == 'contiguous':
            assert all(c % 128 == 0 for c in self.counts)
            self.starts = list(np.cumsum([0] + list(self.counts))[:-1])
            self.rows = int(sum(self.counts))
        else:
            self.starts = [e * self.max_rows for e in range(e_num)]
            self.rows = e_num * self.max_rows
        rows = self.rows
        self.b_scale = 1.0
        self.a2 = 256.0                                            # NVFP4 L2-input global scale
        self.inv_g = float(torch.ones((), dtype=F32) / torch.tensor(self.a2, dtype=F32))
        self.route = (torch.rand(rows, generator=gen) * 0.9 + 0.1).to(F32)
        if self.epilogue == 'plain':
            self.alpha = (torch.rand(e_num, 1, generator=gen) + 0.5).to(F32)
            self.b_scale = 0.7
            self.acc = torch.randint(-5000, 5000, (rows, n), generator=gen).to(F32)     # > 8 bits: BF16 rounds
            return
        inter = n // 2
        if self.epilogue == 'swiglu' or self.recipe == 'mxfp4_fp8':
            self.alpha = torch.ones(e_num, 2, dtype=F32)                  # the bf16 / fp8 paths have no alphas
        else:
            self.alpha = (torch.rand(e_num, 2, generator=gen) + 0.5).to(F32)
            self.b_scale = 1.3
        ag_all = (self.alpha * torch.tensor(self.b_scale, dtype=F32)).to(F32)          # f32(alpha * b_scale)
        gate = torch.zeros(rows, inter)
        up = torch.zeros(rows, inter)
        for e in range(e_num):
            r = slice(self.starts[e], self.starts[e] + self.counts[e])
            cnt = self.counts[e]
            ag, au = float(ag_all[e, 0]), float(ag_all[e, 1])
            pick = torch.rand(cnt, inter, generator=gen)
            target = torch.where(pick < 0.15, torch.zeros(()), torch.where(
                pick < 0.25, -128.0 * 2.0 ** torch.randint(0, 4, (cnt, inter), generator=gen).float(),
                torch.randint(18, 1000, (cnt, inter), generator=gen).float()))
            u_target = torch.randint(-1000, 1000, (cnt, inter), generator=gen).float()
            small = torch.rand(cnt, inter, generator=gen) < 0.2
            u_target = torch.where(small, torch.randint(-3, 4, (cnt, inter), generator=gen).float(), u_target)
            if cnt:
                zero_blocks = torch.rand(cnt, inter // 16, generator=gen) < 0.1   # whole zero L2 blocks
                zb = zero_blocks.repeat_interleave(16, 1)
                target[zb] = 0.0
            if self.epilogue == 'swiglu':
                g = bf16(target)                                       # BF16-exact gate / up: the kernel's
                u = bf16(u_target)                                     # SwiGLU epilogue rounds only at the end
            else:
                g = torch.round(target / ag)                           # integer accumulators
                u = torch.round(u_target / au)
                gb = bf16((g.to(F32) * torch.tensor(ag, dtype=F32)).to(F32))
                ok = (gb == 0) | (gb >= 18) | (gb <= -128)
                g = torch.where(ok, g, torch.zeros(()))
            gate[r], up[r] = g, u
        self.gate, self.up = gate.to(F32), up.to(F32)
        order = l1_kernel_rows(n)                                      # original L1 row of each kernel row
        orig = torch.cat([self.gate, self.up], 1)                      # [T, N]: gate rows then up rows
        self.acc = orig[:, torch.from_numpy(order)].contiguous()

    # ------------------------------------------------------------------ run
    def run(self, fault: Optional[str] = None) -> np.ndarray:
        faults = fault is not None
        with tempfile.TemporaryDirectory() as d:
            self.acc.numpy().astype(np.float32).tofile(os.path.join(d, 'acc.f32'))
            self.alpha.numpy().astype(np.float32).tofile(os.path.join(d, 'alpha.f32'))
            self.route.numpy().astype(np.float32).tofile(os.path.join(d, 'route.f32'))
            env = dict(os.environ)
            if faults:
                env['DG_EPI_FAULT'] = fault
            args = [self.recipe, self.block_n, self.epilogue, self.mode, self.n, self.max_rows,
                    ','.join(map(str, self.counts)), repr(self.b_scale), repr(self.clamp), repr(self.inv_g),
                    int(self.weighted), d]
            proc = subprocess.run([str(exe(faults)), *map(str, args)], capture_output=True, text=True, timeout=120, env=env)
            if proc.returncode != 0:
                raise AssertionError(f'sm100_epilogue_check failed ({proc.returncode}): {proc.stderr[-2000:]}')
            return np.fromfile(os.path.join(d, 'out.bin'), dtype=np.uint8)

    # ------------------------------------------------------------------ reference and comparison
    def valid_rows(self) -> np.ndarray:
        return np.concatenate([self.starts[e] + np.arange(c) for e, c in enumerate(self.counts)]).astype(np.int64)

    def _forward(self, e: int, path: str) -> torch.Tensor:
        """recipe_expert_forward on the rows of expert e with identity x and W2: the accumulators are
        exactly gate / up, and the output is the L2 input as the reference rounds it."""
        r = slice(self.starts[e], self.starts[e] + self.counts[e])
        cnt, inter = self.counts[e], self.n // 2
        x = torch.eye(cnt, dtype=torch.float64)
        w1 = torch.cat([self.gate[r].T, self.up[r].T], 0).to(torch.float64)          # [2I, cnt]
        w2 = torch.eye(inter, dtype=torch.float64)
        ag = float(self.alpha[e, 0] * torch.tensor(self.b_scale, dtype=F32))
        au = float(self.alpha[e, 1] * torch.tensor(self.b_scale, dtype=F32))
        tw = self.route[r] if (self.weighted and path != 'nvfp4') else None
        return recipe_expert_forward(path, x, w1, w2, topk_weights=tw, activation_clamp=self.clamp, l1_alpha=(ag, au),
                                     l2_alpha=1.0, a2_scale=self.a2).to(F32)

    def _activation(self, e: int) -> torch.Tensor:
        """a = f32(f32(silu_f32(g) * u) (* w)) with g = bf16(f32(gate * alpha_g)), u = bf16(f32(up * alpha_u)),
        clamped at bf16(clamp): recipe_expert_forward's steps 2-5 (the values it quantizes)."""
        r = slice(self.starts[e], self.starts[e] + self.counts[e])
        ag = self.alpha[e, 0] * torch.tensor(self.b_scale, dtype=F32)
        au = self.alpha[e, 1] * torch.tensor(self.b_scale, dtype=F32)
        g = bf16((self.gate[r].double() * float(ag)).to(F32))
        u = bf16((self.up[r].double() * float(au)).to(F32))
        cb = float(bf16(torch.tensor(self.clamp)))
        g = torch.clamp(g, max=cb)
        u = torch.clamp(u, min=-cb, max=cb)
        a = silu_f32(g) * u
        if self.weighted:
            a = a * self.route[r].reshape(-1, 1)
        return a

    def check(self, out: np.ndarray):
        rows, n, inter = self.rows, self.n, self.n // 2
        if self.epilogue in ('plain', 'swiglu'):
            cols = n if self.epilogue == 'plain' else inter
            got = out.view(np.uint16).reshape(rows, cols)
            want = np.full((rows, cols), 0xFFFF, dtype=np.uint16)
            for e, c in enumerate(self.counts):
                if not c:
                    continue
                r = slice(self.starts[e], self.starts[e] + c)
                if self.epilogue == 'plain':
                    l2s = float(self.alpha[e, 0] * torch.tensor(self.b_scale, dtype=F32))
                    ref = (self.acc[r].double() * l2s).to(F32).to(torch.bfloat16)      # bf16(f32(acc * l2s))
                    if self.weighted:                   # fp4xfp4's top-k weight after L2: bf16(f32(p * w))
                        ref = (ref.to(F32) * self.route[r].reshape(-1, 1)).to(torch.bfloat16)
                else:
                    ref = self._forward(e, 'bf16').to(torch.bfloat16)
                want[r] = ref.view(torch.int16).numpy().view(np.uint16)
            bad = got != want
            if self.epilogue == 'swiglu':
                # recipe_expert_forward's L2 sum (identity W2) turns -0 into +0: compare zeros by value
                bad &= ~(((got & 0x7FFF) == 0) & ((want & 0x7FFF) == 0))
            if bad.any():
                i = np.argwhere(bad)[0]
                raise AssertionError(f'{self.epilogue}: {int(bad.sum())} of {bad.size} outputs differ '
                                     f'(first at {tuple(i)}: kernel {got[tuple(i)]:#06x}, reference {want[tuple(i)]:#06x})')
            return
        nv = self.recipe == 'nvfp4'
        gran = 16 if nv else 32
        code_bytes = rows * (inter // 2 if nv else inter)
        codes, sfs = out[:code_bytes].reshape(rows, -1), out[code_bytes:]
        want_codes = np.full_like(codes, 0xEE)
        want_sf = np.full_like(sfs, 0xEE)
        deq = np.zeros((rows, inter), dtype=np.float64)
        for e, c in enumerate(self.counts):
            if not c:
                continue
            r0 = self.starts[e]
            a = self._activation(e)
            if nv:
                q, sf8 = quantize_nvfp4_rows(a, torch.tensor(self.a2, dtype=F32))
                qn = q.numpy().astype(np.uint8)
                want_codes[r0:r0 + c] = (qn[:, 0::2] | (qn[:, 1::2] << 4))
                sfb = sf8.view(torch.uint8).numpy()
            else:
                q, sf = quantize_fp8_pow2_rows(a, 32)
                want_codes[r0:r0 + c] = q.view(torch.uint8).numpy()
                sfb = ((sf.view(torch.int32) >> 23) & 0xFF).numpy().astype(np.uint8)
            m_i, k_i = np.meshgrid(r0 + np.arange(c), np.arange(inter // gran), indexing='ij')
            want_sf[interp.sf_global_offset(m_i, k_i, inter // gran)] = sfb
            # the kernel's bytes dequantized, against recipe_expert_forward's L2 input (identity W2)
            kc = codes[r0:r0 + c]
            ksf = sfs[interp.sf_global_offset(m_i, k_i, inter // gran)]
            if nv:
                el = np.stack([kc & 0xF, kc >> 4], -1).reshape(c, inter)
                vals = e2m1_to_float(torch.from_numpy(el.astype(np.uint8)), torch.float64).numpy()
                scale = torch.from_numpy(ksf.copy()).view(torch.float8_e4m3fn).to(torch.float64).numpy()
                deq[r0:r0 + c] = vals * np.repeat(scale, 16, 1) * self.a2
                ref = self._forward(e, 'nvfp4').double().numpy()          # bf16(f32(h * a2)): exact here
            else:
                vals = torch.from_numpy(kc.copy()).view(torch.float8_e4m3fn).to(torch.float64).numpy()
                deq[r0:r0 + c] = vals * np.repeat(np.ldexp(1.0, ksf.astype(np.int64) - 127), 32, 1)
                ref = self._forward(e, 'fp8').double().numpy()            # bf16(h): exact here
            if not np.array_equal(deq[r0:r0 + c], ref):
                bad = int((deq[r0:r0 + c] != ref).sum())
                raise AssertionError(f'expert {e}: {bad} dequantized L2 inputs differ from recipe_expert_forward')
        for what, got, want in (('codes', codes, want_codes), ('scales', sfs, want_sf)):
            bad = got != want
            if bad.any():
                i = np.argwhere(bad)[0]
                raise AssertionError(f'swiglu_quant {what}: {int(bad.sum())} of {bad.size} bytes differ '
                                     f'(first at {tuple(i)}: kernel {got[tuple(i)]:#04x}, reference {want[tuple(i)]:#04x})')
