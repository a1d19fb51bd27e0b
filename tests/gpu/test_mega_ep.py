"""Expert parallelism of the sm90 Mega MoE backend, with the ranks emulated on one GPU.

``SymmBuffer.emulated_group`` gives every rank its own buffer on one device and lets each rank's
kernels reach the others' buffers through plain pointers, as NVLink mappings do across GPUs; each
rank's call runs on its own stream, so the cross-rank barriers really wait for each other.  The
kernels are the multi-GPU ones: only the pointer table differs.  (Several processes cannot share
one GPU through torch symmetric memory, which rejects overlapping devices.)

Checked against the single-process reference on the concatenated tokens (which equals the
multi-rank reference bit for bit, tests/test_multirank.py): fresh random non-uniform data, masked
slots, uneven token counts, a rank with no tokens, an expert with no tokens, y poisoned with NaN,
rel. error <= 1e-2, bitwise-identical repeats, exact receive statistics, CUDA graph replay, a rank
that never arrives, and token tiles in groups bitwise equal to none.  Prefill waves
(``num_max_tokens_per_wave``): bitwise equal to an unwaved buffer, with a rank whose last wave is
empty, on one rank with trailing waves skipped, and in a CUDA graph.
"""
import contextlib
import gc
import time

import pytest
import torch

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
                                reason='needs a Hopper GPU'),
              pytest.mark.usefixtures('mega_path')]   # fused kernel and kernel sequence (gpu/conftest.py)

import deep_gemm  # noqa: E402
from deep_gemm.mega import sm90  # noqa: E402
from deep_gemm.mega.buffer import MegaMoETimeoutError, SymmBuffer  # noqa: E402
from deep_gemm.reference import reference_mega_moe  # noqa: E402
from deep_gemm.utils import relative_error  # noqa: E402

TOL = 1e-2


@contextlib.contextmanager
def launch_window():
    """Between the first rank's launch and the last's nothing may synchronise the device: no garbage
    collection (freeing an earlier test's buffers could), nothing pending on the device before."""
    gc.collect()
    torch.cuda.synchronize()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
    torch.cuda.synchronize()


class Group:
    """One emulated EP group: per-rank buffers, weights, outputs and streams."""

    def __init__(self, p, counts, max_tokens=None, timeout_s=30.0, tokens_per_wave=None):
        self.p, self.counts, self.world = p, counts, len(counts)
        dev = torch.device('cuda')
        e_l = p.experts // self.world
        self.bufs = SymmBuffer.emulated_group(self.world, p.experts, max_tokens or max(max(counts), 1), p.topk,
                                              p.hidden, p.inter, device=dev, timeout_s=timeout_s,
                                              num_max_tokens_per_wave=tokens_per_wave, mma_type='fp8xnvfp4')
        self.l1, self.l2 = [], []
        for r in range(self.world):
            es = slice(r * e_l, (r + 1) * e_l)
            l1, l2 = deep_gemm.transform_nvfp4_weights_for_mega_moe(
                {k: v[es].to(dev) for k, v in p.l1.items()}, {k: v[es].to(dev) for k, v in p.l2.items()})
            self.l1.append(l1)
            self.l2.append(l2)
        self.streams = [torch.cuda.Stream() for _ in range(self.world)]
        self.load(torch.arange(p.t))

    def rows(self, r):
        lo = sum(self.counts[:r])
        return slice(lo, lo + self.counts[r])

    def load(self, perm):
        for r, b in enumerate(self.bufs):
            idx = perm[self.rows(r)]
            n = idx.numel()
            b.x[:n].copy_(self.p.x[idx])
            b.x_sf[:n].copy_(self.p.x_sf[idx])
            b.topk_idx[:n].copy_(self.p.topk_idx[idx])
            b.topk_weights[:n].copy_(self.p.topk_weights[idx])
        torch.cuda.synchronize()

    def run(self, ranks=None, clamp=None):
        ys = [torch.full((c, self.p.hidden), float('nan'), dtype=torch.bfloat16, device='cuda') for c in self.counts]
        stats = [torch.zeros(b.num_experts_per_rank, dtype=torch.int32, device='cuda') for b in self.bufs]
        for r in range(self.world):
            sm90.prepare(self.bufs[r], self.l1[r], self.l2[r], self.counts[r])
        with launch_window():
            for r in (range(self.world) if ranks is None else ranks):
                with torch.cuda.stream(self.streams[r]):
                    deep_gemm.fp8_nvfp4_mega_moe(ys[r], self.l1[r], self.l2[r], self.bufs[r],
                                                 cumulative_local_expert_recv_stats=stats[r], activation_clamp=clamp,
                                                 backend='sm90')
        if ranks is None:
            for b in self.bufs:
                assert b.comm_error() is None, b.comm_error()
        return ys, stats


