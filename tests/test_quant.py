"""Every quantizer against a direct computation (brute-force nearest value, ties to even): float64 for
the weight quantizers' documented steps, plain-Python float32 steps for upstream's activation cast."""
import math
import struct

import pytest
import torch

from deep_gemm.utils import (cast_to_mxfp4, cast_to_nvfp4, cast_to_nvfp4_experts, dequant_fp8, dequant_mxfp4,
                             dequant_nvfp4, e2m1_to_float, float_to_e2m1, pack_e2m1, pack_ue8m0,
                             per_token_cast_to_fp8, round_to_bf16, round_to_e4m3, unpack_e2m1, unpack_ue8m0)

E2M1_MAG = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)
E4M3_POS = torch.arange(0, 0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn).to(torch.float64)  # 0 .. 448


def brute_round(v: torch.Tensor, table: torch.Tensor):
    """Nearest table entry to |v| (saturating at the table max), ties to the even index; returns (index, value)."""
    a = v.abs().to(torch.float64).clamp(max=float(table.max())).reshape(-1, 1)
    d = (a - table.reshape(1, -1)).abs()
    best = d.min(dim=1, keepdim=True).values
    cand = d == best
    idx = torch.arange(table.numel()).expand_as(d)
    even = cand & (idx % 2 == 0)
    pick = torch.where(even.any(1), torch.where(even, idx, 10 ** 6).min(1).values,
                       torch.where(cand, idx, 10 ** 6).min(1).values)
    return pick.reshape(v.shape), table[pick].reshape(v.shape)


def brute_e2m1_codes(v):
    idx, _ = brute_round(v, E2M1_MAG)
    return (idx | (torch.signbit(v.double()).long() << 3)).to(torch.uint8)


def brute_e4m3(v):
    _, val = brute_round(v, E4M3_POS)
    return torch.where(torch.signbit(v.double()), -val, val)


# ----------------------------------------------------------------------------------- E2M1 codes
def test_all_16_e2m1_codes():
    codes = torch.arange(16, dtype=torch.uint8)
    vals = e2m1_to_float(codes, torch.float64)
    expect = [0, .5, 1, 1.5, 2, 3, 4, 6, -0.0, -.5, -1, -1.5, -2, -3, -4, -6]
    assert vals.tolist() == expect
    assert torch.signbit(vals[8]) and not torch.signbit(vals[0])
    assert torch.equal(float_to_e2m1(vals), codes)  # every code round-trips, -0 included


def test_float_to_e2m1_vs_brute_force():
    grid = torch.arange(-8 * 64, 8 * 64 + 1, dtype=torch.float64) / 64  # every tie point is on this grid
    rnd = torch.randn(4096, dtype=torch.float64) * 3
    v = torch.cat([grid, rnd, torch.tensor([7.0, 100.0, -1e9, 1e-30, -1e-30, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])])
    assert torch.equal(float_to_e2m1(v), brute_e2m1_codes(v))
    # ties to even explicitly
    assert float_to_e2m1(torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])).tolist() == [0, 2, 2, 4, 4, 6, 6]
    # saturation
    assert e2m1_to_float(float_to_e2m1(torch.tensor([6.5, -1e6]))).tolist() == [6.0, -6.0]


def test_negative_zero():
    assert float_to_e2m1(torch.tensor([-0.0])).item() == 8
    assert float_to_e2m1(torch.tensor([-0.2])).item() == 8
    w = torch.zeros(2, 32)
    w[0, 3] = -0.0
    w[1] = -1e-3
    w[1, 0] = 100.0
    packed, scale, gs = cast_to_nvfp4(w)
    d = dequant_nvfp4(packed, scale, gs)
    assert torch.equal(d[0], torch.zeros(32))  # -0 == 0
    assert d[1, 0] == 100.0 or abs(d[1, 0] - 100.0) / 100.0 < 1e-6


