"""Upstream DeepGEMM's Mega MoE call sequences, replayed against this package unchanged.

Each ``_sequence_*`` does what upstream's own tests do (tests/test_mega_moe.py for ``fp8xfp4`` /
``bf16xbf16``, tests/test_nvfp4_mega_moe.py for ``fp4xfp4``; our own code, written from their public
contract): build BF16 weights, cast them with ``deep_gemm.utils``, lay out the scales with
``transform_sf_into_required_layout`` (or by hand, MN-major), ``transform_weights_for_mega_moe``,
fill the buffer's views by ``copy_``, call the entry point with keyword arguments, ``destroy()``.
The output must equal ``reference_recipe_moe`` on the same quantized inputs bit for bit (one
process, and 2 / 4 gloo ranks, a rank with zero tokens among them), and be close to a plain float32
computation of the layer (upstream's own tolerance).
"""
import os

import pytest
import torch
import torch.distributed as dist

import deep_gemm
from deep_gemm.reference_recipes import reference_recipe_moe
from deep_gemm.testing import calc_diff
from deep_gemm.utils import (cast_back_from_fp4, per_token_cast_to_fp4, per_token_cast_to_fp8,
                             per_token_cast_to_nvfp4, transform_sf_into_required_layout)
from gloo_ranks import init_gloo

E, K = 8, 3                      # experts, top-k
SHAPES = {'fp8xfp4': (256, 128), 'bf16xbf16': (256, 128), 'fp4xfp4': (512, 512)}   # hidden, intermediate


def _problem(mma_type: str, counts, seed: int = 0, shared: int = 1, masked: float = 0.2):
    """Every rank's tokens and the full expert weights, BF16, as upstream's tests draw them."""
    h, i = SHAPES[mma_type]
    g = torch.Generator().manual_seed(seed)
    n = sum(counts)
    x = torch.randn(n, h, generator=g).bfloat16()
    scores = torch.randn(n, E, generator=g)
    topk_weights, topk_idx = torch.topk(scores, K, dim=-1, sorted=False)
    if mma_type == 'fp4xfp4':
        topk_weights = topk_weights.softmax(-1)
    topk_idx[torch.rand(n, K, generator=g) < masked] = -1
    topk_weights[topk_idx < 0] = 0
    if n:
        topk_idx[0] = -1          # a token with every slot masked
        topk_weights[0] = 0
    w1 = (0.1 * torch.randn(E, 2 * i, h, generator=g) * torch.exp(torch.randn(E, 2 * i, 1, generator=g))).bfloat16()
    w2 = (0.1 * torch.randn(E, h, i, generator=g)).bfloat16()
    s1 = (0.1 * torch.randn(2 * i * shared, h, generator=g)).bfloat16()
    s2 = (0.1 * torch.randn(h, i * shared, generator=g)).bfloat16()
    l1_alphas = 0.5 + torch.rand(E, 2, generator=g)
    l2_alphas = 0.5 + torch.rand(E, generator=g)
    a2 = 0.5 + torch.rand(E, generator=g)        # L2-input global scales: no block scale saturates
    return dict(mma_type=mma_type, counts=list(counts), x=x, topk_idx=topk_idx.to(torch.int64),
                topk_weights=topk_weights.float(), w1=w1, w2=w2, s1=s1, s2=s2, shared=shared,
                l1_alphas=l1_alphas, l2_alphas=l2_alphas, a2=a2, h=h, i=i)


def _fp4_weights(w):
    """Upstream's MXFP4 weights: per expert ``per_token_cast_to_fp4(w, use_ue8m0=True, gran_k=32)``, then
    ``transform_sf_into_required_layout(sf, n, k, (1, 32), E)`` (int32, MN-major, TMA-aligned)."""
    codes, sfs = zip(*[per_token_cast_to_fp4(w[e], use_ue8m0=True, gran_k=32) for e in range(w.shape[0])])
    n, k = w.shape[1:]
    return torch.stack(codes), transform_sf_into_required_layout(torch.stack(sfs), n, k, (1, 32), w.shape[0])


def _nvfp4_weights(w):
    """Upstream's NVFP4 weights: packed codes and int32 packed UE4M3 scales made MN-major by hand."""
    codes, sfs = zip(*[per_token_cast_to_nvfp4(w[e]) for e in range(w.shape[0])])
    sf = torch.stack(sfs)
    return torch.stack(codes), sf.transpose(-1, -2).contiguous().transpose(-1, -2)


