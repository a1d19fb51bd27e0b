"""The reference of upstream's three Mega MoE recipes (``deep_gemm.reference_recipes``), on CPU.

* Every recipe equals a naive loop oracle written below in plain Python floats (per token, per
  slot, per channel; every rounding spelled out as a scalar float64 statement) bit for bit.
* The oracle with one rounding point moved (the top-k weight before/after L2, the rounding before
  the shared row, ``rsf`` on the shared row) gives different bits, so the comparison can fail.
* The NVFP4 and FP8 power-of-two requantizers on every E2M1 tie, E4M3 scale ties, the ``2^-9``
  clamp, amax 0 and exact powers of two, against scalar statements of the rules.
* Two gloo ranks (one with no tokens, then an uneven split) give the single-process bits.
"""
import math
import operator
import os
import struct
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from deep_gemm.utils.quant import round_to_bf16
from deep_gemm.reference_recipes import (dequantize_nvfp4_rows, exact_rows_matmul, fp8_pow2_scale,
                                         quantize_fp8_pow2_rows, quantize_nvfp4_rows, reference_recipe_moe,
                                         silu_f32)
from gloo_ranks import init_gloo

TIMEOUT_S = 180


# ------------------------------------------------------------ scalar statements of the roundings
def f32(v: float) -> float:
    """RNE to float32 (then every float32 op is: exact float64 op, then f32())."""
    return struct.unpack('<f', struct.pack('<f', v))[0]


def rne(v: float, sig: int, emin: int, vmax: float = math.inf) -> float:
    """Round to nearest, ties to even, on the grid of ``sig`` significant bits (frexp exponent of the
    smallest normal: ``emin``; subnormals below), saturating at ``vmax``."""
    if v == 0:
        return v
    _, e = math.frexp(abs(v))
    q = math.ldexp(1.0, max(e, emin) - sig)
    return math.copysign(min(round(abs(v) / q) * q, vmax), v)  # round(): ties to even


def bf16(v: float) -> float:
    return rne(v, 8, -125)


def e4m3(v: float) -> float:
    return rne(v, 4, -5, 448.0)


E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def e2m1(v: float, ties_to_even: bool = True) -> float:
    """Nearest E2M1 value, saturating at 6; a tie goes to the even code (or, if not
    ``ties_to_even``, toward zero: the bucketize rule of upstream's MXFP4 cast)."""
    a = abs(v)
    i = min(range(8), key=lambda i: (abs(E2M1[i] - a), i % 2 if ties_to_even else i))
    return math.copysign(E2M1[i], v)


def ceil_pow2(v: float) -> float:
    m, e = math.frexp(v)
    return math.ldexp(1.0, e - 1 if m == 0.5 else e)


def f32_step(v: float, n: int) -> float:
    """The float32 ``n`` steps away from float32 ``v`` (away from zero for n > 0, v > 0)."""
    b = struct.unpack('<i', struct.pack('<f', v))[0]
    return struct.unpack('<f', struct.pack('<i', b + n))[0]


def silu(g: float) -> float:
    try:
        e = math.exp(-g)
    except OverflowError:
        e = math.inf
    return f32(g / (1.0 + e))


SIXTH = f32(1.0 / 6.0)


def nvfp4_block(blk, inv):
    """(sf8, [e2m1 values]) of one 16-block with inverse global scale ``inv`` (float32 steps)."""
    amax = max(abs(v) for v in blk)
    sf8 = e4m3(max(f32(f32(amax * SIXTH) * inv), 2.0 ** -9))
    sfi = f32(inv / sf8)
    return sf8, [e2m1(f32(v * sfi)) for v in blk]


def fp8_block(blk):
    """(sf, [e4m3 values]) of one 32-block."""
    amax = max(abs(v) for v in blk)
    sf = ceil_pow2(f32(max(amax, f32(1e-4)) / 448.0))
    return sf, [e4m3(v / sf) for v in blk]


# ------------------------------------------------------------------------------ naive oracle
def oracle_expert(kind, xt, w1, w2, w=None, alpha=(1.0, 1.0), l2a=1.0, a2=1.0, clamp=None, mutate=()):
    inter = len(w1) // 2
    acts = []
    for i in range(inter):
        gate = math.fsum(map(operator.mul, xt, w1[i]))
        up = math.fsum(map(operator.mul, xt, w1[inter + i]))
        if kind == 'nvfp4':
            g, u = bf16(f32(gate * alpha[0])), bf16(f32(up * alpha[1]))
        else:
            g, u = bf16(gate), bf16(up)
        if clamp is not None:
            c = bf16(f32(clamp))
            g, u = min(g, c), max(-c, min(u, c))
        a = f32(silu(g) * u)
        if w is not None and (kind != 'nvfp4' or 'weight_before_l2' in mutate) and 'weight_after_l2' not in mutate:
            a = f32(a * w)
        if kind == 'bf16':
            a = bf16(a)
        acts.append(a)
    h = []
    if kind == 'fp8':
        for b in range(0, inter, 32):
            sf, q = fp8_block(acts[b:b + 32])
            h += [v * sf for v in q]
    elif kind == 'nvfp4':
        inv = f32(1.0 / a2)
        for b in range(0, inter, 16):
            sf8, q = nvfp4_block(acts[b:b + 16], inv)
            h += [v * sf8 for v in q]
    else:
        h = acts
    out = []
    for row in w2:
        acc = math.fsum(map(operator.mul, h, row))
        if kind == 'nvfp4':
            p = bf16(f32(acc * f32(l2a * a2)))
            if w is not None and 'weight_before_l2' not in mutate:
                p = bf16(f32(p * w))
        else:
            p = bf16(acc)
            if w is not None and 'weight_after_l2' in mutate:
                p = bf16(f32(p * w))
        out.append(p)
    return out