def test_pack_unpack_e2m1():
    codes = torch.randint(0, 16, (5, 64), dtype=torch.uint8)
    packed = pack_e2m1(codes)
    assert packed.shape == (5, 32)
    assert torch.equal(packed & 0xF, codes[:, 0::2])  # low nibble = even element
    assert torch.equal(packed >> 4, codes[:, 1::2])
    assert torch.equal(unpack_e2m1(packed), codes)
    assert pack_e2m1(torch.tensor([1, 7], dtype=torch.uint8)).item() == 0x71


# ------------------------------------------------------------------------------------ E4M3 / BF16
def test_round_to_e4m3_vs_brute_force():
    t = E4M3_POS
    mids = (t[1:] + t[:-1]) / 2  # every tie
    v = torch.cat([t, mids, mids + 1e-12, mids - 1e-12, torch.rand(4000, dtype=torch.float64) * 500,
                   torch.rand(1000, dtype=torch.float64) * 2 ** -6, torch.tensor([449.0, 464.0, 480.0, 1e30])])
    v = torch.cat([v, -v])
    got = round_to_e4m3(v)
    assert torch.equal(got, brute_e4m3(v))
    # the float8 cast of the rounded value is exact
    assert torch.equal(got.to(torch.float8_e4m3fn).to(torch.float64), got)
    assert round_to_e4m3(torch.tensor([2.0 ** -10])).item() == 0.0  # below half the smallest subnormal
    assert round_to_e4m3(torch.tensor([3 * 2.0 ** -10])).item() == 2.0 ** -8  # tie 1.5 steps -> even (2 steps)
    assert round_to_e4m3(torch.tensor([5 * 2.0 ** -10])).item() == 2.0 ** -8  # tie 2.5 steps -> even (2 steps)
    assert round_to_e4m3(torch.tensor([1000.0])).item() == 448.0


def test_round_to_bf16_single_rounding():
    v = torch.tensor([1 + 2.0 ** -8 + 2.0 ** -40], dtype=torch.float64)  # float32 would round it to the tie
    assert round_to_bf16(v).item() == 1 + 2.0 ** -7
    x = torch.randn(10000, dtype=torch.float32)
    assert torch.equal(round_to_bf16(x.double()), x.to(torch.bfloat16))  # float32 -> bf16 is one rounding
    tiny = torch.tensor([2.0 ** -130, 3 * 2.0 ** -134], dtype=torch.float64)  # bf16 subnormals
    assert torch.equal(round_to_bf16(tiny).double(), torch.tensor([2.0 ** -130, 2.0 ** -132], dtype=torch.float64))


