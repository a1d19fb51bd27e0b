"""The sm100 kind::f16 recipes' descriptors and layouts against CUTLASS / CuTe, on the host (g++, no GPU).

tests/cpp/sm100_f16_conformance.cpp (built once per source hash, tests/sm100_model/build.py) includes the
kernel's headers and CuTe and compares, exhaustively over the shapes the kernels use:

* idesc: make_idesc_f16 (BF16 x BF16 and F16 x F16 -> F32; M = 128 and 64, every legal N, K- and
  MN-major) with UMMA::make_instr_desc / make_runtime_instr_desc, all 32 bits;
* plan_idesc: GemmPlan<NVFP4_EXACT | BF16>::idesc(kk) with CuTe's K x K BF16 descriptor (the TS form
  with A from TMEM uses the same descriptor: CuTe's SM100_MMA_F16BF16_TS requires a K-major A);
* smem_desc: the plans' B descriptors of every MMA of a stage (NVFP4_EXACT: 4 SW128 boxes of 64 BF16
  per stage of K = 256, 16 MMAs) and BF16's A descriptors with make_umma_desc<Major::K> of the same
  BF16 tile_to_shape(Layout_K_SW128_Atom) slices, all 64 bits;
* sw128_bf16: sw128_offset of BF16 elements with &tile(r, k);
* a_tmem: where the dequant warpgroup's tcgen05.st puts A element (m, k) of a stage (the plan's store
  address, the 32x32b fragment, the dequant's register order) with CuTe's A operand of
  SM100_MMA_F16BF16_TS (UMMA::tmem_frg_1sm<bf16>), and each MMA's A address with the start of CuTe's
  slice: (lane, 32-bit column, 16-bit half);
* tmem_st: the 32x32b store fragment with Copy_Traits<SM100_TMEM_STORE_32dp32b{1..32}x>.

Negative controls perturb one kernel-side quantity each (argv[1]); the matching check must fail.
"""
import pytest

from tests.sm100_model.build import assert_check_passes, conformance_fixtures, perturbation_mismatches

CHECKS = ['idesc', 'plan_idesc', 'smem_desc', 'sw128_bf16', 'a_tmem', 'tmem_st']
BREAKS = {'idesc_n': 'idesc', 'idesc_m': 'idesc', 'idesc_fmt': 'idesc', 'idesc_major': 'idesc',
          'plan_fmt': 'plan_idesc', 'smem_start': 'smem_desc', 'smem_box': 'smem_desc', 'smem_sbo': 'smem_desc',
          'sw128_xor': 'sw128_bf16', 'a_col': 'a_tmem', 'a_half': 'a_tmem', 'a_kk': 'a_tmem', 'st_col': 'tmem_st'}


conformance, results = conformance_fixtures('sm100_f16_conformance.cpp')


@pytest.mark.parametrize('check', CHECKS)
def test_kernel_matches_cute(results, check):
    assert_check_passes(results, check, min_cases=50)


@pytest.mark.parametrize('brk', sorted(BREAKS))
def test_kernel_perturbation_is_detected(conformance, brk):
    bad = perturbation_mismatches(conformance, brk)
    assert bad.get(BREAKS[brk], 0) > 0, f'perturbing {brk} went unnoticed ({bad})'
    # a perturbation touches only its own check
    assert set(bad) == {BREAKS[brk]}, bad
