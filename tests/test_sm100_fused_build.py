"""CPU tests of the sm100 fused Mega MoE kernel (impls/sm100_fp8_nvfp4_mega_moe.cuh) and its launcher
(deep_gemm/mega/sm100.py): every registered instantiation compiles for sm_100a and sm_103a with the
expected SASS (the recipe's MMA and not the other's, UTCCP, both TMEM load shapes, UTCBAR, TMA, the
comm roles' system-scope release / acquire) and no local memory; the launcher's shared-memory and
token-row budgets; its argument checks and the 'auto' wiring without a GPU.  No Blackwell GPU runs
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
SPECS = (sm100.FUSED_NVFP4, sm100.FUSED_MXFP4)

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
            for pat in (r'\bUTCCP\b', r'\bLDTM\b', r'\bUTCBAR\b', r'\bSTG\.E\.STRONG\.SYS\b', r'\bLDG\.E\.STRONG\.SYS\b'):
                assert pat in req, (spec.name, arch, pat)


@pytest.mark.parametrize('arch', ARCHS)
@pytest.mark.parametrize('spec', SPECS, ids=lambda s: s.name)
def test_compile_and_sass(cache, spec, arch):
    for params, rep, ops in compile_defaults(spec, arch):
        # the launcher budgets the static shared memory (mega::Shared + the hand-over)
        assert rep.smem <= sm100._fused_shared_bytes(params['max_experts']) + sm100._HANDOVER_BYTES, rep.smem
        if spec is sm100.FUSED_NVFP4:
            assert not any(o.startswith('UTCQMMA') for o in ops)
            assert ops['UTCOMMA.4X' if arch == 'sm_100a' else 'UTCOMMA.BLOCK16'] > 0
        else:
            assert not any(o.startswith('UTCOMMA') for o in ops) and ops['UTCQMMA'] > 0
        # L1 reads TMEM as 16x256b (SwiGLU: gate and up of a channel in one thread), L2 as 32x32b
        assert {o for o in ops if o.startswith('LDTM')} == {'LDTM.16dp256bit.x4', 'LDTM.x16'}


def test_shared_memory_fits():
    for fmt in ('nvfp4', 'mxfp4'):
        for bt in (32, 64, 128):
            for e in (8, 64):
                s = sm100.stages_for(fmt, bt, e)
                assert 2 <= s <= 8
                assert sm100._smem_bytes(fmt, bt, s) + sm100._fused_shared_bytes(e) + sm100._HANDOVER_BYTES \
                    <= gemm_sm100._SMEM_CAPACITY
    for spec, fmt in zip(SPECS, ('nvfp4', 'mxfp4')):
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
    g = 16 if fmt == 'nvfp4' else 32
    codes = torch.randint(0, 256, (e, n, k // 2), dtype=torch.uint8)
    if fmt == 'nvfp4':
        s = torch.full((e, n, k // g), 0x38, dtype=torch.uint8).view(torch.float8_e4m3fn)
        return w100.transform_nvfp4_weights_for_sm100(codes, s, torch.ones(e, 2) if kind == 'l1' else torch.ones(e), kind)
    return w100.transform_mxfp4_weights_for_sm100(codes, torch.full((e, n, k // g), 127, dtype=torch.uint8), kind)


@pytest.mark.parametrize('mma_type,fmt', [('fp4xfp4', 'nvfp4'), ('fp8xfp4', 'mxfp4')])
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


def test_launcher_refuses_other_kinds():
    buf = deep_gemm.get_symm_buffer_for_mega_moe(None, 8, 16, 2, 256, 256, mma_type='fp8xnvfp4', device='cpu')
    y = torch.empty(4, 256, dtype=torch.bfloat16)
    with pytest.raises(NotImplementedError, match="'fp4xfp4'"):
        sm100.run_fused(y, None, None, buf)
    with pytest.raises(NotImplementedError, match='no sm100 kernel'):
        sm100.run(y, None, None, buf)
    assert sm100.unsupported(buf, None, None)


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
