"""Bad input raises a clear error naming the argument, before any work (the new-user issue).

Every case here passed silently (or died with a bare IndexError / a gloo SIGABRT) before.  NaN inside
the FP8 tokens is data, not an argument: it stays in that token's output row.
"""
import os

import pytest
import torch
import torch.distributed as dist

import deep_gemm
from deep_gemm.reference import reference_mega_moe
from gloo_ranks import init_gloo


def _layer_inputs(p):
    l1, l2 = deep_gemm.transform_nvfp4_weights_for_mega_moe(p.l1, p.l2)
    buf = deep_gemm.get_symm_buffer_for_mega_moe(None, p.experts, p.t, p.topk, p.hidden, p.inter, device='cpu', mma_type='fp8xnvfp4')
    buf.x[:p.t].copy_(p.x)
    buf.x_sf[:p.t].copy_(p.x_sf)
    buf.topk_idx[:p.t].copy_(p.topk_idx)
    buf.topk_weights[:p.t].copy_(p.topk_weights)
    return l1, l2, buf


def _ref(p, **over):
    args = dict(x=p.x, x_sf=p.x_sf, topk_idx=p.topk_idx, topk_weights=p.topk_weights, w1=p.w1, w1_alpha=p.w1_alpha,
                w2=p.w2, w2_alpha=p.w2_alpha, num_experts=p.experts)
    args.update(over)
    return reference_mega_moe(**args)


# ------------------------------------------------------------------------------------ global scales
@pytest.mark.parametrize('bad', [float('nan'), float('inf'), -0.5, 0.0])
@pytest.mark.parametrize('which', ['l1', 'l2'])
def test_transform_rejects_bad_global_scales(make_problem, bad, which):
    p = make_problem(experts=4)
    d = dict(getattr(p, which))
    g = d['weight_scale_2'].clone()
    g.view(-1)[1] = bad
    d['weight_scale_2'] = g
    l1, l2 = (d, p.l2) if which == 'l1' else (p.l1, d)
    with pytest.raises(ValueError, match=f'{which}.weight_scale_2: global scales must be finite and positive'):
        deep_gemm.transform_nvfp4_weights_for_mega_moe(l1, l2)


@pytest.mark.parametrize('bad', [float('nan'), float('inf'), -1.0, 0.0])
def test_layer_rejects_bad_alpha(make_problem, bad):
    p = make_problem(experts=4)
    l1, l2, buf = _layer_inputs(p)
    l2.alpha[0, 0] = bad  # e.g. weights built by hand
    y = torch.empty(p.t, p.hidden, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match='l2.alpha: global scales must be finite and positive'):
        deep_gemm.fp8_nvfp4_mega_moe(y, l1, l2, buf, backend='reference')


# ---------------------------------------------------------------------------------- L1 / L2 pairing
@pytest.mark.parametrize('change,needle', [
    (dict(experts=3), 'l2.weight: 3 experts, l1.weight has 4'),
    (dict(hidden=384), r'l2.weight: N = 384 \(hidden\) must equal l1.weight\'s K = 256'),
    (dict(inter=256), r'l2.weight: K = 256 \(intermediate\) must be half of l1.weight\'s N = 256'),
])
def test_transform_cross_checks_l1_against_l2(make_problem, change, needle):
    p = make_problem(experts=4)
    q = make_problem(**{**dict(experts=4), **change})
    with pytest.raises(ValueError, match=needle):
        deep_gemm.transform_nvfp4_weights_for_mega_moe(p.l1, q.l2)


