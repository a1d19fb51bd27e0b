"""CPU tests of the sm100 fused Mega MoE kernel (impls/sm100_fp8_nvfp4_mega_moe.cuh) and its launcher
(deep_gemm/mega/sm100.py): every registered instantiation compiles for sm_100a and sm_103a with the
expected SASS (the recipe's MMA and not the others', UTCCP for the block-scaled recipes, STTM for the
exact recipe's dequant, both TMEM load shapes, UTCBAR, TMA, the comm roles' system-scope release /
acquire) and no local memory; the launcher's shared-memory and token-row budgets; its argument checks
and the api's routing ('auto' / 'sm100', fake compute capability) without a GPU.  No Blackwell GPU runs
here: see docs/sm100.md, "The fused kernel"."""
import re
import warnings

import pytest
import torch

import deep_gemm
from deep_gemm import gemm_sm100
from deep_gemm import weights_sm100 as w100
from deep_gemm.jit import compiler, registry
from deep_gemm.mega import api, sm100
from tests.sm100_build_common import compile_defaults, jit_cache_fixture

ARCHS = ('sm_100a', 'sm_103a')
SPECS = (sm100.FUSED_NVFP4, sm100.FUSED_MXFP4, sm100.FUSED_EXACT, sm100.FUSED_BF16)
F16_SPECS = (sm100.FUSED_EXACT, sm100.FUSED_BF16)
FMTS = ((sm100.FUSED_NVFP4, 'nvfp4'), (sm100.FUSED_MXFP4, 'mxfp4'), (sm100.FUSED_EXACT, 'nvfp4_exact'),
        (sm100.FUSED_BF16, 'bf16'))

cache = jit_cache_fixture('dg_sm100_cache')


def test_registration():
    names = {s.name for s in registry.all_specs()}
    assert 'deep_gemm.mega.sm100' in registry.KERNEL_MODULES
    for spec in SPECS:
        assert spec.name in names and spec.archs == ARCHS and spec.forbid_local_memory
        assert spec.header == 'sm100_fp8_nvfp4_mega_moe.cuh'
        assert 1 <= len(spec.default_params) <= 2          # CI compiles every default
        for arch in ARCHS:
            req = spec.required_sass_for(arch)
            for pat in (r'\bLDTM\b', r'\bUTCBAR\b', r'\bSTG\.E\.STRONG\.SYS\b', r'\bLDG\.E\.STRONG\.SYS\b'):
                assert pat in req, (spec.name, arch, pat)
            assert (r'\bUTCCP\b' in req) == (spec not in F16_SPECS)
            assert (r'\bUTCHMMA\b' in req) == (spec in F16_SPECS)
            assert (r'\bSTTM\b' in req) == (spec is sm100.FUSED_EXACT)


@pytest.mark.parametrize('arch', ARCHS)
@pytest.mark.parametrize('spec', SPECS, ids=lambda s: s.name)
def test_compile_and_sass(cache, spec, arch):
    for params, rep, ops in compile_defaults(spec, arch):
        # the launcher budgets the static shared memory (mega::Shared + the hand-over)
        assert rep.smem <= sm100._fused_shared_bytes(params['max_experts']) + sm100._HANDOVER_BYTES, rep.smem
        if spec is sm100.FUSED_NVFP4:
            assert not any(o.startswith(('UTCQMMA', 'UTCHMMA')) for o in ops)
            assert ops['UTCOMMA.4X' if arch == 'sm_100a' else 'UTCOMMA.BLOCK16'] > 0
        elif spec is sm100.FUSED_MXFP4:
            assert not any(o.startswith(('UTCOMMA', 'UTCHMMA')) for o in ops) and ops['UTCQMMA'] > 0
        else:
            # kind::f16 only: no block-scaled MMA, no scale copies to TMEM
            assert ops['UTCHMMA'] > 0
            assert not any(o.startswith(('UTCOMMA', 'UTCQMMA', 'UTCCP')) for o in ops)
            if spec is sm100.FUSED_EXACT:
                # the dequant warpgroup: 8 tcgen05.st 32x32b.x16 per stage of K = 256 (one call site),
                # 16 MMAs per stage, its setmaxnreg share (the register split that keeps it spill-free)
                assert ops['STTM.x16'] == 8 and ops['UTCHMMA'] % 16 == 0 and ops['UBLKCP.S.G'] > 0
                assert ops['USETMAXREG.TRY_ALLOC.CTAPOOL'] == 1 and ops['USETMAXREG.DEALLOC.CTAPOOL'] == 1
            else:
                assert not any(o.startswith('STTM') for o in ops)
        # L1 reads TMEM as 16x256b (SwiGLU: gate and up of a channel in one thread), L2 as 32x32b
        assert {o for o in ops if o.startswith('LDTM')} == {'LDTM.16dp256bit.x4', 'LDTM.x16'}


