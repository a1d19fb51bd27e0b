"""Blackwell (CC 10.x) tcgen05 grouped GEMM vs a float64 reference on the same quantized inputs.

Never run yet: no Blackwell GPU was available when it was written (docs/sm100.md).  Same method
as tests/gpu/test_grouped_gemm.py: output poisoned with NaN, untouched rows checked to stay NaN,
error = ||out - ref|| / ||ref||.
"""
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 10,
                                reason='needs a Blackwell (CC 10.x) GPU')

from deep_gemm import gemm_sm100  # noqa: E402
from deep_gemm import weights_sm100 as w100  # noqa: E402

TOL = 5e-3
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
                    dtype=torch.float64)


def _unpack(codes):
    b = codes.long().cpu()
    return torch.stack([E2M1[b & 0xF], E2M1[b >> 4]], dim=-1).reshape(*codes.shape[:-1], -1)


def _weights(fmt, e, n, k, kind, gen):
    codes = torch.randint(0, 256, (e, n, k // 2), dtype=torch.uint8, generator=gen)
    if fmt == 'nvfp4':
        s = torch.randint(0x28, 0x48, (e, n, k // 16), dtype=torch.uint8, generator=gen).view(torch.float8_e4m3fn)
        g = (torch.rand(e, 2 if kind == 'l1' else 1, generator=gen) + 0.5) * 1e-2
        b = w100.transform_nvfp4_weights_for_sm100(codes.cuda(), s.cuda(), g.cuda(), kind=kind)
        w = _unpack(codes) * s.double().repeat_interleave(16, -1)
    else:
        s = torch.randint(120, 130, (e, n, k // 32), dtype=torch.uint8, generator=gen)
        b = w100.transform_mxfp4_weights_for_sm100(codes.cuda(), s.cuda(), kind=kind)
        w = _unpack(codes) * torch.exp2(s.double() - 127).repeat_interleave(32, -1)
    return b, w, b.alpha.double().cpu()


def _tokens(fmt, rows, k, gen):
    if fmt == 'nvfp4':
        x = torch.randint(0, 256, (rows, k // 2), dtype=torch.uint8, generator=gen)
        s = torch.randint(0x28, 0x48, (rows, k // 16), dtype=torch.uint8, generator=gen).view(torch.float8_e4m3fn)
        gs = 0.75
        ref = _unpack(x) * s.double().repeat_interleave(16, -1) * gs
        return (x.cuda(), s.cuda(), gs), ref
    x = (torch.randn(rows, k, generator=gen) * 4).to(torch.float8_e4m3fn)
    s = torch.randint(124, 130, (rows, k // 32), dtype=torch.uint8, generator=gen)
    ref = x.double() * torch.exp2(s.double() - 127).repeat_interleave(32, -1)
    return (x.cuda(), s.cuda()), ref


def _err(out, ref):
    return float((out.double() - ref).norm() / ref.norm().clamp_min(1e-30))


@pytest.mark.parametrize('fmt', ['nvfp4', 'mxfp4'])
def test_contiguous_plain(fmt):
    gen = torch.Generator().manual_seed(0)
    e, n, k = 4, 256, 512
    counts = [128, 0, 256, 128]
    offs = torch.tensor([0] + torch.tensor(counts).cumsum(0).tolist(), dtype=torch.int32)
    rows = int(offs[-1])
    b, w, alpha = _weights(fmt, e, n, k, 'l2', gen)
    a, tok = _tokens(fmt, rows, k, gen)
    d = torch.full((rows, n), float('nan'), dtype=torch.bfloat16, device='cuda')
    gemm_sm100.m_grouped_fp4_gemm_nt_contiguous_sm100(a, b, d, offs.cuda(), check_offsets=True)
    ref = torch.empty(rows, n, dtype=torch.float64)
    for i in range(e):
        lo, hi = int(offs[i]), int(offs[i + 1])
        ref[lo:hi] = tok[lo:hi] @ w[i].T * alpha[i, 0]
    assert not torch.isnan(d).any()
    assert _err(d.cpu(), ref) < TOL


@pytest.mark.parametrize('fmt', ['nvfp4', 'mxfp4'])
@pytest.mark.parametrize('block_n', [32, 64, 128])
def test_masked_swiglu(fmt, block_n):
    gen = torch.Generator().manual_seed(1)
    e, inter, k, max_m = 3, 128, 512, 128
    b, w, alpha = _weights(fmt, e, 2 * inter, k, 'l1', gen)
    masked = torch.tensor([5, 0, 100], dtype=torch.int32)
    a, tok = _tokens(fmt, e * max_m, k, gen)
    a = tuple(t.reshape(e, max_m, -1) if isinstance(t, torch.Tensor) else t for t in a)
    rw = torch.rand(e, max_m, generator=gen)
    d = torch.full((e, max_m, inter), float('nan'), dtype=torch.bfloat16, device='cuda')
    gemm_sm100.m_grouped_fp4_gemm_nt_masked_sm100(a, b, d, masked.cuda(), expected_m=64, epilogue='swiglu',
                                                  route_weights=rw.cuda(), activation_clamp=10.0, block_n=block_n)
    tok = tok.reshape(e, max_m, k)
    for i in range(e):
        m = int(masked[i])
        h = tok[i, :m] @ w[i].T
        gate, up = h[:, :inter] * alpha[i, 0], h[:, inter:] * alpha[i, -1]
        up, gate = up.clamp(-10, 10), gate.clamp(max=10)
        ref = gate * torch.sigmoid(gate) * up * rw[i, :m, None].double()
        assert _err(d[i, :m].cpu(), ref) < TOL
        assert torch.isnan(d[i, m:]).all()
