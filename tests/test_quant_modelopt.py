"""``cast_to_nvfp4`` follows NVIDIA ModelOpt's NVFP4 weight quantizer bit for bit.

Two kinds of tests:

* against a slow oracle written plainly below (Python loops over a small matrix, float32 steps
  done as float64 operations rounded to float32 with ``struct``; for one multiply or divide of
  float32 operands that double rounding is innocuous, so it equals the float32 operation).  The
  oracle is the convention documented in ``deep_gemm/utils/quant.py`` and needs no ModelOpt;
* against ModelOpt itself (``modelopt.torch.quantization.qtensor.NVFP4QTensor.quantize``, the
  code that writes ModelOpt checkpoints): a test extra, so these run in CI (there a failed import is
  an error); elsewhere they skip without ``nvidia-modelopt``.
"""
import os
import struct
from fractions import Fraction

import pytest
import torch

from deep_gemm.utils import (cast_to_nvfp4, cast_to_nvfp4_experts, dequant_nvfp4, e2m1_to_float, pack_e2m1,
                             unpack_e2m1)

E2M1_MAGS = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
E2M1_TIES = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]


# ------------------------------------------------------------------------------------------ oracle
def f32(v: float) -> float:
    """Round a Python float (float64) to the nearest float32, ties to even."""
    return struct.unpack('<f', struct.pack('<f', v))[0]


def e4m3_value(code: int) -> float:
    e, m = code >> 3, code & 7
    return m * 2.0 ** -9 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7)


E4M3_TABLE = [e4m3_value(c) for c in range(0x7F)]  # codes 0 .. 126: 0 .. 448


def e4m3_rne(v: float) -> int:
    """Code of the E4M3 value nearest to ``v >= 0`` (at most 448), ties to the even code."""
    best = None
    for c, val in enumerate(E4M3_TABLE):
        d = abs(v - val)
        if best is None or d < best[0] or (d == best[0] and c % 2 == 0):
            best = (d, c)
    return best[1]


def e2m1_rne(a: float) -> int:
    """Magnitude code of the E2M1 value nearest to ``a >= 0``, ties to the even code, saturating."""
    best = None
    for c, val in enumerate(E2M1_MAGS):
        d = abs(min(a, 6.0) - val)
        if best is None or d < best[0] or (d == best[0] and c % 2 == 0):
            best = (d, c)
    return best[1]


def oracle_nvfp4(w: torch.Tensor):
    """The documented convention, one element at a time.  ``w [N, K]`` float32 or BF16 values."""
    rows = w.double().tolist()
    amax = max((abs(v) for row in rows for v in row), default=0.0)
    gs = f32(amax / 2688.0)
    if gs == 0.0:
        gs = 1.0
    six_gs = f32(6.0 * gs)
    codes, scales = [], []
    for row in rows:
        crow, srow = [], []
        for b in range(0, len(row), 16):
            block = row[b:b + 16]
            s = f32(max(abs(v) for v in block) / six_gs)
            if s == 0.0:
                s = 1.0
            s = min(max(s, 2.0 ** -9), 448.0)
            sc = e4m3_rne(s)
            srow.append(sc)
            denom = f32(E4M3_TABLE[sc] * gs)
            for v in block:
                q = f32(v / denom)
                crow.append((8 if q < 0 else 0) | e2m1_rne(abs(q)))
        codes.append(crow)
        scales.append(srow)
    return (pack_e2m1(torch.tensor(codes, dtype=torch.uint8)), torch.tensor(scales, dtype=torch.uint8),
            torch.tensor(gs, dtype=torch.float32))


def assert_same(got, want):
    packed, scale, gs = got
    p2, s2, g2 = want
    assert packed.dtype == torch.uint8 and scale.dtype == torch.float8_e4m3fn and gs.dtype == torch.float32
    assert torch.equal(gs.reshape(g2.shape), g2), (gs, g2)
    assert torch.equal(scale.view(torch.uint8), s2.view(torch.uint8) if s2.dtype != torch.uint8 else s2)
    bad = (unpack_e2m1(packed) != unpack_e2m1(p2)).nonzero()
    assert bad.numel() == 0, f'{bad.shape[0]} codes differ, first at {bad[0].tolist()}'