def _fp8_shared(w):
    q, sf = per_token_cast_to_fp8(w, use_ue8m0=True, gran_k=32)
    return q, transform_sf_into_required_layout(sf, w.shape[0], w.shape[1], (1, 32))


def _run_layer(d, group, rank: int, world: int, backend: str = 'auto'):
    """One rank's upstream call sequence; returns (y, stats, the reference's inputs)."""
    mt, h, i, counts = d['mma_type'], d['h'], d['i'], d['counts']
    lo, n = sum(counts[:rank]), counts[rank]
    e_l = E // world
    es = slice(rank * e_l, (rank + 1) * e_l)
    dev = d['x'].device
    buffer = deep_gemm.get_symm_buffer_for_mega_moe(group, E, max(max(counts), 1), K, h, i,
                                                    num_shared_experts=d['shared'], mma_type=mt, device=dev)
    x = d['x'][lo:lo + n]
    kw = {}
    if mt == 'fp8xfp4':
        x_q, x_sf = per_token_cast_to_fp8(x, use_ue8m0=True, gran_k=32, use_packed_ue8m0=True)
        l1, l2 = deep_gemm.transform_weights_for_mega_moe(_fp4_weights(d['w1'][es]), _fp4_weights(d['w2'][es]))
        if d.get('bf16_shared'):          # upstream also takes BF16 shared experts with FP8 tokens
            sl1, sl2 = deep_gemm.transform_weights_for_mega_moe(d['s1'], d['s2'])
        else:
            sl1, sl2 = deep_gemm.transform_weights_for_mega_moe(_fp8_shared(d['s1']), _fp8_shared(d['s2']))
        buffer.x[:n].copy_(x_q)
        buffer.x_sf[:n].copy_(x_sf)
        buffer.shared_l1_acts_sf.zero_()          # upstream's callers fill this re-laid-out copy of x_sf
        entry = deep_gemm.fp8_fp4_mega_moe
    elif mt == 'bf16xbf16':
        l1, l2 = deep_gemm.transform_weights_for_mega_moe(d['w1'][es], d['w2'][es])
        sl1, sl2 = deep_gemm.transform_weights_for_mega_moe(d['s1'], d['s2'])
        buffer.x[:n].copy_(x)
        entry = deep_gemm.bf16_mega_moe
    else:
        x_q, x_sf = per_token_cast_to_nvfp4(x)
        l1, l2 = deep_gemm.transform_weights_for_mega_moe(_nvfp4_weights(d['w1'][es]), _nvfp4_weights(d['w2'][es]))
        sl1, sl2 = deep_gemm.transform_weights_for_mega_moe(d['s1'], d['s2'])
        buffer.x[:n].copy_(x_q.view(torch.uint8))
        buffer.x_sf[:n].copy_(x_sf)
        kw = dict(x_bf16=x, l1_alphas=d['l1_alphas'][es].contiguous(), l2_alphas=d['l2_alphas'][es].contiguous(),
                  a2_scales=d['a2'][es].contiguous(), routed_scaling_factor=0.75)
        entry = deep_gemm.fp4_fp4_mega_moe
    buffer.topk_idx[:n].copy_(d['topk_idx'][lo:lo + n])
    buffer.topk_weights[:n].copy_(d['topk_weights'][lo:lo + n])
    stats = torch.randint(0, 100, (e_l,), dtype=torch.int32, generator=torch.Generator().manual_seed(rank)).to(dev)
    stats0 = stats.clone()
    y = torch.empty(n, h, dtype=torch.bfloat16, device=dev)
    entry(y=y, l1_weights=l1, l2_weights=l2, sym_buffer=buffer, shared_l1_weights=sl1, shared_l2_weights=sl2,
          cumulative_local_expert_recv_stats=stats, activation_clamp=10.0, fast_math=True, backend=backend, **kw)
    buffer.destroy()
    return y, stats - stats0