def oracle_moe(recipe, P, mutate=()):
    """y (list of rows) and per-expert receive counts, by loops over tokens, slots and channels."""
    kind = {'fp8xfp4': 'fp8', 'fp8xfp8': 'fp8', 'bf16xbf16': 'bf16', 'fp4xfp4': 'nvfp4'}[recipe]
    L = P.lists
    hidden = len(L.x[0]) if L.x else 0
    recv = [0] * P.experts
    ys = []
    for t in range(len(L.x)):
        r = [0.0] * hidden
        for j in range(len(L.idx[t])):
            e = L.idx[t][j]
            if e < 0:
                continue
            recv[e] += 1
            kw = {}
            if kind == 'nvfp4':
                kw = dict(alpha=L.l1a[e], l2a=L.l2a[e], a2=L.a2[e])
            o = oracle_expert(kind, L.x[t], L.w1[e], L.w2[e], L.tw[t][j], clamp=P.clamp, mutate=mutate, **kw)
            r = [f32(a + b) for a, b in zip(r, o)]
        if L.sw1 is not None:
            s = oracle_expert('fp8' if kind == 'fp8' else 'bf16', L.xs[t], L.sw1, L.sw2, None, clamp=P.clamp)
        rsf = f32(P.rsf)
        if kind == 'nvfp4':
            if (L.sw1 is not None or rsf != 1.0) and 'no_round_before_shared' not in mutate:
                r = [bf16(v) for v in r]
            if rsf != 1.0 and 'rsf_after_shared' not in mutate:
                r = [bf16(f32(v * rsf)) for v in r]
        if L.sw1 is not None:
            r = [f32(a + b) for a, b in zip(r, s)]
            if 'rsf_after_shared' in mutate and rsf != 1.0:
                r = [f32(bf16(v) * rsf) for v in r]
        ys.append([bf16(v) for v in r])
    return ys, recv


# ------------------------------------------------------------------------------- problems
def _e2m1_values(gen, shape):
    vals = torch.tensor(E2M1 + [-v for v in E2M1])
    return vals[torch.randint(0, 16, shape, generator=gen)]


def _fp8_values(gen, shape, scale=64.0):
    return (torch.randn(shape, generator=gen) * scale).clamp(-448, 448).to(torch.float8_e4m3fn).float()


def _block_scale(values, gran, scales):
    return values * scales.repeat_interleave(gran, dim=-1)