# -------------------------------------------------------------------------------- reference inputs
@pytest.mark.parametrize('over,exc,needle', [
    (lambda p: dict(x=p.x.view(torch.int8)), TypeError, 'x: expected dtype torch.float8_e4m3fn'),
    (lambda p: dict(x=p.x.float()), TypeError, 'x: expected dtype torch.float8_e4m3fn'),
    (lambda p: dict(x_sf=p.x_sf[:-1]), ValueError, 'x_sf: expected shape'),
    (lambda p: dict(x_sf=p.x_sf[:, :3]), ValueError, 'x_sf: 3 scales per token'),
    (lambda p: dict(x_sf=p.x_sf.double()), TypeError, 'x_sf: expected dtype torch.float32'),
    (lambda p: dict(x_sf=torch.where(torch.arange(p.x_sf.numel()).view_as(p.x_sf) == 5,
                                     float('inf'), p.x_sf)), ValueError, 'x_sf: must be finite'),
    (lambda p: dict(topk_idx=torch.where(p.topk_idx == -1, -2, p.topk_idx)), ValueError,
     'topk_idx: expert id -2 out of range'),
    (lambda p: dict(topk_idx=p.topk_idx + p.experts), ValueError, 'topk_idx: expert id'),
    (lambda p: dict(topk_idx=p.topk_idx.float()), TypeError, 'topk_idx: expected an integer tensor'),
    (lambda p: dict(topk_idx=p.topk_idx[:, :-1]), ValueError, 'topk_weights: expected shape'),
    (lambda p: dict(topk_weights=p.topk_weights.double()), TypeError, 'topk_weights: expected dtype'),
    (lambda p: dict(topk_weights=p.topk_weights * float('nan')), ValueError, 'topk_weights: must be finite'),
    (lambda p: dict(w1_alpha=p.w1_alpha[:, :1]), ValueError, 'w1_alpha: expected shape'),
    (lambda p: dict(w1_alpha=-p.w1_alpha), ValueError, 'w1_alpha: must be positive'),
    (lambda p: dict(w2_alpha=p.w2_alpha * float('inf')), ValueError, 'w2_alpha: must be finite'),
    (lambda p: dict(w2=p.w2[:-1]), ValueError, 'w2: 7 experts, w1 has 8'),
    (lambda p: dict(w1=p.w1[:, :, :-16]), ValueError, r'w1\[\d\]: expected shape'),
    (lambda p: dict(w2=p.w2[:, :-16]), ValueError, r'w2\[\d\]: expected shape'),
    (lambda p: dict(activation_clamp=-1.0), ValueError, 'activation_clamp'),
    (lambda p: dict(num_experts=16), ValueError, 'num_experts: 16 != 8 local experts x 1 ranks'),
    (lambda p: dict(cumulative_local_expert_recv_stats=torch.zeros(8, dtype=torch.int64)), TypeError,
     'cumulative_local_expert_recv_stats'),
])
def test_reference_validates_like_the_layer(make_problem, over, exc, needle):
    p = make_problem()
    with pytest.raises(exc, match=needle):
        _ref(p, **over(p))


def test_reference_still_accepts_valid_input(make_problem):
    p = make_problem()
    y = _ref(p)
    assert y.shape == (p.t, p.hidden) and bool(torch.isfinite(y.float()).all())


# --------------------------------------------------------------------------- NaN in the FP8 tokens
def test_nan_in_fp8_tokens_stays_in_its_row(make_problem):
    """A NaN byte inside ``x`` is data: the layer does not check it (that would cost a pass over every
    token), and it poisons exactly the output row of its token."""
    p = make_problem(mask_frac=0.0)
    x = p.x.clone()
    x.view(torch.uint8)[3, 17] = 0x7F  # E4M3 NaN
    l1, l2, buf = _layer_inputs(p)
    buf.x[:p.t].copy_(x)
    y = torch.empty(p.t, p.hidden, dtype=torch.bfloat16)
    deep_gemm.fp8_nvfp4_mega_moe(y, l1, l2, buf, backend='reference')
    clean = _ref(p)
    nan_rows = torch.isnan(y.float()).any(dim=1)
    assert nan_rows.tolist() == [i == 3 for i in range(p.t)]
    assert torch.equal(y[~nan_rows], clean[~nan_rows])
    assert torch.equal(_ref(p, x=x)[~nan_rows], clean[~nan_rows])


# -------------------------------------------------------------------- buffer sizes across the ranks
def _mismatch_worker(rank, world, port, out_dir):
    init_gloo(rank, world, port)
    try:
        hidden = 256 if rank == 0 else 384
        try:
            deep_gemm.get_symm_buffer_for_mega_moe(dist.group.WORLD, 8, 16, 2, hidden, 128, device='cpu', mma_type='fp8xnvfp4')
            msg = None
        except ValueError as exc:
            msg = str(exc)
        # still in step: a collective after the error completes on every rank
        t = torch.ones(1)
        dist.all_reduce(t)
        with open(os.path.join(out_dir, f'rank{rank}.txt'), 'w') as f:
            f.write(f'{msg}\n{int(t.item())}')
    finally:
        dist.destroy_process_group()


def test_buffer_sizes_checked_across_ranks(tmp_path, spawn_ranks):
    spawn_ranks(_mismatch_worker, 2, args=(str(tmp_path),), timeout_s=120)
    texts = [open(tmp_path / f'rank{r}.txt').read().split('\n') for r in range(2)]
    msgs = [t[0] for t in texts]
    assert msgs[0] == msgs[1], msgs
    assert 'hidden: rank 0 passed 256, rank 1 passed 384' in msgs[0]
    assert 'intermediate_hidden' not in msgs[0]
    assert [t[1] for t in texts] == ['2', '2']


# ----------------------------------------------------------------------------- discoverability
def test_timeout_error_exported():
    assert deep_gemm.MegaMoETimeoutError is deep_gemm.mega.buffer.MegaMoETimeoutError
    assert issubclass(deep_gemm.MegaMoETimeoutError, RuntimeError)