def tie_matrix():
    """Blocks whose float32 quotient is exactly every E2M1 tie (and its float32 neighbours), both
    signs, for several block scales; the global amax is 2688, so global_scale = 1."""
    blocks = []
    for scale in (1.0, 0.5, 1.25, 0.171875, 3.0, 2.0 ** -7):  # each exact in E4M3
        amax = 6.0 * scale  # -> s = amax / 6 = scale exactly
        for shift in (0, 1, -1):  # the tie itself, one float32 above, one below
            vals = []
            for t in E2M1_TIES:
                v = torch.tensor(t * scale, dtype=torch.float32)
                if shift:
                    v = torch.nextafter(v, torch.tensor(shift * float('inf')))
                vals += [v.item(), -v.item()]
            blocks.append(vals + [amax, -amax])
    blocks.append([2688.0] + [0.0] * 15)
    blocks += [[0.0] * 16] * (-len(blocks) % 4)
    return torch.tensor(blocks, dtype=torch.float32).reshape(-1, 64)


def test_e2m1_ties_vs_oracle():
    w = tie_matrix()
    got = cast_to_nvfp4(w)
    assert_same(got, oracle_nvfp4(w))
    assert got[2].item() == 1.0
    # the ties themselves: ties to even, both signs (block 0: scale 1, quotient = w)
    codes = unpack_e2m1(got[0]).reshape(-1, 16)
    assert codes[0, 0:14:2].tolist() == [0, 2, 2, 4, 4, 6, 6]
    assert codes[0, 1:14:2].tolist() == [8, 10, 10, 12, 12, 14, 14]
    assert codes[1, 0:14:2].tolist() == [1, 2, 3, 4, 5, 6, 7]  # one ulp above: up
    assert codes[2, 0:14:2].tolist() == [0, 1, 2, 3, 4, 5, 6]  # one ulp below: down
    for blk in range(0, 18, 3):  # every scale: the same ties decision
        assert torch.equal(codes[blk, :14], codes[0, :14]), blk


def test_e4m3_scale_ties_vs_oracle():
    """Block amax = 6 * m for every E4M3 midpoint m: the float32 block scale is exactly the tie."""
    mids = [(a + b) / 2 for a, b in zip(E4M3_TABLE[:-1], E4M3_TABLE[1:])] + [2.0 ** -11, 2.0 ** -10]
    blocks = [[6.0 * m] + [-(6.0 * m) / 7] * 15 for m in mids]
    blocks.append([2688.0] + [1.0] * 15)  # global amax 2688: global_scale = 1, 6 * gs = 6
    blocks += [[0.0] * 16] * (-len(blocks) % 4)
    w = torch.tensor(blocks, dtype=torch.float32).reshape(-1, 64)
    packed, scale, gs = cast_to_nvfp4(w)
    assert gs.item() == 1.0
    assert_same((packed, scale, gs), oracle_nvfp4(w))
    sc = scale.view(torch.uint8).flatten()[:len(mids)].tolist()
    for m, c in zip(mids, sc):
        if m <= 2.0 ** -10:
            assert c == 1  # clamped up to the smallest subnormal 2^-9
        else:
            assert c % 2 == 0 and abs(E4M3_TABLE[c] - m) == min(abs(v - m) for v in E4M3_TABLE), (m, c)


def bf16(v: float) -> float:
    return torch.tensor(v, dtype=torch.float64).to(torch.float32).bfloat16().item()