# ------------------------------------------------------------------------------------------ NVFP4
def naive_nvfp4(w: torch.Tensor):
    """The ModelOpt convention of ``cast_to_nvfp4`` with torch float32 steps and brute-force
    roundings (``test_quant_modelopt.py`` checks the same convention element by element)."""
    amax = w.abs().max().float()
    gs = amax / 2688.0
    gs = torch.where(gs == 0, torch.ones_like(gs), gs)
    n, k = w.shape
    blocks = w.reshape(n, k // 16, 16)
    s = blocks.abs().amax(-1).float() / (6.0 * gs)
    s = torch.where(s == 0, torch.ones_like(s), s).clamp(2.0 ** -9, 448.0)
    scale = brute_e4m3(s)  # float64 values, exact
    denom = (scale.float() * gs).unsqueeze(-1)  # float32 product
    q = (blocks.to(torch.promote_types(w.dtype, torch.float32)) / denom).reshape(n, k)
    _idx, _ = brute_round(q, E2M1_MAG)
    codes = (_idx | ((q < 0).long() << 3)).to(torch.uint8)
    return pack_e2m1(codes), scale.to(torch.float8_e4m3fn), gs


def nvfp4_test_matrix():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(24, 128, generator=g) * torch.exp(3 * torch.randn(24, 1, generator=g))
    w[0, :16] = 0  # zero block
    w[3, :16] = -w.abs().max() * 2  # the global amax block: scale saturates at 448, elements at 6
    amax = w.abs().max()
    w[1, :16] = amax / 448 * 0.005 * torch.linspace(-1, 1, 16)  # block scale 0.005: a UE4M3 subnormal
    w[1, 16:32] = amax / 448 * 0.012 * torch.linspace(-1, 1, 16)
    w[2, 16:32] = 1e-9  # scale clamped up to 2^-9 -> zero elements
    w[4] = torch.tensor([-0.0] * 128)
    return w


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float64])
def test_cast_to_nvfp4_vs_naive(dtype):
    w = nvfp4_test_matrix().to(dtype)
    packed, scale, gs = cast_to_nvfp4(w)
    p2, s2, g2 = naive_nvfp4(w)
    assert gs.dtype == torch.float32 and gs.dim() == 0
    assert torch.equal(gs, g2)
    assert torch.equal(scale.view(torch.uint8), s2.view(torch.uint8))
    assert torch.equal(packed, p2)
    sv = scale.view(torch.uint8)
    assert ((sv[1] > 0) & (sv[1] < 8)).any(), 'expected UE4M3 subnormal scales'
    assert (sv[3, 0].item() == 0x7E)  # 448
    assert sv[0, 0].item() == 0x38 and sv[2, 1].item() == 0x01  # zero block: 1.0; tiny block: 2^-9
    assert torch.equal(unpack_e2m1(packed)[3, :16] & 7, torch.full((16,), 7, dtype=torch.uint8))
    assert (sv & 0x80 == 0).all()  # UE4M3: no sign


def test_nvfp4_saturation_at_6_times_448():
    w = torch.zeros(1, 32)
    w[0, 0] = 6 * 448.0
    w[0, 16:] = -1.0
    packed, scale, gs = cast_to_nvfp4(w)
    assert gs.item() == 1.0
    d = dequant_nvfp4(packed, scale, gs)
    assert d[0, 0].item() == 2688.0
    s = round_to_e4m3(torch.tensor([1.0 / 6], dtype=torch.float64)).item()  # 0.171875
    assert torch.equal(d[0, 16:].double(), torch.full((16,), -6 * s, dtype=torch.float64))


def test_nvfp4_all_zero_and_dequant_exact():
    packed, scale, gs = cast_to_nvfp4(torch.zeros(4, 64))
    assert gs.item() == 1.0 and (packed == 0).all() and (scale.view(torch.uint8) == 0x38).all()  # scale 1.0
    w = nvfp4_test_matrix()
    packed, scale, gs = cast_to_nvfp4(w)
    codes = unpack_e2m1(packed)
    exact = e2m1_to_float(codes, torch.float64) * scale.double().repeat_interleave(16, 1)
    assert torch.equal(dequant_nvfp4(packed, scale).double(), exact)  # block-scaled part exact in float32
    assert torch.equal(dequant_nvfp4(packed, scale, gs, dtype=torch.float64), exact * gs.double())


def test_nvfp4_roundtrip_error_bound():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(32, 256, generator=g)
    packed, scale, gs = cast_to_nvfp4(w)
    d = dequant_nvfp4(packed, scale, gs, dtype=torch.float64)
    step = (scale.double() * gs.double()).repeat_interleave(16, 1)  # largest E2M1 gap is 2 -> error <= 1 step
    assert ((d - w.double()).abs() <= step * 1.0 + 1e-12).all()
    # quantizing already-quantized values is the identity on the codes
    p2, s2, g2 = cast_to_nvfp4(d)
    assert torch.equal(dequant_nvfp4(p2, s2, g2, dtype=torch.float64), d) or \
        torch.allclose(dequant_nvfp4(p2, s2, g2, dtype=torch.float64), d, rtol=0.2)


