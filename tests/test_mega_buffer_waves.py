"""Prefill waves on CPU: the buffer's rows are sized by ``num_max_tokens_per_wave`` (W), its token
regions by ``num_max_tokens_per_rank`` (T); the default W; how many waves a call runs; argument
checks; the size formula and figures of the buffer's docstring; and the sm90 host loop (kernel
launches recorded instead of run): each wave passes the per-token offsets and tensors of its first
token, its own token count and W, on one rank and on emulated ranks.  The GPU side of the same
(bitwise equal to an unwaved buffer, CUDA graphs): tests/gpu/test_mega_ep.py."""
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import deep_gemm
from deep_gemm import gemm, get_symm_buffer_for_mega_moe, get_symm_buffer_size_for_mega_moe
from deep_gemm.mega import buffer as buffer_mod
from deep_gemm.mega.buffer import (DEFAULT_MAX_RECV_ROWS, SymmBuffer, default_num_max_tokens_per_wave,
                                   get_symm_buffer_layout)

H, I, E, K = 256, 128, 8, 4
TOKEN_REGIONS = ('x', 'x_sf', 'topk_idx', 'topk_weights', 'pair_row')
ROW_REGIONS = ('l1_x', 'l1_src', 'l1_topk_weights', 'l2_x', 'combine')
DSV4 = dict(num_experts=384, num_topk=6, hidden=7168, intermediate_hidden=3072)


