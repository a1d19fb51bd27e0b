"""Hopper NVFP4/MXFP4 grouped GEMM vs a float64 reference on the same quantized inputs.

Every run: fresh random non-uniform data, output poisoned with NaN first, rows a kernel must not
touch checked to still be NaN, NaN never passes, error = ||out - ref|| / ||ref||.
"""
import math

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
                                reason='needs a Hopper GPU')

from deep_gemm.gemm import (m_grouped_fp8_nvfp4_gemm_nt_contiguous, m_grouped_fp8_nvfp4_gemm_nt_masked)  # noqa: E402
from deep_gemm.utils import relative_error  # noqa: E402
from deep_gemm.weights import (transform_mxfp4_weights_for_grouped_gemm,  # noqa: E402
                                    transform_nvfp4_weights_for_grouped_gemm, transform_nvfp4_weights_for_mega_moe)

TOL = 5e-3


def rand_nvfp4(e, n, k, gen, scale_lo=0x28, scale_hi=0x48):
    codes = torch.randint(0, 256, (e, n, k // 2), dtype=torch.uint8, generator=gen)
    scale = torch.randint(scale_lo, scale_hi, (e, n, k // 16), dtype=torch.uint8, generator=gen)
    g2 = (torch.rand(e, generator=gen) * 2 + 0.5) * 1e-2
    return codes, scale.view(torch.float8_e4m3fn), g2


def quant_tokens(x, gran=32):
    """FP8 E4M3 with power-of-two per-block scales (exact in BF16)."""
    rows, k = x.shape
    blocks = x.float().reshape(rows, k // gran, gran)
    amax = blocks.abs().amax(-1).clamp_min(1e-30)
    sf = torch.exp2(torch.ceil(torch.log2(amax / 448)))
    q = (blocks / sf[..., None]).clamp(-448, 448).to(torch.float8_e4m3fn).reshape(rows, k)
    return q, sf


def dequant_tokens(q, sf):
    rows, k = q.shape
    return (q.double().reshape(rows, sf.shape[1], -1) * sf.double()[..., None]).reshape(rows, k)


def rand_tokens(rows, k, gen):
    # non-uniform: per-row magnitudes spanning 2^-4..2^4 and a few outliers
    x = torch.randn(rows, k, generator=gen) * torch.exp2(torch.randint(-4, 5, (rows, 1), generator=gen).float())
    x[:, :: 97] *= 8
    return x


def ref_plain(tok64, w, alpha):
    return tok64 @ w.double().T * alpha


def ref_swiglu(tok64, w, alpha_gu, clamp, rw):
    inter = w.shape[0] // 2
    h = tok64 @ w.double().T
    gate, up = h[:, :inter] * alpha_gu[0], h[:, inter:] * alpha_gu[1]
    if clamp is not None:
        up, gate = up.clamp(-clamp, clamp), gate.clamp(max=clamp)
    out = gate * torch.sigmoid(gate) * up
    return out * rw[:, None] if rw is not None else out


@pytest.mark.parametrize('fmt', ['nvfp4', 'mxfp4'])
@pytest.mark.parametrize('expected_m', [4, 16, 48])
def test_masked_plain(fmt, expected_m):
    gen = torch.Generator().manual_seed(1000 + expected_m)
    e, n, k, max_m = 4, 256, 512, 64
    codes, scale, g2 = rand_nvfp4(e, n, k, gen)
    if fmt == 'nvfp4':
        b = transform_nvfp4_weights_for_grouped_gemm(codes.cuda(), scale.cuda(), g2.cuda())
    else:
        sc = torch.randint(118, 130, (e, n, k // 32), dtype=torch.uint8, generator=gen)
        b = transform_mxfp4_weights_for_grouped_gemm(codes.cuda(), sc.cuda())
    check_masked_plain(b, [expected_m, 0, max(1, expected_m // 3), min(max_m, expected_m + 5)], max_m,
                       expected_m, gen)


def check_masked_plain(b, counts, max_m, expected_m, gen):
    """Masked plain GEMM on poisoned output: valid rows against float64, rows past the counts untouched."""
    e, n, k = b.num_experts, b.n, b.k
    w = b.dequantize()
    q, sf = quant_tokens(rand_tokens(e * max_m, k, gen))
    d = torch.full((e, max_m, n), float('nan'), dtype=torch.bfloat16, device='cuda')
    m_grouped_fp8_nvfp4_gemm_nt_masked((q.view(e, max_m, k).cuda(), sf.view(e, max_m, -1).cuda()), b, d,
                                       torch.tensor(counts, dtype=torch.int32, device='cuda'), expected_m)
    tok = dequant_tokens(q, sf).view(e, max_m, k)
    for i, c in enumerate(counts):
        if c:
            assert relative_error(d[i, :c].cpu(), ref_plain(tok[i, :c], w[i], b.alpha[i, 0].item())) < TOL
        assert torch.isnan(d[i, c:].float()).all(), 'rows past masked_m were written'


@pytest.mark.parametrize('block_t,ctas', [(8, 1), (8, 2), (16, 1), (16, 2), (32, 1), (32, 2), (64, 1), (64, 2), (128, 1),
                                           (256, 1)])
def test_every_tile_config(block_t, ctas, monkeypatch):
    """Each token-tile width and CTAs-per-SM mode, with several token tiles and k blocks per expert."""
    monkeypatch.setenv('DG_GROUPED_GEMM_BLOCK_T', str(block_t))
    monkeypatch.setenv('DG_GROUPED_GEMM_CTAS_PER_SM', str(ctas))
    gen = torch.Generator().manual_seed(block_t * 10 + ctas)
    e, n, k, max_m = 3, 256, 640, 2 * block_t + 8
    codes, scale, g2 = rand_nvfp4(e, n, k, gen)
    b = transform_nvfp4_weights_for_grouped_gemm(codes.cuda(), scale.cuda(), g2.cuda())
    check_masked_plain(b, [max_m, 0, block_t + 3], max_m, block_t, gen)


@pytest.mark.parametrize('block_t', [32, 64, 128, 256])
def test_partial_token_tiles(block_t, monkeypatch):
    """Tiles of 32+ tokens run the MMA over only the tokens rounded up to max(8, an eighth of the tile)
    (FP4Consumer::mma_tile): one expert per width, each with a full tile before its partial one."""
    monkeypatch.setenv('DG_GROUPED_GEMM_BLOCK_T', str(block_t))
    gen = torch.Generator().manual_seed(block_t + 7)
    gran = max(8, block_t // 8)
    counts = [block_t + j * gran - (j % 3) for j in range(1, block_t // gran + 1)]   # last tile: j parts, 0-2 rows short
    e, n, k, max_m = len(counts), 256, 384, 2 * block_t
    codes, scale, g2 = rand_nvfp4(e, n, k, gen)
    b = transform_nvfp4_weights_for_grouped_gemm(codes.cuda(), scale.cuda(), g2.cuda())
    check_masked_plain(b, counts, max_m, block_t, gen)


@pytest.mark.parametrize('counts', [[300, 0, 77, 1], [1024, 513, 0, 256]])
def test_contiguous_plain(counts, monkeypatch):
    """Also with an expert's token tiles in groups of one and three (scheduler/tile_order.cuh; at
    these K one group holds every tile unless forced): the same bits."""
    gen = torch.Generator().manual_seed(sum(counts))
    e, n, k = len(counts), 384, 256
    codes, scale, g2 = rand_nvfp4(e, n, k, gen)
    b = transform_nvfp4_weights_for_grouped_gemm(codes.cuda(), scale.cuda(), g2.cuda())
    w = b.dequantize()
    offsets = torch.tensor([0] + list(torch.tensor(counts).cumsum(0)), dtype=torch.int32)
    rows = int(offsets[-1])
    x = rand_tokens(rows, k, gen)
    q, sf = quant_tokens(x, 128)
    d = torch.full((rows, n), float('nan'), dtype=torch.bfloat16, device='cuda')
    m_grouped_fp8_nvfp4_gemm_nt_contiguous((q.cuda(), sf.cuda()), b, d, offsets.cuda())
    tok = dequant_tokens(q, sf)
    ref = torch.cat([ref_plain(tok[offsets[i]:offsets[i + 1]], w[i], b.alpha[i, 0].item()) for i in range(e)])
    assert relative_error(d.cpu(), ref) < TOL
    for group in (1, 3):
        monkeypatch.setenv('DG_GROUPED_GEMM_TOKEN_GROUP', str(group))
        d2 = torch.full_like(d, float('nan'))
        m_grouped_fp8_nvfp4_gemm_nt_contiguous((q.cuda(), sf.cuda()), b, d2, offsets.cuda())
        assert torch.equal(d2.view(torch.int16), d.view(torch.int16)), f'token group {group}'


@pytest.mark.parametrize('clamp', [None, 7.0])
@pytest.mark.parametrize('layout', ['masked', 'contiguous'])
def test_swiglu_epilogue(clamp, layout):
    gen = torch.Generator().manual_seed(7)
    e, inter, hidden, max_m = 3, 256, 512, 32
    codes, scale, _ = rand_nvfp4(e, 2 * inter, hidden, gen)
    g1 = (torch.rand(e, 2, generator=gen) + 0.5) * 1e-2  # gate and up global scales differ
    l1, _ = transform_nvfp4_weights_for_mega_moe((codes.cuda(), scale.cuda(), g1.cuda()),
                                                 (codes[:, :hidden, :inter // 2].contiguous().cuda(),
                                                  scale[:, :hidden, :inter // 16].contiguous().cuda(), g1[:, 0].contiguous().cuda()))
    w = l1.dequantize()
    counts = [max_m, 9, 0]
    x = rand_tokens(e * max_m, hidden, gen)
    q, sf = quant_tokens(x)
    rw = torch.rand(e * max_m, generator=gen)
    tok = dequant_tokens(q, sf)
    if layout == 'masked':
        d = torch.full((e, max_m, inter), float('nan'), dtype=torch.bfloat16, device='cuda')
        m_grouped_fp8_nvfp4_gemm_nt_masked((q.view(e, max_m, -1).cuda(), sf.view(e, max_m, -1).cuda()), l1, d,
                                           torch.tensor(counts, dtype=torch.int32, device='cuda'), 16,
                                           epilogue='swiglu', route_weights=rw.view(e, max_m).cuda(), activation_clamp=clamp)
        for i, c in enumerate(counts):
            rows = slice(i * max_m, i * max_m + c)
            if c:
                ref = ref_swiglu(tok[rows], w[i], l1.alpha[i].double().cpu(), clamp, rw[rows].double())
                assert relative_error(d[i, :c].cpu(), ref) < TOL
            assert torch.isnan(d[i, c:].float()).all()
    else:
        offsets = torch.tensor([0, 32, 41, 41], dtype=torch.int32)
        rows = 41
        d = torch.full((rows, inter), float('nan'), dtype=torch.bfloat16, device='cuda')
        m_grouped_fp8_nvfp4_gemm_nt_contiguous((q[:rows].cuda(), sf[:rows].cuda()), l1, d, offsets.cuda(),
                                               epilogue='swiglu', route_weights=rw[:rows].cuda(), activation_clamp=clamp)
        ref = torch.cat([ref_swiglu(tok[offsets[i]:offsets[i + 1]], w[i], l1.alpha[i].double().cpu(), clamp,
                                    rw[offsets[i]:offsets[i + 1]].double()) for i in range(e)])
        assert relative_error(d.cpu(), ref) < TOL


def test_edge_data():
    """Zero blocks, UE4M3 subnormal and maximal (448) scales with codes +-6, FP8 activations at +-448."""
    gen = torch.Generator().manual_seed(11)
    e, n, k, max_m = 2, 128, 256, 16
    codes, scale, g2 = rand_nvfp4(e, n, k, gen)
    sb = scale.view(torch.uint8).clone()
    sb[0, :32] = torch.randint(1, 8, (32, k // 16), dtype=torch.uint8, generator=gen)   # subnormal scales
    sb[0, 32:64] = 0x7E                                                                   # 448
    codes[0, 32:64] = 0x77                                                                # +6, +6
    codes[1, :, :8] = 0                                                                   # zero blocks
    codes[1, 64:96] = 0xFF                                                                # -6, -6
    b = transform_nvfp4_weights_for_grouped_gemm(codes.cuda(), sb.view(torch.float8_e4m3fn).cuda(), g2.cuda())
    w = b.dequantize()
    x = rand_tokens(e * max_m, k, gen)
    q, sf = quant_tokens(x)
    qb = q.view(torch.uint8)
    qb[:4, :64] = 0x7E   # +448
    qb[4:8, :64] = 0xFE  # -448
    d = torch.full((e, max_m, n), float('nan'), dtype=torch.bfloat16, device='cuda')
    m_grouped_fp8_nvfp4_gemm_nt_masked((q.view(e, max_m, k).cuda(), sf.view(e, max_m, -1).cuda()), b, d,
                                       torch.tensor([max_m, max_m], dtype=torch.int32, device='cuda'), max_m)
    tok = dequant_tokens(q, sf).view(e, max_m, k)
    for i in range(e):
        ref = ref_plain(tok[i], w[i], b.alpha[i, 0].item())
        assert relative_error(d[i].cpu(), ref) < TOL
    # the subnormal-scale rows alone (a flush-to-zero would zero them)
    ref0 = ref_plain(tok[0], w[0], b.alpha[0, 0].item())[:, :32]
    assert ref0.abs().max() > 0 and relative_error(d[0, :, :32].cpu(), ref0) < TOL


def test_deepseek_shape_and_graph_capture():
    """7168 / 3072 L1 (swiglu) and L2 over a few experts, then the same launches inside a CUDA graph."""
    gen = torch.Generator().manual_seed(5)
    e, hidden, inter, max_m = 2, 7168, 3072, 8
    c1, s1, _ = rand_nvfp4(e, 2 * inter, hidden, gen)
    c2, s2, g2 = rand_nvfp4(e, hidden, inter, gen)
    g1 = (torch.rand(e, 2, generator=gen) + 0.5) * 1e-2
    l1, l2 = transform_nvfp4_weights_for_mega_moe((c1.cuda(), s1.cuda(), g1.cuda()), (c2.cuda(), s2.cuda(), g2.cuda()))
    x = rand_tokens(e * max_m, hidden, gen)
    q, sf = quant_tokens(x)
    counts = torch.tensor([max_m, 3], dtype=torch.int32, device='cuda')
    h = torch.empty(e, max_m, inter, dtype=torch.bfloat16, device='cuda')
    y = torch.full((e, max_m, hidden), float('nan'), dtype=torch.bfloat16, device='cuda')
    a1 = (q.view(e, max_m, hidden).cuda(), sf.view(e, max_m, -1).cuda())

    def run():
        m_grouped_fp8_nvfp4_gemm_nt_masked(a1, l1, h, counts, max_m, epilogue='swiglu')
        hq, hsf = quant_tokens(h.view(-1, inter).float())  # L2 input back to FP8 for the FP8 entry point
        m_grouped_fp8_nvfp4_gemm_nt_masked((hq.view(e, max_m, inter), hsf.view(e, max_m, -1)), l2, y, counts, max_m)

    run()
    torch.cuda.synchronize()
    w1, w2 = l1.dequantize(), l2.dequantize()
    tok = dequant_tokens(q, sf).view(e, max_m, hidden)
    for i, c in enumerate(counts.tolist()):
        h_ref = ref_swiglu(tok[i, :c], w1[i], l1.alpha[i].double().cpu(), None, None)
        assert relative_error(h[i, :c].cpu(), h_ref) < TOL
        hq, hsf = quant_tokens(h[i, :c].float().cpu())
        y_ref = ref_plain(dequant_tokens(hq, hsf), w2[i], l2.alpha[i, 0].item())
        assert relative_error(y[i, :c].cpu(), y_ref) < TOL
    y_eager = y.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    y.fill_(float('nan'))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y[0], y_eager[0]) and torch.equal(y[1, :3], y_eager[1, :3])


def test_bad_inputs_raise_before_launch():
    gen = torch.Generator().manual_seed(3)
    codes, scale, g2 = rand_nvfp4(2, 128, 256, gen)
    b = transform_nvfp4_weights_for_grouped_gemm(codes.cuda(), scale.cuda(), g2.cuda())
    q = torch.zeros(2, 8, 256, dtype=torch.float8_e4m3fn, device='cuda')
    sf = torch.ones(2, 8, 8, device='cuda')
    d = torch.empty(2, 8, 128, dtype=torch.bfloat16, device='cuda')
    m = torch.tensor([8, 8], dtype=torch.int32, device='cuda')
    with pytest.raises(TypeError, match='masked_m'):
        m_grouped_fp8_nvfp4_gemm_nt_masked((q, sf), b, d, m.long(), 8)
    with pytest.raises(ValueError, match='d'):
        m_grouped_fp8_nvfp4_gemm_nt_masked((q, sf), b, d[:, :, :64], m, 8)
    with pytest.raises(ValueError, match='a\\[0\\]'):
        m_grouped_fp8_nvfp4_gemm_nt_masked((q[:, :, :128].contiguous(), sf), b, d, m, 8)
    with pytest.raises(ValueError, match='epilogue|b'):
        m_grouped_fp8_nvfp4_gemm_nt_masked((q, sf), b, d, m, 8, epilogue='swiglu')


@pytest.mark.parametrize('block_t', [32, 128])
@pytest.mark.parametrize('counts', [[70, 0, 33], [5, 129, 1]])
def test_bf16_weights(block_t, counts, monkeypatch):
    """BF16 weights (bf16_mega_moe, shared experts; loaded in fragment order): the plain epilogue equals
    bf16(exact sum) up to FP32 accumulation, the 'swiglu_bf16' L1 its upstream formula; untouched rows
    stay NaN."""
    from deep_gemm.weights import transform_weights_for_mega_moe
    monkeypatch.setenv('DG_GROUPED_GEMM_BLOCK_T', str(block_t))
    gen = torch.Generator().manual_seed(block_t + sum(counts))
    e, n, k = len(counts), 256, 384
    w1 = (torch.randn(e, n, k, generator=gen) * torch.exp(torch.randn(e, n, 1, generator=gen))).bfloat16()
    w2 = torch.randn(e, k, n // 2, generator=gen).bfloat16()
    l1, l2 = transform_weights_for_mega_moe(w1.cuda(), w2.cuda())
    rows = sum(counts)
    offsets = torch.tensor([0] + list(torch.tensor(counts).cumsum(0)), dtype=torch.int32, device='cuda')
    x = rand_tokens(rows, k, gen).bfloat16().cuda()
    rw = torch.rand(rows, generator=gen).cuda()
    h = torch.full((rows, n // 2), float('nan'), dtype=torch.bfloat16, device='cuda')
    m_grouped_fp8_nvfp4_gemm_nt_contiguous(x, l1, h, offsets, epilogue='swiglu_bf16', route_weights=rw,
                                           activation_clamp=20.0, expected_m=max(counts))
    o = torch.full((rows, k // 2 * 2), float('nan'), dtype=torch.bfloat16, device='cuda')
    m_grouped_fp8_nvfp4_gemm_nt_contiguous(h, l2, o, offsets, expected_m=max(counts))
    torch.cuda.synchronize()
    ref_h = torch.empty(rows, n // 2, dtype=torch.float64)
    ref_o = torch.empty(rows, k, dtype=torch.float64)
    lo = 0
    for i, c in enumerate(counts):
        acc = x[lo:lo + c].double().cpu() @ w1[i].double().T
        g = acc[:, :n // 2].bfloat16().double().clamp(max=20.0)
        u = acc[:, n // 2:].bfloat16().double().clamp(-20.0, 20.0)
        ref_h[lo:lo + c] = (g / (1 + torch.exp(-g)) * u * rw[lo:lo + c].double().cpu()[:, None]).bfloat16().double()
        ref_o[lo:lo + c] = (h[lo:lo + c].double().cpu() @ w2[i].double().T)
        lo += c
    assert not torch.isnan(h).any() and not torch.isnan(o).any()
    assert relative_error(h.cpu(), ref_h) < TOL
    assert relative_error(o.cpu(), ref_o) < TOL
