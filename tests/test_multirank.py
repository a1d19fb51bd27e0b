"""Multi-rank protocol on CPU (gloo, 2 and 4 spawned processes).

* The multi-rank reference (and the public entry point on a CPU group) equals the single-process
  reference bit for bit.
* The benchmark's unfused EP baseline (``scripts/bench_mega_moe.ep_all_to_all``: all_to_all_single
  dispatch of FP8 rows, scales, expert ids and weights, experts at the owner, all_to_all_single back,
  slot-order combine) gives the reference's bits when its experts are the reference's, so the
  figures it is compared with on GPUs come from a correct dispatch/combine.
"""
import os

import pytest
import torch
import torch.distributed as dist

from deep_gemm.reference import reference_mega_moe
from gloo_ranks import init_gloo

TIMEOUT_S = 180


def _worker(rank, world, port, data_path, out_dir):
    init_gloo(rank, world, port)
    try:
        d = torch.load(data_path)
        counts = d['counts']
        lo, hi = sum(counts[:rank]), sum(counts[:rank + 1])
        e_l = d['experts'] // world
        es = slice(rank * e_l, (rank + 1) * e_l)
        tok = {k: d[k][lo:hi] for k in ('x', 'x_sf', 'topk_idx', 'topk_weights')}
        stats = torch.zeros(e_l, dtype=torch.int32)
        y = reference_mega_moe(tok['x'], tok['x_sf'], tok['topk_idx'], tok['topk_weights'], d['w1'][es],
                               d['w1_alpha'][es], d['w2'][es], d['w2_alpha'][es], group=dist.group.WORLD,
                               activation_clamp=d['clamp'], num_experts=d['experts'],
                               cumulative_local_expert_recv_stats=stats)
        res = {'y': y, 'stats': stats}
        # the public entry point on a CPU group (plain-memory buffer, reference backend)
        import deep_gemm
        if hasattr(deep_gemm, 'transform_nvfp4_weights_for_mega_moe'):
            l1 = {k: v[es] for k, v in d['l1'].items()}
            l2 = {k: v[es] for k, v in d['l2'].items()}
            L1, L2 = deep_gemm.transform_nvfp4_weights_for_mega_moe(l1, l2)
            buf = deep_gemm.get_symm_buffer_for_mega_moe(dist.group.WORLD, d['experts'], max(counts) + 3,
                                                         d['topk'], d['hidden'], d['inter'], device='cpu', mma_type='fp8xnvfp4')
            t = hi - lo
            buf.x[:t].copy_(tok['x'])
            buf.x_sf[:t].copy_(tok['x_sf'])
            buf.topk_idx[:t].copy_(tok['topk_idx'])
            buf.topk_weights[:t].copy_(tok['topk_weights'])
            y_api = torch.empty(t, d['hidden'], dtype=torch.bfloat16)
            api_stats = torch.zeros(e_l, dtype=torch.int32)
            deep_gemm.fp8_nvfp4_mega_moe(y_api, L1, L2, buf, cumulative_local_expert_recv_stats=api_stats,
                                         activation_clamp=d['clamp'], backend='auto')
            res.update(y_api=y_api, api_stats=api_stats)
        torch.save(res, os.path.join(out_dir, f'rank{rank}.pt'))
    finally:
        dist.destroy_process_group()