def test_cast_to_nvfp4_experts_matches_per_expert():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(3, 16, 64, generator=g) * torch.tensor([1.0, 1e-3, 50.0]).reshape(3, 1, 1)
    w[1] = 0
    packed, scale, gs = cast_to_nvfp4_experts(w)
    assert gs.shape == (3,) and gs.dtype == torch.float32 and gs[1].item() == 1.0
    for e in range(3):
        p, s, gg = cast_to_nvfp4(w[e])
        assert torch.equal(packed[e], p) and torch.equal(scale[e].view(torch.uint8), s.view(torch.uint8))
        assert gs[e] == gg
    d = dequant_nvfp4(packed, scale, gs, dtype=torch.float64)
    for e in range(3):
        assert torch.equal(d[e], dequant_nvfp4(packed[e], scale[e], gs[e], dtype=torch.float64))


# ------------------------------------------------------------------------------------------ MXFP4
def test_cast_to_mxfp4_vs_float64():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(8, 128, generator=g) * torch.exp(4 * torch.randn(8, 1, generator=g))
    w[0, :32] = 0
    w[1, :32] = 6.0  # amax / 6 = 1 exactly -> exponent 0
    w[1, 32:64] = 6.0 * 2 ** -3 + 1e-6
    packed, scale = cast_to_mxfp4(w)
    assert scale.dtype == torch.uint8 and scale.shape == (8, 4)
    for n in range(8):
        for b in range(4):
            blk = w[n, 32 * b:32 * (b + 1)].double()
            amax = blk.abs().max().item()
            e = 0 if amax == 0 else min(max(math.ceil(math.log2(amax / 6)) + 127, 0), 254)
            assert scale[n, b].item() == e, (n, b)
            codes = brute_e2m1_codes(blk / 2.0 ** (e - 127))
            assert torch.equal(unpack_e2m1(packed[n, 16 * b:16 * (b + 1)]), codes)
    assert scale[1, 0].item() == 127 and scale[1, 1].item() == 125
    d = dequant_mxfp4(packed, scale, dtype=torch.float64)
    assert torch.equal(dequant_mxfp4(packed, scale).double(), d)  # exact in float32
    step = torch.exp2(scale.double() - 127).repeat_interleave(32, 1)
    assert ((d - w.double()).abs() <= step + 1e-30).all()


# -------------------------------------------------------------------------------------------- FP8
def f32(v: float) -> float:
    """Round a Python float to float32 (one RNE rounding)."""
    return struct.unpack('f', struct.pack('f', v))[0]