def reference(p, clamp=None):
    stats = torch.zeros(p.experts, dtype=torch.int32)
    y = reference_mega_moe(p.x, p.x_sf, p.topk_idx, p.topk_weights, p.w1, p.w1_alpha, p.w2, p.w2_alpha,
                           activation_clamp=clamp, cumulative_local_expert_recv_stats=stats)
    return y, stats


@pytest.mark.parametrize('counts,shape,clamp', [
    ([7, 0], dict(hidden=256, inter=128, experts=8, topk=3), None),
    ([5, 0, 9, 2], dict(hidden=512, inter=256, experts=16, topk=6, use_ue8m0=True), 3.0),
    ([3, 11, 1, 6], dict(hidden=256, inter=128, experts=8, topk=6), None),       # 2 experts per rank
    ([19, 6], dict(hidden=7168, inter=3072, experts=8, topk=6, use_ue8m0=True), None),
    # 8 ranks (issue #7's EP 8, emulated): 64 experts (8 per rank) and DeepSeek-V4's 384 (48 per rank)
    ([7, 0, 12, 3, 9, 1, 5, 10], dict(hidden=512, inter=256, experts=64, topk=6, use_ue8m0=True), None),
    ([4, 9, 0, 6, 2, 11, 3, 8], dict(hidden=512, inter=256, experts=384, topk=6), None),
])
def test_matches_reference(make_problem, counts, shape, clamp):
    p = make_problem(seed=sum(counts) + len(counts), t=sum(counts), mask_frac=0.25, **shape)
    p.topk_idx[p.topk_idx == 1] = -1            # an expert that receives no tokens
    g = Group(p, counts, max_tokens=max(counts) + 3)
    ys, stats = g.run(clamp=clamp)
    y_ref, stats_ref = reference(p, clamp)
    for r in range(g.world):
        assert ys[r].shape == (counts[r], p.hidden)
        if counts[r]:
            assert relative_error(ys[r].cpu(), y_ref[g.rows(r)]) < TOL, f'rank {r}'
    assert torch.equal(torch.cat([s.cpu() for s in stats]), stats_ref)
    assert stats_ref[1] == 0
    ys2, stats2 = g.run(clamp=clamp)
    for r in range(g.world):
        assert torch.equal(ys[r].view(torch.int16), ys2[r].view(torch.int16)), f'rank {r}: not bitwise stable'
    assert torch.equal(torch.cat(stats2).cpu(), stats_ref)