def _baseline_worker(rank, world, port, data_path, out_dir):
    import deep_gemm
    from deep_gemm.reference import reference_moe_forward
    from scripts.bench_mega_moe import ep_all_to_all
    init_gloo(rank, world, port)
    try:
        d = torch.load(data_path)
        counts = d['counts']
        lo, t = sum(counts[:rank]), counts[rank]
        e_l = d['experts'] // world
        es = slice(rank * e_l, (rank + 1) * e_l)
        buf = deep_gemm.get_symm_buffer_for_mega_moe(dist.group.WORLD, d['experts'], max(counts) + 1, d['topk'],
                                                     d['hidden'], d['inter'], device='cpu', mma_type='fp8xnvfp4')
        for name in ('x', 'x_sf', 'topk_idx', 'topk_weights'):
            getattr(buf, name)[:t].copy_(d[name][lo:lo + t])
        received = []

        def experts(rx, rsf, re, rw):
            assert re.numel() == 0 or (0 <= int(re.min()) and int(re.max()) < e_l)
            received.append(re.numel())
            out, _ = reference_moe_forward(rx, rsf, re.unsqueeze(1), rw.unsqueeze(1), d['w1'][es], d['w1_alpha'][es],
                                           d['w2'][es], d['w2_alpha'][es])
            return out[:, 0]

        y = ep_all_to_all(buf, t, d['topk'], e_l, dist.group.WORLD, experts)
        torch.save({'y': y, 'received': received[0]}, os.path.join(out_dir, f'rank{rank}.pt'))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize('world,counts,clamp', [
    (2, [7, 0], None),
    (4, [5, 0, 9, 2], 0.1),
])
def test_multirank_equals_single_process(tmp_path, make_problem, spawn_ranks, world, counts, clamp):
    p = make_problem(seed=100 + world, t=sum(counts), hidden=256, inter=128, experts=8, topk=3, mask_frac=0.25)
    stats = torch.zeros(p.experts, dtype=torch.int32)
    y_full = reference_mega_moe(p.x, p.x_sf, p.topk_idx, p.topk_weights, p.w1, p.w1_alpha, p.w2, p.w2_alpha,
                                activation_clamp=clamp, cumulative_local_expert_recv_stats=stats)
    data = dict(x=p.x, x_sf=p.x_sf, topk_idx=p.topk_idx, topk_weights=p.topk_weights, w1=p.w1, w1_alpha=p.w1_alpha,
                w2=p.w2, w2_alpha=p.w2_alpha, l1=p.l1, l2=p.l2, counts=counts, experts=p.experts, topk=p.topk,
                hidden=p.hidden, inter=p.inter, clamp=clamp)
    data_path = str(tmp_path / 'data.pt')
    torch.save(data, data_path)
    spawn_ranks(_worker, world, (data_path, str(tmp_path)), TIMEOUT_S)
    ys, st = [], []
    for r in range(world):
        res = torch.load(tmp_path / f'rank{r}.pt')
        assert res['y'].shape == (counts[r], p.hidden)
        ys.append(res['y'])
        st.append(res['stats'])
        if 'y_api' in res:
            assert torch.equal(res['y_api'], res['y'])
            assert torch.equal(res['api_stats'], res['stats'])
    import deep_gemm
    if hasattr(deep_gemm, 'transform_nvfp4_weights_for_mega_moe'):
        assert all('y_api' in torch.load(tmp_path / f'rank{r}.pt') for r in range(world))
    y = torch.cat(ys)
    assert torch.equal(y.view(torch.int16), y_full.view(torch.int16))  # bit for bit
    assert torch.equal(torch.cat(st), stats)
    assert y_full.float().abs().sum() > 0


@pytest.mark.parametrize('world,counts', [(2, [6, 0]), (4, [3, 7, 0, 5])])
def test_ep_all_to_all_baseline_matches_reference(tmp_path, make_problem, spawn_ranks, world, counts):
    p = make_problem(seed=200 + world, t=sum(counts), hidden=256, inter=128, experts=8, topk=3, mask_frac=0.25)
    stats = torch.zeros(p.experts, dtype=torch.int32)
    y_full = reference_mega_moe(p.x, p.x_sf, p.topk_idx, p.topk_weights, p.w1, p.w1_alpha, p.w2, p.w2_alpha,
                                cumulative_local_expert_recv_stats=stats)
    data = dict(x=p.x, x_sf=p.x_sf, topk_idx=p.topk_idx, topk_weights=p.topk_weights, w1=p.w1, w1_alpha=p.w1_alpha,
                w2=p.w2, w2_alpha=p.w2_alpha, counts=counts, experts=p.experts, topk=p.topk, hidden=p.hidden,
                inter=p.inter)
    data_path = str(tmp_path / 'data.pt')
    torch.save(data, data_path)
    spawn_ranks(_baseline_worker, world, (data_path, str(tmp_path)), TIMEOUT_S)
    res = [torch.load(tmp_path / f'rank{r}.pt') for r in range(world)]
    y = torch.cat([r['y'] for r in res])
    assert torch.equal(y.view(torch.int16), y_full.view(torch.int16))
    e_l = p.experts // world
    assert [r['received'] for r in res] == [int(stats[r * e_l:(r + 1) * e_l].sum()) for r in range(world)]
    assert y_full.float().abs().sum() > 0
