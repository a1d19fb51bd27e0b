"""CPU tests of the kind::f16 recipes of the sm100 grouped GEMM (issue #27): Recipe::NVFP4_EXACT (NVFP4
weights dequantized exactly to BF16 by a dequant warpgroup, tcgen05.st into TMEM, tcgen05.mma kind::f16
with A from TMEM) and Recipe::BF16 (BF16 x BF16, both operands in shared memory).  Every registered
instantiation compiles for sm_100a and sm_103a with the expected SASS (UTCHMMA; STTM for the exact
recipe; no block-scaled MMA, no UTCCP) and no local memory; the PTX spells the TS / SS forms; the
launcher's shared-memory sizes, barrier counts and thread counts equal the plan's (g++); the launcher's
argument checks need no GPU.  No Blackwell GPU runs here (docs/sm100.md)."""
import re
import shutil

import pytest
import torch

from deep_gemm import gemm_sm100
from deep_gemm import weights_sm100 as w100
from deep_gemm.jit import registry
from tests.sm100_build_common import compile_defaults, jit_cache_fixture, kernel_ptx, plan_program_lines

ARCHS = ('sm_100a', 'sm_103a')
EXACT, BF16 = gemm_sm100.GROUPED_GEMM_NVFP4_EXACT, gemm_sm100.GROUPED_GEMM_BF16


cache = jit_cache_fixture('dg_sm100_f16_cache')


def test_registration():
    names = {s.name for s in registry.all_specs()}
    for spec in (EXACT, BF16):
        assert spec.name in names and spec.archs == ARCHS and spec.forbid_local_memory
    assert r'\bSTTM\b' in EXACT.required_sass_for('sm_100a') and r'\bUTCHMMA\b' in EXACT.required_sass_for('sm_103a')
    assert r'\bUTCHMMA\b' in BF16.required_sass_for('sm_100a')
    # what compile-all builds is what the launcher would pick
    for spec, fmt in ((EXACT, 'nvfp4_exact'), (BF16, 'bf16')):
        for p in spec.default_params:
            epi = 'swiglu' if 'SwiGLU' in p['epilogue'] else 'plain'
            assert p['stages'] == gemm_sm100.stages(fmt, p['block_n'], 384, epi), p


@pytest.mark.parametrize('arch', ARCHS)
@pytest.mark.parametrize('spec', (EXACT, BF16), ids=lambda s: s.name)
def test_compile_and_sass(cache, spec, arch):
    for params, rep, ops in compile_defaults(spec, arch):
        # kind::f16 only: no block-scaled MMA, no scale copies into TMEM
        assert not any(o.startswith(('UTCOMMA', 'UTCQMMA', 'UTCCP')) for o in ops), params
        if spec is EXACT:
            # 16 MMAs of K = 16 per stage of K = 256 (unrolled), 8 tcgen05.st 32x32b.x16 (one per 32 k)
            assert ops['UTCHMMA'] == 16 and ops['STTM.x16'] == 8, (params, ops['UTCHMMA'], ops['STTM.x16'])
            # the dequant: 4 bf16x2 multiplies per code word (32 words per stage) + 2 per scale (16)
            assert ops['HMUL2.BF16_V2'] + ops['HFMA2.BF16_V2'] >= 160, params
            assert rep.registers <= 168, rep.registers     # 384 threads, 1 CTA per SM
        else:
            assert ops['UTCHMMA'] >= 4 and not any(o.startswith('STTM') for o in ops), params
        ldtm = {o for o in ops if o.startswith('LDTM')}
        assert ldtm == ({'LDTM.16dp256bit.x4'} if 'SwiGLU' in params['epilogue'] else {'LDTM.x16'}), ldtm


def test_ptx_forms(tmp_path):
    ptx = kernel_ptx(EXACT, EXACT.default_params[0], 'sm_100a', tmp_path)
    # TS: the A operand is a TMEM address in brackets, B a 64-bit descriptor
    assert re.search(r'tcgen05\.mma\.cta_group::1\.kind::f16 \[%r\d+\], \[%r\d+\], %rd\d+', ptx)
    assert 'tcgen05.st.sync.aligned.32x32b.x16.b32' in ptx and 'tcgen05.wait::st' in ptx
    assert 'block_scale' not in ptx and 'tcgen05.cp' not in ptx
    ptx = kernel_ptx(BF16, BF16.default_params[0], 'sm_100a', tmp_path)
    # SS: both operands descriptors
    assert re.search(r'tcgen05\.mma\.cta_group::1\.kind::f16 \[%r\d+\], %rd\d+, %rd\d+', ptx)
    assert 'tcgen05.st' not in ptx and 'block_scale' not in ptx


