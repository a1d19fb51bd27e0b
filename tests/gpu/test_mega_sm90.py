"""The sm90 Mega MoE backend (one GPU) against the reference backend on the same quantized inputs.

Every run: fresh random non-uniform data (conftest's problem: per-token and per-row magnitudes,
gate/up global scales that differ, masked slots), ``y`` poisoned with NaN first, NaN never passes,
error = ||y - ref|| / ||ref|| where the reference computes in float64 from the same FP8 / NVFP4
values (its only roundings are the design's BF16 points).
"""
import pytest
import torch

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
                                reason='needs a Hopper GPU'),
              pytest.mark.usefixtures('mega_path')]   # fused kernel and kernel sequence (gpu/conftest.py)

import deep_gemm  # noqa: E402
from deep_gemm.utils import relative_error  # noqa: E402

TOL = 1e-2


def setup(p, num_max_tokens=None):
    dev = torch.device('cuda')
    l1, l2 = deep_gemm.transform_nvfp4_weights_for_mega_moe({k: v.to(dev) for k, v in p.l1.items()},
                                                           {k: v.to(dev) for k, v in p.l2.items()})
    buf = deep_gemm.get_symm_buffer_for_mega_moe(None, p.experts, num_max_tokens or p.t, p.topk, p.hidden, p.inter,
                                                 device=dev, mma_type='fp8xnvfp4')
    t = p.t
    buf.x[:t].copy_(p.x)
    buf.x_sf[:t].copy_(p.x_sf)
    buf.topk_idx[:t].copy_(p.topk_idx)
    buf.topk_weights[:t].copy_(p.topk_weights)
    return l1, l2, buf


def run(fn, l1, l2, buf, t, backend, clamp=None):
    y = torch.full((t, buf.hidden), float('nan'), dtype=torch.bfloat16, device='cuda')
    stats = torch.zeros(buf.num_experts_per_rank, dtype=torch.int32, device='cuda')
    fn(y, l1, l2, buf, cumulative_local_expert_recv_stats=stats, activation_clamp=clamp, backend=backend)
    torch.cuda.synchronize()
    return y, stats


@pytest.mark.parametrize('shape', [dict(t=37, hidden=256, inter=128, experts=8, topk=3),
                                   dict(t=100, hidden=512, inter=256, experts=16, topk=6, use_ue8m0=True),
                                   dict(t=24, hidden=7168, inter=3072, experts=8, topk=6, use_ue8m0=True)])
@pytest.mark.parametrize('clamp', [None, 3.0])
def test_matches_reference(make_problem, shape, clamp):
    p = make_problem(seed=len(shape) + shape['t'], mask_frac=0.25, **shape)
    p.topk_idx[p.topk_idx == 1] = -1            # an expert that receives no tokens
    l1, l2, buf = setup(p, num_max_tokens=p.t + 5)
    fn = deep_gemm.fp8_nvfp4_mega_moe
    y, stats = run(fn, l1, l2, buf, p.t, 'sm90', clamp)
    y_ref, stats_ref = run(fn, l1, l2, buf, p.t, 'reference', clamp)
    assert relative_error(y, y_ref) < TOL
    assert torch.equal(stats, stats_ref) and stats[1].item() == 0
    y2, _ = run(fn, l1, l2, buf, p.t, 'sm90', clamp)
    assert torch.equal(y.view(torch.int16), y2.view(torch.int16)), 'not bitwise stable run to run'