def test_mxfp4_two_ranks(make_problem):
    from deep_gemm.utils import cast_to_mxfp4
    p = make_problem(seed=5, t=23, hidden=256, inter=128, experts=8, topk=4, use_ue8m0=True)
    counts = [15, 8]
    bufs = SymmBuffer.emulated_group(2, p.experts, 16, p.topk, p.hidden, p.inter, device='cuda', timeout_s=30.0, mma_type='fp8xnvfp4')
    ref_bufs = [deep_gemm.get_symm_buffer_for_mega_moe(None, p.experts, 32, p.topk, p.hidden, p.inter, mma_type='fp8xnvfp4')]
    w1 = deep_gemm.dequant_nvfp4(p.l1['weight'], p.l1['weight_scale'])
    w2 = deep_gemm.dequant_nvfp4(p.l2['weight'], p.l2['weight_scale'])
    (q1, s1), (q2, s2) = cast_to_mxfp4(w1), cast_to_mxfp4(w2)
    full = deep_gemm.transform_weights_for_mega_moe((q1.cuda(), s1.cuda()), (q2.cuda(), s2.cuda()))
    per_rank = [deep_gemm.transform_weights_for_mega_moe((q1[es].cuda(), s1[es].cuda()), (q2[es].cuda(), s2[es].cuda()))
                for es in (slice(0, 4), slice(4, 8))]
    lo = 0
    for r, b in enumerate(bufs):
        sl = slice(lo, lo + counts[r])
        lo += counts[r]
        for name in ('x', 'x_sf', 'topk_idx', 'topk_weights'):
            getattr(b, name)[:counts[r]].copy_(getattr(p, name)[sl])
    rb = ref_bufs[0]
    for name in ('x', 'x_sf', 'topk_idx', 'topk_weights'):
        getattr(rb, name)[:p.t].copy_(getattr(p, name))
    ys = [torch.full((c, p.hidden), float('nan'), dtype=torch.bfloat16, device='cuda') for c in counts]
    streams = [torch.cuda.Stream() for _ in counts]
    for r in range(2):
        sm90.prepare(bufs[r], per_rank[r][0], per_rank[r][1], counts[r])
    with launch_window():
        for r in range(2):
            with torch.cuda.stream(streams[r]):
                deep_gemm.fp8_nvfp4_mega_moe(ys[r], per_rank[r][0], per_rank[r][1], bufs[r], backend='sm90')
    y_ref = torch.empty(p.t, p.hidden, dtype=torch.bfloat16, device='cuda')
    deep_gemm.fp8_nvfp4_mega_moe(y_ref, full[0], full[1], rb, backend='reference')
    for b in bufs:
        b.check_comm()
    assert relative_error(torch.cat(ys), y_ref) < TOL


@pytest.mark.parametrize('tokens_per_wave', [None, 8])
def test_cuda_graph_replay_new_routing(make_problem, tokens_per_wave):
    p = make_problem(seed=77, t=30, hidden=512, inter=256, experts=8, topk=4, use_ue8m0=True, mask_frac=0.1)
    g = Group(p, [12, 18], tokens_per_wave=tokens_per_wave)
    # waves of 8: rank 0 runs 8, 4 and 0 tokens, rank 1 8, 8 and 2, all captured in each rank's graph
    assert [b.num_waves(c) for b, c in zip(g.bufs, g.counts)] == ([1, 1] if tokens_per_wave is None else [3, 3])
    eager, _ = g.run()
    ys = [torch.empty(c, p.hidden, dtype=torch.bfloat16, device='cuda') for c in g.counts]
    graphs = []
    for r in range(g.world):   # capture records launches only: no rank waits during capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            deep_gemm.fp8_nvfp4_mega_moe(ys[r], g.l1[r], g.l2[r], g.bufs[r], backend='sm90')
        graphs.append(graph)

    def replay():
        for y in ys:
            y.fill_(float('nan'))
        with launch_window():
            for r in range(g.world):
                with torch.cuda.stream(g.streams[r]):
                    graphs[r].replay()

    replay()
    for r in range(g.world):
        assert torch.equal(ys[r].view(torch.int16), eager[r].view(torch.int16))
    # new routing and tokens across ranks, same graphs: counts and barriers live on the device
    perm = torch.randperm(p.t, generator=torch.Generator().manual_seed(1))
    g.load(perm)
    replay()
    y_ref, _ = reference(p)
    y_ref = y_ref[perm]
    for r in range(g.world):
        assert relative_error(ys[r].cpu(), y_ref[g.rows(r)]) < TOL
        assert torch.equal(ys[r].cpu().view(torch.int16), torch.cat(eager).cpu()[perm][g.rows(r)].view(torch.int16))