# ---------------------------------------------------------------------------------------- layout
def test_rows_follow_the_wave_tokens_follow_t():
    t, w = 96, 32
    for ranks in (1, 2, 4):
        full = get_symm_buffer_layout(ranks, E, t, K, H, I, mma_type='fp8xnvfp4')
        waved = get_symm_buffer_layout(ranks, E, t, K, H, I, num_max_tokens_per_wave=w, mma_type='fp8xnvfp4')
        r_w = ranks * w * min(K, E // ranks)
        for name in TOKEN_REGIONS:
            assert waved[name].shape == full[name].shape and waved[name].shape[0] == t, name
        for name in ROW_REGIONS:
            assert waved[name].shape[0] == r_w, name
            assert full[name].shape[0] == ranks * t * min(K, E // ranks), name
        assert waved['work'].shape == (8 + 4 * (E // ranks) + 3 * r_w,)
        # the pushed combine rows: one per (token, slot) of a wave, with peers only
        assert waved['combine_in'].shape[0] == (w * K if ranks > 1 else 0)
        assert full['combine_in'].shape[0] == (t * K if ranks > 1 else 0)
        small = get_symm_buffer_size_for_mega_moe(ranks, E, t, K, H, I, num_max_tokens_per_wave=w, mma_type='fp8xnvfp4')
        big = get_symm_buffer_size_for_mega_moe(ranks, E, t, K, H, I, mma_type='fp8xnvfp4')
        assert small < big
        # W = T is the unwaved layout
        assert get_symm_buffer_size_for_mega_moe(ranks, E, t, K, H, I, num_max_tokens_per_wave=t, mma_type='fp8xnvfp4') == big


def test_buffer_views_and_token_offsets():
    buf = get_symm_buffer_for_mega_moe(None, E, 96, K, H, I, device='cpu', num_max_tokens_per_wave=32, mma_type='fp8xnvfp4')
    assert buf.num_max_tokens_per_wave == 32 and buf.num_max_tokens_per_rank == 96
    assert buf.num_bytes == buf.raw.numel() == get_symm_buffer_size_for_mega_moe(1, E, 96, K, H, I,
                                                                                  num_max_tokens_per_wave=32, mma_type='fp8xnvfp4')
    assert buf.x.shape == (96, H) and buf.region('l1_x').shape == (32 * K, H)
    base = buf.raw.data_ptr()
    # the offsets a wave passes to the kernels address the rows the local slices start at
    for name in TOKEN_REGIONS:
        for t0 in (0, 32, 64):
            assert buf.offset(name, t0) == buf.region(name)[t0].data_ptr() - base, (name, t0)
    assert buf.offset('x', 5) - buf.offset('x') == 5 * H
    assert buf.offset('x_sf', 5) - buf.offset('x_sf') == 5 * (H // 32) * 4
    assert buf.offset('topk_idx', 5) - buf.offset('topk_idx') == 5 * K * 8
    assert buf.offset('topk_weights', 5) - buf.offset('topk_weights') == 5 * K * 4
    assert buf.offset('pair_row', 5) - buf.offset('pair_row') == 5 * K * 4
    assert 'tokens_per_wave=32' in repr(buf)


# ------------------------------------------------------------------------------------ default W
@pytest.mark.parametrize('ranks,t,want', [
    (1, 4096, 4096),      # 24576 rows: no waves
    (1, 8192, 8192),      # 49152 rows
    (1, 16384, 8192),     # 98304 rows > 65536: at most 65536 // 6 = 10922 per wave -> 2 even waves
    (4, 4096, 2048),      # 98304 rows: at most 65536 // 24 = 2730 -> 2 waves
    (8, 4096, 1024),      # at most 65536 // 48 = 1365 -> 4 waves
    (8, 8192, 1171),      # 1365 -> 7 waves of ceil(8192 / 7)
])
def test_default_wave_at_dsv4_shape(ranks, t, want):
    w = default_num_max_tokens_per_wave(ranks, DSV4['num_experts'], t, DSV4['num_topk'])
    assert w == want
    lay = get_symm_buffer_layout(ranks, DSV4['num_experts'], t, DSV4['num_topk'], DSV4['hidden'],
                                 DSV4['intermediate_hidden'], mma_type='fp8xnvfp4')
    assert lay['l1_x'].shape[0] == ranks * want * 6 <= DEFAULT_MAX_RECV_ROWS
    assert lay['x'].shape[0] == t
    if want < t:   # the fewest waves whose rows fit, evenly sized
        n = -(-t // want)
        largest = DEFAULT_MAX_RECV_ROWS // (ranks * 6)
        assert -(-t // largest) == n and (n - 1) * want < t <= n * want


def test_default_wave_with_fewer_local_experts_than_topk():
    # 2 local experts: a token sends at most 2 pairs to one rank
    assert default_num_max_tokens_per_wave(8, 16, 4096, 6) == 4096          # 8 * 4096 * 2 = 65536
    assert default_num_max_tokens_per_wave(8, 16, 4097, 6) == 2049          # 2 even waves
    assert default_num_max_tokens_per_wave(128, 128, 4096, 6) == 512       # one local expert: 65536 // 128
    assert default_num_max_tokens_per_wave(1, 8, 70000, 8) == 7778          # 9 waves of at most 8192


def test_buffer_takes_the_default_wave():
    # one rank, 8 slots per token: 8200 tokens need 65600 rows > 65536, so two even waves of 4100
    buf = get_symm_buffer_for_mega_moe(None, 8, 8200, 8, 128, 128, device='cpu', mma_type='fp8xnvfp4')
    assert buf.num_max_tokens_per_wave == 4100
    assert buf.region('l1_x').shape == (32800, 128) and buf.x.shape == (8200, 128)
    assert buf.waves(8200) == [(0, 4100), (4100, 4100)]
    assert get_symm_buffer_for_mega_moe(None, 8, 8192, 8, 128, 128, device='cpu', mma_type='fp8xnvfp4').num_max_tokens_per_wave == 8192


# ------------------------------------------------------------------------------------- num_waves
def test_num_waves_one_rank():
    buf = get_symm_buffer_for_mega_moe(None, E, 100, K, H, I, device='cpu', num_max_tokens_per_wave=32, mma_type='fp8xnvfp4')
    assert [buf.num_waves(n) for n in (0, 1, 32, 33, 64, 65, 100)] == [0, 1, 1, 2, 2, 3, 4]
    assert buf.waves(0) == []
    assert buf.waves(40) == [(0, 32), (32, 8)]            # trailing waves skipped
    assert buf.waves(100) == [(0, 32), (32, 32), (64, 32), (96, 4)]
    with pytest.raises(ValueError, match='^num_tokens: 101 > num_max_tokens_per_rank = 100'):
        buf.num_waves(101)
    with pytest.raises(ValueError, match='^num_tokens:'):
        buf.num_waves(-1)
    assert get_symm_buffer_for_mega_moe(None, E, 100, K, H, I, device='cpu', mma_type='fp8xnvfp4').num_waves(100) == 1


def test_num_waves_several_ranks():
    """Every rank runs ceil(T / W) waves whatever its own token count: the barriers pair up."""
    bufs = SymmBuffer.emulated_group(2, E, 96, K, H, I, device='cpu', num_max_tokens_per_wave=32, mma_type='fp8xnvfp4')
    assert all(b.num_max_tokens_per_wave == 32 for b in bufs)
    for n in (0, 1, 50, 96):
        assert bufs[1].num_waves(n) == 3, n
    assert bufs[1].waves(50) == [(0, 32), (32, 18), (64, 0)]
    assert bufs[0].waves(0) == [(0, 0), (32, 0), (64, 0)]
    assert bufs[0].waves(96) == [(0, 32), (32, 32), (64, 32)]
    unwaved = SymmBuffer.emulated_group(2, E, 96, K, H, I, device='cpu', mma_type='fp8xnvfp4')
    assert unwaved[0].num_max_tokens_per_wave == 96 and unwaved[0].waves(5) == [(0, 5)]
    assert unwaved[1].waves(0) == [(0, 0)]


# ------------------------------------------------------------------------------------ arguments
@pytest.mark.parametrize('value,exc', [(0, ValueError), (-4, ValueError), (97, ValueError), (32.0, TypeError),
                                       (True, TypeError), ('32', TypeError)])
def test_bad_tokens_per_wave(value, exc):
    pattern = '^num_max_tokens_per_wave:'
    with pytest.raises(exc, match=pattern):
        get_symm_buffer_layout(1, E, 96, K, H, I, num_max_tokens_per_wave=value, mma_type='fp8xnvfp4')
    with pytest.raises(exc, match=pattern):
        get_symm_buffer_size_for_mega_moe(2, E, 96, K, H, I, num_max_tokens_per_wave=value, mma_type='fp8xnvfp4')
    with pytest.raises(exc, match=pattern):
        get_symm_buffer_for_mega_moe(None, E, 96, K, H, I, device='cpu', num_max_tokens_per_wave=value, mma_type='fp8xnvfp4')
    with pytest.raises(exc, match=pattern):
        SymmBuffer.emulated_group(2, E, 96, K, H, I, device='cpu', num_max_tokens_per_wave=value, mma_type='fp8xnvfp4')


def test_more_than_t_names_both_limits():
    with pytest.raises(ValueError, match=r'^num_max_tokens_per_wave: 97 > num_max_tokens_per_rank = 96'):
        get_symm_buffer_layout(1, E, 96, K, H, I, num_max_tokens_per_wave=97, mma_type='fp8xnvfp4')


def test_upstream_positional_arguments_unchanged():
    # upstream's order: (group, E, T, k, H, I, num_shared_experts, use_fp8_dispatch, mma_type, activation)
    buf = get_symm_buffer_for_mega_moe(None, E, 16, K, H, I, 0, None, 'fp8xnvfp4', 'swiglu', device='cpu',
                                       timeout_s=5.0)
    assert buf.timeout_s == 5.0 and buf.device == torch.device('cpu') and buf.num_max_tokens_per_wave == 16
    assert buf.mma_type == 'fp8xnvfp4' and buf.activation == 'swiglu' and buf.num_shared_experts == 0
    assert get_symm_buffer_size_for_mega_moe(1, E, 16, K, H, I, mma_type='fp8xnvfp4') == buf.num_bytes
    # our extras are keyword-only: the old positional device / timeout land on upstream's arguments and fail
    with pytest.raises(TypeError, match='num_shared_experts: expected an int, got str'):
        get_symm_buffer_for_mega_moe(None, E, 16, K, H, I, 'cpu', 5.0)
    with pytest.raises(TypeError):
        get_symm_buffer_size_for_mega_moe(1, E, 16, K, H, I, 8, mma_type='fp8xnvfp4')


# ------------------------------------------------------------------------------ docstring figures
def _formula(ranks, experts, t, w, k, h, i):
    r_w = ranks * w * min(k, experts // ranks)
    p_w = w * k if ranks > 1 else 0
    return t * (9 * h // 8 + 16 * k) + r_w * (4 * h + 2 * i + 32) + p_w * 2 * h


@pytest.mark.parametrize('ranks,experts,t,w,k,h,i', [
    (1, 8, 4096, 4096, 6, 7168, 3072), (4, 32, 4096, 2048, 6, 7168, 3072), (8, 64, 8192, 1171, 6, 7168, 3072),
    (1, 8, 1, 1, 1, 128, 128), (2, 8, 100, 7, 6, 256, 384), (4, 8, 96, 32, 6, 512, 256), (8, 384, 33, 33, 8, 128, 256),
    (3, 3, 50, 50, 1, 384, 128),
])
def test_docstring_size_formula(ranks, experts, t, w, k, h, i):
    assert 'T x (9 H / 8 + 16 k) + R_w x (4 H + 2 I + 32) + P_w x 2 H' in buffer_mod.__doc__
    assert 'less than ``2176 + 20 E_l + 8 ranks``' in buffer_mod.__doc__
    size = get_symm_buffer_size_for_mega_moe(ranks, experts, t, k, h, i, num_max_tokens_per_wave=w, mma_type='fp8xnvfp4')
    extra = size - _formula(ranks, experts, t, w, k, h, i)
    assert 0 <= extra < 2176 + 20 * (experts // ranks) + 8 * ranks, extra


def test_docstring_worked_figures():
    doc = ' '.join(buffer_mod.__doc__.split())
    h, i, k = 7168, 3072, 6
    cases = [  # (ranks, T, W or None for the default, the docstring's words)
        (1, 4096, None, 'one rank, W = T (the default): {} GB'),
        (4, 4096, 4096, '4 ranks, W = T: {} GB per rank'),
        (4, 4096, None, 'with the default W = 2048 (2 waves): {} GB'),
        (4, 4096, 1024, 'with W = 1024 (4 waves): {} GB'),
        (8, 8192, 8192, 'T = 8192: {} GB with W = T'),
        (8, 8192, None, '{} GB with the default W = 1171 (7 waves)'),
    ]
    for ranks, t, w, words in cases:
        size = get_symm_buffer_size_for_mega_moe(ranks, 8 * ranks, t, k, h, i, num_max_tokens_per_wave=w, mma_type='fp8xnvfp4')
        assert words.format(f'{size / 1e9:.2f}') in doc, (ranks, t, w, size)
    assert default_num_max_tokens_per_wave(4, 32, 4096, 6) == 2048
    assert default_num_max_tokens_per_wave(8, 64, 8192, 6) == 1171 and -(-8192 // 1171) == 7


# ---------------------------------------------------------------------- the sm90 host wave loop
def _kernel_params(header: str, name: str):
    """Parameter names of a kernel, from its source (the launch arguments must line up with them)."""
    src = (Path(deep_gemm.__file__).parent / 'include' / 'deep_gemm' / 'impls' / header).read_text()
    m = re.search(r'__global__[^{]*?\b' + name + r'\(([^)]*)\)', src)
    assert m, name
    return [p.split()[-1].strip('*&') for p in m.group(1).split(',')]


class Recorder:
    """Stands in for the JIT: records every launch as {parameter name: argument}."""

    def __init__(self, monkeypatch):
        from deep_gemm import gemm
        from deep_gemm.jit import runtime, tma
        from deep_gemm.mega import kernels, sm90
        self.launches = []
        self.params = {spec.name: _kernel_params(spec.header, spec.name)
                       for spec in (kernels.BARRIER, kernels.DISPATCH_LAYOUT, kernels.DISPATCH_GATHER,
                                    kernels.COMBINE, sm90.FUSED)}
        monkeypatch.setattr(kernels, '_kernel', lambda spec, buffer, **p: spec.name)
        monkeypatch.setattr(runtime, 'launch', self._launch)
        monkeypatch.setattr(gemm, 'm_grouped_fp8_nvfp4_gemm_nt_contiguous', self._gemm)
        monkeypatch.setattr(gemm, 'get_num_sms', lambda: 132)
        monkeypatch.setattr(sm90, 'prepare', lambda *a, **kw: None)
        monkeypatch.setattr(sm90, '_fused_config', lambda buffer, l1, expected_m, fast_math, trace=False,
                            l1_epilogue='swiglu', l2_epilogue='plain':
                            ((sm90.FUSED.name, expected_m, l1_epilogue, l2_epilogue), 16, 2, 4096))
        monkeypatch.setattr(tma, 'make_tma_2d', lambda t, *a: ('tma', t.data_ptr()))
        monkeypatch.setattr(SymmBuffer, 'error_record_ptr', 0)   # CPU buffers have no host-mapped record

    def _launch(self, kernel, grid, block, smem, args):
        name = kernel[0] if isinstance(kernel, tuple) else kernel
        names = self.params[name]
        assert len(args) == len(names), f'{name}: {len(args)} arguments for {len(names)} parameters'
        rec = {n: getattr(a, 'value', a) for n, a in zip(names, args)}
        rec['kernel'], rec['config'] = name, kernel
        self.launches.append(rec)

    def _gemm(self, a, b, d, offsets, expected_m=None, **kw):
        self.launches.append({'kernel': 'gemm', 'expected_m': expected_m})

    def kernels(self):
        return [r['kernel'] for r in self.launches]


def _weights(num_alpha):
    z = torch.zeros(1)
    return SimpleNamespace(codes=z, scales=z, alpha=torch.zeros(1, num_alpha))


L1, L2 = _weights(2), _weights(1)


def _check_routing_offsets(buf, rec, t0, names=('topk_idx_offset', 'topk_weights_offset', 'pair_row_offset')):
    for pname, region in zip(names, ('topk_idx', 'topk_weights', 'pair_row')):
        assert rec[pname] == buf.offset(region, t0), (pname, t0)


def _no_tile_floor(monkeypatch):
    # the block-size hint's wave arithmetic, without the tile floors of sm90._expected_m
    from deep_gemm.mega import sm90
    monkeypatch.setattr(sm90, '_MIN_TILE_ROWS', 1)
    monkeypatch.setattr(sm90, '_MIN_TILE_ROWS_BUSY', 1)


def test_sequence_waves_one_rank(monkeypatch):
    from deep_gemm.mega import sm90
    _no_tile_floor(monkeypatch)
    r = Recorder(monkeypatch)
    buf = get_symm_buffer_for_mega_moe(None, E, 96, K, H, I, device='cpu', num_max_tokens_per_wave=32, mma_type='fp8xnvfp4')
    y = torch.empty(40, H, dtype=torch.bfloat16)
    stats = torch.zeros(E, dtype=torch.int32)
    sm90.run_sequence(y, L1, L2, buf, stats)
    per_wave = ['smxx_moe_dispatch_layout', 'smxx_moe_dispatch_gather', 'gemm', 'gemm', 'smxx_moe_combine']
    assert r.kernels() == per_wave * 2          # 40 tokens: waves of 32 and 8, the third skipped
    layouts = [x for x in r.launches if x['kernel'] == 'smxx_moe_dispatch_layout']
    gathers = [x for x in r.launches if x['kernel'] == 'smxx_moe_dispatch_gather']
    combines = [x for x in r.launches if x['kernel'] == 'smxx_moe_combine']
    for (t0, n), lay, gat, com in zip([(0, 32), (32, 8)], layouts, gathers, combines):
        _check_routing_offsets(buf, lay, t0)
        assert lay['num_tokens'] == n and lay['max_tokens'] == 32 and lay['stats'] is stats
        assert lay['max_rows'] == 32 * K == buf.region('l1_src').shape[0]
        assert gat['x_offset'] == buf.offset('x', t0) and gat['x_sf_offset'] == buf.offset('x_sf', t0)
        assert com['combine_offset'] == buf.offset('combine')
        assert com['topk_idx'].data_ptr() == buf.topk_idx[t0].data_ptr()
        assert com['pair_row'].data_ptr() == buf.region('pair_row')[t0].data_ptr()
        assert com['y'].data_ptr() == y[t0].data_ptr() and com['y'].shape == (n, H)
    # the block-size hint of a wave: 32 tokens x 4 slots over 8 experts, not 40 x 4 / 8
    assert {x['expected_m'] for x in r.launches if x['kernel'] == 'gemm'} == {16}
    # compute-only and communication-only passes loop over the same waves
    r.launches.clear()
    sm90.run_sequence(y, L1, L2, buf, comm=False)
    assert r.kernels() == ['gemm', 'gemm'] * 2
    r.launches.clear()
    sm90.run_sequence(y, L1, L2, buf, compute=False)
    assert r.kernels() == ['smxx_moe_dispatch_layout', 'smxx_moe_dispatch_gather', 'smxx_moe_combine'] * 2
    r.launches.clear()
    sm90.run(y[:0], L1, L2, buf, fused=False)
    assert r.launches == []


def test_sequence_waves_emulated_ranks(monkeypatch):
    from deep_gemm.mega import sm90
    _no_tile_floor(monkeypatch)
    r = Recorder(monkeypatch)
    bufs = SymmBuffer.emulated_group(2, E, 96, K, H, I, device='cpu', num_max_tokens_per_wave=32, mma_type='fp8xnvfp4')
    y = torch.empty(50, H, dtype=torch.bfloat16)
    sm90.run_sequence(y, L1, L2, bufs[1])
    per_wave = ['smxx_moe_barrier', 'smxx_moe_dispatch_layout', 'smxx_moe_dispatch_gather', 'gemm', 'gemm',
                'smxx_moe_barrier']
    # waves of 32, 18 and 0 tokens: the empty one still signals, routes peers' pairs and runs the experts
    assert r.kernels() == (per_wave + ['smxx_moe_combine']) * 2 + per_wave
    barriers = [x for x in r.launches if x['kernel'] == 'smxx_moe_barrier']
    assert [(x['phase'], x['num_tokens']) for x in barriers] == [(0, 32), (1, 32), (0, 18), (1, 18), (0, 0), (1, 0)]
    assert all(x['rank'] == 1 and x['num_ranks'] == 2 for x in barriers)
    layouts = [x for x in r.launches if x['kernel'] == 'smxx_moe_dispatch_layout']
    for (t0, n), lay in zip([(0, 32), (32, 18), (64, 0)], layouts):
        _check_routing_offsets(bufs[1], lay, t0)
        assert lay['num_tokens'] == n and lay['max_tokens'] == 32 and lay['max_rows'] == 2 * 32 * K
    # the hint is the same for every wave and every rank with at least W tokens: one set of kernels
    # (32 tokens x 4 slots x 2 ranks over 8 experts)
    assert {x['expected_m'] for x in r.launches if x['kernel'] == 'gemm'} == {32}
    r.launches.clear()
    sm90.run_sequence(y[:0], L1, L2, bufs[1])
    assert r.kernels().count('smxx_moe_barrier') == 6 and 'smxx_moe_combine' not in r.kernels()


@pytest.mark.parametrize('ranks,count,waves,hint', [(1, 40, [(0, 32), (32, 8)], 16),
                                                    (2, 50, [(0, 32), (32, 18), (64, 0)], 32)])
def test_fused_waves(monkeypatch, ranks, count, waves, hint):
    from deep_gemm.mega import sm90
    _no_tile_floor(monkeypatch)
    r = Recorder(monkeypatch)
    if ranks == 1:
        buf = get_symm_buffer_for_mega_moe(None, E, 96, K, H, I, device='cpu', num_max_tokens_per_wave=32, mma_type='fp8xnvfp4')
    else:
        buf = SymmBuffer.emulated_group(ranks, E, 96, K, H, I, device='cpu', num_max_tokens_per_wave=32, mma_type='fp8xnvfp4')[-1]
    y = torch.empty(count, H, dtype=torch.bfloat16)
    stats = torch.zeros(buf.num_experts_per_rank, dtype=torch.int32)
    sm90.run(y, L1, L2, buf, stats, fused=True)
    assert r.kernels() == ['sm90_fp8_nvfp4_mega_moe'] * len(waves)
    for (t0, n), rec in zip(waves, r.launches):
        _check_routing_offsets(buf, rec, t0, ('topk_idx_off', 'topk_weights_off', 'pair_row_off'))
        assert rec['x_off'] == buf.offset('x', t0) and rec['x_sf_off'] == buf.offset('x_sf', t0)
        assert rec['combine_off'] == buf.offset('combine') and rec['meta_off'] == buf.offset('meta')
        # one wave's pushed rows at a time: not shifted by the wave; nothing to push on one rank
        assert rec['combine_in_off'] == buf.offset('combine_in') and rec['push_combine'] == int(ranks > 1)
        assert rec['num_tokens'] == n and rec['max_tokens'] == 32 and rec['stats'] is stats
        assert rec['max_rows'] == ranks * 32 * K == rec['l1_x'].shape[0]
        assert rec['topk_idx'].data_ptr() == buf.topk_idx[t0].data_ptr()
        assert rec['pair_row'].data_ptr() == buf.region('pair_row')[t0].data_ptr()
        assert rec['y'].shape == (n, H) and (n == 0 or rec['y'].data_ptr() == y[t0].data_ptr())
        # one kernel configuration for every wave, from the per-wave token count (32 x 4 x ranks / 8)
        assert rec['config'] == (sm90.FUSED.name, hint, 'swiglu', 'plain')
    if ranks == 1:
        r.launches.clear()
        sm90.run(y[:0], L1, L2, buf, fused=True)
        assert r.launches == []


@pytest.mark.parametrize('world,tokens,block_t', [
    (1, 1, 32), (1, 24, 32), (1, 26, 64), (1, 64, 64), (2, 32, 64), (1, 128, 64), (1, 130, 128), (1, 200, 128),
    (2, 96, 128), (1, 4096, 256)])
def test_token_tile_choice(monkeypatch, world, tokens, block_t):
    """The token tile of a call: the mean rows per local expert (tokens x top-k x ranks / experts, E = 8,
    top-4), but at least 32 rows, and at least 64 once the mean exceeds 12 rows, so that the busiest
    experts of uneven routing do not stream their weights once per small tile; tiles of up to 64 rows
    run two CTAs per SM; the fused kernel and the sequence's GEMMs agree; the env override wins."""
    from deep_gemm.mega import sm90
    bufs = SymmBuffer.emulated_group(world, E, 4096, K, H, I, device='cpu', mma_type='fp8xnvfp4') if world > 1 else \
        [get_symm_buffer_for_mega_moe(None, E, 4096, K, H, I, device='cpu', mma_type='fp8xnvfp4')]
    monkeypatch.delenv('DG_GROUPED_GEMM_BLOCK_T', raising=False)
    assert sm90.block_t_for(bufs[-1], tokens) == block_t
    assert gemm._block_t(sm90._expected_m(bufs[-1], tokens)) == block_t
    monkeypatch.delenv('DG_GROUPED_GEMM_CTAS_PER_SM', raising=False)
    assert gemm._ctas_per_sm(block_t) == (2 if block_t <= 64 else 1)
    monkeypatch.setenv('DG_GROUPED_GEMM_BLOCK_T', '8')
    assert sm90.block_t_for(bufs[-1], tokens) == 8


@pytest.mark.parametrize('mma_type,l1_epilogue,l2_epilogue', [('fp4xfp4', 'swiglu_nvfp4', 'weighted'),
                                                              ('fp8xfp4', 'swiglu_fp8', 'plain'),
                                                              ('bf16xbf16', 'swiglu_bf16', 'plain')])
def test_fused_upstream_waves(monkeypatch, mma_type, l1_epilogue, l2_epilogue):
    """run_upstream on the fused kernel (DG_MEGA_MOE_FUSED not '0'): one launch per wave with the recipe's
    variant, alphas, epi scales, the token format's scale offset, the wave's shared rows and the combine's
    routed scaling / order; DG_MEGA_MOE_FUSED=0 runs the sequence."""
    from deep_gemm.mega import kernels, sm90
    _no_tile_floor(monkeypatch)
    r = Recorder(monkeypatch)
    buf = get_symm_buffer_for_mega_moe(None, E, 96, K, 512, 512, device='cpu', num_max_tokens_per_wave=32, mma_type=mma_type)
    fmt = sm90.UPSTREAM_WEIGHTS[mma_type]
    l1, l2 = (SimpleNamespace(fmt=fmt, **vars(w)) for w in (L1, L2))
    recipe = sm90.upstream_recipe(mma_type, E, 'cpu', routed_scaling_factor=0.75 if mma_type == 'fp4xfp4' else 1.0)
    y = torch.empty(40, 512, dtype=torch.bfloat16)
    shared = torch.zeros(40, 512, dtype=torch.bfloat16)
    monkeypatch.setenv('DG_MEGA_MOE_FUSED', '1')
    sm90.run_fused(y, l1, l2, buf, None, recipe=recipe, shared=shared)
    assert r.kernels() == ['sm90_fp8_nvfp4_mega_moe'] * 2
    for (t0, n), rec in zip([(0, 32), (32, 8)], r.launches):
        assert rec['config'][2:] == (l1_epilogue, l2_epilogue)
        assert rec['x_off'] == buf.offset('x', t0) and rec['x_sf_off'] == kernels._x_sf_offset(buf, t0)
        assert rec['l1_alpha'] is (recipe.l1_alpha if recipe.l1_alpha is not None else l1.alpha)
        assert rec['l2_alpha'] is (recipe.l2_alpha if recipe.l2_alpha is not None else l2.alpha)
        assert rec['epi_scales'] is recipe.epi_scales
        assert rec['shared_rows'].data_ptr() == shared[t0].data_ptr() and rec['shared_rows'].shape[0] == n
        assert rec['rsf'] == pytest.approx(recipe.routed_scaling_factor)
        assert rec['nvfp4_combine'] == int(mma_type == 'fp4xfp4')
    r.launches.clear()
    sm90.run_upstream(y, l1, l2, buf, recipe)
    assert r.kernels() == ['sm90_fp8_nvfp4_mega_moe'] * 2 and r.launches[0]['shared_rows'] is None
    r.launches.clear()
    monkeypatch.setenv('DG_MEGA_MOE_FUSED', '0')
    sm90.run_upstream(y, l1, l2, buf, recipe)
    assert 'sm90_fp8_nvfp4_mega_moe' not in r.kernels() and 'smxx_moe_combine' in r.kernels()
