"""Bad inputs raise TypeError (dtype) / ValueError (shape, device, layout, range) naming the argument."""
import pytest
import torch

import deep_gemm
from deep_gemm import (fp8_fp4_mega_moe, fp8_nvfp4_mega_moe, get_symm_buffer_for_mega_moe,
                       get_symm_buffer_size_for_mega_moe, reference_mega_moe)
from deep_gemm.mega.buffer import ALIGNMENT, SymmBuffer, get_symm_buffer_layout
from deep_gemm.utils import check_expert_ids, check_multiple, check_tensor

H, I, E, K, TMAX = 256, 128, 8, 3, 16


# ------------------------------------------------------------------------------- helpers themselves
def test_check_tensor():
    t = torch.zeros(4, 8)
    assert check_tensor('a', t, dtype=torch.float32, shape=(None, 8), device='cpu') is t
    with pytest.raises(TypeError, match='^a: .*dtype'):
        check_tensor('a', t, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match='^a: '):
        check_tensor('a', [1, 2])
    with pytest.raises(ValueError, match='^a: .*dimensions'):
        check_tensor('a', t, ndim=3)
    with pytest.raises(ValueError, match=r'^a: expected shape \(\*, 9\)'):
        check_tensor('a', t, shape=(None, 9))
    with pytest.raises(ValueError, match='^a: .*contiguous'):
        check_tensor('a', t.t())
    check_tensor('a', t.t(), contiguous=False)
    with pytest.raises(ValueError, match='^a: .*meta'):
        check_tensor('a', t, device='meta')


def test_check_expert_ids_and_multiple():
    check_expert_ids('ids', torch.tensor([[-1, 0, 7]]), 8)
    with pytest.raises(ValueError, match='^ids: expert id 8'):
        check_expert_ids('ids', torch.tensor([[-1, 8]]), 8)
    with pytest.raises(ValueError, match='^ids: expert id -2'):
        check_expert_ids('ids', torch.tensor([[-2, 0]]), 8)
    with pytest.raises(TypeError, match='^ids'):
        check_expert_ids('ids', torch.tensor([[0.0]]), 8)
    assert check_multiple('n', 256, 128) == 256
    with pytest.raises(ValueError, match='^n: 100 must be a multiple of 128'):
        check_multiple('n', 100, 128)
    with pytest.raises(TypeError, match='^n'):
        check_multiple('n', 128.0, 128)


