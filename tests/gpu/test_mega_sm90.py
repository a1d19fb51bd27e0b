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


def test_upstream_entry_points_run_on_the_device(make_problem):
    """fp8_fp4 / bf16 / fp4_fp4_mega_moe have no sm90 kernel yet: 'auto' runs their reference on the GPU
    (with a warning), 'sm90' by name says so; the device result equals the CPU one."""
    import sys
    import os
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
    from test_upstream_api import _problem, _run_layer
    from deep_gemm.mega import api
    api._warned_no_kernel.clear()     # the warning is said once per entry point and backend
    for mt in ('fp8xfp4', 'bf16xbf16', 'fp4xfp4'):
        d = _problem(mt, [9])
        y_cpu, recv_cpu = _run_layer(d, None, 0, 1)
        dev = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in d.items()}
        with pytest.warns(UserWarning, match='no sm90 kernel yet'):
            y_gpu, recv_gpu = _run_layer(dev, None, 0, 1)
        with pytest.raises(NotImplementedError, match='no sm90 kernel'):
            _run_layer(dev, None, 0, 1, backend='sm90')
        assert torch.equal(recv_gpu.cpu(), recv_cpu)
        assert relative_error(y_gpu.cpu(), y_cpu) < 1e-5, mt


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