def _pin_token_tile(monkeypatch):
    # The token tile width follows the per-wave token count (a hint), so an unwaved call may pick
    # another one; pinned, both calls launch the same kernels and any difference is the waves'.
    monkeypatch.setenv('DG_GROUPED_GEMM_BLOCK_T', '32')


def test_waves_bitwise_equal_unwaved(make_problem, monkeypatch):
    """T = 96 tokens per rank in waves of W = 32: both ranks run 3 waves; rank 1 (50 tokens) has a
    partial second wave and an empty third, in which it still serves its experts for rank 0's last
    32 tokens."""
    _pin_token_tile(monkeypatch)
    counts = [96, 50]
    p = make_problem(seed=146, t=sum(counts), hidden=512, inter=256, experts=8, topk=4, use_ue8m0=True,
                     mask_frac=0.25)
    waved = Group(p, counts, max_tokens=96, tokens_per_wave=32)
    unwaved = Group(p, counts, max_tokens=96)
    assert [b.waves(c) for b, c in zip(waved.bufs, counts)] == [[(0, 32), (32, 32), (64, 32)],
                                                               [(0, 32), (32, 18), (64, 0)]]
    assert unwaved.bufs[0].num_waves(96) == 1
    assert waved.bufs[0].region('l1_x').shape[0] * 3 == unwaved.bufs[0].region('l1_x').shape[0]
    # rank 0's last wave routes pairs to rank 1's experts (what rank 1's empty wave serves)
    assert (p.topk_idx[64:96] >= 4).any()
    ys, stats = waved.run()
    ys_u, stats_u = unwaved.run()
    y_ref, stats_ref = reference(p)
    for r in range(waved.world):
        assert ys[r].shape == (counts[r], p.hidden)
        assert torch.equal(ys[r].view(torch.int16), ys_u[r].view(torch.int16)), f'rank {r}: waves changed y'
        assert relative_error(ys[r].cpu(), y_ref[waved.rows(r)]) < TOL, f'rank {r}'
    # every wave adds its pairs to the statistics
    assert torch.equal(torch.cat([s.cpu() for s in stats]), stats_ref)
    assert torch.equal(torch.cat([s.cpu() for s in stats_u]), stats_ref)
    # the last wave left the counters and barriers ready for the next call
    ys2, stats2 = waved.run()
    for r in range(waved.world):
        assert torch.equal(ys[r].view(torch.int16), ys2[r].view(torch.int16)), f'rank {r}: not bitwise stable'
    assert torch.equal(torch.cat([s.cpu() for s in stats2]), stats_ref)


def test_token_groups_bitwise_equal(make_problem, monkeypatch):
    """Token tiles of an expert in groups of one or two (scheduler/tile_order.cuh; at DeepSeek sizes
    only prefill has enough tiles per expert for groups): the same bits as no groups."""
    monkeypatch.setenv('DG_GROUPED_GEMM_BLOCK_T', '16')
    counts = [60, 36]
    p = make_problem(seed=211, t=sum(counts), hidden=512, inter=256, experts=8, topk=4, use_ue8m0=True,
                     mask_frac=0.1)
    g = Group(p, counts)
    ys, _ = g.run()
    y_ref, _ = reference(p)
    per_expert = torch.bincount(p.topk_idx[p.topk_idx >= 0], minlength=p.experts)
    assert (per_expert > 2 * 16).sum() >= 4, per_expert      # experts with 3+ token tiles
    for r in range(g.world):
        assert relative_error(ys[r].cpu(), y_ref[g.rows(r)]) < TOL, f'rank {r}'
    for group in (1, 2):
        monkeypatch.setenv('DG_GROUPED_GEMM_TOKEN_GROUP', str(group))
        ys_g, _ = g.run()
        for r in range(g.world):
            assert torch.equal(ys_g[r].view(torch.int16), ys[r].view(torch.int16)), f'group {group}, rank {r}'