def test_shared_memory_fits():
    for fmt in ('nvfp4', 'mxfp4', 'nvfp4_exact', 'bf16'):
        for bt in (32, 64, 128):
            for e in (8, 64):
                s = sm100.stages_for(fmt, bt, e)
                assert 2 <= s <= 8
                assert sm100._smem_bytes(fmt, bt, s) + sm100._fused_shared_bytes(e) + sm100._HANDOVER_BYTES \
                    <= gemm_sm100._SMEM_CAPACITY
    # the f16 recipes have no SwiGLUQuant staging; the exact recipe 4 more barriers (its A slots)
    assert sm100._smem_bytes('bf16', 64, 2) == 1024 + 2 * gemm_sm100._stage_bytes('bf16', 64) + 8 * 8 + 16
    assert sm100._smem_bytes('nvfp4_exact', 64, 2) == 1024 + 2 * gemm_sm100._stage_bytes('nvfp4_exact', 64) + 8 * 12 + 16
    for spec, fmt in FMTS:
        for p in spec.default_params:
            assert p['stages'] == sm100.stages_for(fmt, p['block_t'], p['max_experts'])


def test_token_layout():
    lay = sm100.token_layout('nvfp4', 1000, 7168, 32, 32)
    assert lay.padded_rows == (-(-1000 // 32) + 32) * 32 and lay.row_bytes == 3584
    assert lay.sf_offset % 1024 == 0 and lay.sf_offset >= lay.padded_rows * lay.row_bytes
    assert lay.sf_bytes == -(-lay.padded_rows // 128) * (7168 // 16 // 4) * 512
    assert lay.region_bytes == 1000 * 7168 * 2 and lay.fits
    fp8 = sm100.token_layout('mxfp4', 1000, 2048, 64, 32)
    assert fp8.row_bytes == 2048 and fp8.sf_bytes == -(-fp8.padded_rows // 128) * (2048 // 32 // 4) * 512
    # few rows per expert: the padding does not fit (the launcher raises)
    assert not sm100.token_layout('mxfp4', 64, 2048, 128, 64).fits


def _weights(fmt, e, n, k, kind):
    if fmt == 'bf16':
        return w100.transform_bf16_weights_for_sm100(torch.randn(e, n, k).to(torch.bfloat16), kind)
    if fmt == 'nvfp4_exact':
        return w100.to_sm100_exact(_weights('nvfp4', e, n, k, kind))
    g = 16 if fmt == 'nvfp4' else 32
    codes = torch.randint(0, 256, (e, n, k // 2), dtype=torch.uint8)
    if fmt == 'nvfp4':
        s = torch.full((e, n, k // g), 0x38, dtype=torch.uint8).view(torch.float8_e4m3fn)
        return w100.transform_nvfp4_weights_for_sm100(codes, s, torch.ones(e, 2) if kind == 'l1' else torch.ones(e), kind)
    return w100.transform_mxfp4_weights_for_sm100(codes, torch.full((e, n, k // g), 127, dtype=torch.uint8), kind)


@pytest.mark.parametrize('mma_type,fmt', [('fp4xfp4', 'nvfp4'), ('fp8xfp4', 'mxfp4'), ('bf16xbf16', 'bf16')])
def test_launcher_checks_without_gpu(mma_type, fmt):
    e, h, i = 8, 512, 512
    buf = deep_gemm.get_symm_buffer_for_mega_moe(None, e, 16, 2, h, i, mma_type=mma_type, device='cpu')
    l1, l2 = _weights(fmt, e, 2 * i, h, 'l1'), _weights(fmt, e, h, i, 'l2')
    y = torch.empty(4, h, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match='CUDA buffer'):
        sm100.run_fused(y, l1, l2, buf)
    with pytest.raises(TypeError, match='Sm100ExpertWeights'):
        sm100.run_fused(y, object(), l2, buf)
    with pytest.raises(ValueError, match='l1 weights'):
        sm100.run_fused(y, l2, l2, buf)
    with pytest.raises(ValueError, match='experts of'):
        sm100.run_fused(y, _weights(fmt, e, 2 * i, 2 * h, 'l1'), l2, buf)
    with pytest.raises(TypeError, match='bfloat16'):
        sm100.run_fused(y.float(), l1, l2, buf)
    with pytest.raises(ValueError, match='tokens >'):
        sm100.run_fused(torch.empty(17, h, dtype=torch.bfloat16), l1, l2, buf)
    with pytest.raises(NotImplementedError, match='routed_scaling_factor'):
        sm100.run_fused(y, l1, l2, buf, routed_scaling_factor=2.0)
    other = 'mxfp4' if fmt == 'nvfp4' else 'nvfp4'
    with pytest.raises(ValueError, match=f'runs {fmt}'):
        sm100.run_fused(y, _weights(other, e, 2 * i, h, 'l1'), l2, buf)


@pytest.mark.parametrize('mma_type', ['fp8xnvfp4', 'fp8xfp4'])
def test_exact_entry_checks_without_gpu(mma_type):
    """sm100.run (fp8_nvfp4_mega_moe): 'nvfp4_exact' weights pass unsupported() and reach the launcher's
    checks, which name the problem; other weights get a reason (NotImplementedError from run)."""
    e, h, i = 8, 512, 512
    buf = deep_gemm.get_symm_buffer_for_mega_moe(None, e, 16, 2, h, i, mma_type=mma_type, device='cpu')
    l1, l2 = _weights('nvfp4_exact', e, 2 * i, h, 'l1'), _weights('nvfp4_exact', e, h, i, 'l2')
    y = torch.empty(4, h, dtype=torch.bfloat16)
    assert sm100.unsupported(buf, l1, l2) is None
    with pytest.raises(ValueError, match='CUDA buffer'):
        sm100.run(y, l1, l2, buf)
    with pytest.raises(TypeError, match='bfloat16'):
        sm100.run(y.float(), l1, l2, buf)
    with pytest.raises(ValueError, match='tokens >'):
        sm100.run(torch.empty(17, h, dtype=torch.bfloat16), l1, l2, buf)
    with pytest.raises(ValueError, match='experts of'):
        sm100.run(y, _weights('nvfp4_exact', e, 2 * i, 2 * h, 'l1'), l2, buf)
    with pytest.raises(ValueError, match='l1 weights'):
        sm100.run(y, l2, l2, buf)
    plain = _weights('nvfp4', e, 2 * i, h, 'l1')
    for w1, why in ((plain, 'to_sm100_exact'), (object(), 'sm100-layout weights')):
        assert why in sm100.unsupported(buf, w1, l2)
        with pytest.raises(NotImplementedError, match=why):
            sm100.run(y, w1, l2, buf)


def test_launcher_refuses_other_kinds():
    buf = deep_gemm.get_symm_buffer_for_mega_moe(None, 8, 16, 2, 256, 256, mma_type='fp8xnvfp4', device='cpu')
    y = torch.empty(4, 256, dtype=torch.bfloat16)
    with pytest.raises(NotImplementedError, match="'fp4xfp4'"):
        sm100.run_fused(y, None, None, buf)
    with pytest.raises(NotImplementedError, match='sm100-layout weights'):
        sm100.run(y, None, None, buf)
    assert sm100.unsupported(buf, None, None)
    buf8 = deep_gemm.get_symm_buffer_for_mega_moe(None, 8, 16, 2, 256, 256, mma_type='fp8xfp8', device='cpu')
    with pytest.raises(NotImplementedError, match="'fp8xfp8'"):
        sm100.run_fused(y, None, None, buf8)
    assert "'fp8xfp8'" in sm100.unsupported(buf8, None, None)


def test_auto_selects_sm100_on_cc10(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda device=None: (10, 0))
    assert api.select_backend('auto', torch.device('cuda', 0)) == 'sm100'
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda device=None: (10, 3))
    assert api.select_backend('auto', torch.device('cuda', 0)) == 'sm100'
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda device=None: (9, 0))
    assert api.select_backend('auto', torch.device('cuda', 0)) == 'sm90'
    assert api.select_backend('auto', torch.device('cpu')) == 'reference'
    assert getattr(sm100, 'MULTI_RANK', False)


def test_compile_all_lists_the_fused_kernels():
    from deep_gemm.jit import __main__ as jit_main
    src = open(jit_main.__file__).read()
    assert 'all_specs' in src            # --compile-all walks registry.all_specs(), which imports sm100
    specs = {s.name: s for s in registry.all_specs()}
    for spec in SPECS:
        assert specs[spec.name] is spec


@pytest.mark.parametrize('mma_type,fmt', [('fp4xfp4', 'nvfp4'), ('fp8xfp4', 'mxfp4')])
def test_upstream_entries_reach_sm100(mma_type, fmt):
    """fp4_fp4_mega_moe / fp8_fp4_mega_moe with sm100-layout weights: backend='sm100' reaches
    sm100.run_fused (which refuses the CPU buffer, naming it); the reference backend takes the same
    weights (Sm100ExpertWeights.dequantize) and computes the layer."""
    e, h, i, t = 8, 512, 512, 4
    buf = deep_gemm.get_symm_buffer_for_mega_moe(None, e, 16, 2, h, i, mma_type=mma_type, device='cpu')
    gen = torch.Generator().manual_seed(0)
    if mma_type == 'fp4xfp4':
        buf.x[:t].copy_(torch.randint(0, 256, (t, h // 2), dtype=torch.uint8, generator=gen))
        buf.x_sf[:t].copy_(torch.full((t, h // 16), 0x38, dtype=torch.uint8).view(torch.int32))
    else:
        buf.x[:t].copy_(torch.randn(t, h, generator=gen).to(torch.float8_e4m3fn))
        buf.x_sf[:t].copy_(torch.full((t, h // 32), 127, dtype=torch.uint8).view(torch.int32))
    buf.topk_idx[:t].copy_(torch.randint(0, e, (t, 2), generator=gen))
    buf.topk_weights[:t].copy_(torch.rand(t, 2, generator=gen))
    l1, l2 = _weights(fmt, e, 2 * i, h, 'l1'), _weights(fmt, e, h, i, 'l2')
    fn = deep_gemm.fp4_fp4_mega_moe if mma_type == 'fp4xfp4' else deep_gemm.fp8_fp4_mega_moe
    y = torch.empty(t, h, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match='CUDA buffer'):
        fn(y, l1, l2, buf, backend='sm100')
    assert api._sm100_runs(buf, l1, None, 1.0) and not api._sm90_runs(buf, l1, None)
    assert not api._sm100_runs(buf, l1, None, 0.5)
    fn(y, l1, l2, buf, backend='reference')
    assert torch.isfinite(y.float()).all()


def _fp8_layer(buf, t, e, gen):
    h = buf.hidden
    buf.x[:t].copy_(torch.randn(t, h, generator=gen).to(torch.float8_e4m3fn))
    if buf.mma_type == 'fp8xnvfp4':
        buf.x_sf[:t].copy_(torch.full((t, h // 32), 0.5))
    else:
        buf.x_sf[:t].copy_(torch.full((t, h // 32), 126, dtype=torch.uint8).view(torch.int32))
    buf.topk_idx[:t].copy_(torch.randint(0, e, (t, 2), generator=gen))
    buf.topk_weights[:t].copy_(torch.rand(t, 2, generator=gen))


def _as_cc10(monkeypatch):
    """select_backend as on a CC 10.x GPU ('auto' -> 'sm100'; the buffers here are CPU ones)."""
    real = api.select_backend
    monkeypatch.setattr(api, 'select_backend', lambda b, d: 'sm100' if b == 'auto' else real(b, d))


@pytest.mark.parametrize('mma_type', ['fp8xnvfp4', 'fp8xfp4'])
def test_fp8_nvfp4_entry_routes_to_sm100(monkeypatch, mma_type):
    """fp8_nvfp4_mega_moe on CC 10.x: 'nvfp4_exact' weights go to the sm100 backend (which refuses the CPU
    buffer, naming it) with no fallback warning; sm100-layout NVFP4 weights that are not exact fall back to
    the reference with the reason; the reference computes the same layer from either form (the exact
    layout's dequantize is the inverse of to_sm100_exact)."""
    e, h, i, t = 8, 512, 512, 4
    buf = deep_gemm.get_symm_buffer_for_mega_moe(None, e, 16, 2, h, i, mma_type=mma_type, device='cpu')
    _fp8_layer(buf, t, e, torch.Generator().manual_seed(1))
    plain1, plain2 = _weights('nvfp4', e, 2 * i, h, 'l1'), _weights('nvfp4', e, h, i, 'l2')
    ex1, ex2 = w100.to_sm100_exact(plain1), w100.to_sm100_exact(plain2)
    y = torch.empty(t, h, dtype=torch.bfloat16)
    _as_cc10(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter('error')          # no "using the reference backend" warning
        with pytest.raises(ValueError, match="backend 'sm100' needs a CUDA buffer"):
            deep_gemm.fp8_nvfp4_mega_moe(y, ex1, ex2, buf)
        with pytest.raises(ValueError, match="backend 'sm100' needs a CUDA buffer"):
            deep_gemm.fp8_nvfp4_mega_moe(y, ex1, ex2, buf, backend='sm100')
    with pytest.warns(UserWarning, match='to_sm100_exact'):
        deep_gemm.fp8_nvfp4_mega_moe(y, plain1, plain2, buf)
    y_exact = torch.empty_like(y)
    deep_gemm.fp8_nvfp4_mega_moe(y_exact, ex1, ex2, buf, backend='reference')
    assert torch.isfinite(y.float()).all() and torch.equal(y, y_exact)


def test_sm100_weights_on_sm90_fall_back(monkeypatch):
    e, h, i, t = 8, 512, 512, 4
    buf = deep_gemm.get_symm_buffer_for_mega_moe(None, e, 16, 2, h, i, mma_type='fp8xnvfp4', device='cpu')
    _fp8_layer(buf, t, e, torch.Generator().manual_seed(2))
    real = api.select_backend
    monkeypatch.setattr(api, 'select_backend', lambda b, d: 'sm90' if b == 'auto' else real(b, d))
    l1, l2 = _weights('nvfp4_exact', e, 2 * i, h, 'l1'), _weights('nvfp4_exact', e, h, i, 'l2')
    with pytest.warns(UserWarning, match='no sm90 kernel'):
        deep_gemm.fp8_nvfp4_mega_moe(torch.empty(t, h, dtype=torch.bfloat16), l1, l2, buf)


def test_bf16_entry_routes_to_sm100(monkeypatch):
    """bf16_mega_moe with sm100-layout BF16 weights: _sm100_runs, and 'auto' on CC 10.x reaches
    sm100.run_fused (its CPU-buffer refusal); the reference takes the same weights."""
    e, h, i, t = 8, 256, 256, 4
    buf = deep_gemm.get_symm_buffer_for_mega_moe(None, e, 16, 2, h, i, mma_type='bf16xbf16', device='cpu')
    gen = torch.Generator().manual_seed(3)
    buf.x[:t].copy_(torch.randn(t, h, generator=gen).to(torch.bfloat16))
    buf.topk_idx[:t].copy_(torch.randint(0, e, (t, 2), generator=gen))
    buf.topk_weights[:t].copy_(torch.rand(t, 2, generator=gen))
    l1, l2 = _weights('bf16', e, 2 * i, h, 'l1'), _weights('bf16', e, h, i, 'l2')
    assert api._sm100_runs(buf, l1, None, 1.0) and not api._sm90_runs(buf, l1, None)
    y = torch.empty(t, h, dtype=torch.bfloat16)
    _as_cc10(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        with pytest.raises(ValueError, match='CUDA buffer'):
            deep_gemm.bf16_mega_moe(y, l1, l2, buf)
    deep_gemm.bf16_mega_moe(y, l1, l2, buf, backend='reference')
    assert torch.isfinite(y.float()).all()


def test_bf16_weights_round_trip():
    """transform_bf16_weights_for_sm100 -> untransform / dequantize (what the reference backend reads) is
    the identity on the values, L1 row interleave undone."""
    w = torch.randn(2, 256, 128).to(torch.bfloat16)
    for kind in ('l1', 'l2'):
        t = w100.transform_bf16_weights_for_sm100(w, kind)
        back, s, _ = w100.untransform_sm100(t)
        assert s is None and torch.equal(back, w)
        assert torch.equal(t.dequantize([1]), w[1:].float())