def test_transformed_weights_repr_is_short(make_problem):
    l1, _ = deep_gemm.transform_nvfp4_weights_for_mega_moe(make_problem().l1, make_problem().l2)
    r = repr(l1)
    assert len(r) < 200 and r.startswith("ExpertWeights(fmt='nvfp4', kind='l1', experts=8, n=256, k=256")


@pytest.mark.parametrize('obj,words', [
    (deep_gemm.fp8_nvfp4_mega_moe, ['float8_e4m3fn', 'x_sf', 'topk_idx', 'topk_weights', 'fast_math', 'backend',
                                    'reference', 'sm90', 'TypeError', 'ValueError', 'MegaMoETimeoutError']),
    (deep_gemm.SymmBuffer, ['float8_e4m3fn', 'float32', 'int64', 'x_sf', 'topk_idx', 'topk_weights',
                            'check_comm', 'MegaMoETimeoutError']),
])
def test_docstrings_list_views_arguments_and_errors(obj, words):
    doc = obj.__doc__ or ''
    missing = [w for w in words if w not in doc]
    assert not missing, f'{obj.__name__}.__doc__ lacks {missing}'


# ------------------------------------------------------------------- one obvious way to fill x_sf
def test_copy_inputs_takes_the_casts_outputs_and_names_bad_ones():
    from deep_gemm.utils import per_token_cast_to_fp8, per_token_cast_to_nvfp4, unpack_ue8m0
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 512, generator=g)
    idx = torch.randint(0, 8, (6, 2), generator=g)
    w = torch.rand(6, 2, generator=g)
    ours = deep_gemm.get_symm_buffer_for_mega_moe(None, 8, 8, 2, 512, 512, mma_type='fp8xnvfp4', device='cpu')
    q, sf128 = per_token_cast_to_fp8(x, False)              # upstream's default gran_k = 128
    assert ours.copy_inputs(q, sf128, idx, w) == 6
    assert torch.equal(ours.x_sf[:6], sf128.repeat_interleave(4, 1))   # per-128 scales are per-32 scales
    q, sf32 = per_token_cast_to_fp8(x, False, 32)
    ours.copy_inputs(q, sf32, idx, w)
    assert torch.equal(ours.x_sf[:6], sf32) and torch.equal(ours.topk_idx[:6], idx)
    up = deep_gemm.get_symm_buffer_for_mega_moe(None, 8, 8, 2, 512, 512, device='cpu')      # 'fp8xfp4'
    q, sf = per_token_cast_to_fp8(x, True, 32)
    up.copy_inputs(q, sf, idx, w)                            # unpacked powers of two: packed on the way in
    assert torch.equal(unpack_ue8m0(up.x_sf[:6], 16), sf)
    q, packed = per_token_cast_to_fp8(x, True, 32, True)
    up.copy_inputs(q, packed, idx, w)
    assert torch.equal(up.x_sf[:6], packed)
    with pytest.raises(ValueError, match=r"^x_sf: torch.float32 \(6, 4\) fits neither"):
        up.copy_inputs(q, per_token_cast_to_fp8(x, True)[1], idx, w)   # per-128 scales cannot be per-32 words
    with pytest.raises(TypeError, match='^x: expected dtype torch.float8_e4m3fn'):
        up.copy_inputs(x, packed, idx, w)
    with pytest.raises(TypeError, match='^topk_idx: expected dtype torch.int64'):
        up.copy_inputs(q, packed, idx.int(), w)
    with pytest.raises(ValueError, match='^x: 9 tokens > num_max_tokens_per_rank = 8'):
        up.copy_inputs(torch.cat([q, q[:3]]), packed, idx, w)
    nv = deep_gemm.get_symm_buffer_for_mega_moe(None, 8, 8, 2, 512, 512, mma_type='fp4xfp4', device='cpu')
    codes, sfw = per_token_cast_to_nvfp4(x)
    nv.copy_inputs(codes.view(torch.uint8), sfw, idx, w)
    assert torch.equal(nv.x_sf[:6], sfw)
    bf = deep_gemm.get_symm_buffer_for_mega_moe(None, 8, 8, 2, 512, 512, mma_type='bf16xbf16', device='cpu')
    with pytest.raises(ValueError, match="^x_sf: a 'bf16xbf16' buffer takes no activation scales"):
        bf.copy_inputs(x.bfloat16(), sf, idx, w)
    bf.copy_inputs(x.bfloat16(), None, idx, w)
    bf.destroy()
    with pytest.raises(ValueError, match='destroyed'):
        bf.copy_inputs(x.bfloat16(), None, idx, w)