# -------------------------------------------------------------------------------------------- buffer
def test_buffer_layout_and_views():
    buf = get_symm_buffer_for_mega_moe(None, E, TMAX, K, H, I, device='cpu', mma_type='fp8xnvfp4')
    size = get_symm_buffer_size_for_mega_moe(1, E, TMAX, K, H, I, mma_type='fp8xnvfp4')
    assert buf.num_bytes == size == buf.raw.numel()
    layout = get_symm_buffer_layout(1, E, TMAX, K, H, I, mma_type='fp8xnvfp4')
    end = 0
    for name, reg in layout.items():
        assert reg.offset % ALIGNMENT == 0 and reg.offset >= end, name
        end = reg.offset + reg.nbytes
        v = buf.region(name)
        assert v.dtype == reg.dtype and tuple(v.shape) == reg.shape
    assert size >= end and size % ALIGNMENT == 0
    assert buf.x.dtype == torch.float8_e4m3fn and buf.x.shape == (TMAX, H)
    assert buf.x_sf.dtype == torch.float32 and buf.x_sf.shape == (TMAX, H // 32)
    assert buf.topk_idx.dtype == torch.int64 and buf.topk_idx.shape == (TMAX, K)
    assert buf.topk_weights.dtype == torch.float32 and buf.topk_weights.shape == (TMAX, K)
    # views alias one allocation and do not overlap
    buf.raw.zero_()
    buf.topk_weights.fill_(1.0)
    assert (buf.x.view(torch.uint8) == 0).all() and (buf.topk_idx == 0).all()
    # larger problems need more room; the size grows with ranks (receive pools)
    assert get_symm_buffer_size_for_mega_moe(4, E, TMAX, K, H, I, mma_type='fp8xnvfp4') > size


@pytest.mark.parametrize('kwargs,exc,name', [
    (dict(hidden=200), ValueError, 'hidden'),
    (dict(hidden=0), ValueError, 'hidden'),
    (dict(intermediate_hidden=100), ValueError, 'intermediate_hidden'),
    (dict(num_experts=0), ValueError, 'num_experts'),
    (dict(num_experts=8.0), TypeError, 'num_experts'),
    (dict(num_max_tokens_per_rank=0), ValueError, 'num_max_tokens_per_rank'),
    (dict(num_max_tokens_per_rank=-3), ValueError, 'num_max_tokens_per_rank'),
    (dict(num_topk=0), ValueError, 'num_topk'),
    (dict(num_topk=9), ValueError, 'num_topk'),
])
def test_bad_buffer_args(kwargs, exc, name):
    args = dict(num_experts=E, num_max_tokens_per_rank=TMAX, num_topk=K, hidden=H, intermediate_hidden=I)
    args.update(kwargs)
    with pytest.raises(exc, match=f'^{name}:'):
        get_symm_buffer_for_mega_moe(None, device='cpu', **args, mma_type='fp8xnvfp4')
    with pytest.raises(exc, match=f'^{name}:'):
        get_symm_buffer_size_for_mega_moe(1, **args, mma_type='fp8xnvfp4')


def test_buffer_num_experts_multiple_of_ranks():
    with pytest.raises(ValueError, match='^num_experts:'):
        get_symm_buffer_size_for_mega_moe(3, E, TMAX, K, H, I, mma_type='fp8xnvfp4')


def test_multi_rank_layout():
    """The regions the EP kernels index: receive pools sized for every rank's tokens, per-pair rows
    of this rank's tokens, per-phase flags per rank."""
    for ranks in (1, 2, 4, 8):
        lay = get_symm_buffer_layout(ranks, 8 * ranks, TMAX, 6, H, I, mma_type='fp8xnvfp4')
        r = ranks * TMAX * min(6, 8)
        assert lay['l1_x'].shape == (r, H) and lay['l1_x'].dtype == torch.bfloat16
        assert lay['combine'].shape == (r, H) and lay['l2_x'].shape == (r, I) and lay['l1_src'].shape == (r, 4)
        assert lay['pair_row'].shape == (TMAX, 6) and lay['expert_offsets'].shape == (9,)
        assert lay['flags'].shape == (2, ranks) and lay['meta'].shape == (16,)
        # the fused kernel's counters: header, per-expert counts, three per-token-tile arrays of R + E_l
        assert lay['work'].shape == (8 + 4 * 8 + 3 * r,) and lay['work'].dtype == torch.int32
        # the rows other ranks push for this rank's (token, slot) pairs; none with one rank
        assert lay['combine_in'].shape == ((TMAX * 6 if ranks > 1 else 0), H)
    # top-k above the local expert count: at most E_l distinct experts of a token land on one rank
    assert get_symm_buffer_layout(4, 8, TMAX, 6, H, I, mma_type='fp8xnvfp4')['l1_x'].shape == (4 * TMAX * 2, H)


def test_emulated_group_views():
    bufs = SymmBuffer.emulated_group(4, 8, TMAX, K, H, I, device='cpu', mma_type='fp8xnvfp4')
    assert [b.rank for b in bufs] == [0, 1, 2, 3] and all(b.num_ranks == 4 and b.emulated for b in bufs)
    ptrs = [b.raw.data_ptr() for b in bufs]
    for b in bufs:
        assert b.peer_bases.tolist() == ptrs
        assert b.num_experts_per_rank == 2
    bufs[2].topk_weights.fill_(3.5)
    assert (bufs[0].peer_region('topk_weights', 2) == 3.5).all()
    assert bufs[1].peer_region('x', 1).data_ptr() == bufs[1].x.data_ptr()
    assert bufs[0].offset('flags') == bufs[3].offset('flags')
    assert bufs[0].comm_error() is None
    bufs[0].check_comm()    # CPU: nothing to report


def test_emulated_group_rejects_reference(make_problem, fake_weights):
    p = make_problem(seed=1, t=4, hidden=H, inter=I, experts=E, topk=K)
    bufs = SymmBuffer.emulated_group(2, E, TMAX, K, H, I, device='cpu', mma_type='fp8xnvfp4')
    y = torch.empty(4, H, dtype=torch.bfloat16)
    l1 = fake_weights(p.w1[:4], p.w1_alpha[:4])
    l2 = fake_weights(p.w2[:4], p.w2_alpha[:4])
    with pytest.raises(ValueError, match='^buffer: an emulated 2-rank group'):
        fp8_nvfp4_mega_moe(y, l1, l2, bufs[0], backend='reference')


@pytest.mark.parametrize('value,exc', [(0, ValueError), (-1.0, ValueError), (float('inf'), ValueError),
                                       ('5', TypeError), (True, TypeError)])
def test_bad_timeout(value, exc):
    with pytest.raises(exc, match='^timeout_s:'):
        get_symm_buffer_for_mega_moe(None, E, TMAX, K, H, I, device='cpu', timeout_s=value, mma_type='fp8xnvfp4')


def test_timeout_default_and_env(monkeypatch):
    monkeypatch.delenv('DG_MEGA_MOE_TIMEOUT_S', raising=False)
    assert get_symm_buffer_for_mega_moe(None, E, TMAX, K, H, I, device='cpu', mma_type='fp8xnvfp4').timeout_s == 300.0
    assert get_symm_buffer_for_mega_moe(None, E, TMAX, K, H, I, device='cpu', timeout_s=2, mma_type='fp8xnvfp4').timeout_s == 2.0
    monkeypatch.setenv('DG_MEGA_MOE_TIMEOUT_S', '7.5')
    assert get_symm_buffer_for_mega_moe(None, E, TMAX, K, H, I, device='cpu', mma_type='fp8xnvfp4').timeout_s == 7.5
    monkeypatch.setenv('DG_MEGA_MOE_TIMEOUT_S', 'soon')
    with pytest.raises(ValueError, match='^DG_MEGA_MOE_TIMEOUT_S:'):
        get_symm_buffer_for_mega_moe(None, E, TMAX, K, H, I, device='cpu', mma_type='fp8xnvfp4')


# ------------------------------------------------------------------------------------------ the API
@pytest.fixture
def setup(make_problem, fake_weights):
    p = make_problem(seed=3, t=10, hidden=H, inter=I, experts=E, topk=K)
    buf = get_symm_buffer_for_mega_moe(None, E, TMAX, K, H, I, device='cpu', mma_type='fp8xnvfp4')
    buf.x[:p.t].copy_(p.x)
    buf.x_sf[:p.t].copy_(p.x_sf)
    buf.topk_idx[:p.t].copy_(p.topk_idx)
    buf.topk_weights[:p.t].copy_(p.topk_weights)
    l1 = fake_weights(p.w1, p.w1_alpha)
    l2 = fake_weights(p.w2, p.w2_alpha)
    y = torch.full((p.t, H), 7.0, dtype=torch.bfloat16)
    return p, buf, l1, l2, y


def test_api_reference_matches(setup):
    p, buf, l1, l2, y = setup
    stats = torch.zeros(E, dtype=torch.int32)
    out = fp8_nvfp4_mega_moe(y, l1, l2, buf, cumulative_local_expert_recv_stats=stats)
    assert out is y
    want = reference_mega_moe(p.x, p.x_sf, p.topk_idx, p.topk_weights, p.w1, p.w1_alpha, p.w2, p.w2_alpha)
    assert torch.equal(y, want)
    assert stats.sum().item() == (p.topk_idx >= 0).sum().item()
    y2 = torch.empty_like(y)
    fp8_nvfp4_mega_moe(y2, l1, l2, buf, backend='reference', activation_clamp=0.5)
    assert torch.equal(y2, reference_mega_moe(p.x, p.x_sf, p.topk_idx, p.topk_weights, p.w1, p.w1_alpha, p.w2,
                                              p.w2_alpha, activation_clamp=0.5))


def _bad_cases():
    """(description, mutate(setup) -> call kwargs, exception, regex the message must match)."""
    def call(**over):
        def f(p, buf, l1, l2, y):
            kw = dict(y=y, l1=l1, l2=l2, buffer=buf)
            for k, v in over.items():
                kw[k] = v(p, buf, l1, l2, y) if callable(v) else v
            return kw
        return f

    def set_idx(val):
        def f(p, buf, l1, l2, y):
            buf.topk_idx[2, 1] = val
            return dict(y=y, l1=l1, l2=l2, buffer=buf)
        return f

    return [
        ('y float32', call(y=lambda p, b, l1, l2, y: y.float()), TypeError, '^y: .*dtype'),
        ('y wrong hidden', call(y=lambda p, b, l1, l2, y: torch.zeros(p.t, H + 128, dtype=torch.bfloat16)),
         ValueError, '^y: .*shape'),
        ('y 1-D', call(y=lambda p, b, l1, l2, y: torch.zeros(H, dtype=torch.bfloat16)), ValueError, '^y: '),
        ('y non-contiguous', call(y=lambda p, b, l1, l2, y: torch.zeros(H, p.t, dtype=torch.bfloat16).t()),
         ValueError, '^y: .*contiguous'),
        ('y on another device', call(y=lambda p, b, l1, l2, y: torch.zeros(p.t, H, dtype=torch.bfloat16,
                                                                             device='meta')),
         ValueError, '^y: .*device|^y: .*meta'),
        ('y not a tensor', call(y=[[0.0]]), TypeError, '^y: '),
        ('too many tokens', call(y=lambda p, b, l1, l2, y: torch.zeros(TMAX + 1, H, dtype=torch.bfloat16)),
         ValueError, '^y: too many tokens'),
        ('expert id >= num_experts', set_idx(E), ValueError, '^buffer.topk_idx: expert id 8'),
        ('expert id < -1', set_idx(-5), ValueError, '^buffer.topk_idx: expert id -5'),
        ('stats int64', call(cumulative_local_expert_recv_stats=torch.zeros(E, dtype=torch.int64)), TypeError,
         '^cumulative_local_expert_recv_stats: '),
        ('stats wrong shape', call(cumulative_local_expert_recv_stats=torch.zeros(E + 1, dtype=torch.int32)),
         ValueError, '^cumulative_local_expert_recv_stats: '),
        ('stats non-contiguous', call(cumulative_local_expert_recv_stats=torch.zeros(2 * E, dtype=torch.int32)[::2]),
         ValueError, '^cumulative_local_expert_recv_stats: '),
        ('l1 and l2 swapped', call(l1=lambda p, b, l1, l2, y: l2, l2=lambda p, b, l1, l2, y: l1), ValueError, '^l1: '),
        ('l2 wrong k', call(l2=lambda p, b, l1, l2, y: type(l2)(torch.zeros(E, H, 2 * I), l2.alpha)),
         ValueError, '^l2: k'),
        ('l1 wrong expert count', call(l1=lambda p, b, l1, l2, y: type(l1)(l1.w[:4], l1.alpha[:4])),
         ValueError, '^l1: '),
        ('l1 mxfp4 with l2 nvfp4', call(l1=lambda p, b, l1, l2, y: type(l1)(l1.w, l1.alpha, 'mxfp4')),
         ValueError, '^l1: mxfp4 weights, l2 are nvfp4'),
        ('l1 fp8 into the nvfp4 API', call(l1=lambda p, b, l1, l2, y: type(l1)(l1.w, l1.alpha, 'fp8')),
         ValueError, '^l1: expected nvfp4 or mxfp4'),
        ('l1 alpha wrong shape', call(l1=lambda p, b, l1, l2, y: type(l1)(l1.w, l1.alpha[:, :1])),
         ValueError, '^l1.alpha: '),
        ('l1 not weights', call(l1=torch.zeros(3)), TypeError, '^l1: '),
        ('buffer wrong type', call(buffer=object()), TypeError, '^buffer: '),
        ('negative clamp', call(activation_clamp=-1.0), ValueError, '^activation_clamp: '),
        ('nan clamp', call(activation_clamp=float('nan')), ValueError, '^activation_clamp: '),
        ('string clamp', call(activation_clamp='1'), TypeError, '^activation_clamp: '),
        ('unknown backend', call(backend='sm80'), ValueError, '^backend: '),
        ('fast_math not bool', call(fast_math=1), TypeError, '^fast_math: '),
    ]


@pytest.mark.parametrize('case', _bad_cases(), ids=lambda c: c[0])
def test_api_rejects_bad_inputs(setup, case):
    _, mutate, exc, pattern = case
    kw = mutate(*setup)
    y_before = setup[4].clone()
    with pytest.raises(exc, match=pattern):
        fp8_nvfp4_mega_moe(**kw)
    assert torch.equal(setup[4], y_before)  # nothing was written


def test_gpu_backend_on_cpu_buffer(setup):
    p, buf, l1, l2, y = setup
    for backend in ('sm90', 'sm100'):
        with pytest.raises((ValueError, NotImplementedError), match='buffer|backend'):
            fp8_nvfp4_mega_moe(y, l1, l2, buf, backend=backend)


def test_mxfp4_api_args(setup, fake_weights):
    p, buf, l1, l2, y = setup
    m1, m2 = fake_weights(p.w1, torch.ones(E, 2), 'mxfp4'), fake_weights(p.w2, torch.ones(E, 1), 'mxfp4')
    with pytest.raises(ValueError, match="^sym_buffer: fp8_fp4_mega_moe requires a symmetric buffer of mma_type "
                                         "'fp8xfp4' or 'fp8xfp8', got 'fp8xnvfp4'"):
        fp8_fp4_mega_moe(y, m1, m2, buf)
    up = get_symm_buffer_for_mega_moe(None, E, TMAX, K, H, I, device='cpu')   # upstream's default kind
    assert up.mma_type == 'fp8xfp4'
    with pytest.raises(ValueError, match='^recipe: '):
        fp8_fp4_mega_moe(y, m1, m2, up, recipe=(1, 1, 128))
    with pytest.raises(ValueError, match='^activation: '):
        fp8_fp4_mega_moe(y, m1, m2, up, activation='gelu')
    with pytest.raises(ValueError, match='^l1_weights: expected mxfp4'):
        fp8_fp4_mega_moe(y, l1, l2, up)
    with pytest.raises(TypeError, match='^sym_buffer: '):
        fp8_fp4_mega_moe(y, m1, m2, None)
    with pytest.raises(ValueError, match='^situ_beta: '):
        fp8_fp4_mega_moe(y, m1, m2, up, situ_beta=1.0)
    with pytest.raises(ValueError, match='^shared_l1_weights: the buffer was made for 1 shared'):
        fp8_fp4_mega_moe(y, m1, m2, get_symm_buffer_for_mega_moe(None, E, TMAX, K, H, I, 1, device='cpu'))


# ------------------------------------------------------------- with the real kernel-side weight objects
def test_api_with_transformed_nvfp4_weights(make_problem):
    weights = pytest.importorskip('deep_gemm.weights')
    p = make_problem(seed=21, t=9, hidden=H, inter=I, experts=E, topk=K)
    l1, l2 = weights.transform_nvfp4_weights_for_mega_moe(p.l1, p.l2)
    buf = get_symm_buffer_for_mega_moe(None, E, TMAX, K, H, I, device='cpu', mma_type='fp8xnvfp4')
    buf.x[:p.t].copy_(p.x)
    buf.x_sf[:p.t].copy_(p.x_sf)
    buf.topk_idx[:p.t].copy_(p.topk_idx)
    buf.topk_weights[:p.t].copy_(p.topk_weights)
    y = torch.empty(p.t, H, dtype=torch.bfloat16)
    deep_gemm.fp8_nvfp4_mega_moe(y, l1, l2, buf, backend='reference')
    want = reference_mega_moe(p.x, p.x_sf, p.topk_idx, p.topk_weights, p.w1, p.w1_alpha, p.w2, p.w2_alpha)
    assert torch.equal(y, want)


def test_relative_error():
    ref = torch.tensor([3.0, 4.0])
    assert deep_gemm.utils.relative_error(ref.to(torch.bfloat16), ref) == 0.0
    assert abs(deep_gemm.utils.relative_error(torch.tensor([3.0, 5.0]), ref) - 0.2) < 1e-12
    with pytest.raises(ValueError, match='^out: NaN'):
        deep_gemm.utils.relative_error(torch.tensor([float('nan'), 4.0]), ref)


def test_set_num_sms_is_exported():
    """Upstream's ``deep_gemm.set_num_sms`` (the persistent kernels' grid, the fused Mega MoE's too)."""
    import deep_gemm
    assert deep_gemm.set_num_sms is deep_gemm.gemm.set_num_sms
    assert deep_gemm.m_grouped_fp8_nvfp4_gemm_nt_masked is deep_gemm.gemm.m_grouped_fp8_nvfp4_gemm_nt_masked
    with pytest.raises(ValueError, match='num_sms'):
        deep_gemm.set_num_sms(0)
