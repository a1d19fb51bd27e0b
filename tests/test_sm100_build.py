"""CPU tests of the sm100 grouped GEMM build: every registered instantiation compiles for sm_100a and
sm_103a with the expected SASS (the recipe's MMA, UTCCP, LDTM, UTCBAR, TMA) and no local memory; the
PTX spells .block16 / .block32 (never scale_vec); the launcher's shared-memory sizes equal the plan's;
the launchers' argument checks need no GPU.  No Blackwell GPU runs here: see docs/sm100.md."""
import re
import shutil
from pathlib import Path

import pytest
import torch

from deep_gemm import gemm_sm100
from deep_gemm.jit import compiler, registry
from deep_gemm import weights_sm100 as w100
from tests.sm100_build_common import compile_defaults, jit_cache_fixture, kernel_ptx, plan_program_lines

ARCHS = ('sm_100a', 'sm_103a')
SPECS = (gemm_sm100.GROUPED_GEMM_NVFP4, gemm_sm100.GROUPED_GEMM_MXFP4)


cache = jit_cache_fixture('dg_sm100_cache')


def test_arch_mapping_and_registration():
    assert 'sm_103a' in compiler.SUPPORTED_ARCHS
    assert compiler.CC_ARCHS[(10, 0)] == 'sm_100a' and compiler.CC_ARCHS[(10, 3)] == 'sm_103a'
    assert compiler.arch_flags('sm_103a') == ['-gencode=arch=compute_103a,code=sm_103a']
    for bad in ('sm_100f', 'sm_103f', 'sm_103'):
        with pytest.raises(ValueError):
            compiler.arch_flags(bad)
    names = {s.name for s in registry.all_specs()}
    for spec in SPECS:
        assert spec.name in names and spec.archs == ARCHS and spec.forbid_local_memory


@pytest.mark.parametrize('arch', ARCHS)
@pytest.mark.parametrize('spec', SPECS, ids=lambda s: s.name)
def test_compile_and_sass(cache, spec, arch):
    for params, rep, ops in compile_defaults(spec, arch):
        # the other recipe's MMA is absent: the kind is the recipe's
        if spec is gemm_sm100.GROUPED_GEMM_NVFP4:
            assert not any(o.startswith('UTCQMMA') for o in ops)
            assert ('UTCOMMA.4X' if arch == 'sm_100a' else 'UTCOMMA.BLOCK16') in ops
        else:
            assert not any(o.startswith('UTCOMMA') for o in ops)
        # SwiGLU reads TMEM as 16x256b, Plain as 32x32b
        ldtm = {o for o in ops if o.startswith('LDTM')}
        assert ldtm == ({'LDTM.16dp256bit.x4'} if 'SwiGLU' in params['epilogue'] else {'LDTM.x16'}), ldtm


@pytest.mark.parametrize('spec,spelling', [(gemm_sm100.GROUPED_GEMM_NVFP4, 'kind::mxf4nvf4.block_scale.block16'),
                                           (gemm_sm100.GROUPED_GEMM_MXFP4, 'kind::mxf8f6f4.block_scale.block32')],
                         ids=['nvfp4', 'mxfp4'])
def test_ptx_spells_block_scale(spec, spelling, tmp_path):
    ptx = kernel_ptx(spec, spec.default_params[0], 'sm_100a', tmp_path)
    assert spelling in ptx
    assert 'scale_vec' not in ptx
    assert 'tcgen05.cp.cta_group::1.32x128b.warpx4' in ptx and 'tcgen05.commit' in ptx


@pytest.mark.skipif(shutil.which('g++') is None, reason='needs g++')
def test_smem_bytes_match_the_plan(tmp_path):
    cases = [(r, bn, s) for r in ('nvfp4', 'mxfp4') for bn in (32, 64, 128) for s in (2, 6, 8)]
    enum = {'nvfp4': 'NVFP4', 'mxfp4': 'MXFP4_FP8'}
    body = '\n'.join(f'  std::printf("%u %u\\n", GemmPlan<Recipe::{enum[r]}, {bn}, {s}>::kSmemBytes, '
                     f'GemmPlan<Recipe::{enum[r]}, {bn}, {s}>::Tmem::kAlloc);' for r, bn, s in cases)
    lines = plan_program_lines(tmp_path, body)
    for (r, bn, s), line in zip(cases, lines):
        plan, tmem = map(int, line.split())
        assert gemm_sm100.smem_bytes(r, bn, s, 7) == 1024 + plan + 4 * 8
        assert gemm_sm100.smem_bytes(r, bn, s, 7, "swiglu_quant") == 1024 + plan + 64 * bn * 4 + 4 * 8
        assert tmem in (32, 64, 128, 256, 512) and tmem >= 2 * bn + (64 if r == "nvfp4" else 16)
    for r in ('nvfp4', 'mxfp4'):
        for bn in (32, 64, 128):
            for epi in ('plain', 'swiglu_quant'):
                assert gemm_sm100.smem_bytes(r, bn, gemm_sm100.stages(r, bn, 384, epi), 384, epi) <= 232448


def test_launcher_checks_without_gpu():
    c = torch.randint(0, 256, (2, 128, 128), dtype=torch.uint8)
    s = torch.full((2, 128, 16), 0x38, dtype=torch.uint8).view(torch.float8_e4m3fn)
    b = w100.transform_nvfp4_weights_for_sm100(c, s, torch.ones(2))
    x = torch.zeros(128, 128, dtype=torch.uint8)
    d = torch.zeros(128, 128, dtype=torch.bfloat16)
    offs = torch.tensor([0, 128, 128], dtype=torch.int32)
    with pytest.raises(TypeError, match='Sm100ExpertWeights'):
        gemm_sm100.m_grouped_fp4_gemm_nt_contiguous_sm100((x, s, 1.0), object(), d, offs)
    with pytest.raises(ValueError, match='CUDA device'):
        gemm_sm100.m_grouped_fp4_gemm_nt_contiguous_sm100((x, s, 1.0), b, d, offs)
    with pytest.raises(ValueError, match='block_n'):
        gemm_sm100._block_n(16, 16)
    assert gemm_sm100._block_n(20, None) == 32 and gemm_sm100._block_n(1000, None) == 128
