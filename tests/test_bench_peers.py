"""CPU tests of the benchmark peers' host-side logic (scripts/peers/, the benchmark flags, scripts/gpu_session.sh).

No GPU: the Marlin op is replaced by a torch model of its documented semantics, so that the layout
transforms, the block table and the MoE chain are checked end to end; the SGLang worker's quantizers
and reference are checked against plain loops.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.peers import marlin_nvfp4 as mp  # noqa: E402
from scripts.peers import sgl_mega_moe as sp  # noqa: E402
from scripts.peers import unavailable, ratio  # noqa: E402

# The schema string in vllm 0.20.2's _moe_C.abi3.so (`strings`), as registered.
MARLIN_SCHEMA = ('moe_wna16_marlin_gemm(Tensor! a, Tensor? c_or_none,Tensor! b_q_weight, Tensor? b_bias_or_none,'
                 'Tensor! b_scales, Tensor? a_scales, Tensor? global_scale, Tensor? b_zeros_or_none,'
                 'Tensor? g_idx_or_none, Tensor? perm_or_none, Tensor! workspace,Tensor sorted_token_ids,'
                 'Tensor! expert_ids, Tensor! num_tokens_past_padded,Tensor! topk_weights, int moe_block_size, '
                 'int top_k, bool mul_topk_weights, int b_type_id,int size_m, int size_n, int size_k,'
                 'bool is_full_k, bool use_atomic_add,bool use_fp32_reduce, bool is_zp_float,int thread_k, '
                 'int thread_n, int blocks_per_sm) -> Tensor')


# ------------------------------------------------------------------------------------ type ids, heuristics
def test_scalar_type_ids():
    # both ids appear in the mangled names of the binary's NVFP4 Marlin kernels
    assert mp.FLOAT4_E2M1F_ID == 562949953487106
    assert mp.scalar_type_id(8, 7, True) == 1125899906909960          # bfloat16 (IEEE NaNs)
    assert mp.scalar_type_id(4, 3, True, 0, True, 2) != mp.FLOAT4_E2M1F_ID


@pytest.mark.parametrize('per_expert,expected', [(1, 8), (4, 8), (7, 8), (8, 16), (14, 16), (16, 32), (28, 32),
                                                 (32, 48), (43, 48), (48, 64), (64, 64), (4096, 64)])
def test_moe_block_size(per_expert, expected):
    assert mp.moe_block_size(per_expert * 32, 1, 32) == expected
    assert mp.moe_block_size(per_expert * 8, 6, 48) == expected


def test_schema_names_and_values():
    names = mp.parse_schema_arg_names(MARLIN_SCHEMA)
    assert names[:3] == ['a', 'c_or_none', 'b_q_weight'] and names[-1] == 'blocks_per_sm' and len(names) == 29
    w = mp.MarlinWeights(torch.zeros(2, 4, 128, dtype=torch.int32), torch.zeros(2, 4, 64, dtype=torch.uint8),
                         torch.ones(2), 64, 64, 1.0)
    al = mp.moe_align_block_size(torch.tensor([[0], [1], [1]]), 2, 8)
    a, tw, ws = torch.zeros(3, 64), torch.ones(3, 1), torch.zeros(4, dtype=torch.int32)
    args = mp.build_args(names, mp.gemm_values(a, None, w, al, tw, 1, True, ws))
    by = dict(zip(names, args))
    assert by['a'] is a and by['c_or_none'] is None and by['b_q_weight'] is w.qweight
    assert by['b_type_id'] == mp.FLOAT4_E2M1F_ID and by['moe_block_size'] == 8 and by['top_k'] == 1
    assert (by['size_m'], by['size_n'], by['size_k']) == (3, 64, 64)
    assert by['mul_topk_weights'] is True and by['use_fp32_reduce'] is True and by['use_atomic_add'] is False
    assert by['sorted_token_ids'] is al.sorted_token_ids and by['workspace'] is ws
    with pytest.raises(KeyError, match='brand_new_arg'):
        mp.build_args(names + ['brand_new_arg'], mp.gemm_values(a, None, w, al, tw, 1, True, ws))


# ------------------------------------------------------------------------------------ block table
def naive_align(ids, num_experts, block_size):
    flat = ids.reshape(-1).tolist()
    numel = len(flat)
    total = numel + num_experts * (block_size - 1)
    if numel < num_experts:
        total = min(numel * block_size, total)
    sorted_ids, experts = [], []
    for e in range(num_experts):
        slots = [i for i, v in enumerate(flat) if v == e]
        if not slots:
            continue
        pad = -len(slots) % block_size
        sorted_ids += slots + [numel] * pad
        experts += [e] * ((len(slots) + pad) // block_size)
    post = len(sorted_ids)
    sorted_ids += [numel] * (total - post)
    experts += [0] * (-(-total // block_size) - len(experts))
    return sorted_ids, experts, post


@pytest.mark.parametrize('tokens,topk,experts,bs', [(16, 2, 4, 8), (5, 1, 8, 16), (3, 2, 32, 8), (64, 6, 8, 64),
                                                    (100, 3, 7, 48), (1, 1, 1, 8)])
def test_moe_align_matches_naive(tokens, topk, experts, bs):
    gen = torch.Generator().manual_seed(tokens * 31 + experts)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:topk] for _ in range(tokens)]) if topk <= experts \
        else torch.randint(0, experts, (tokens, topk), generator=gen)
    al = mp.moe_align_block_size(ids.to(torch.int32), experts, bs)
    ref_sorted, ref_experts, ref_post = naive_align(ids, experts, bs)
    assert al.sorted_token_ids.dtype == torch.int32 and al.expert_ids.dtype == torch.int32
    assert al.sorted_token_ids.tolist() == ref_sorted
    assert al.expert_ids.tolist() == ref_experts
    assert al.num_tokens_post_padded.tolist() == [ref_post]
    assert al.block_size == bs and ref_post % bs == 0


def test_moe_align_skips_out_of_range_ids():
    ids = torch.tensor([[0, 3], [-1, 1], [1, 5]])
    al = mp.moe_align_block_size(ids, 4, 4)
    valid = al.sorted_token_ids[:int(al.num_tokens_post_padded)]
    assert sorted(v for v in valid.tolist() if v < ids.numel()) == [0, 1, 3, 4]
    assert int(al.num_tokens_post_padded) == 12


# ------------------------------------------------------------------------------------ weight layout
def literal_marlin_repack(packed):
    """The GPTQ -> Marlin repack spelled out with loops: codes [K, N] (k = row), 16x16 tiles laid out
    tile-row by tile-row (tile (kt, nt) holds codes [16 kt + r, 16 nt + c] at r * 16 + c), every 1024
    values permuted by weight_perm, then 8 codes per int32, code i at bits 4 i."""
    n, k = packed.shape[0], packed.shape[1] * 2
    code = [[0] * n for _ in range(k)]
    for row in range(n):
        for j in range(k // 2):
            b = int(packed[row, j])
            code[2 * j][row], code[2 * j + 1][row] = b & 15, b >> 4
    perm = mp.weight_perm()
    out = torch.zeros(k // 16, 2 * n, dtype=torch.int64)
    for kt in range(k // 16):
        flat = []
        for nt in range(n // 16):
            for r in range(16):
                for c in range(16):
                    flat.append(code[16 * kt + r][16 * nt + c])
        permuted = []
        for base in range(0, len(flat), 1024):
            permuted += [flat[base + p] for p in perm]
        for wi in range(2 * n):
            word = 0
            for i in range(8):
                word |= permuted[8 * wi + i] << (4 * i)
            out[kt, wi] = word - (1 << 32) if word >= 1 << 31 else word
    return out.to(torch.int32)


def test_weight_perm_is_a_permutation_with_the_nibble_interleave():
    perm = mp.weight_perm()
    assert sorted(perm) == list(range(1024))
    # lane 0's first int32: rows 0, 1, 8, 9 of column 0 in tile 0 then in the next 8 columns, nibbles 0 2 4 6 1 3 5 7
    assert perm[:8] == (0, 128, 8, 136, 16, 144, 24, 152)
    assert sorted(mp.scale_perm()) == list(range(64)) and mp.scale_perm()[:9] == (0, 8, 16, 24, 32, 40, 48, 56, 1)


def test_modelopt_bytes_are_gptq_packing():
    """vLLM feeds ``weight.view(int32).T`` to gptq_marlin_repack: GPTQ's qweight[k // 8, n] with k % 8 at bits 4 (k % 8)."""
    gen = torch.Generator().manual_seed(1)
    packed = torch.randint(0, 256, (16, 32), dtype=torch.uint8, generator=gen)
    codes = mp.unpack_codes(packed)                      # [N, K]
    gptq = packed.view(torch.int32).t()                  # [K / 8, N]
    for kb in range(gptq.shape[0]):
        for n in range(gptq.shape[1]):
            want = sum(int(codes[n, 8 * kb + i]) << (4 * i) for i in range(8))
            assert int(gptq[kb, n]) & 0xFFFFFFFF == want