def test_upstream_fp8_buffer(make_problem):
    """fp8_nvfp4_mega_moe on upstream's default buffer kind ('fp8xfp4': packed UE8M0 x_sf, unpacked into the
    kernels' float32 region before the launch) gives the same bits as on our 'fp8xnvfp4' buffer."""
    p = make_problem(seed=3, t=29, hidden=256, inter=128, experts=8, topk=4, use_ue8m0=True)
    l1, l2, ours = setup(p)
    up = deep_gemm.get_symm_buffer_for_mega_moe(None, p.experts, p.t, p.topk, p.hidden, p.inter, device='cuda')
    assert up.mma_type == 'fp8xfp4' and up.x_sf.dtype == torch.int32
    up.copy_inputs(p.x.cuda(), p.x_sf.cuda(), p.topk_idx.cuda(), p.topk_weights.cuda())
    fn = deep_gemm.fp8_nvfp4_mega_moe
    y, stats = run(fn, l1, l2, up, p.t, 'sm90')
    y_ours, stats_ours = run(fn, l1, l2, ours, p.t, 'sm90')
    y_ref, _ = run(fn, l1, l2, up, p.t, 'reference')
    assert torch.equal(y.view(torch.int16), y_ours.view(torch.int16)) and torch.equal(stats, stats_ours)
    assert relative_error(y, y_ref) < TOL


def _upstream_cases():
    """(mma_type, label, extra keys of test_upstream_api._problem's dict) of upstream's call sequences."""
    return [('fp8xfp4', 'fp8-shared', {}), ('fp8xfp4', 'bf16-shared', {'bf16_shared': True}),
            ('bf16xbf16', 'bf16', {}), ('fp4xfp4', 'nvfp4', {})]


def _on_sequence(monkeypatch, fn):
    """``fn()`` with DG_MEGA_MOE_FUSED=0 (the kernel sequence), then back to the fused kernel: in the
    ``[fused]`` ids, upstream's recipes on the fused kernel must equal the sequence bit for bit (the same
    epilogue and combine code; sm90.run_upstream)."""
    monkeypatch.setenv('DG_MEGA_MOE_FUSED', '0')
    try:
        return fn()
    finally:
        monkeypatch.setenv('DG_MEGA_MOE_FUSED', '1')


def _bits_equal(a, b):
    return torch.equal(a.view(torch.int16), b.view(torch.int16))


@pytest.mark.parametrize('case', _upstream_cases(), ids=lambda c: c[1])
def test_upstream_entry_points_on_the_device(case, mega_path, monkeypatch):
    """Upstream's call sequences (tests/test_upstream_api.py: masked slots, a token with every slot
    masked, shared experts, clamp 10, fp4xfp4 with alphas, a2 scales and routed scaling 0.75) on the GPU.
    MXFP4 / BF16 / NVFP4 routed weights with BF16 shared experts run sm90's kernel sequence
    (run_upstream): 'auto' takes it without a warning, equal to 'sm90' bit for bit, stable run to run,
    against the reference of upstream's numerics computed on the CPU.  FP8 shared-expert weights have
    no sm90 kernel: 'auto' runs the reference on the GPU (a warning), 'sm90' by name says so.  [fused]:
    the fused kernel's variant of each recipe, also equal to the sequence bit for bit."""
    import os
    import sys
    import warnings
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
    from test_upstream_api import _problem, _run_layer
    from deep_gemm.mega import api
    mt, label, extra = case
    d = dict(_problem(mt, [41]), **extra)
    y_cpu, recv_cpu = _run_layer(d, None, 0, 1)
    dev = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in d.items()}
    if label == 'fp8-shared':
        api._warned_no_kernel.clear()     # the warning is said once per entry point and backend
        with pytest.warns(UserWarning, match='no sm90 kernel yet'):
            y_gpu, recv_gpu = _run_layer(dev, None, 0, 1)
        with pytest.raises(NotImplementedError, match='no sm90 kernel'):
            _run_layer(dev, None, 0, 1, backend='sm90')
        assert torch.equal(recv_gpu.cpu(), recv_cpu)
        assert relative_error(y_gpu.cpu(), y_cpu) < 1e-5
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        y_auto, recv_auto = _run_layer(dev, None, 0, 1)
    assert not [w for w in caught if 'reference' in str(w.message)], [str(w.message) for w in caught]
    y, recv = _run_layer(dev, None, 0, 1, backend='sm90')
    y2, _ = _run_layer(dev, None, 0, 1, backend='sm90')
    assert torch.equal(y.view(torch.int16), y2.view(torch.int16)), 'not bitwise stable run to run'
    assert torch.equal(y.view(torch.int16), y_auto.view(torch.int16)), "backend='auto' did not run the sm90 kernels"
    assert torch.equal(recv.cpu(), recv_cpu) and torch.equal(recv_auto.cpu(), recv_cpu)
    assert not torch.isnan(y).any()
    err = relative_error(y.cpu(), y_cpu)
    assert err < TOL, (label, err)
    if mega_path == 'fused':
        y_seq, recv_seq = _on_sequence(monkeypatch, lambda: _run_layer(dev, None, 0, 1, backend='sm90'))
        assert _bits_equal(y, y_seq), 'fused != sequence'
        assert torch.equal(recv_seq.cpu(), recv_cpu)