def test_combine_push_equals_pull(make_problem, monkeypatch, mega_path):
    """The fused kernel's owners push the L2 rows of other ranks' pairs into the sources' `combine_in`
    as token tiles finish (sm90.push_enabled); pulled after barrier 1 instead (DG_MEGA_MOE_PUSH=0)
    the bits are the same.  Every pushed row is checked against the owner's `combine` row it copies,
    and a pulling call must leave `combine_in` untouched."""
    if mega_path != 'fused':
        pytest.skip('the kernel sequence pulls')
    counts = [21, 9, 0, 14]      # every rank picks BLOCK_T 32: emulated ranks must all be resident
    p = make_problem(seed=404, t=sum(counts), hidden=512, inter=256, experts=16, topk=6, use_ue8m0=True,
                     mask_frac=0.1)
    g = Group(p, counts)
    for b in g.bufs:
        b.region('combine_in').fill_(float('nan'))
    monkeypatch.setenv('DG_MEGA_MOE_PUSH', '0')
    ys_pull, _ = g.run()
    assert all(torch.isnan(b.region('combine_in').float()).all() for b in g.bufs)
    monkeypatch.setenv('DG_MEGA_MOE_PUSH', '1')
    ys, _ = g.run()
    y_ref, _ = reference(p)
    for r in range(g.world):
        if counts[r]:
            assert relative_error(ys[r].cpu(), y_ref[g.rows(r)]) < TOL, f'rank {r}'
        assert torch.equal(ys[r].view(torch.int16), ys_pull[r].view(torch.int16)), f'rank {r}: push != pull'
    e_l, k, pushed = p.experts // g.world, p.topk, 0
    for r, b in enumerate(g.bufs):
        idx, rows = b.topk_idx[:counts[r]].cpu(), b.region('pair_row')[:counts[r]].cpu()
        got = b.region('combine_in').cpu().view(torch.int16)
        for t, j in zip(*torch.nonzero(idx >= 0, as_tuple=True)):
            owner, row = int(idx[t, j]) // e_l, int(rows[t, j])
            if owner == r or row < 0:
                continue
            want = g.bufs[owner].region('combine')[row].cpu().view(torch.int16)
            assert torch.equal(got[t * k + j], want), (r, int(t), int(j))
            pushed += 1
    assert pushed > 100, pushed


@pytest.mark.parametrize('block_t', [8, 16, 32])
def test_small_token_tiles(make_problem, monkeypatch, block_t):
    """The calls pick tiles of at least 32 rows (sm90._MIN_TILE_ROWS); the narrower ones stay
    reachable (DG_GROUPED_GEMM_BLOCK_T) and correct, with experts of several tiles and partial ones
    (32-row tiles narrow their MMA to the rows present)."""
    monkeypatch.setenv('DG_GROUPED_GEMM_BLOCK_T', str(block_t))
    counts = [29, 40]
    p = make_problem(seed=300 + block_t, t=sum(counts), hidden=512, inter=256, experts=8, topk=4, use_ue8m0=True,
                     mask_frac=0.1)
    assert sm90.block_t_for(SymmBuffer.emulated_group(2, 8, 40, 4, 512, 256, device='cpu', mma_type='fp8xnvfp4')[0], 40) == block_t
    g = Group(p, counts)
    ys, _ = g.run()
    y_ref, _ = reference(p)
    per_expert = torch.bincount(p.topk_idx[p.topk_idx >= 0], minlength=p.experts)
    assert (per_expert % 8 != 0).any() and (per_expert > block_t).any(), per_expert
    for r in range(g.world):
        assert relative_error(ys[r].cpu(), y_ref[g.rows(r)]) < TOL, f'rank {r}'
    ys2, _ = g.run()
    for r in range(g.world):
        assert torch.equal(ys2[r].view(torch.int16), ys[r].view(torch.int16)), f'rank {r}: not bitwise stable'