def bf16_tie_cases():
    """BF16 weights whose float32 quotient is exactly an E2M1 tie while a float64 quotient is not.

    The global amax ``7 * 29 * 2^-11`` makes ``global_scale = float32(29 / (3 * 2^18))`` inexact; for
    a block scale with a factor 3 the exact product ``scale * global_scale`` is short again, and the
    float32 product rounds back onto it (the float64 product keeps the error of the global scale).
    Weights ``tie * denominator`` are then BF16 values whose float32 quotient is exactly the tie.
    This is how a BF16 checkpoint hits the ties (ModelOpt rounds them to even)."""
    amax = 7 * 29 * 2.0 ** -11
    gs = f32(amax / 2688.0)
    six_gs = f32(6.0 * gs)
    blocks, cases = [[amax] + [0.0] * 15], 0
    for scale in (0.375, 0.75, 1.5, 3.0, 6.0, 12.0, 24.0, 48.0, 96.0, 192.0, 384.0):
        b_amax = bf16(scale * 6 * float(Fraction(29, 3 * 2 ** 18)))
        assert E4M3_TABLE[e4m3_rne(f32(b_amax / six_gs))] == scale
        denom = f32(scale * gs)
        assert denom != scale * gs  # the float64 product differs from the float32 one
        vals = []
        for t in E2M1_TIES:
            v = bf16(t * denom)
            assert v == t * denom and f32(v / denom) == t and v / (scale * gs) != t
            vals += [v, -v]
        blocks.append([b_amax] + vals + [0.0])
        cases += len(vals)
    blocks += [[0.0] * 16] * (-len(blocks) % 4)
    w = torch.tensor(blocks, dtype=torch.float64).reshape(-1, 64)
    assert w.abs().max().item() == amax and cases == 11 * 14
    return w.bfloat16()


def test_bf16_float32_ties_vs_oracle():
    w = bf16_tie_cases()
    got = cast_to_nvfp4(w)
    assert_same(got, oracle_nvfp4(w))
    codes = unpack_e2m1(got[0]).reshape(-1, 16)[1:12, 1:15]
    even = torch.tensor([0, 2, 2, 4, 4, 6, 6], dtype=torch.uint8)
    assert torch.equal(codes[:, 0::2], even.expand(11, 7))  # ties to even
    assert torch.equal(codes[:, 1::2], (even | 8).expand(11, 7))