@pytest.mark.skipif(shutil.which('g++') is None, reason='needs g++')
def test_plan_numbers_match_the_launcher(tmp_path):
    enum = {'nvfp4_exact': 'NVFP4_EXACT', 'bf16': 'BF16'}
    cases = [(r, bn, s) for r in enum for bn in (32, 64, 128) for s in (2, 4, 6)]
    body = '\n'.join(
        f'  {{ using P = GemmPlan<Recipe::{enum[r]}, {bn}, {s}>; std::printf("%u %u %d %d %d %d %u\\n", P::kSmemBytes, '
        f'P::Tmem::kAlloc, P::kNumThreads, P::kNumBarriers, P::kEmptyCount, P::kMmasPerStage, P::kStageBytes); }}'
        for r, bn, s in cases)
    lines = plan_program_lines(tmp_path, body)
    for (r, bn, s), line in zip(cases, lines):
        plan, tmem, threads, bars, empty_count, mmas, stage = map(int, line.split())
        assert gemm_sm100.smem_bytes(r, bn, s, 7) == 1024 + plan + 4 * 8, (r, bn, s)
        assert threads == gemm_sm100.num_threads(r)
        if r == 'nvfp4_exact':
            # accumulators 2 N + two A slots of 128 columns; dequant barriers; MMA commit + 4 dequant warps
            assert tmem == 512 and 2 * bn + 256 <= 512                # 1 CTA per SM: all of TMEM
            assert bars == 2 * s + 8 and empty_count == 5 and mmas == 16 and threads == 384
            assert stage == 128 * 128 + 4 * bn * 128 + 4 * 512
        else:
            assert tmem >= 2 * bn and bars == 2 * s + 4 and empty_count == 1 and mmas == 4 and threads == 256
            assert stage == 128 * 128 + bn * 128
    for r in enum:
        for bn in (32, 64, 128):
            for epi in ('plain', 'swiglu'):
                assert gemm_sm100.smem_bytes(r, bn, gemm_sm100.stages(r, bn, 384, epi), 384, epi) <= 232448


def test_launcher_checks_without_gpu():
    c = torch.randint(0, 256, (2, 128, 128), dtype=torch.uint8)
    s = torch.full((2, 128, 16), 0x38, dtype=torch.uint8).view(torch.float8_e4m3fn)
    ex = w100.to_sm100_exact(w100.transform_nvfp4_weights_for_sm100(c, s, torch.ones(2)))
    assert ex.fmt == 'nvfp4_exact'
    bf = w100.transform_bf16_weights_for_sm100(torch.randn(2, 128, 256).bfloat16())
    x = torch.zeros(128, 256, dtype=torch.bfloat16)
    d = torch.zeros(128, 128, dtype=torch.bfloat16)
    offs = torch.tensor([0, 128, 128], dtype=torch.int32)
    for b in (ex, bf):
        with pytest.raises(ValueError, match='CUDA device'):
            gemm_sm100.m_grouped_fp4_gemm_nt_contiguous_sm100(x, b, d, offs)
    with pytest.raises(ValueError, match='NVFP4'):
        w100.to_sm100_exact(ex)
    with pytest.raises(TypeError):
        w100.transform_bf16_weights_for_sm100(torch.randn(2, 128, 256))


def test_fp8_tokens_to_bf16_is_exact():
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn)
    codes = codes[~torch.isnan(codes.float())]
    x = codes.repeat(4, 1)[:, :224]
    sf = torch.tensor([[100] * 7, [127] * 7, [140] * 7, [160] * 7], dtype=torch.uint8)
    y = gemm_sm100.fp8_tokens_to_bf16(x, sf)
    want = x.double() * torch.exp2(sf.double() - 127).repeat_interleave(32, dim=-1)
    assert torch.equal(y.double(), want)
    with pytest.raises(ValueError, match='not exact'):
        gemm_sm100.fp8_tokens_to_bf16(x, torch.full((4, 7), 1, dtype=torch.uint8))   # 2^-126 * subnormal E4M3