def test_fewer_tokens_than_buffer_and_zero_tokens(make_problem):
    p = make_problem(seed=9, t=12, hidden=256, inter=128, experts=8, topk=2)
    l1, l2, buf = setup(p, num_max_tokens=64)
    buf.topk_idx[p.t:] = 3        # stale routing past T must be ignored
    y, stats = run(deep_gemm.fp8_nvfp4_mega_moe, l1, l2, buf, p.t, 'sm90')
    y_ref, stats_ref = run(deep_gemm.fp8_nvfp4_mega_moe, l1, l2, buf, p.t, 'reference')
    assert relative_error(y, y_ref) < TOL and torch.equal(stats, stats_ref)
    y0, stats0 = run(deep_gemm.fp8_nvfp4_mega_moe, l1, l2, buf, 0, 'sm90')
    assert y0.shape == (0, p.hidden) and stats0.sum().item() == 0


def test_cuda_graph_replay(make_problem):
    p = make_problem(seed=21, t=40, hidden=512, inter=256, experts=8, topk=4, use_ue8m0=True)
    l1, l2, buf = setup(p)
    y = torch.empty(p.t, p.hidden, dtype=torch.bfloat16, device='cuda')
    stats = torch.zeros(8, dtype=torch.int32, device='cuda')
    deep_gemm.fp8_nvfp4_mega_moe(y, l1, l2, buf, cumulative_local_expert_recv_stats=stats, backend='sm90')
    torch.cuda.synchronize()
    eager, eager_stats = y.clone(), stats.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        deep_gemm.fp8_nvfp4_mega_moe(y, l1, l2, buf, cumulative_local_expert_recv_stats=stats, backend='sm90')
    y.fill_(float('nan'))
    stats.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y.view(torch.int16), eager.view(torch.int16))
    assert torch.equal(stats, eager_stats)
    # new routing, same graph: the counts live on the device
    perm = torch.randperm(p.t)
    buf.topk_idx[:p.t].copy_(p.topk_idx[perm])
    buf.topk_weights[:p.t].copy_(p.topk_weights[perm])
    buf.x[:p.t].copy_(p.x[perm])
    buf.x_sf[:p.t].copy_(p.x_sf[perm])
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y.view(torch.int16), eager[perm].view(torch.int16))


# ------------------------------------------------ upstream's fp8_fp4_mega_moe on the sm90 kernel sequence
def _bf16_layer(g, counts, hidden, inter, experts, topk, masked, softmax, mask_first_token):
    """BF16 tokens with per-token magnitudes, top-k routing (softmax weights if ``softmax``) with masked
    slots, expert 1 without tokens (and token 0 with every slot masked if ``mask_first_token``), BF16
    weights with per-row magnitudes; all drawn from the CUDA generator ``g`` in this order."""
    n = sum(counts)
    x = (torch.randn(n, hidden, generator=g, device='cuda') *
         torch.exp(torch.randn(n, 1, generator=g, device='cuda'))).bfloat16()
    w, idx = torch.topk(torch.randn(n, experts, generator=g, device='cuda'), topk, dim=-1, sorted=False)
    if softmax:
        w = w.softmax(-1)
    idx[torch.rand(n, topk, generator=g, device='cuda') < masked] = -1
    idx[idx == 1] = -1
    if mask_first_token and n:
        idx[0] = -1
    w[idx < 0] = 0
    w1 = (0.1 * torch.randn(experts, 2 * inter, hidden, generator=g, device='cuda') *
          torch.exp(torch.randn(experts, 2 * inter, 1, generator=g, device='cuda'))).bfloat16()
    w2 = (0.1 * torch.randn(experts, hidden, inter, generator=g, device='cuda')).bfloat16()
    return x, idx.to(torch.int64), w.float(), w1, w2