def oracle_matrix(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(8, 64, generator=g) * torch.exp(2 * torch.randn(8, 1, generator=g))
    w = w * torch.exp(2 * torch.randn(8, 4, generator=g)).repeat_interleave(16, 1)
    w[0, :16] = 0  # zero block: scale 1.0
    w[1, :16] = -0.0  # negative zeros: code 0 (sign = q < 0)
    w[1, 16:32] = -1e-30  # tiny: scale clamped to 2^-9, negative codes 8
    w[2, :16] = 0
    w[2, 5] = -1e-3 * w.abs().max()
    return w.to(dtype)


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('seed', [0, 1, 2])
def test_random_vs_oracle(dtype, seed):
    w = oracle_matrix(dtype, seed)
    got = cast_to_nvfp4(w)
    assert_same(got, oracle_nvfp4(w))
    sv = got[1].view(torch.uint8)
    assert sv[0, 0].item() == 0x38 and sv[1, 1].item() == 0x01  # zero block -> 1.0; tiny block -> 2^-9
    assert (unpack_e2m1(got[0])[1, :16] == 0).all() and (unpack_e2m1(got[0])[1, 16:32] == 8).all()


def test_all_zero_and_experts_vs_oracle():
    z = torch.zeros(2, 32)
    assert_same(cast_to_nvfp4(z), oracle_nvfp4(z))
    p, s, g = cast_to_nvfp4(z)
    assert g.item() == 1.0 and (s.view(torch.uint8) == 0x38).all() and (p == 0).all()
    w = torch.stack([oracle_matrix(torch.float32, 3), torch.zeros(8, 64), oracle_matrix(torch.float32, 4) * 1e3])
    packed, scale, gs = cast_to_nvfp4_experts(w)
    assert gs.shape == (3,)
    for e in range(3):
        assert_same((packed[e], scale[e], gs[e]), oracle_nvfp4(w[e]))


# ------------------------------------------------------------------------------------------ hygiene
@pytest.mark.parametrize('bad', [float('nan'), float('inf'), -float('inf')])
def test_non_finite_rejected(bad):
    w = torch.randn(4, 32)
    w[2, 7] = bad
    with pytest.raises(ValueError, match='^w: .*NaN or Inf'):
        cast_to_nvfp4(w)
    with pytest.raises(ValueError, match='^w: .*NaN or Inf'):
        cast_to_nvfp4(w.bfloat16())
    with pytest.raises(ValueError, match='^w: .*NaN or Inf'):
        cast_to_nvfp4_experts(torch.stack([torch.zeros(4, 32), w]))


# ---------------------------------------------------------------------------------------- ModelOpt
def _import_modelopt_qtensor():
    """ModelOpt's qtensor module.  It is a test extra (the README's set-up installs it): in CI a failed
    import is an error, not a skip, so the comparison with the checkpoint writer cannot silently vanish."""
    if os.environ.get('CI'):
        import importlib
        return importlib.import_module('modelopt.torch.quantization.qtensor')
    return pytest.importorskip('modelopt.torch.quantization.qtensor')


@pytest.fixture(scope='module')
def modelopt():
    qtensor = _import_modelopt_qtensor()

    def quantize(w):
        q, scale, gs = qtensor.NVFP4QTensor.quantize(w.clone(), 16)
        return q._quantized_data, scale, gs
    return quantize


def modelopt_matrix(dtype, seed, n=96, k=512):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.exp(1.5 * torch.randn(n, 1, generator=g))
    w = w * torch.exp(1.5 * torch.randn(n, k // 16, generator=g)).repeat_interleave(16, 1)  # per-block magnitude
    w[0, :16] = 0
    w[1, :32] = -0.0
    w[2, 16:32] = 1e-20 * torch.randn(16, generator=g)
    w[3, :16] = w[3, :16].sign() * w.abs().max()  # the global amax block: scale at 448, codes at 6
    return w.to(dtype)


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize('seed', [0, 1])
def test_random_vs_modelopt(modelopt, dtype, seed):
    w = modelopt_matrix(dtype, seed)
    if dtype == torch.float16:
        w[2, 16:32] = 1e-6  # keep it finite and non-zero in float16
    assert_same(cast_to_nvfp4(w), modelopt(w))


def test_bf16_checkpoint_like_vs_modelopt(modelopt):
    """Small BF16 weights (a typical checkpoint): here a float64 quotient differed in ~0.2-0.4 % of
    the codes; the float32 convention gives none."""
    g = torch.Generator().manual_seed(7)
    w = (torch.randn(512, 1024, generator=g) * 0.02).bfloat16()
    got, want = cast_to_nvfp4(w), modelopt(w)
    assert_same(got, want)
    # and the difference from a float64 quotient is real: recompute the codes that way
    packed, scale, gs = got
    denom = (scale.double() * gs.double()).repeat_interleave(16, 1)
    q64 = w.double() / denom
    q32 = (w.float() / (scale.float() * gs).repeat_interleave(16, 1)).double()
    ties = torch.tensor(E2M1_TIES, dtype=torch.float64)
    on_tie32 = (q32.abs().unsqueeze(-1) == ties).any(-1)
    assert (on_tie32 & (q64 != q32)).sum() > 100


def test_ties_zero_blocks_saturation_vs_modelopt(modelopt):
    assert_same(cast_to_nvfp4(tie_matrix()), modelopt(tie_matrix()))
    w = bf16_tie_cases()
    assert_same(cast_to_nvfp4(w), modelopt(w))
    for dtype in (torch.float32, torch.bfloat16):
        w = oracle_matrix(dtype, 5)
        assert_same(cast_to_nvfp4(w), modelopt(w))


def saturation_matrix():
    """Rows whose global amax ``a`` gives ``a / float32(6 * gs)`` just above 448 (clamped to 448) or
    just below it (rounded to 448): the amax element's quotient is then just above or below 6."""
    hits = []
    for i in range(2000):
        a = f32(1.0 + i * 2 ** -12)
        if f32(a / f32(6.0 * f32(a / 2688.0))) != 448.0:
            hits.append(a)
        if len(hits) >= 32:
            break
    assert any(f32(a / f32(6.0 * f32(a / 2688.0))) > 448 for a in hits)
    assert any(f32(a / f32(6.0 * f32(a / 2688.0))) < 448 for a in hits)
    w = torch.zeros(len(hits), 32)
    w[:, 0] = torch.tensor(hits)
    w[:, 16:] = torch.linspace(-1, 1, 16)
    return w


def test_block_scale_saturation_vs_oracle():
    w = saturation_matrix()
    for row in range(w.shape[0]):
        got = cast_to_nvfp4(w[row:row + 1])
        assert_same(got, oracle_nvfp4(w[row:row + 1]))
        assert got[1].view(torch.uint8)[0, 0].item() == 0x7E  # scale 448
        assert unpack_e2m1(got[0])[0, 0].item() == 7  # 6, the quotient is within an ulp of it
    assert_same(cast_to_nvfp4(w), oracle_nvfp4(w))


def test_block_scale_saturation_vs_modelopt(modelopt):
    w = saturation_matrix()
    for row in range(w.shape[0]):
        assert_same(cast_to_nvfp4(w[row:row + 1]), modelopt(w[row:row + 1]))
    assert_same(cast_to_nvfp4(w), modelopt(w))


def test_experts_vs_modelopt_per_expert(modelopt):
    w = torch.stack([modelopt_matrix(torch.bfloat16, s, n=32, k=256) for s in (3, 4, 5)])
    w[1] *= 1e-3
    packed, scale, gs = cast_to_nvfp4_experts(w)
    for e in range(3):
        assert_same((packed[e], scale[e], gs[e]), modelopt(w[e]))


def test_all_zero_matrix_modelopt_writes_nan(modelopt):
    """The one documented deviation: ModelOpt's global scale is 0 for an all-zero matrix, its block
    scales become 0 / 0 = NaN and every code 7; we write global scale 1, block scales 1, codes 0."""
    z = torch.zeros(2, 32)
    p, s, g = modelopt(z)
    assert g.item() == 0.0 and torch.isnan(s.float()).all() and (p == 0x77).all()
    p, s, g = cast_to_nvfp4(z)
    assert g.item() == 1.0 and (s.view(torch.uint8) == 0x38).all() and (p == 0).all()
    # a zero block inside a non-zero matrix: ModelOpt writes scale 1.0 too
    w = torch.zeros(1, 32)
    w[0, 16] = 3.0
    assert modelopt(w)[1].view(torch.uint8)[0, 0].item() == 0x38
    assert_same(cast_to_nvfp4(w), modelopt(w))


def test_dequant_matches_modelopt_dequantize(modelopt):
    """Same meaning of (codes, scale, global_scale): ModelOpt's float32 dequantize rounds
    ``scale * global_scale`` and the product with the E2M1 value, ours is exact then rounded once."""
    qtensor = _import_modelopt_qtensor()
    w = modelopt_matrix(torch.bfloat16, 9, n=16, k=128)
    packed, scale, gs = cast_to_nvfp4(w)
    ours = dequant_nvfp4(packed, scale, gs, dtype=torch.float64)
    vals = e2m1_to_float(unpack_e2m1(packed), torch.float64)
    assert torch.equal(ours, vals * (scale.double() * gs.double()).repeat_interleave(16, 1))
    theirs = qtensor.NVFP4QTensor(w.shape, torch.float32, packed).dequantize(
        dtype=torch.float32, scale=scale, double_scale=gs, block_sizes={-1: 16}).double()
    assert ((theirs - ours).abs() <= ours.abs() * 2.0 ** -22).all()