def _reference(d):
    """``reference_recipe_moe`` called directly, on the dequantized values of the same casts."""
    mt = d['mma_type']
    x = d['x']
    recipe = {'fp8xfp4': 'fp8xfp4', 'bf16xbf16': 'bf16xbf16', 'fp4xfp4': 'fp4xfp4'}[mt]
    kw = {}
    if mt == 'fp8xfp4':
        q, sf = per_token_cast_to_fp8(x, use_ue8m0=True, gran_k=32)
        xv = q.float() * sf.repeat_interleave(32, 1)
        w1 = torch.stack([cast_back_from_fp4(*per_token_cast_to_fp4(w, True, 32), gran_k=32) for w in d['w1']])
        w2 = torch.stack([cast_back_from_fp4(*per_token_cast_to_fp4(w, True, 32), gran_k=32) for w in d['w2']])

        def fp8_values(w):
            q, sf = per_token_cast_to_fp8(w, True, 32)
            return q.float() * sf.repeat_interleave(32, 1)
        shared = dict(shared_w1=fp8_values(d['s1']), shared_w2=fp8_values(d['s2']), x_shared=xv)
    else:
        if mt == 'bf16xbf16':
            xv, w1, w2 = x.float(), d['w1'].float(), d['w2'].float()
        else:
            def nv(t):
                c, s = per_token_cast_to_nvfp4(t, use_packed_sf=False)
                vals = deep_gemm.e2m1_to_float(deep_gemm.unpack_e2m1(c.view(torch.uint8)))
                return vals * s.repeat_interleave(16, 1)
            xv = nv(x)
            w1 = torch.stack([nv(w) for w in d['w1']])
            w2 = torch.stack([nv(w) for w in d['w2']])
            kw = dict(l1_alphas=d['l1_alphas'], l2_alphas=d['l2_alphas'], a2_scales=d['a2'],
                      routed_scaling_factor=0.75)
        shared = dict(shared_w1=d['s1'].float(), shared_w2=d['s2'].float(),
                      x_shared=x.float())
    stats = torch.zeros(E, dtype=torch.int32)
    y = reference_recipe_moe(recipe, xv, d['topk_idx'], d['topk_weights'], w1, w2, None, num_experts=E,
                             activation_clamp=10.0, cumulative_local_expert_recv_stats=stats, **shared, **kw)
    return y, stats, (xv, w1, w2, shared, kw)


def _float32_layer(d, inputs):
    """A plain float32 MoE on the same quantized values (no intermediate rounding, no requantization):
    what upstream's NVFP4 test compares against with calc_diff < 1e-3."""
    xv, w1, w2, shared, kw = inputs
    n, h = xv.shape
    i = w2.shape[2]
    y = torch.zeros(n, h)
    for t in range(n):
        for j in range(K):
            e = int(d['topk_idx'][t, j])
            if e < 0:
                continue
            a = w1[e] @ xv[t]
            gate, up = a[:i], a[i:]
            if kw:
                gate, up = gate * kw['l1_alphas'][e, 0], up * kw['l1_alphas'][e, 1]
            gate, up = gate.clamp(max=10.0), up.clamp(-10.0, 10.0)
            o = w2[e] @ (torch.nn.functional.silu(gate) * up)
            o = o * (kw['l2_alphas'][e] if kw else 1.0)
            y[t] += o * d['topk_weights'][t, j] * (kw.get('routed_scaling_factor', 1.0) if kw else 1.0)
        a = shared['shared_w1'] @ shared['x_shared'][t]
        s = a.shape[0] // 2
        y[t] += shared['shared_w2'] @ (torch.nn.functional.silu(a[:s].clamp(max=10.0)) * a[s:].clamp(-10.0, 10.0))
    return y


@pytest.mark.parametrize('mma_type', ['fp8xfp4', 'bf16xbf16', 'fp4xfp4'])
def test_upstream_sequence_single_process(mma_type):
    d = _problem(mma_type, [12])
    y, recv = _run_layer(d, None, 0, 1)
    y_ref, stats, inputs = _reference(d)
    assert bool(torch.isfinite(y.float()).all())
    assert torch.equal(y, y_ref)
    assert torch.equal(recv, stats)
    assert torch.equal(y[0], torch.zeros_like(y[0])) or d['shared']      # all slots masked: only the shared expert
    diff = calc_diff(y.float(), _float32_layer(d, inputs))
    # NVFP4 activations and NVFP4 L2 inputs against unquantized float32 arithmetic: more error than upstream's
    # test sees against its own requantizing reference (1e-3)
    assert diff < (3e-3 if mma_type == 'fp4xfp4' else 1e-3), diff