def _upstream_fp8_problem(seed, counts, hidden, inter, experts, topk, masked=0.2):
    """Upstream-style inputs on the GPU (its test's casts, no shared experts): BF16 tokens with per-token
    magnitudes, routing with masked slots, a token with every slot masked, expert 1 without tokens, BF16
    weights with per-row magnitudes cast to MXFP4 (tests/test_upstream_api.py's _fp4_weights), tokens cast
    by per_token_cast_to_fp8(use_ue8m0=True, gran_k=32, use_packed_ue8m0=True)."""
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
    from test_upstream_api import _fp4_weights
    from deep_gemm.utils import per_token_cast_to_fp8
    g = torch.Generator(device='cuda').manual_seed(seed)
    x, idx, w, w1, w2 = _bf16_layer(g, counts, hidden, inter, experts, topk, masked, softmax=False, mask_first_token=True)
    x_q, x_sf = per_token_cast_to_fp8(x, use_ue8m0=True, gran_k=32, use_packed_ue8m0=True)
    return dict(counts=list(counts), x=x_q, x_sf=x_sf, topk_idx=idx, topk_weights=w,
                w1=_fp4_weights(w1), w2=_fp4_weights(w2), experts=experts, topk=topk, hidden=hidden, inter=inter)


def _upstream_fp8_buffer(d, rows):
    buf = deep_gemm.get_symm_buffer_for_mega_moe(None, d['experts'], max(len(rows), 1), d['topk'], d['hidden'],
                                                 d['inter'], device='cuda', mma_type='fp8xfp4')
    n = len(rows)
    buf.x[:n].copy_(d['x'][rows])
    buf.x_sf[:n].copy_(d['x_sf'][rows])
    buf.topk_idx[:n].copy_(d['topk_idx'][rows])
    buf.topk_weights[:n].copy_(d['topk_weights'][rows])
    return buf


def _upstream_fp8_run(entry, l1, l2, buf, n, backend, clamp):
    y = torch.full((n, buf.hidden), float('nan'), dtype=torch.bfloat16, device='cuda')
    stats = torch.zeros(buf.num_experts_per_rank, dtype=torch.int32, device='cuda')
    entry(y, l1, l2, buf, cumulative_local_expert_recv_stats=stats, activation_clamp=clamp, backend=backend)
    torch.cuda.synchronize()
    return y, stats