def make_problem(recipe, seed=0, t=8, hidden=128, inter=64, experts=6, topk=3, shared_inter=64, shared=True,
                 clamp=1.5, rsf=1.0, alphas=True, a2=True, mask_frac=0.25, wide=False):
    gen = torch.Generator().manual_seed(seed)
    x_src = torch.randn(t, hidden, generator=gen) * torch.exp(0.5 * torch.randn(t, 1, generator=gen))
    pow2 = lambda lo, hi, shape: torch.pow(2.0, torch.randint(lo, hi, shape, generator=gen).float())  # noqa: E731
    if recipe.startswith('fp8'):
        q, sf = quantize_fp8_pow2_rows(x_src, 32)
        x = q.float() * sf.repeat_interleave(32, dim=1)
        xs = x.clone()
    elif recipe == 'bf16xbf16':
        x = x_src.to(torch.bfloat16).float()
        xs = x.clone()
    else:
        xs = x_src.to(torch.bfloat16).float()  # x_bf16: what x was quantized from
        x = dequantize_nvfp4_rows(*quantize_nvfp4_rows(xs))

    def weights(n, k, lead=()):
        shape = (*lead, n, k)
        if recipe == 'fp8xfp4':
            return _block_scale(_e2m1_values(gen, shape), 32, pow2(-7, -4, (*lead, n, k // 32)))
        if recipe == 'fp8xfp8':
            return _block_scale(_fp8_values(gen, shape), 32, pow2(-13, -10, (*lead, n, k // 32)))
        if recipe == 'bf16xbf16':
            return (torch.randn(shape, generator=gen) * 0.08).to(torch.bfloat16).float()
        sf8 = (0.004 + 0.02 * torch.rand((*lead, n, k // 16), generator=gen)).to(torch.float8_e4m3fn).float()
        return _block_scale(_e2m1_values(gen, shape), 16, sf8)

    w1 = weights(2 * inter, hidden, (experts,))
    w2 = weights(hidden, inter, (experts,))
    if wide:  # the first channel of every 32-block 2^10 larger: the others get E4M3 subnormals
        w1[:, inter::32] *= 2.0 ** 10
    if shared:
        if recipe.startswith('fp8'):
            sw1 = _block_scale(_fp8_values(gen, (2 * shared_inter, hidden)), 32,
                               pow2(-13, -10, (2 * shared_inter, hidden // 32)))
            sw2 = _block_scale(_fp8_values(gen, (hidden, shared_inter)), 32,
                               pow2(-13, -10, (hidden, shared_inter // 32)))
        else:
            sw1 = (torch.randn(2 * shared_inter, hidden, generator=gen) * 0.08).to(torch.bfloat16).float()
            sw2 = (torch.randn(hidden, shared_inter, generator=gen) * 0.08).to(torch.bfloat16).float()
    else:
        sw1 = sw2 = xs = None
    idx = torch.rand(t, experts, generator=gen).argsort(dim=1)[:, :topk].contiguous()
    idx[torch.rand(t, topk, generator=gen) < mask_frac] = -1
    if t > 1:
        idx[1] = -1  # a token with every slot masked
    tw = torch.randn(t, topk, generator=gen)  # raw scores: some negative
    tw[idx < 0] = 0.0
    l1a = l2a = a2s = None
    if recipe == 'fp4xfp4':
        if alphas:
            l1a = 0.5 + torch.rand(experts, 2, generator=gen)
            l2a = 0.5 + torch.rand(experts, generator=gen)
        if a2:
            a2s = 1e-3 * (0.5 + torch.rand(experts, generator=gen))
    P = SimpleNamespace(recipe=recipe, x=x, idx=idx, tw=tw, w1=w1, w2=w2, sw1=sw1, sw2=sw2, xs=xs, l1a=l1a,
                        l2a=l2a, a2=a2s, clamp=clamp, rsf=rsf, experts=experts)
    tl = lambda v: None if v is None else v.tolist()  # noqa: E731
    P.lists = SimpleNamespace(
        x=x.tolist(), idx=idx.tolist(), tw=tw.tolist(), w1=w1.tolist(), w2=w2.tolist(), sw1=tl(sw1),
        sw2=tl(sw2), xs=tl(xs), l1a=tl(l1a) if l1a is not None else [(1.0, 1.0)] * experts,
        l2a=tl(l2a) if l2a is not None else [1.0] * experts, a2=tl(a2s) if a2s is not None else [1.0] * experts)
    return P


def run_reference(P, stats=None, **over):
    kw = dict(l1_alphas=P.l1a, l2_alphas=P.l2a, a2_scales=P.a2, routed_scaling_factor=P.rsf, shared_w1=P.sw1,
              shared_w2=P.sw2, x_shared=P.xs, activation_clamp=P.clamp, cumulative_local_expert_recv_stats=stats)
    idx = over.pop('topk_idx', P.idx)
    kw.update(over)
    return reference_recipe_moe(P.recipe, P.x, idx, P.tw, P.w1, P.w2, **kw)


def as_bf16(rows, hidden):
    return torch.tensor(rows, dtype=torch.float64).reshape(-1, hidden).to(torch.bfloat16)


def same_bits(a, b):
    return a.shape == b.shape and torch.equal(a.view(torch.int16), b.view(torch.int16))


# --------------------------------------------------------------------- layer vs the oracle
CASES = [
    ('fp8xfp4', dict()),
    ('fp8xfp4', dict(shared=False, clamp=None, seed=1)),
    ('fp8xfp8', dict()),
    ('bf16xbf16', dict()),
    ('bf16xbf16', dict(shared=False, clamp=None, seed=2)),
    ('fp4xfp4', dict(rsf=0.75)),
    ('fp4xfp4', dict(shared=False, rsf=0.75, seed=3)),
    ('fp4xfp4', dict(rsf=1.0, clamp=None, seed=4)),
    ('fp4xfp4', dict(shared=False, rsf=1.0, alphas=False, a2=False, seed=5)),
    # bf16(f32(c)) = 1.0 but bf16(c) = 1.0078125; 1.2345 is not a BF16 value
    ('fp8xfp8', dict(clamp=1 + 2 ** -8 + 2 ** -30, seed=6)),
    ('fp8xfp4', dict(clamp=None, wide=True, seed=10)),
    ('bf16xbf16', dict(clamp=1.2345, seed=7)),
    # f32(rsf) = 1 + 2^-8: bf16(r * f32(rsf)) ties to even where bf16(r * rsf) would round up
    ('fp4xfp4', dict(shared=False, rsf=1 + 2 ** -8 + 2 ** -30, seed=8)),
    ('fp4xfp4', dict(rsf=1 + 2 ** -8 + 2 ** -30, seed=9)),
]


@pytest.mark.parametrize('recipe,opts', CASES, ids=[f'{r}-{i}' for i, (r, _) in enumerate(CASES)])
def test_recipe_equals_naive_oracle(recipe, opts):
    P = make_problem(recipe, **opts)
    stats = torch.arange(P.experts, dtype=torch.int32)
    y = run_reference(P, stats)
    ys, recv = oracle_moe(recipe, P)
    want = as_bf16(ys, P.x.shape[1])
    assert same_bits(y, want)
    assert stats.tolist() == [e + c for e, c in enumerate(recv)]
    assert sum(recv) < P.idx.numel() and y.float().abs().sum() > 0  # some masked, not all zero
    if P.sw1 is None:
        assert not y[1].float().abs().any()  # every slot masked, no shared expert: y = 0
    else:
        assert y[1].float().abs().sum() > 0


def test_masked_slots_are_ignored():
    """A NaN weight or a changed weight in a masked slot changes nothing; stats count valid slots."""
    P = make_problem('fp4xfp4', seed=7, rsf=0.75)
    y = run_reference(P)
    tw = P.tw.clone()
    tw[P.idx < 0] = float('nan')
    stats = torch.zeros(P.experts, dtype=torch.int32)
    y2 = reference_recipe_moe('fp4xfp4', P.x, P.idx, tw, P.w1, P.w2, l1_alphas=P.l1a, l2_alphas=P.l2a,
                              a2_scales=P.a2, routed_scaling_factor=0.75, shared_w1=P.sw1, shared_w2=P.sw2,
                              x_shared=P.xs, activation_clamp=P.clamp, cumulative_local_expert_recv_stats=stats)
    assert same_bits(y, y2)
    valid = P.idx[P.idx >= 0]
    assert stats.tolist() == torch.bincount(valid, minlength=P.experts).tolist()


@pytest.mark.parametrize('recipe,mutation', [
    ('fp4xfp4', 'weight_before_l2'),       # fp8-style top-k weight in the L1 epilogue
    ('fp4xfp4', 'no_round_before_shared'),
    ('fp4xfp4', 'rsf_after_shared'),       # rsf also scaling the shared row
    ('fp8xfp4', 'weight_after_l2'),        # NVFP4-style top-k weight after L2
])
def test_broken_variants_differ(recipe, mutation):
    P = make_problem(recipe, seed=11, t=6, rsf=0.75 if recipe == 'fp4xfp4' else 1.0)
    y = run_reference(P)
    ys, _ = oracle_moe(recipe, P, mutate=(mutation,))
    assert not same_bits(y, as_bf16(ys, P.x.shape[1]))


def test_rsf_and_shared_fp4():
    """rsf scales the routed part only; without shared experts and rsf == 1 there is no extra rounding."""
    P = make_problem('fp4xfp4', seed=12, rsf=0.75)
    y = run_reference(P).float()
    no_shared = run_reference(P, shared_w1=None, shared_w2=None, x_shared=None).float()
    routed_1 = run_reference(P, shared_w1=None, shared_w2=None, x_shared=None, routed_scaling_factor=1.0)
    # bf16(bf16(r) * rsf) computed from the rsf == 1 result (which is bf16(r))
    assert same_bits(no_shared.to(torch.bfloat16),
                     (routed_1.float() * torch.tensor(0.75)).to(torch.bfloat16))
    assert not torch.equal(y, no_shared)
    # an rsf that rounds to 1.0 in float32 is 1.0
    y_eps = run_reference(P, shared_w1=None, shared_w2=None, x_shared=None, routed_scaling_factor=1.0 + 1e-12)
    assert same_bits(y_eps, routed_1)


@pytest.mark.parametrize('recipe', ['fp8xfp4', 'bf16xbf16', 'fp4xfp4'])
def test_l1_rounding_traps(recipe):
    """gate/up sums one tiny term away from a BF16 midpoint: ``bf16(acc)`` (fp8 / bf16 recipes) and
    ``bf16(f32(acc * alpha))`` (fp4xfp4) round them differently, and the oracle says which is right."""
    P = make_problem(recipe, seed=30, t=6, inter=32, shared=False, clamp=None)
    gen = torch.Generator().manual_seed(31)
    t, hidden = P.x.shape
    # token t: 2^k_t (+-) in columns 0..2 (keeps the traps), anything elsewhere (weights are 0 there)
    x = P.x.clone()
    x[:, :3] = (torch.where(torch.rand(t, 1, generator=gen) < 0.5, -1.0, 1.0)
                * 2.0 ** torch.randint(-1, 2, (t, 1), generator=gen).float())
    # row value 2^s (1 + m 2^-7 + 2^-8 +- 2^-30): three BF16 chunks in columns 0..2
    n = P.w1.shape[0] * P.w1.shape[1]
    s_ = torch.randint(-1, 2, (n,), generator=gen).float()
    m = torch.randint(0, 128, (n,), generator=gen).float()
    sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    tiny = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0) * 2.0 ** -30
    w1 = torch.zeros(n, hidden)
    w1[:, 0] = sign * 2 ** s_ * (1 + m * 2.0 ** -7)
    w1[:, 1] = sign * 2 ** s_ * 2.0 ** -8
    w1[:, 2] = sign * 2 ** s_ * tiny
    P.x, P.w1 = x, w1.reshape(P.w1.shape)
    acc = x.double() @ P.w1.double().reshape(n, hidden).t()
    assert (round_to_bf16(acc) != acc.float().to(torch.bfloat16)).float().mean() > 0.4  # the traps are live
    if recipe == 'fp4xfp4':
        P.l1a = torch.tensor([[2.0, 0.5]] * P.experts)  # powers of two keep the traps
    P.lists.x, P.lists.w1 = P.x.tolist(), P.w1.tolist()
    P.lists.l1a = P.l1a.tolist() if P.l1a is not None else P.lists.l1a
    y = run_reference(P)
    ys, _ = oracle_moe(recipe, P)
    assert same_bits(y, as_bf16(ys, hidden))


@pytest.mark.parametrize('recipe', ['fp8xfp4', 'bf16xbf16', 'fp4xfp4'])
def test_combine_order(recipe):
    """Slots in increasing j, then the shared row: experts 0 and 1 are equal and get weights w and -w,
    so slot 1 cancels slot 0 exactly, and the small slot 2 and the (small) shared row survive only
    in that order."""
    P = make_problem(recipe, seed=50, t=6, rsf=0.75 if recipe == 'fp4xfp4' else 1.0, clamp=None)
    P.w1[1], P.w2[1] = P.w1[0], P.w2[0]
    for v in (P.l1a, P.l2a, P.a2):
        if v is not None:
            v[1] = v[0]
    P.w2[2] *= 2.0 ** -12
    P.sw2 *= 2.0 ** -12
    P.idx = torch.tensor([[0, 1, 2]] * 6)
    P.tw = torch.rand(6, 3, generator=torch.Generator().manual_seed(51)) + 0.5
    P.tw[:, 1] = -P.tw[:, 0]
    y = run_reference(P)
    only = lambda idx, **kw: run_reference(P, topk_idx=torch.tensor([idx] * 6), **kw).float()  # noqa: E731
    o0 = only([0, -1, -1], shared_w1=None, shared_w2=None, x_shared=None, routed_scaling_factor=1.0)
    o2 = only([-1, -1, 2], shared_w1=None, shared_w2=None, x_shared=None, routed_scaling_factor=1.0)
    sh = only([-1, -1, -1])
    assert o0.abs().median() > 2.0 ** 6 * max(o2.abs().median(), sh.abs().median())
    routed = o2 if recipe != 'fp4xfp4' else (o2 * torch.tensor(0.75)).to(torch.bfloat16).float()
    assert same_bits(y, (routed + sh).to(torch.bfloat16))
    assert not torch.equal(y.float(), ((sh + o0) - o0 + o2).to(torch.bfloat16).float())   # shared first
    assert not torch.equal(y.float(), ((o2 - o0) + o0 + sh).to(torch.bfloat16).float())   # decreasing j
    P.lists.idx, P.lists.tw = P.idx.tolist(), P.tw.tolist()
    P.lists.w1, P.lists.w2, P.lists.sw2 = P.w1.tolist(), P.w2.tolist(), P.sw2.tolist()
    if P.l1a is not None:
        P.lists.l1a, P.lists.l2a, P.lists.a2 = P.l1a.tolist(), P.l2a.tolist(), P.a2.tolist()
    ys, _ = oracle_moe(recipe, P)
    assert same_bits(y, as_bf16(ys, P.x.shape[1]))


def _bf16_chunks(v: float):
    """Three BF16 values summing to the float32 ``v`` exactly (truncated 8-bit pieces)."""
    out = []
    for _ in range(2):
        b = struct.unpack('<I', struct.pack('<f', v))[0] & 0xFFFF0000
        c = struct.unpack('<f', struct.pack('<I', b))[0]
        out.append(c)
        v = v - c
    return out + [v]


def _crafted(recipe, t, hidden, inter, l2_cols):
    """One expert per token (k = 1), every intermediate channel equal: gate = up = 1 (x = e_0),
    and L2 rows with values in columns 0..2 only (``l2_cols [H, 3]``)."""
    x = torch.zeros(t, hidden)
    x[:, 0] = 1.0
    w1 = torch.zeros(2, 2 * inter, hidden)
    w1[:, :, 0] = 1.0
    w2 = torch.zeros(2, hidden, inter)
    w2[:, :, :3] = l2_cols
    P = SimpleNamespace(recipe=recipe, x=x, idx=torch.zeros(t, 1, dtype=torch.int64), tw=torch.ones(t, 1),
                        w1=w1, w2=w2, sw1=None, sw2=None, xs=None, l1a=None, l2a=None, a2=None, clamp=None,
                        rsf=1.0, experts=2)
    return P


def _lists(P):
    tl = lambda v: None if v is None else v.tolist()  # noqa: E731
    P.lists = SimpleNamespace(x=P.x.tolist(), idx=P.idx.tolist(), tw=P.tw.tolist(), w1=P.w1.tolist(),
                              w2=P.w2.tolist(), sw1=None, sw2=None, xs=None,
                              l1a=tl(P.l1a) if P.l1a is not None else [(1.0, 1.0)] * P.experts,
                              l2a=tl(P.l2a) if P.l2a is not None else [1.0] * P.experts,
                              a2=tl(P.a2) if P.a2 is not None else [1.0] * P.experts)
    return P


def test_epilogue_rounding_traps():
    """Values that land on a BF16 midpoint only after the float32 rounding the spec prescribes:
    bf16xbf16 ``bf16(f32(f32(s * u) * w))`` and fp4xfp4 ``bf16(f32(L2acc * f32(l2_alpha * a2)))``."""
    hidden, t = 128, 8
    mids = [1.0 + (2 * i + 1) * 2.0 ** -8 for i in range(64)]  # BF16 midpoints in [1, 2)
    # bf16xbf16: s = silu(1), u = 1; per token a weight w with f32(s * w) a midpoint, s * w not
    s = silu(1.0)
    P = _crafted('bf16xbf16', t, hidden, 32, torch.tensor([1.0, 0.0, 0.0]))
    for i in range(t):
        for m in mids[i::t]:
            cand = [f32_step(f32(m / s), d) for d in (-2, -1, 0, 1, 2)]
            cand = [w for w in cand if f32(s * w) == m and bf16(s * w) != bf16(m)]
            if cand:
                P.tw[i, 0] = cand[0]
                break
        else:
            raise AssertionError('no trap weight')
    y = run_reference(_lists(P))
    ys, _ = oracle_moe('bf16xbf16', P)
    assert same_bits(y, as_bf16(ys, hidden))
    assert y[:, 0].tolist() == [bf16(f32(s * w)) for w in P.tw[:, 0].tolist()]
    assert y[:, 0].tolist() != [bf16(s * w) for w in P.tw[:, 0].tolist()]
    # fp4xfp4: every channel a = f32(silu(1)), so h = e2m1 * sf8 is one known value; L2 rows V_n with
    # f32(h V_n l2s) a midpoint where l2s = f32(l2_alpha * a2) != l2_alpha * a2
    l2a, a2 = f32(1.2345678), f32(0.0012345)
    l2s, l2s64 = f32(l2a * a2), l2a * a2
    assert l2s != l2s64
    sf8, q = nvfp4_block([s] * 16, f32(1.0 / a2))
    h = q[0] * sf8
    cols = []
    for m in mids:
        v0 = f32(m / (h * l2s))
        cand = [v for v in (f32_step(v0, d) for d in range(-8, 9))
                if f32(h * v * l2s) == m and bf16(f32(h * v * l2s64)) != bf16(m)]
        if cand:
            cols.append(_bf16_chunks(cand[0]))
    assert len(cols) >= 4
    cols = (cols * hidden)[:hidden]
    P = _crafted('fp4xfp4', t, hidden, 32, torch.tensor(cols))
    P.l2a, P.a2 = torch.tensor([l2a, l2a]), torch.tensor([a2, a2])
    y = run_reference(_lists(P))
    ys, _ = oracle_moe('fp4xfp4', P)
    assert same_bits(y, as_bf16(ys, hidden))
    vs = [math.fsum(c) for c in cols]
    assert y[0].tolist() == [bf16(f32(h * v * l2s)) for v in vs]
    assert y[0].tolist() != [bf16(f32(h * v * l2s64)) for v in vs]
    # fp4xfp4 top-k weight after L2: p = h (V = 1, no alphas), weights with f32(p * w) a midpoint
    P = _crafted('fp4xfp4', t, hidden, 32, torch.tensor([1.0, 0.0, 0.0]))
    h1 = nvfp4_block([s] * 16, 1.0)
    p = h1[1][0] * h1[0]
    ws = []
    for m in mids:
        m = m * 2.0 ** math.frexp(p)[1]
        cand = [w for w in (f32_step(f32(m / p), d) for d in (-2, -1, 0, 1, 2))
                if f32(p * w) == m and bf16(p * w) != bf16(m)]
        ws += cand[:1]
    assert len(ws) >= t
    P.tw[:, 0] = torch.tensor(ws[:t])
    y = run_reference(_lists(P))
    ys, _ = oracle_moe('fp4xfp4', P)
    assert same_bits(y, as_bf16(ys, hidden))
    assert y[:, 0].tolist() == [bf16(f32(p * w)) for w in ws[:t]]
    assert y[:, 0].tolist() != [bf16(p * w) for w in ws[:t]]


# ------------------------------------------------------------------------ NVFP4 quantizer
def nvfp4_statement(a: torch.Tensor, inv_rows):
    """Scalar statement per block -> (values e2m1 [R, K] float64, sf8 float64 [R, K/16])."""
    vals, sfs = [], []
    for row, inv in zip(a.tolist(), inv_rows):
        rv, rs = [], []
        for b in range(0, len(row), 16):
            sf8, q = nvfp4_block(row[b:b + 16], inv)
            rs.append(sf8)
            rv += q
        vals.append(rv)
        sfs.append(rs)
    return torch.tensor(vals, dtype=torch.float64), torch.tensor(sfs, dtype=torch.float64)


def check_nvfp4(a, gs=None):
    codes, sf8 = quantize_nvfp4_rows(a, gs)
    assert codes.dtype == torch.uint8 and sf8.dtype == torch.float8_e4m3fn
    assert codes.shape == a.shape and sf8.shape == (a.shape[0], a.shape[1] // 16)
    if gs is None:
        inv = [1.0] * a.shape[0]
    elif isinstance(gs, torch.Tensor):
        inv = [f32(1.0 / g) for g in gs.tolist()]
    else:
        inv = [f32(1.0 / f32(gs))] * a.shape[0]
    want_v, want_sf = nvfp4_statement(a, inv)
    from deep_gemm.utils import e2m1_to_float
    got_v = e2m1_to_float(codes, torch.float64)
    assert torch.equal(got_v, want_v)
    assert torch.equal(torch.signbit(got_v[got_v != 0]), torch.signbit(want_v[want_v != 0]))
    assert torch.equal(sf8.to(torch.float64), want_sf)
    return got_v, sf8.to(torch.float64)


TIES = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
TIES_TO = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]  # the even code of each tie


@pytest.mark.parametrize('scale,gs', [(1.0, None), (2.0 ** -3, None), (2.0 ** -3, 0.5), (4.0, 8.0)])
def test_nvfp4_e2m1_ties(scale, gs):
    # one block: amax = 6 * scale * gs gives sf8 = scale exactly, so a * sf_inv = a / (scale * gs)
    m = scale * (gs or 1.0)
    row = [6.0] + TIES + [-v for v in TIES] + [5.999]
    a = torch.tensor([[v * m for v in row]], dtype=torch.float32)
    vals, sf8 = check_nvfp4(a, gs)
    assert sf8.tolist() == [[scale]]
    assert vals[0].tolist() == [6.0] + TIES_TO + [-v for v in TIES_TO] + [6.0]
    assert e2m1(2.5, ties_to_even=False) == 2.0 and e2m1(0.75, ties_to_even=False) == 0.5  # the other rule


def test_nvfp4_e4m3_scale_ties_and_clamp():
    # amax -> t = f32(amax * f32(1/6)): 6.375 -> 1.0625 (tie, to 1.0), 7.125 -> 1.1875 (tie, to 1.25),
    # 9 * 2^-9 -> 1.5 * 2^-9 (subnormal tie, to 2^-8), 15 * 2^-9 -> 2.5 * 2^-9 (to 2^-8),
    # 0.009 -> below 2^-9: clamped to 2^-9 (elements still quantize to non-zero codes), 0 -> 2^-9
    # f32 just below 7.125: amax * f32(1/6) rounds to the tie 1.1875 (-> 1.25), amax / 6 would not (-> 1.125)
    below = f32_step(7.125, -1)
    assert e4m3(f32(below * SIXTH)) == 1.25 and e4m3(f32(below / 6.0)) == 1.125
    amaxes = [6.375, 7.125, 9 * 2.0 ** -9, 15 * 2.0 ** -9, 0.009, 1e-5, 0.0, below]
    expect = [1.0, 1.25, 2.0 ** -8, 2.0 ** -8, 2.0 ** -9, 2.0 ** -9, 2.0 ** -9, 1.25]
    gen = torch.Generator().manual_seed(5)
    rows = []
    for am in amaxes:
        r = (torch.rand(16, generator=gen) * 2 - 1) * am
        r[3] = -am
        rows.append(r)
    a = torch.stack(rows).to(torch.float32)
    vals, sf8 = check_nvfp4(a)
    assert sf8[:, 0].tolist() == expect
    assert vals[4].abs().max() > 0  # the clamped scale still codes the block
    assert not vals[6].any() and not vals[5].any()
    # per-row global scales: the same block with inv_a2 = 1/gs moved into the normal E4M3 range
    gs = torch.tensor([1.0, 0.5, 2.0 ** -6, 2.0 ** -6, 3e-3, 1e-6, 1.0, 2.0], dtype=torch.float32)
    check_nvfp4(a, gs)
    check_nvfp4(a, 0.37)


def test_nvfp4_e2m1_ties_with_inexact_scales():
    """Values that the kernel's ``f32(a * f32(inv / sf8))`` puts exactly on an E2M1 tie, for
    arbitrary (non power of two) global and block scales."""
    gen = torch.Generator().manual_seed(8)
    rows, found, gss = [], 0, []
    for r in range(24):
        gs = f32(math.exp(float(torch.randn(1, generator=gen)) * 3) * 1e-2)
        inv = f32(1.0 / gs)
        amax = f32(6.0 * gs * float(1 + 200 * torch.rand(1, generator=gen)))
        sf8 = e4m3(max(f32(f32(amax * SIXTH) * inv), 2.0 ** -9))
        sfi = f32(inv / sf8)
        row = [amax]
        for tie in TIES + [-v for v in TIES]:
            a0 = f32(tie / sfi)
            hit = [a for a in (f32_step(a0, d) for d in (0, -1, 1, -2, 2)) if f32(a * sfi) == tie and abs(a) <= amax]
            row.append(hit[0] if hit else 0.0)
            found += bool(hit)
        rows.append(row + [0.0])
        gss.append(gs)
    assert found >= 0.8 * 24 * 14
    a = torch.tensor(rows, dtype=torch.float32)
    gs = torch.tensor(gss, dtype=torch.float32)
    vals, _ = check_nvfp4(a, gs)
    want = TIES_TO + [-v for v in TIES_TO]
    for r in range(24):
        for i, w in enumerate(want):
            if rows[r][1 + i] != 0.0:
                assert vals[r, 1 + i].item() == w


def test_nvfp4_random_rows_against_statement():
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(12, 64, generator=gen) * torch.exp(3 * torch.randn(12, 1, generator=gen))
    a[0, :16] = 0.0
    a[1, 16:32] = -0.0
    check_nvfp4(a)
    gs = (a.abs().amax(1) / 2688.0 * torch.exp(torch.randn(12, generator=gen))).clamp(min=1e-30)
    check_nvfp4(a, gs)
    dq = dequantize_nvfp4_rows(*quantize_nvfp4_rows(a))
    assert dq.dtype == torch.float32 and torch.equal(dq.to(torch.bfloat16).float(), dq)


# ------------------------------------------------------------------------ FP8 pow2 quantizer
def kernel_ue8m0_exp(amax: float) -> int:
    """The kernel's bit formula: biased exponent E of amax, +1 if its mantissa exceeds 1.75's,
    floor at 113, minus 8 -> biased exponent of the scale."""
    bits = struct.unpack('<I', struct.pack('<f', amax))[0]
    e, mant = (bits >> 23) & 0xFF, bits & 0x7FFFFF
    e += mant > 0x600000
    return max(e, 105 + 8) - 8


def test_fp8_pow2_scale_rule():
    ks = range(-20, 20)
    cases = [0.0, 1e-4, f32(1e-4), 2.0 ** -22 * 448, f32(2.0 ** -22 * 448 * (1 + 2 ** -20)), 1.0, 448.0, 3e38]
    cases += [448.0 * 2.0 ** k for k in ks] + [f32(448.0 * 2.0 ** k * (1 + 2.0 ** -23)) for k in ks]
    cases += [f32(v) for v in torch.exp(torch.linspace(-25, 25, 2001, dtype=torch.float64)).tolist()]
    amax = torch.tensor(cases, dtype=torch.float32)
    sf = fp8_pow2_scale(amax).tolist()
    for am, s in zip(amax.tolist(), sf):
        assert s == ceil_pow2(f32(max(am, f32(1e-4)) / 448.0))
        assert s == 2.0 ** (kernel_ue8m0_exp(am) - 127)
    assert sf[0] == sf[1] == 2.0 ** -22 and sf[3] == 2.0 ** -22 and sf[4] == 2.0 ** -21
    n = len(ks)
    assert sf[8:8 + n] == [2.0 ** k for k in ks]                 # exact powers of two stay
    assert sf[8 + n:8 + 2 * n] == [2.0 ** (k + 1) for k in ks]   # one ulp above: next power


def test_fp8_pow2_rows_against_statement():
    gen = torch.Generator().manual_seed(9)
    a = torch.randn(6, 128, generator=gen) * torch.exp(4 * torch.randn(6, 1, generator=gen))
    a[0, :32] = 0.0
    a[1, 32:64] = torch.tensor([448.0, 1.0625 * 448 / 448, 1.1875, -1.0625, 2.0 ** -9 * 0.5] * 6 + [0.0, 7.0])
    q, sf = quantize_fp8_pow2_rows(a, 32)
    assert q.dtype == torch.float8_e4m3fn and sf.shape == (6, 4)
    for r in range(6):
        for b in range(4):
            want_sf, want_q = fp8_block(a[r, 32 * b:32 * b + 32].tolist())
            assert sf[r, b].item() == want_sf
            assert q[r, 32 * b:32 * b + 32].to(torch.float64).tolist() == want_q
    assert sf[0, 0].item() == 2.0 ** -22 and not q[0, :32].float().any()
    assert sf[1, 1].item() == 1.0  # amax 448 exactly
    assert q[1, 33].item() == 1.0 and q[1, 34].item() == 1.25 and q[1, 35].item() == -1.0  # E4M3 ties to even
    assert not quantize_fp8_pow2_rows(a, 64)[1].isnan().any()
    with pytest.raises(ValueError, match='gran'):
        quantize_fp8_pow2_rows(a, 48)


# ------------------------------------------------------------------------ building blocks
def test_exact_rows_matmul_is_row_independent_and_exact():
    gen = torch.Generator().manual_seed(4)
    # BF16 values spanning ~60 binades in a row, FP8 x 2^k weights
    a = (torch.randn(9, 256, generator=gen) * torch.exp(6 * torch.randn(9, 256, generator=gen)))
    a = a.to(torch.bfloat16).to(torch.float64)
    a[2] = 0.0
    w = _block_scale(_fp8_values(gen, (40, 256)), 32,
                     torch.pow(2.0, torch.randint(-12, 3, (40, 8), generator=gen).float()))
    w = w.to(torch.float64)
    full = exact_rows_matmul(a, w)
    for r in range(9):
        assert torch.equal(exact_rows_matmul(a[r:r + 1], w)[0], full[r])
        assert torch.equal(exact_rows_matmul(a[[r, (r + 3) % 9, (r + 5) % 9]], w)[0], full[r])
    # FP8 x FP8 rows of moderate range: every sum fits in 53 bits, so the result is the exact sum
    b = _fp8_values(gen, (5, 256)).to(torch.float64) * 2.0 ** -6
    exact = exact_rows_matmul(b, w)
    want = torch.tensor([[math.fsum(map(operator.mul, br, wr)) for wr in w.tolist()] for br in b.tolist()],
                        dtype=torch.float64)
    assert torch.equal(exact, want)


def test_silu_table():
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    g = bits.view(torch.bfloat16).float()
    g = g[torch.isfinite(g)]
    s = silu_f32(g)
    assert s.dtype == torch.float32
    want = torch.tensor([silu(v) for v in g.tolist()], dtype=torch.float32)
    assert torch.equal(s.view(torch.int32), want.view(torch.int32))  # every finite BF16 gate, sign of 0 too
    one = silu_f32(torch.tensor([-1000.0, -0.0]))
    assert one[0].item() == 0.0 and torch.signbit(one).all()


# ------------------------------------------------------------------------------- validation
def test_validation_names_the_argument():
    P = make_problem('fp8xfp4', seed=21, t=4)
    F = make_problem('fp4xfp4', seed=22, t=4)

    def call(P, **over):
        kw = dict(recipe=P.recipe, x=P.x, topk_idx=P.idx, topk_weights=P.tw, w1=P.w1, w2=P.w2)
        kw.update(over)
        rest = {k: kw.pop(k) for k in list(kw) if k not in ('recipe', 'x', 'topk_idx', 'topk_weights', 'w1', 'w2')}
        return reference_recipe_moe(kw['recipe'], kw['x'], kw['topk_idx'], kw['topk_weights'], kw['w1'], kw['w2'],
                                    **rest)

    bad = [
        (P, dict(recipe='fp8xfp16'), ValueError, 'recipe'),
        (P, dict(recipe=8), TypeError, 'recipe'),
        (P, dict(x=P.x.double()), TypeError, 'x'),
        (P, dict(x=P.x + 1e-3), ValueError, 'x: values must be exactly representable'),
        (P, dict(topk_idx=P.idx.int()), TypeError, 'topk_idx'),
        (P, dict(topk_idx=P.idx.clamp(max=P.experts) + 0 * P.idx + (P.idx == P.idx.max()) * 7), ValueError, 'topk_idx'),
        (P, dict(topk_weights=torch.where(P.idx >= 0, torch.nan, P.tw)), ValueError, 'topk_weights'),
        (P, dict(w2=P.w2[:-1]), ValueError, 'w2'),
        (P, dict(w1=P.w1[:, :96]), ValueError, 'w1'),  # I = 48: not a multiple of 32
        (P, dict(num_experts=12), ValueError, 'num_experts'),
        (P, dict(l1_alphas=torch.ones(P.experts, 2)), ValueError, 'l1_alphas'),
        (P, dict(a2_scales=torch.ones(P.experts)), ValueError, 'a2_scales'),
        (P, dict(routed_scaling_factor=0.5), ValueError, 'routed_scaling_factor'),
        (P, dict(shared_w1=P.sw1), ValueError, 'shared_w1'),
        (P, dict(shared_w1=P.sw1, shared_w2=P.sw2, x_shared=P.xs[:2]), ValueError, 'x_shared'),
        (P, dict(shared_w1=P.sw1[:80], shared_w2=P.sw2[:, :40], x_shared=P.xs), ValueError, 'shared_w1'),
        (P, dict(activation_clamp=-1.0), ValueError, 'activation_clamp'),
        (P, dict(activation_clamp='1'), TypeError, 'activation_clamp'),
        (P, dict(cumulative_local_expert_recv_stats=torch.zeros(P.experts, dtype=torch.int64)), TypeError,
         'cumulative_local_expert_recv_stats'),
        (F, dict(l1_alphas=torch.ones(F.experts)), ValueError, 'l1_alphas'),
        (F, dict(l2_alphas=torch.ones(F.experts, dtype=torch.float64)), TypeError, 'l2_alphas'),
        (F, dict(a2_scales=-torch.ones(F.experts)), ValueError, 'a2_scales'),
        (F, dict(a2_scales=torch.full((F.experts,), math.inf)), ValueError, 'a2_scales'),
        (F, dict(l2_alphas=torch.zeros(F.experts)), ValueError, 'l2_alphas'),
        (F, dict(routed_scaling_factor=math.nan), ValueError, 'routed_scaling_factor'),
        (F, dict(routed_scaling_factor=True), TypeError, 'routed_scaling_factor'),
        (F, dict(w1=F.w1[:, :, :120], w2=F.w2[:, :120]), ValueError, 'w1'),
    ]
    for prob, over, exc, msg in bad:
        with pytest.raises(exc, match=msg):
            call(prob, **over)
    with pytest.raises(ValueError, match='a'):
        quantize_nvfp4_rows(torch.ones(2, 24))
    with pytest.raises(ValueError, match='global_scale'):
        quantize_nvfp4_rows(torch.ones(2, 32), torch.tensor([1.0, 0.0]))
    with pytest.raises(TypeError, match='a'):
        quantize_nvfp4_rows(torch.ones(2, 32, dtype=torch.float64))
    with pytest.raises(ValueError, match='a'):
        quantize_fp8_pow2_rows(torch.tensor([[math.inf] * 32]))
    # accepted: a clamp of 0 or inf, masked slots with NaN weights, zero tokens
    call(P, activation_clamp=0.0)
    call(P, activation_clamp=math.inf)
    y = call(P, x=P.x[:0], topk_idx=P.idx[:0], topk_weights=P.tw[:0])
    assert y.shape == (0, P.x.shape[1]) and y.dtype == torch.bfloat16


# ------------------------------------------------------------------------------- multi-rank
MR_CASES = [('fp8xfp4', {}), ('fp8xfp8', dict(clamp=None)), ('bf16xbf16', {}), ('fp4xfp4', dict(rsf=0.75))]
MR_SPLITS = [[6, 0], [2, 4]]


def _mr_worker(rank, world, port, data_path, out_dir):
    init_gloo(rank, world, port)
    try:
        cases = torch.load(data_path)
        res = []
        for c in cases:
            lo, hi = sum(c['counts'][:rank]), sum(c['counts'][:rank + 1])
            e_l = c['experts'] // world
            es = slice(rank * e_l, (rank + 1) * e_l)
            tok = lambda v: None if v is None else v[lo:hi]  # noqa: E731
            per_e = lambda v: None if v is None else v[es]  # noqa: E731
            stats = torch.full((e_l,), 5, dtype=torch.int32)
            y = reference_recipe_moe(c['recipe'], c['x'][lo:hi], c['idx'][lo:hi], c['tw'][lo:hi],
                                     list(c['w1'][es]), c['w2'][es], dist.group.WORLD,
                                     num_experts=c['experts'], l1_alphas=per_e(c['l1a']),
                                     l2_alphas=per_e(c['l2a']), a2_scales=per_e(c['a2']),
                                     routed_scaling_factor=c['rsf'], shared_w1=c['sw1'], shared_w2=c['sw2'],
                                     x_shared=tok(c['xs']), activation_clamp=c['clamp'],
                                     cumulative_local_expert_recv_stats=stats)
            res.append({'y': y, 'stats': stats})
        torch.save(res, os.path.join(out_dir, f'rank{rank}.pt'))
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_single_process(tmp_path, spawn_ranks):
    cases, want = [], []
    for i, (recipe, opts) in enumerate(MR_CASES):
        P = make_problem(recipe, seed=40 + i, t=6, **opts)
        stats = torch.full((P.experts,), 5, dtype=torch.int32)
        y = run_reference(P, stats)
        for counts in MR_SPLITS:
            cases.append(dict(recipe=recipe, counts=counts, experts=P.experts, x=P.x, idx=P.idx, tw=P.tw, w1=P.w1,
                              w2=P.w2, sw1=P.sw1, sw2=P.sw2, xs=P.xs, l1a=P.l1a, l2a=P.l2a, a2=P.a2, rsf=P.rsf,
                              clamp=P.clamp))
            want.append((y, stats))
    data_path = str(tmp_path / 'data.pt')
    torch.save(cases, data_path)
    spawn_ranks(_mr_worker, 2, (data_path, str(tmp_path)), TIMEOUT_S)
    res = [torch.load(tmp_path / f'rank{r}.pt') for r in range(2)]
    for i, (c, (y, stats)) in enumerate(zip(cases, want)):
        parts = [res[r][i]['y'] for r in range(2)]
        assert [p.shape[0] for p in parts] == c['counts']
        assert same_bits(torch.cat(parts), y), (c['recipe'], c['counts'])
        assert torch.equal(torch.cat([res[r][i]['stats'] for r in range(2)]), stats)
        assert y.float().abs().sum() > 0