def test_waves_one_rank_skip_trailing(make_problem, monkeypatch):
    """One rank, T = 96, W = 32, 40 tokens: waves of 32 and 8 tokens; the third is not launched."""
    from deep_gemm.jit import runtime
    _pin_token_tile(monkeypatch)
    p = make_problem(seed=40, t=40, hidden=512, inter=256, experts=8, topk=4, use_ue8m0=True, mask_frac=0.25)
    dev = torch.device('cuda')
    l1, l2 = deep_gemm.transform_nvfp4_weights_for_mega_moe({k: v.to(dev) for k, v in p.l1.items()},
                                                           {k: v.to(dev) for k, v in p.l2.items()})
    waved, unwaved = [deep_gemm.get_symm_buffer_for_mega_moe(None, p.experts, 96, p.topk, p.hidden, p.inter,
                                                             device=dev, num_max_tokens_per_wave=w, mma_type='fp8xnvfp4')
                      for w in (32, None)]
    for b in (waved, unwaved):
        for name in ('x', 'x_sf', 'topk_idx', 'topk_weights'):
            getattr(b, name)[:p.t].copy_(getattr(p, name))
    assert waved.num_waves(40) == 2 and waved.num_waves(32) == 1 and unwaved.num_waves(40) == 1
    launched = []
    launch = runtime.launch
    monkeypatch.setattr(runtime, 'launch', lambda kernel, *a, **kw: (launched.append(kernel), launch(kernel, *a, **kw)))

    def call(buf, t):
        y = torch.full((t, p.hidden), float('nan'), dtype=torch.bfloat16, device='cuda')
        stats = torch.zeros(p.experts, dtype=torch.int32, device='cuda')
        launched.clear()
        deep_gemm.fp8_nvfp4_mega_moe(y, l1, l2, buf, cumulative_local_expert_recv_stats=stats, backend='sm90')
        torch.cuda.synchronize()
        return y, stats, len(launched)

    y, stats, n = call(waved, 40)
    y_u, stats_u, n_u = call(unwaved, 40)
    _, _, n_one = call(waved, 32)
    assert n_one > 0 and n == 2 * n_one and n_u == n_one, (n, n_u, n_one)
    y_ref, stats_ref = reference(p)
    assert torch.equal(y.view(torch.int16), y_u.view(torch.int16))
    assert relative_error(y.cpu(), y_ref) < TOL
    assert torch.equal(stats.cpu(), stats_ref) and torch.equal(stats_u.cpu(), stats_ref)
    # no tokens: nothing launched
    assert call(waved, 0)[2] == 0


def test_rank_that_never_arrives_times_out(make_problem):
    p = make_problem(seed=8, t=20, hidden=256, inter=128, experts=8, topk=3)
    timeout = 0.5
    g = Group(p, [10, 10], timeout_s=timeout)
    g.run()                                   # both ranks: compiles the kernels, call 1 succeeds
    assert g.bufs[0].comm_error() is None
    start = time.monotonic()
    ys, _ = g.run(ranks=[0])                  # rank 1 never arrives at call 2
    elapsed = time.monotonic() - start
    assert elapsed < timeout + 2.0, f'rank 0 waited {elapsed:.2f} s with a {timeout} s timeout'
    assert elapsed >= timeout
    with pytest.raises(MegaMoETimeoutError, match=r'rank 0 timed out after 0.5 s waiting for rank 1 at the dispatch'):
        g.bufs[0].check_comm()
    assert torch.isnan(ys[0].float()).all(), 'a timed-out call must not return stale data'
    # the buffer stays failed: the next call raises before launching anything
    y = torch.empty(10, p.hidden, dtype=torch.bfloat16, device='cuda')
    with pytest.raises(MegaMoETimeoutError, match='waiting for rank 1'):
        deep_gemm.fp8_nvfp4_mega_moe(y, g.l1[0], g.l2[0], g.bufs[0], backend='sm90')