@pytest.mark.parametrize('n,k', [(64, 32), (128, 64)])
def test_marlin_repack_matches_literal(n, k):
    gen = torch.Generator().manual_seed(n + k)
    packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=gen)
    got = mp.marlin_repack(packed)
    assert got.shape == (k // 16, 2 * n) and got.dtype == torch.int32
    assert torch.equal(got, literal_marlin_repack(packed))
    assert torch.equal(mp.marlin_unpack(got), packed)
    batched = torch.stack([packed, packed.flip(0)])
    assert torch.equal(mp.marlin_repack(batched)[1], mp.marlin_repack(packed.flip(0)))


def test_marlin_repack_rejects_bad_shapes():
    with pytest.raises(ValueError, match='N % 64'):
        mp.marlin_repack(torch.zeros(48, 16, dtype=torch.uint8))


def literal_marlin_scales(scales, factor):
    """vLLM's scale path spelled out: transpose to [K/16, N], 64-chunks permuted by scale_perm, groups of
    4 reordered 0 2 1 3, times factor * 2^7 in half precision (< 2: zero), then the half's bits shifted
    left by one and the high byte kept."""
    n, g = scales.shape
    t = scales.float().t().reshape(-1).tolist()
    sp_ = mp.scale_perm()
    t = [t[base + p] for base in range(0, len(t), 64) for p in sp_]
    t = [t[base + q] for base in range(0, len(t), 4) for q in (0, 2, 1, 3)]
    out = []
    for v in t:
        h = torch.tensor(v * factor, dtype=torch.float32).to(torch.half) * 128
        h = torch.zeros_like(h) if float(h) < 2 else h
        bits = int(h.view(torch.int16)) & 0xFFFF
        out.append(((bits << 1) >> 8) & 0xFF)
    return torch.tensor(out, dtype=torch.uint8).reshape(g, n)


def test_marlin_scales_match_literal_and_round_trip():
    gen = torch.Generator().manual_seed(2)
    raw = torch.randint(0x01, 0x7e, (128, 8), dtype=torch.uint8, generator=gen)   # positive E4M3, subnormals too
    scales = raw.view(torch.float8_e4m3fn)
    f = mp.nvfp4_scale_factor(scales)
    got = mp.marlin_scales(scales, f)
    assert got.dtype == torch.float8_e4m3fn and got.shape == (8, 128)
    assert torch.equal(got.view(torch.uint8), literal_marlin_scales(scales, f))
    dec = mp.decode_marlin_scales(got, f)
    s = scales.float()
    kept = s * f * 128 >= 2
    assert torch.equal(dec[kept], s[kept]) and (dec[~kept] == 0).all()


@pytest.mark.parametrize('mx,factor', [(3.75, 64.0), (448.0, 1.0), (240.0, 1.0), (0.125, 2048.0), (0.001953125, 131072.0)])
def test_nvfp4_scale_factor(mx, factor):
    s = torch.tensor([[0.0, mx / 2, mx]]).to(torch.float8_e4m3fn)
    assert mp.nvfp4_scale_factor(s) == factor
    assert float(s.float().max()) * factor <= 448


def test_global_scale_bias():
    g = torch.tensor([1.0, 0.5])
    assert mp.marlin_global_scale(g, 1.0).tolist() == [2.0 ** 119, 2.0 ** 118]
    assert mp.marlin_global_scale(g, 4.0, torch.half).tolist() == [2.0 ** 5, 2.0 ** 4]
    assert mp.marlin_global_scale(g, 1.0).dtype == torch.float32


def test_dequant_reference():
    codes = torch.tensor([[[0x21, 0xF8] * 8]], dtype=torch.uint8)       # [1, 1, 16]: 32 values
    scales = torch.tensor([[[2.0, 0.5]]]).to(torch.float8_e4m3fn)
    w = mp.dequant_reference(codes, scales, torch.tensor([0.25]))
    assert w.shape == (1, 1, 32)
    assert w[0, 0, :4].tolist() == [0.5 * 2 * 0.25, 1.0 * 2 * 0.25, -0.0, -6.0 * 2 * 0.25]
    assert w[0, 0, 16:20].tolist() == [0.5 * 0.5 * 0.25, 1.0 * 0.5 * 0.25, 0.0, -6.0 * 0.5 * 0.25]


# ------------------------------------------------------------------------------------ the chain, with a model of the op
class FakeMarlinOps:
    """moe_wna16_marlin_gemm's documented semantics in torch, reading the Marlin layout back."""
    align_op = None
    align = staticmethod(mp.moe_align_block_size)

    def __init__(self):
        self.calls = []

    def gemm(self, a, c, w, al, topk_weights, top_k, mul_topk_weights, workspace):
        self.calls.append((a.shape[0], w.n, w.k, top_k, mul_topk_weights, al.block_size))
        e = w.qweight.shape[0]
        codes = mp.marlin_unpack(w.qweight)
        scales = mp.decode_marlin_scales(w.scales, w.factor)
        g = w.global_scale.float() / 2.0 ** 119 * w.factor
        lut = torch.tensor(mp.E2M1)
        weight = lut[mp.unpack_codes(codes).long()] * scales.repeat_interleave(16, -1) * g.reshape(e, 1, 1)
        out = torch.zeros(a.shape[0] * top_k, w.n) if c is None else c
        post = int(al.num_tokens_post_padded)
        for b in range(post // al.block_size):
            ex = int(al.expert_ids[b])
            for slot in al.sorted_token_ids[b * al.block_size:(b + 1) * al.block_size].tolist():
                if slot >= a.shape[0] * top_k:
                    continue
                row = a[slot // top_k].float() @ weight[ex].t()
                if mul_topk_weights:
                    row = row * topk_weights.reshape(-1)[slot]
                out[slot] = row.to(out.dtype)
        return out


def test_check_runs_the_chain_on_a_model_of_the_op():
    ops = FakeMarlinOps()
    res = mp.check(ops, device='cpu')
    assert res['l1'] < 1e-2 and res['moe'] < 2e-2, res
    assert 'ok' in mp.check_line(res)
    # L1 over tokens with the router's top-k, L2 over the slots with top_k 1 and the routing weights
    assert ops.calls == [(16, 512, 512, 2, False, 16), (32, 512, 256, 1, True, 16)]   # 8 slots per expert: block 16


def test_marlin_moe_rows_grouped_by_expert():
    """The bench's use: rows already grouped by expert, top_k 1, routing weights in L2."""
    ops = FakeMarlinOps()
    gen = torch.Generator().manual_seed(3)
    e, tpe, hidden, inter = 2, 3, 128, 64
    c1 = torch.randint(0, 256, (e, 2 * inter, hidden // 2), dtype=torch.uint8, generator=gen)
    s1 = torch.randint(0x30, 0x40, (e, 2 * inter, hidden // 16), dtype=torch.uint8, generator=gen).view(torch.float8_e4m3fn)
    c2 = torch.randint(0, 256, (e, hidden, inter // 2), dtype=torch.uint8, generator=gen)
    s2 = torch.randint(0x30, 0x40, (e, hidden, inter // 16), dtype=torch.uint8, generator=gen).view(torch.float8_e4m3fn)
    g1, g2 = torch.tensor([0.01, 0.02]), torch.tensor([0.03, 0.01])
    w1, w2 = mp.prepare_nvfp4(c1, s1, g1), mp.prepare_nvfp4(c2, s2, g2)
    assert w1.nbytes == e * (2 * inter * hidden // 2 + 2 * inter * hidden // 16 + 4)
    ids = torch.arange(e, dtype=torch.int32).repeat_interleave(tpe)[:, None]
    rw = torch.rand(e * tpe, 1, generator=gen)
    x = torch.randn(e * tpe, hidden, generator=gen).to(torch.bfloat16)
    moe = mp.MarlinMoE(ops, w1, w2, ids, rw)
    assert moe.block_size == 8
    y = moe(x).float()
    r1, r2 = mp.dequant_reference(c1, s1, g1), mp.dequant_reference(c2, s2, g2)
    for row in range(e * tpe):
        ex = row // tpe
        hh = x[row].float() @ r1[ex].t()
        act = (torch.nn.functional.silu(hh[:inter]) * hh[inter:]).to(torch.bfloat16).float()
        want = (act @ r2[ex].t()) * rw[row]
        assert torch.allclose(y[row], want, rtol=2e-2, atol=2e-2 * float(want.abs().max()))


# ------------------------------------------------------------------------------------ peers absent
def test_unavailable_line():
    line = unavailable('marlin', 'x.so not found\n  (carry it)')
    assert line == 'peer marlin: not available (x.so not found (carry it))'
    assert len(unavailable('sgl', 'y' * 1000)) < 340
    assert ratio(1.0, 0.0) != ratio(1.0, 0.0) and ratio(1.0, 4.0) == 0.25 and ratio(None, 1.0) != ratio(None, 1.0)


def test_marlin_absent(tmp_path):
    ops, why = mp.MarlinOps.load(tmp_path / '_moe_C.abi3.so')
    assert ops is None and 'not found' in why
    assert unavailable('marlin', why).startswith('peer marlin: not available (')


@pytest.mark.skipif(torch.cuda.is_available() or not mp.SO_PATH.exists(), reason='needs the carried binary and no GPU')
def test_marlin_present_without_gpu():
    ops, why = mp.MarlinOps.load()
    assert ops is None and why == 'no CUDA device'


def test_sgl_absent(tmp_path, monkeypatch):
    monkeypatch.delenv('DG_PEER_SGL_SITE', raising=False)
    site, why = sp.find_site(whl_dir=tmp_path, dest=tmp_path / 'site')
    assert site is None and 'wheels not found' in why
    rows, why2 = sp.run_peer({16: (torch.zeros(16, 6, dtype=torch.long), torch.ones(16, 6))}, 8, 256, 128, 6,
                             whl_dir=tmp_path)
    assert rows == {} and why2 == why


def test_sgl_site_from_env(tmp_path, monkeypatch):
    (tmp_path / 'deep_gemm').mkdir()
    (tmp_path / 'deep_gemm' / '_C.so').write_bytes(b'')
    (tmp_path / 'tvm_ffi').mkdir()
    monkeypatch.setenv('DG_PEER_SGL_SITE', str(tmp_path))
    assert sp.find_site(whl_dir=tmp_path / 'none') == (tmp_path, None)


def test_sgl_worker_env(tmp_path):
    base = {'PYTHONPATH': f'/tmp/site:{ROOT}', 'WORLD_SIZE': '4', 'RANK': '1', 'MASTER_PORT': '1234',
            'NCCL_NVLS_ENABLE': '1', 'LD_LIBRARY_PATH': '/opt/x', 'HOME': '/root'}
    env = sp.worker_env(tmp_path / 'site', tmp_path / 'cache', base)
    assert env['PYTHONPATH'] == str(tmp_path / 'site')
    assert not any(k in env for k in ('WORLD_SIZE', 'RANK', 'MASTER_PORT'))
    assert env['NCCL_NVLS_ENABLE'] == '0' and env['TORCH_SYMM_MEM_DISABLE_MULTICAST'] == '1'
    assert env['NVSHMEM_DISABLE_NVLS'] == '1' and env['PYTHONUNBUFFERED'] == '1'
    assert env['DG_JIT_CACHE_DIR'].startswith(str(tmp_path / 'cache')) and env['HOME'] == '/root'
    assert env['LD_LIBRARY_PATH'].endswith('/opt/x')
    assert base['WORLD_SIZE'] == '4'                                    # the caller's dict is not changed


def test_sgl_worker_lines():
    row = {'tokens': 128, 'graph_us': 150.5, 'eager_us': 170.0}
    assert sp.parse_worker_line(sp.TAG + json.dumps(row) + '\n') == row
    assert sp.parse_worker_line('[DeepGEMM] compiling ...') is None
    assert sp.parse_worker_line(sp.TAG + '{broken') is None


def test_fp8_weight_bytes():
    per = 3 * 7168 * 3072
    assert sp.fp8_weight_bytes(8, 7168, 3072) == 8 * (per + 4 * per // 16384)
    assert sp.fp8_weight_bytes(1, 256, 128) == 98304 + 24


# ------------------------------------------------------------------------------------ the SGLang worker's torch parts
def test_sgl_block_and_token_quant():
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(2, 256, 384, generator=gen) * torch.linspace(0.1, 3, 384)
    q, sf = sp.quant_block_fp8(w)
    assert q.dtype == torch.float8_e4m3fn and sf.shape == (2, 2, 3) and sf.dtype == torch.float32
    blk = w.view(2, 2, 128, 3, 128)
    assert torch.allclose(sf, blk.abs().amax(dim=(2, 4)) / 448)
    back = sp.dequant_block_fp8(q, sf)
    assert float((back - w).norm() / w.norm()) < 0.05
    x = torch.randn(5, 256, generator=gen)
    xq, xsf = sp.quant_token_fp8(x)
    assert xsf.shape == (5, 2) and torch.allclose(xsf, x.view(5, 2, 128).abs().amax(-1) / 448)


def test_sgl_reference_matches_loop():
    gen = torch.Generator().manual_seed(5)
    e, t, hidden, inter, k = 3, 6, 256, 128, 2
    w1q, s1 = sp.quant_block_fp8(torch.randn(e, 2 * inter, hidden, generator=gen) * 0.05)
    w2q, s2 = sp.quant_block_fp8(torch.randn(e, hidden, inter, generator=gen) * 0.05)
    xq, xsf = sp.quant_token_fp8(torch.randn(t, hidden, generator=gen))
    idx = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)])
    wts = torch.rand(t, k, generator=gen)
    got = sp.reference(xq, xsf, idx, wts, w1q, s1, w2q, s2)
    x = torch.stack([torch.cat([xq[tok, 128 * b:128 * (b + 1)].float() * xsf[tok, b] for b in range(hidden // 128)])
                     for tok in range(t)])
    w1, w2 = sp.dequant_block_fp8(w1q, s1), sp.dequant_block_fp8(w2q, s2)
    for tok in range(t):
        want = torch.zeros(hidden)
        for j in range(k):
            ex = int(idx[tok, j])
            h = w1[ex] @ x[tok]
            want += wts[tok, j] * (w2[ex] @ (torch.nn.functional.silu(h[:inter]) * h[inter:]))
        assert torch.allclose(got[tok], want, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------ flags and the session script
def test_bench_grouped_gemm_flags():
    from scripts import bench_grouped_gemm as bg
    a = bg.build_parser().parse_args([])
    assert a.peers is True and a.sustained is False and a.no_torch is False and a.no_peer_check is False
    assert a.tokens == '1,4,16,64,256,1024,4096' and a.experts == 32 and (a.hidden, a.inter) == (7168, 3072)
    assert bg.parse_tokens(a.sustained_tokens) == [1, 16] and a.sustained_seconds == 3.0
    b = bg.build_parser().parse_args(['--no-peers', '--no-torch', '--tokens', '1,16', '--sustained',
                                      '--sustained-tokens', '4', '--sustained-seconds', '1.5'])
    assert (b.peers, b.no_torch, b.sustained, b.sustained_tokens, b.sustained_seconds) == (False, True, True, '4', 1.5)
    assert bg.parse_tokens(b.tokens) == [1, 16]
    for bad in ('', '0,4', 'x'):
        with pytest.raises(ValueError):
            bg.parse_tokens(bad)


@pytest.mark.parametrize('script,flags', [('bench_grouped_gemm.py', ['--no-peers', '--sustained', '--no-torch']),
                                          ('bench_mega_moe.py', ['--no-peers', '--peer-timeout', '--clocks'])])
def test_script_help(script, flags):
    out = subprocess.run([sys.executable, str(ROOT / 'scripts' / script), '--help'], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    for f in flags:
        assert f in out.stdout


def _session(*args, **env):
    out = subprocess.run(['bash', str(ROOT / 'scripts' / 'gpu_session.sh'), *args], capture_output=True, text=True,
                         timeout=60, env={**os.environ, 'DRY_RUN': '1', **env})
    out.stdout = '\n'.join(ln for ln in out.stdout.splitlines() if not ln.startswith('(budget'))
    return out


def test_gpu_session_plan():
    out = _session()
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert [ln.split()[0] for ln in lines] == ['smi', 'tests', 'grouped', 'mega', 'sustained', 'layer']
    assert 'python3 -m pytest -q -x tests/gpu' in lines[1] and '[240 s]' in lines[1]
    assert 'bench_mega_moe.py --experts-per-rank 8 --tokens 16,128,4096' in lines[3]
    assert '--sustained' in lines[4] and 'run_moe_layer.py --full --tokens 128' in lines[5]
    sel = _session('mega', 'tests', T_MEGA='400', ARGS_TESTS='-k sm90').stdout.strip().splitlines()
    assert [ln.split()[0] for ln in sel] == ['mega', 'tests']
    assert '[400 s]' in sel[0] and '--peer-timeout 250' in sel[0] and sel[1].endswith('-k sm90')
    env_sel = _session(STEPS='layer').stdout.strip().splitlines()
    assert len(env_sel) == 1 and env_sel[0].startswith('layer')
    bad = _session('nope')
    assert bad.returncode == 2 and 'unknown step' in bad.stderr


def test_gpu_session_syntax():
    assert subprocess.run(['bash', '-n', str(ROOT / 'scripts' / 'gpu_session.sh')]).returncode == 0


def test_setup_marlin_absent(monkeypatch, tmp_path):
    from scripts import bench_grouped_gemm as bg
    monkeypatch.setattr(mp, 'SO_PATH', tmp_path / 'missing.so')
    ops, w, why = bg.setup_marlin(None, None, True)
    assert ops is None and w is None and 'not found' in why


def test_sgl_peer_table(monkeypatch):
    from scripts import bench_mega_moe as bm
    lines = []
    rows = {16: {'tokens': 16, 'graph_us': 100.0, 'eager_us': 120.0, 'weight_bytes': 8 * 66e6, 'rel_err': 0.02,
                 'first_call_s': 42.0, 'idempotent': False},
            128: {'tokens': 128, 'error': 'RuntimeError: boom'}}
    monkeypatch.setattr(sp, 'run_peer', lambda *a, **kw: (rows, 'no result for tokens [4096]'))
    ours = {16: (50.0, 60.0, 8, 8 * 37e6), 128: (150.0, 170.0, 8, 8 * 37e6), 4096: (5000.0, 5100.0, 8, 8 * 37e6)}
    bm.sgl_peer_table({}, ours, 8, 7168, 3072, 6, 4200.0, 390, say=lines.append)
    text = '\n'.join(lines)
    row16 = next(ln for ln in lines if ln.split()[:1] == ['16'])
    assert row16.split()[1:4] == ['50.0', '100.0', '60.0'] and ' 0.50 ' in row16 and 're-staged' in row16
    assert 'RuntimeError: boom' in next(ln for ln in lines if ln.split()[:1] == ['128'])
    assert 'no result' in next(ln for ln in lines if ln.split()[:1] == ['4096'])
    assert 'peer sgl: not available (no result for tokens [4096]) for the missing rows' in text
    lines.clear()
    monkeypatch.setattr(sp, 'run_peer', lambda *a, **kw: ({}, 'wheels not found in /x'))
    bm.sgl_peer_table({}, ours, 8, 7168, 3072, 6, 4200.0, 390, say=lines.append)
    assert lines[-1] == 'peer sgl: not available (wheels not found in /x)'


def _fake_worker(tmp_path, monkeypatch, body):
    site = tmp_path / 'site'
    (site / 'deep_gemm').mkdir(parents=True)
    (site / 'deep_gemm' / '_C.so').write_bytes(b'')
    (site / 'tvm_ffi').mkdir()
    script = tmp_path / 'worker.py'
    script.write_text(body)
    monkeypatch.setenv('DG_PEER_SGL_SITE', str(site))
    monkeypatch.setenv('DG_PEER_SGL_CACHE', str(tmp_path / 'cache'))
    monkeypatch.setattr(sp, '__file__', str(script))
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    return site


def test_run_peer_collects_rows(tmp_path, monkeypatch):
    site = _fake_worker(tmp_path, monkeypatch, '''
import json, os, sys
import torch
spec = torch.load(sys.argv[2])
print('compiling sm90_fp8_mega_moe ...')
print('PYTHONPATH=' + os.environ['PYTHONPATH'] + ' NVLS=' + os.environ['NCCL_NVLS_ENABLE'])
for t in spec['tokens']:
    idx, w = spec['routes'][t]
    print('SGLPEER ' + json.dumps({'tokens': t, 'graph_us': 10.0 * t, 'eager_us': 11.0 * t, 'shape': list(idx.shape),
                                   'experts': spec['experts']}))
''')
    said = []
    routes = {4: (torch.zeros(4, 6, dtype=torch.long), torch.ones(4, 6)), 16: (torch.zeros(16, 6, dtype=torch.long),
                                                                            torch.ones(16, 6))}
    rows, why = sp.run_peer(routes, 8, 256, 128, 6, timeout_s=60, say=said.append)
    assert why is None, why
    assert rows[4]['graph_us'] == 40.0 and rows[16]['shape'] == [16, 6] and rows[16]['experts'] == 8
    assert '  [sgl] compiling sm90_fp8_mega_moe ...' in said
    assert f'  [sgl] PYTHONPATH={site} NVLS=0' in said


def test_run_peer_failures(tmp_path, monkeypatch):
    _fake_worker(tmp_path, monkeypatch, 'import sys\nprint("RuntimeError: no kernel for sm_90")\nsys.exit(3)\n')
    rows, why = sp.run_peer({4: (torch.zeros(4, 6, dtype=torch.long), torch.ones(4, 6))}, 8, 256, 128, 6,
                            timeout_s=60, say=lambda s: None)
    assert rows == {} and 'exited with 3' in why and 'no kernel for sm_90' in why
    _fake_worker(tmp_path / 'b', monkeypatch, 'import time\nprint("SGLPEER {\\"tokens\\": 4}", flush=True)\ntime.sleep(30)\n')
    routes = {4: (torch.zeros(4, 6, dtype=torch.long), torch.ones(4, 6)), 8: (torch.zeros(8, 6, dtype=torch.long),
                                                                           torch.ones(8, 6))}
    rows, why = sp.run_peer(routes, 8, 256, 128, 6, timeout_s=5, say=lambda s: None)
    assert list(rows) == [4] and why.startswith('timed out after 5 s (1 of 2')


def test_same_blocks():
    ids = torch.tensor([[0, 2], [2, 1], [0, 1], [2, 0]])
    a = mp.moe_align_block_size(ids, 3, 4)
    assert mp.same_blocks(a, mp.moe_align_block_size(ids, 3, 4)) == 'same'
    b = mp.moe_align_block_size(ids, 3, 4)
    b.sorted_token_ids[:2] = b.sorted_token_ids[:2].flip(0)          # order inside a block is free
    assert mp.same_blocks(a, b) == 'same'
    b.sorted_token_ids[0] = 7
    assert mp.same_blocks(a, b) == 'slots differ'
    c = mp.moe_align_block_size(ids, 3, 4)
    c.expert_ids[0] = 2
    assert mp.same_blocks(a, c) == 'expert ids differ'
    assert mp.same_blocks(a, mp.moe_align_block_size(ids, 3, 8)).startswith('padded totals')