def test_fp4_buffer_rejection_like_upstreams_test():
    """Upstream's NVFP4 test sets ``buffer.mma_type = 'fp8xfp4'`` and expects this ValueError even with
    every other argument None."""
    h, i = SHAPES['fp4xfp4']
    buffer = deep_gemm.get_symm_buffer_for_mega_moe(None, E, 4, K, h, i, mma_type='fp4xfp4')
    buffer.mma_type = 'fp8xfp4'
    with pytest.raises(ValueError, match='requires an fp4xfp4 symmetric buffer'):
        deep_gemm.fp4_fp4_mega_moe(None, None, None, buffer)
    buffer.mma_type = 'fp4xfp4'
    for entry in (deep_gemm.fp8_fp4_mega_moe, deep_gemm.bf16_mega_moe, deep_gemm.fp8_nvfp4_mega_moe):
        with pytest.raises(ValueError, match="got 'fp4xfp4'"):
            entry(None, None, None, buffer)


def test_gpu_backend_by_name_is_not_implemented_for_upstream_recipes():
    """FP8 shared-expert weights have no sm90 kernel (NotImplementedError by name, before any device
    check); the recipes that do have one say that a CPU buffer cannot run it."""
    d = _problem('fp8xfp4', [4])
    with pytest.raises(NotImplementedError, match="fp8_fp4_mega_moe \\(mma_type='fp8xfp4'\\) has no sm90 kernel"):
        _run_layer(d, None, 0, 1, backend='sm90')
    for mt in ('bf16xbf16', 'fp4xfp4'):
        with pytest.raises(ValueError, match="backend 'sm90' needs a CUDA buffer"):
            _run_layer(_problem(mt, [4]), None, 0, 1, backend='sm90')
    with pytest.raises(ValueError, match="backend 'sm90' needs a CUDA buffer"):
        _run_layer(dict(_problem('fp8xfp4', [4]), bf16_shared=True), None, 0, 1, backend='sm90')


def test_use_fp8_dispatch_must_agree_with_mma_type():
    with pytest.warns(DeprecationWarning):
        buf = deep_gemm.get_symm_buffer_for_mega_moe(None, E, 4, K, 256, 128, use_fp8_dispatch=True)
    assert buf.mma_type == 'fp8xfp4'
    with pytest.raises(ValueError, match='use_fp8_dispatch'), pytest.warns(DeprecationWarning):
        deep_gemm.get_symm_buffer_for_mega_moe(None, E, 4, K, 256, 128, use_fp8_dispatch=True, mma_type='bf16xbf16')
    with pytest.raises(ValueError, match='^hidden: 256 must be a multiple of 512'):
        deep_gemm.get_symm_buffer_for_mega_moe(None, E, 4, K, 256, 512, mma_type='fp4xfp4')
    with pytest.raises(ValueError, match='^mma_type'):
        deep_gemm.get_symm_buffer_for_mega_moe(None, E, 4, K, 256, 128, mma_type='fp8')


def test_receive_rows_fit_upstreams_block_m():
    """Upstream's NVFP4 test asserts ``buffer.l1_acts.size(0) % block_m == 0``."""
    for mt, (h, i) in SHAPES.items():
        buf = deep_gemm.get_symm_buffer_for_mega_moe(None, 256, 64, 8, h, i, mma_type=mt)
        for n in (0, 1, 16, 64):
            bm = deep_gemm.get_block_m_for_mega_moe(1, 256, buf.num_max_tokens_per_rank, n, 8, mt)
            assert buf.l1_acts.size(0) % bm == 0 and buf.l2_acts.size(0) == buf.l1_acts.size(0)


# ---------------------------------------------------------------------------------- several ranks
def _worker(rank, world, port, data_path, out_dir):
    init_gloo(rank, world, port, timeout_s=90)
    try:
        res = {}
        for mt, d in torch.load(data_path).items():
            res[mt] = _run_layer(d, dist.group.WORLD, rank, world)
        torch.save(res, os.path.join(out_dir, f'rank{rank}.pt'))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize('world,counts', [(2, [7, 0]), (4, [3, 0, 5, 2])])
def test_upstream_sequences_across_ranks(tmp_path, spawn_ranks, world, counts):
    data = {mt: _problem(mt, counts, seed=world) for mt in SHAPES}
    torch.save(data, tmp_path / 'data.pt')
    spawn_ranks(_worker, world, args=(str(tmp_path / 'data.pt'), str(tmp_path)), timeout_s=240)
    parts = [torch.load(tmp_path / f'rank{r}.pt') for r in range(world)]
    for mt, d in data.items():
        y_ref, stats, _ = _reference(d)
        y = torch.cat([p[mt][0] for p in parts])
        assert torch.equal(y, y_ref), mt
        assert torch.equal(torch.cat([p[mt][1] for p in parts]), stats), mt