def _check_l2_input_is_fp8_pow2(buf):
    """Every 32-channel block of every used L2-input row is E4M3 x one power of two: with
    s = ceil_pow2(amax / 448) (at least the 2^-22 floor's grid), every h / s is an E4M3 value."""
    from deep_gemm.utils.quant import round_to_e4m3
    offs = buf.region('expert_offsets').tolist()
    h = buf.region('l2_x')[offs[0]:offs[-1]].double()
    assert h.shape[0] > 0 and torch.isfinite(h).all()
    blocks = h.reshape(h.shape[0], -1, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    # ceil_pow2(amax / 448) by frexp, exactly (CUDA's float64 log2 of an exact power of two can land just
    # above it and ceil then doubles the scale: amax = 1.75 x 2^k, i.e. amax / 448 a power of two, did);
    # never below 2^-22 (upstream's amax floor of 1e-4): a block of tiny values sits on that grid
    mant, ex = torch.frexp(torch.clamp(amax, min=2.0 ** -40) / 448)       # = mant x 2^ex, mant in [0.5, 1)
    s = torch.ldexp(torch.ones_like(mant), torch.where(mant == 0.5, ex - 1, ex)).clamp(min=2.0 ** -22)
    v = blocks / s
    bad = (round_to_e4m3(v) != v).any(-1)
    assert not bool(bad.any()), (f'{int(bad.sum())} of {bad.numel()} 32-channel blocks of the L1 output are not '
                                 f'FP8 E4M3 x a power of two')


@pytest.mark.parametrize('shape', [dict(counts=[37], hidden=256, inter=128, experts=8, topk=3),
                                   dict(counts=[100], hidden=512, inter=256, experts=16, topk=6),
                                   dict(counts=[16], hidden=7168, inter=2048, experts=8, topk=8)],   # DeepSeek V3
                         ids=['small', 'mid', 'deepseek'])
@pytest.mark.parametrize('clamp', [None, 10.0])
def test_upstream_fp8_fp4_matches_reference(shape, clamp, mega_path, monkeypatch):
    """fp8_fp4_mega_moe (mma_type 'fp8xfp4', MXFP4, no shared experts) on sm90 runs run_upstream_fp8 (the
    kernel sequence with the FP8 L2 input) and matches the reference of upstream's numerics; 'auto' picks
    it without a warning; it is measurably closer to upstream's numerics than to our BF16 intermediate.
    [fused]: the fused kernel's fp8xfp4 variant, also equal to the sequence bit for bit."""
    import warnings
    if shape['hidden'] == 7168 and clamp is None:
        pytest.skip('one DeepSeek-shape case (clamp 10) is enough')
    d = _upstream_fp8_problem(seed=shape['counts'][0] + shape['hidden'], **shape)
    n = sum(d['counts'])
    l1, l2 = deep_gemm.transform_weights_for_mega_moe(d['w1'], d['w2'])
    assert l1.fmt == 'mxfp4'
    buf = _upstream_fp8_buffer(d, torch.arange(n, device='cuda'))
    fn = deep_gemm.fp8_fp4_mega_moe
    y, stats = _upstream_fp8_run(fn, l1, l2, buf, n, 'sm90', clamp)
    _check_l2_input_is_fp8_pow2(buf)
    y_ref, stats_ref = _upstream_fp8_run(fn, l1, l2, buf, n, 'reference', clamp)
    err = relative_error(y, y_ref)
    assert err < TOL, err
    assert torch.equal(stats, stats_ref) and stats[1].item() == 0
    assert torch.equal(y[0], torch.zeros_like(y[0]))           # every slot masked
    y2, _ = _upstream_fp8_run(fn, l1, l2, buf, n, 'sm90', clamp)
    assert torch.equal(y.view(torch.int16), y2.view(torch.int16)), 'not bitwise stable run to run'
    if mega_path == 'fused':
        y_seq, stats_seq = _on_sequence(monkeypatch, lambda: _upstream_fp8_run(fn, l1, l2, buf, n, 'sm90', clamp))
        assert _bits_equal(y, y_seq) and torch.equal(stats, stats_seq), 'fused != sequence'
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        y3, _ = _upstream_fp8_run(fn, l1, l2, buf, n, 'auto', clamp)
    assert not [w for w in caught if 'reference' in str(w.message)], [str(w.message) for w in caught]
    assert torch.equal(y.view(torch.int16), y3.view(torch.int16)), "backend='auto' did not run the sm90 kernels"
    # our fp8_nvfp4_mega_moe keeps a BF16 L2 input: the FP8 requantization must show
    y_bf16, _ = _upstream_fp8_run(deep_gemm.fp8_nvfp4_mega_moe, l1, l2, buf, n, 'reference', clamp)
    assert err < 0.3 * relative_error(y, y_bf16), (err, relative_error(y, y_bf16))


def _two_ranks_emulated(d, mma_type, fill, launch, **prepare_kw):
    """Two ranks emulated on one GPU (tests/gpu/test_mega_ep.py's set-up): each rank's tokens filled by
    ``fill(buffer, lo, n)``, its experts' weights transformed, its kernels prepared (``prepare_kw``), then
    ``launch(rank, y, l1, l2, buffer, stats)`` per rank on its own stream.  Returns (y of all tokens, the
    ranks' stats concatenated)."""
    import os
    import sys
    sys.path.insert(0, os.path.dirname(__file__))
    from test_mega_ep import launch_window
    from deep_gemm.mega import sm90
    from deep_gemm.mega.buffer import SymmBuffer
    counts, world = d['counts'], 2
    e_l = d['experts'] // world
    bufs = SymmBuffer.emulated_group(world, d['experts'], max(counts), d['topk'], d['hidden'], d['inter'],
                                     device='cuda', timeout_s=30.0, mma_type=mma_type)
    ls, ys, stats, lo = [], [], [], 0
    for r, b in enumerate(bufs):
        n = counts[r]
        fill(b, lo, n)
        es = slice(r * e_l, (r + 1) * e_l)
        ls.append(deep_gemm.transform_weights_for_mega_moe((d['w1'][0][es], d['w1'][1][es]),
                                                          (d['w2'][0][es], d['w2'][1][es])))
        ys.append(torch.full((n, d['hidden']), float('nan'), dtype=torch.bfloat16, device='cuda'))
        stats.append(torch.zeros(e_l, dtype=torch.int32, device='cuda'))
        sm90.prepare(b, *ls[r], n, **prepare_kw)
        lo += n
    torch.cuda.synchronize()
    streams = [torch.cuda.Stream() for _ in range(world)]
    with launch_window():
        for r in range(world):
            with torch.cuda.stream(streams[r]):
                launch(r, ys[r], *ls[r], bufs[r], stats[r])
    for b in bufs:
        assert b.comm_error() is None, b.comm_error()
    return torch.cat(ys), torch.cat(stats)


def test_upstream_fp8_fp4_two_ranks_emulated(mega_path, monkeypatch):
    """run_upstream_fp8 per rank, two ranks emulated, against the one-process reference on the
    concatenated tokens (equal to the 2-rank one).  [fused]: also equal to the sequence bit for bit."""
    from deep_gemm.mega import api, sm90
    counts = [9, 4]
    d = _upstream_fp8_problem(seed=5, counts=counts, hidden=256, inter=128, experts=8, topk=3)

    def fill(b, lo, n):
        b.x[:n].copy_(d['x'][lo:lo + n])
        b.x_sf[:n].copy_(d['x_sf'][lo:lo + n])
        b.topk_idx[:n].copy_(d['topk_idx'][lo:lo + n])
        b.topk_weights[:n].copy_(d['topk_weights'][lo:lo + n])
        api._stage_packed_scales(b, n)             # what fp8_fp4_mega_moe does; allocates, so before the launches

    def two_ranks():
        return _two_ranks_emulated(d, 'fp8xfp4', fill, lambda r, y, l1, l2, b, st: sm90.run_upstream_fp8(
            y, l1, l2, b, st, 10.0, True), l1_epilogue='swiglu_fp8')

    y, stats = two_ranks()
    if mega_path == 'fused':
        y_seq, stats_seq = _on_sequence(monkeypatch, two_ranks)
        assert _bits_equal(y, y_seq) and torch.equal(stats, stats_seq), 'fused != sequence'
    l1, l2 = deep_gemm.transform_weights_for_mega_moe(d['w1'], d['w2'])
    one = _upstream_fp8_buffer(d, torch.arange(sum(counts), device='cuda'))
    y_ref, stats_ref = _upstream_fp8_run(deep_gemm.fp8_fp4_mega_moe, l1, l2, one, sum(counts), 'reference', 10.0)
    assert relative_error(y, y_ref) < TOL
    assert torch.equal(stats, stats_ref)


# ------------------------------------------- fp4_fp4_mega_moe: a DeepSeek shape, and two emulated ranks
def _nvfp4_problem(seed, counts, hidden, inter, experts, topk, masked=0.2):
    """fp4_fp4_mega_moe inputs on the GPU, upstream's casts (tests/test_upstream_api.py): NVFP4 tokens and
    weights, alphas, a2 scales, softmax routing, masked slots, expert 1 without tokens."""
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
    from test_upstream_api import _nvfp4_weights
    from deep_gemm.utils import per_token_cast_to_nvfp4
    g = torch.Generator(device='cuda').manual_seed(seed)
    x, idx, w, w1, w2 = _bf16_layer(g, counts, hidden, inter, experts, topk, masked, softmax=True, mask_first_token=False)
    x_q, x_sf = per_token_cast_to_nvfp4(x)
    return dict(counts=list(counts), x=x, x_q=x_q.view(torch.uint8), x_sf=x_sf, topk_idx=idx,
                topk_weights=w, w1=_nvfp4_weights(w1), w2=_nvfp4_weights(w2), experts=experts, topk=topk,
                hidden=hidden, inter=inter,
                l1_alphas=0.5 + torch.rand(experts, 2, generator=g, device='cuda'),
                l2_alphas=0.5 + torch.rand(experts, generator=g, device='cuda'),
                a2=0.5 + torch.rand(experts, generator=g, device='cuda'))


def _fill(buf, d, lo, n):
    buf.x[:n].copy_(d['x_q'][lo:lo + n])
    buf.x_sf[:n].copy_(d['x_sf'][lo:lo + n])
    buf.topk_idx[:n].copy_(d['topk_idx'][lo:lo + n])
    buf.topk_weights[:n].copy_(d['topk_weights'][lo:lo + n])


def _nvfp4_run(d, l1, l2, buf, n, backend, es=slice(None), shared=None, rsf=0.75):
    y = torch.full((n, buf.hidden), float('nan'), dtype=torch.bfloat16, device='cuda')
    stats = torch.zeros(buf.num_experts_per_rank, dtype=torch.int32, device='cuda')
    kw = {} if shared is None else dict(shared_l1_weights=shared[0], shared_l2_weights=shared[1], x_bf16=d['x'])
    deep_gemm.fp4_fp4_mega_moe(y, l1, l2, buf, cumulative_local_expert_recv_stats=stats, activation_clamp=10.0,
                               l1_alphas=d['l1_alphas'][es].contiguous(), l2_alphas=d['l2_alphas'][es].contiguous(),
                               a2_scales=d['a2'][es].contiguous(), routed_scaling_factor=rsf, backend=backend, **kw)
    torch.cuda.synchronize()
    return y, stats


def test_fp4_fp4_deepseek_shape(mega_path, monkeypatch):
    """fp4_fp4_mega_moe at hidden 7168 / intermediate 3072 (DeepSeek V4), 8 experts, top-6, a BF16 shared
    expert, routed scaling 2.5, on sm90's kernel sequence against the reference of upstream's numerics;
    then the routed part alone (a buffer without shared experts), so the shared row cannot hide it.
    [fused]: the fused kernel against the sequence, bit for bit, both buffers (the reference at this
    shape takes most of the test's ~100 s: the sequence ids compute it)."""
    rsf = 2.5
    d = _nvfp4_problem(seed=11, counts=[24], hidden=7168, inter=3072, experts=8, topk=6)
    n = 24
    l1, l2 = deep_gemm.transform_weights_for_mega_moe(d['w1'], d['w2'])
    g = torch.Generator(device='cuda').manual_seed(12)
    s1 = (0.05 * torch.randn(2 * 3072, 7168, generator=g, device='cuda')).bfloat16()
    s2 = (0.05 * torch.randn(7168, 3072, generator=g, device='cuda')).bfloat16()
    shared = deep_gemm.transform_weights_for_mega_moe(s1, s2)
    buf = deep_gemm.get_symm_buffer_for_mega_moe(None, 8, n, 6, 7168, 3072, num_shared_experts=1, device='cuda',
                                                 mma_type='fp4xfp4')
    _fill(buf, d, 0, n)
    y, stats = _nvfp4_run(d, l1, l2, buf, n, 'sm90', shared=shared, rsf=rsf)
    if mega_path == 'fused':
        routed = deep_gemm.get_symm_buffer_for_mega_moe(None, 8, n, 6, 7168, 3072, device='cuda', mma_type='fp4xfp4')
        _fill(routed, d, 0, n)
        y_r, stats_r = _nvfp4_run(d, l1, l2, routed, n, 'sm90', rsf=rsf)
        y_seq, stats_seq = _on_sequence(monkeypatch, lambda: _nvfp4_run(d, l1, l2, buf, n, 'sm90', shared=shared, rsf=rsf))
        y_r_seq, _ = _on_sequence(monkeypatch, lambda: _nvfp4_run(d, l1, l2, routed, n, 'sm90', rsf=rsf))
        assert not torch.isnan(y).any() and not torch.isnan(y_r).any()
        assert _bits_equal(y, y_seq) and torch.equal(stats, stats_seq), 'fused != sequence (shared expert)'
        assert _bits_equal(y_r, y_r_seq) and torch.equal(stats_r, stats_seq), 'fused != sequence (routed only)'
        return
    y_ref, stats_ref = _nvfp4_run(d, l1, l2, buf, n, 'reference', shared=shared, rsf=rsf)
    assert not torch.isnan(y).any()
    err = relative_error(y, y_ref)
    assert err < TOL, err
    assert torch.equal(stats, stats_ref) and stats[1].item() == 0
    routed = deep_gemm.get_symm_buffer_for_mega_moe(None, 8, n, 6, 7168, 3072, device='cuda', mma_type='fp4xfp4')
    _fill(routed, d, 0, n)
    y_r, _ = _nvfp4_run(d, l1, l2, routed, n, 'sm90', rsf=rsf)
    y_r_ref, _ = _nvfp4_run(d, l1, l2, routed, n, 'reference', rsf=rsf)
    assert not torch.isnan(y_r).any() and relative_error(y_r, y_r_ref) < TOL


def test_fp4_fp4_two_ranks_emulated(mega_path, monkeypatch):
    """run_upstream per rank with the fp4xfp4 recipe (NVFP4 tokens pulled from the peer as NVFP4), two
    ranks emulated, against the one-process reference on the concatenated tokens (equal to the 2-rank
    one).  No shared experts here: they are rank-local work (the single-rank tests cover them) and
    allocate, which emulated ranks must not do between launches.  [fused]: the fused kernel (pushing the
    combine rows to the peer), also equal to the sequence bit for bit."""
    from deep_gemm.mega import sm90
    counts = [11, 5]
    d = _nvfp4_problem(seed=5, counts=counts, hidden=512, inter=512, experts=8, topk=3)
    e_l = d['experts'] // 2
    recipes = [sm90.upstream_recipe('fp4xfp4', e_l, 'cuda', d['l1_alphas'][es], d['l2_alphas'][es], d['a2'][es], 0.75)
               for es in (slice(0, e_l), slice(e_l, 2 * e_l))]
    def two_ranks():
        return _two_ranks_emulated(d, 'fp4xfp4', lambda b, lo, n: _fill(b, d, lo, n),
                                   lambda r, y, l1, l2, b, st: sm90.run_upstream(y, l1, l2, b, recipes[r], st, 10.0, True),
                                   l1_epilogue='swiglu_nvfp4', l2_epilogue='weighted')

    y, stats = two_ranks()
    if mega_path == 'fused':
        y_seq, stats_seq = _on_sequence(monkeypatch, two_ranks)
        assert _bits_equal(y, y_seq) and torch.equal(stats, stats_seq), 'fused != sequence'
    l1, l2 = deep_gemm.transform_weights_for_mega_moe(d['w1'], d['w2'])
    one = deep_gemm.get_symm_buffer_for_mega_moe(None, 8, sum(counts), 3, 512, 512, device='cuda', mma_type='fp4xfp4')
    _fill(one, d, 0, sum(counts))
    y_ref, stats_ref = _nvfp4_run(d, l1, l2, one, sum(counts), 'reference')
    assert not torch.isnan(y).any()
    assert relative_error(y, y_ref) < TOL
    assert torch.equal(stats, stats_ref)