def upstream_fp8_oracle(x: torch.Tensor, use_ue8m0: bool, gran_k: int):
    """Upstream's per_token_cast_to_fp8, element by element in plain Python: float32 amax clamped at
    1e-4, float32 amax / 448, the next power of two up (ue8m0), float32 reciprocal, float32 product,
    RNE to E4M3 saturating at 448."""
    m, n = x.shape
    groups = -(-n // gran_k)
    xs = x.float().tolist()
    q = torch.zeros(m, n, dtype=torch.float64)
    sf = torch.zeros(m, groups, dtype=torch.float64)
    for r in range(m):
        for gi in range(groups):
            block = xs[r][gi * gran_k:(gi + 1) * gran_k]
            s = f32(max(max(abs(v) for v in block), f32(1e-4)) / 448.0)
            if use_ue8m0:
                s = 2.0 ** math.ceil(math.log2(s))
            sf[r, gi] = s
            inv = f32(1.0 / s)
            for j, v in enumerate(block):
                q[r, gi * gran_k + j] = f32(v * inv)
    return brute_e4m3(q), sf


@pytest.mark.parametrize('gran_k', [32, 128])
@pytest.mark.parametrize('use_ue8m0', [False, True])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_per_token_cast_to_fp8_is_upstreams(gran_k, use_ue8m0, dtype):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 256, generator=g) * torch.exp(3 * torch.randn(6, 1, generator=g))
    x[0] = 0
    x[1, :gran_k] = 0
    x[2, :gran_k] = 3e-5      # below the 1e-4 amax clamp
    x[3, 0] = 448 * 1.75      # amax / 448 exactly a power of two times 1.75
    x = x.to(dtype)
    q, sf = per_token_cast_to_fp8(x, use_ue8m0, gran_k)
    assert q.dtype == torch.float8_e4m3fn and sf.dtype == torch.float32 and sf.shape == (6, 256 // gran_k)
    want_q, want_sf = upstream_fp8_oracle(x, use_ue8m0, gran_k)
    assert torch.equal(sf.double(), want_sf)
    assert torch.equal(q.double(), want_q)
    assert sf[0, 0].item() == (2.0 ** -22 if use_ue8m0 else f32(f32(1e-4) / 448))   # all-zero block
    d = dequant_fp8(q, sf, gran_k, dtype=torch.float64)
    assert torch.equal(d, q.double() * sf.double().repeat_interleave(gran_k, 1))
    if use_ue8m0:  # power-of-two scales: FP8 x scale is exact in BF16
        assert torch.equal(d.to(torch.bfloat16).double(), d)
    assert torch.allclose(d[4:], x[4:].double(), rtol=0.07, atol=0)


def test_per_token_cast_to_fp8_packed_and_padded():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(5, 200, generator=g)          # 200 is no multiple of 128: zero padding
    q, sf = per_token_cast_to_fp8(x, True, 32)
    assert q.shape == (5, 200) and sf.shape == (5, 7)
    assert torch.equal(q.double(), upstream_fp8_oracle(x, True, 32)[0])
    with pytest.raises(ValueError, match='multiple of 4'):   # 7 groups do not pack into words
        per_token_cast_to_fp8(x, True, 32, True)
    q, sf = per_token_cast_to_fp8(torch.cat([x, x[:, :56]], 1), True, 32)
    qp, packed = per_token_cast_to_fp8(torch.cat([x, x[:, :56]], 1), True, 32, True)
    assert torch.equal(q.view(torch.uint8), qp.view(torch.uint8))
    assert packed.dtype == torch.int32 and packed.shape == (5, 2)
    assert torch.equal(unpack_ue8m0(packed, 8), sf)
    with pytest.raises(TypeError, match='use_ue8m0: expected a bool'):   # the old order (x, gran_k, ...)
        per_token_cast_to_fp8(x, 32)
    with pytest.raises(ValueError, match='use_packed_ue8m0'):
        per_token_cast_to_fp8(x, False, 32, True)


def test_pack_unpack_ue8m0():
    sf = torch.tensor([[1.0, 2.0, 0.5, 8.0, 32.0]])
    packed = pack_ue8m0(sf)
    assert packed.dtype == torch.int32 and packed.shape == (1, 2)
    word0 = 127 | (128 << 8) | (126 << 16) | (130 << 24)
    assert packed[0, 0].item() == word0 - 2 ** 32  # little endian, 4 exponents per int32
    assert packed[0, 1].item() == 132
    assert torch.equal(unpack_ue8m0(packed, 5), sf)
    g = torch.Generator().manual_seed(6)
    sf = torch.exp2(torch.randint(-100, 100, (7, 13), generator=g).float())
    assert torch.equal(unpack_ue8m0(pack_ue8m0(sf), 13), sf)
    _, sf2 = per_token_cast_to_fp8(torch.randn(4, 256), True, 32)
    assert torch.equal(unpack_ue8m0(pack_ue8m0(sf2), 8), sf2)
    with pytest.raises(ValueError, match='sf'):
        pack_ue8m0(torch.tensor([[1.5]]))


# ------------------------------------------------------------- the previous float64 implementations
# Copies of the float64 quantizers that the fast ones replaced: their math is the documented one
# (single RNE roundings of float64 quotients), and the fast code must equal them bit for bit.
def old_round_to_format(x, sig_bits, min_exp, max_value):
    x = x.to(torch.float64)
    a = x.abs().clamp(max=max_value)
    _, e = torch.frexp(a)
    quantum = torch.ldexp(torch.ones_like(a), e.clamp(min=min_exp) - sig_bits)
    r = torch.round(a / quantum) * quantum
    r = r.clamp(max=max_value)
    return torch.where(torch.signbit(x), -r, r)


def old_float_to_e2m1(x):
    r = old_round_to_format(x.to(torch.float64), 2, 1, 6.0)
    a = r.abs()
    mag = torch.where(a < 2, a * 2, torch.where(a < 4, a + 2, a / 2 + 4)).to(torch.uint8)
    return mag | (torch.signbit(r).to(torch.uint8) << 3)


def old_cast_to_mxfp4(w):
    w64 = w.to(torch.float64)
    blocks = w64.reshape(*w.shape[:-1], w.shape[-1] // 32, 32)
    amax = blocks.abs().amax(dim=-1) / 6.0
    m, e = torch.frexp(amax)
    ceil_log2 = torch.where(m == 0.5, e - 1, e)
    b = torch.where(amax == 0, torch.zeros_like(e), (ceil_log2 + 127).clamp(0, 254))
    s = torch.ldexp(torch.ones_like(amax), b - 127).unsqueeze(-1)
    codes = old_float_to_e2m1(blocks / s).reshape(w.shape)
    return pack_e2m1(codes), b.to(torch.uint8)


def random_activations(dtype, seed, t=64, k=1024):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, k, generator=g) * torch.exp(3 * torch.randn(t, 1, generator=g))
    x = x * torch.exp(torch.randn(t, k // 32, generator=g)).repeat_interleave(32, 1)
    x[0] = 0
    x[1, :128] = 0
    x[2, :64] = -0.0
    x[3, 5] = -1e-30
    return x.to(dtype)


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float64])
def test_cast_to_mxfp4_vs_old_float64(dtype):
    for seed in range(3):
        w = random_activations(dtype, seed, t=32, k=512)
        ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0] * 4)
        w[4, :32] = ties * torch.tensor([1.0, -1.0]).repeat(16)  # scale 1: the E2M1 ties themselves
        w[5, 0] = 1e-38 if dtype != torch.float16 else 1e-5
        got, want = cast_to_mxfp4(w), old_cast_to_mxfp4(w)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    w3 = random_activations(torch.float32, 4, t=24, k=256).reshape(2, 12, 256)
    got, want = cast_to_mxfp4(w3), old_cast_to_mxfp4(w3)
    assert got[0].shape == (2, 12, 128) and torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_float_to_e2m1_all_dtypes():
    grid = torch.arange(-8 * 64, 8 * 64 + 1, dtype=torch.float64) / 64
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        v = torch.cat([grid, torch.randn(1000, dtype=torch.float64) * 3]).to(dtype)
        assert torch.equal(float_to_e2m1(v), old_float_to_e2m1(v))
        assert torch.equal(float_to_e2m1(v), brute_e2m1_codes(v.double()))


# ------------------------------------------------------------------------------------ input hygiene
@pytest.mark.parametrize('bad', [float('nan'), float('inf'), -float('inf')])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_non_finite_input_rejected(bad, dtype):
    w = torch.randn(4, 128)
    w[3, 100] = bad
    w = w.to(dtype)
    for f in (cast_to_nvfp4, cast_to_mxfp4, lambda t: cast_to_nvfp4_experts(t[None])):
        with pytest.raises(ValueError, match='^w: .*NaN or Inf'):
            f(w)
    with pytest.raises(ValueError, match='^x: .*NaN or Inf'):
        per_token_cast_to_fp8(w, False, 32)
    with pytest.raises(ValueError, match='^x: .*NaN or Inf'):
        per_token_cast_to_fp8(w, True, 128)
