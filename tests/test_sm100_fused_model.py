"""The fused sm100 Mega MoE kernel's compute (impls/sm100_fp8_nvfp4_mega_moe.cuh), run on the functional
model on CPU (no Blackwell GPU needed): one rank and two emulated ranks, all four recipes (the kind::f16
ones, NVFP4_EXACT and BF16, at the end of this file).

tests/cpp/sm100_fused_model_emit.cpp runs one rank's roles with the kernel's own host-device code (work
order MegaMoEWork, GemmPlan::produce_tile / mma_tile / epilogue_tile with their Cursors over two plans,
the padded rows and plan tiles of scheduler/sm100_mega_tiles.cuh, the epilogues swiglu_quant_chunk +
quantize_l2_input and plain_rows_chunk) under a seeded cooperative scheduler; tests/sm100_model/fused.py
executes the stream on the interpreter as it comes (the registers of every tcgen05.ld are the
interpreter's), keeps the rank's memory (gathered L1 input, the L2 input bytes quantize_l2_input wrote,
combine rows, pushes), reduces every rank's tokens and compares with deep_gemm.reference_recipes
(reference_recipe_moe: y; recipe_expert_forward: every combine row) bit for bit, on exact data (power-of-
two alphas, no clamp).  The producer and MMA loops are the kernel's (mega_produce_units /
mega_mma_units, with the model's hooks); the epilogue's loop is mirrored in the emit program; ranks run in protocol phases, not interleaved (docs/sm100.md says what is
and is not modelled).  Broken kernels (faults of the emit program) must fail.
"""
import pytest

from tests.sm100_model import fused, interp

CONFIGS = {
    # one rank, 4 experts (expert 1 receives nothing), 40 tokens top-2, L2 right after each L1 block
    'nvfp4-1rank': dict(recipe='nvfp4', tokens=(40,)),
    # two CTAs claiming from one counter, lookahead: L2 blocks two experts later, 3 stages
    'nvfp4-1rank-2cta-lookahead': dict(recipe='nvfp4', tokens=(40,), ctas=2, stages=3, lookahead_experts=2, seed=1),
    'mxfp4-1rank': dict(recipe='mxfp4_fp8', tokens=(36,), block_t=64, seed=2),
    # two emulated ranks, 2 experts each (global expert 1 empty), pushes on / off
    'nvfp4-2rank-push': dict(recipe='nvfp4', ranks=2, experts_per_rank=2, tokens=(20, 13), push=1, ctas=2, seed=3),
    'nvfp4-2rank-pull': dict(recipe='nvfp4', ranks=2, experts_per_rank=2, tokens=(17, 9), seed=4),
    # a rank without tokens, an empty expert on the other rank
    'mxfp4-2rank-push': dict(recipe='mxfp4_fp8', ranks=2, experts_per_rank=2, tokens=(20, 0), empty_experts=(2,),
                             push=1, stages=3, seed=5),
}

_CACHE = {}


def _problem(name):
    if name not in _CACHE:
        _CACHE[name] = fused.FusedProblem(**CONFIGS[name]).build()
    return _CACHE[name]


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_matches_reference(name):
    p = _problem(name)
    runs, ys = fused.run_all(p)
    fused.check(p, runs, ys)
    counts = [c for r in p.data['counts'] for c in r]
    assert 0 in counts and len(set(counts)) > 2, 'non-uniform counts with an empty expert'
    for run in runs:
        m = sum(mm.counts.get('mma', 0) for mm in run.machines.values())
        assert (m > 0) == (len(run.rows) > 0)
        if len(run.rows):
            # both plans ran: L1 and L2 units, and the L2 input the L1 epilogue wrote was read
            phases = {u['phase'] for u in run.units_started.values()}
            assert phases == {0, 1}
            assert run.written[fused.T_L2_B].any() and run.written[fused.T_L2_SFB].any()
    if p.ranks == 2 and p.push:
        assert any(r.pushes for r in runs), 'pairs across ranks were pushed'


def test_seeds_give_other_interleavings_same_result():
    p = fused.FusedProblem(**CONFIGS['nvfp4-1rank'])
    p.build()
    ref = None
    for seed in (0, 11):
        p.seed = seed            # the scheduler's seed; data drawn once above
        runs, ys = fused.run_all(p)
        fused.check(p, runs, ys)
        if ref is None:
            ref = ys
        assert all((a == b).all() for a, b in zip(ys, ref))


# ------------------------------------------------------------------ negative controls (faults of the emit program)
FAULTS = {
    'no_l1_wait': 'L2 unit .* starts after',             # L2 units do not wait for their L1 units
    'swap_k': 'past the tensor|past its data|differ',    # the two plans' k exchanged
    'unpadded_b': 'nothing wrote|differ',                # token rows at the unpadded row numbering
    'combine_padded': 'combine|differ',                  # combine rows written at the padded rows
    'no_tag': 'deadlock|differ',                         # the first stage not tagged with its unit
}


def test_fault_build_without_fault_passes():
    p = _problem('nvfp4-1rank')
    runs, ys = fused.run_all(p, fault='none')
    fused.check(p, runs, ys)


@pytest.mark.parametrize('fault', sorted(FAULTS))
def test_broken_kernel_fails(fault):
    p = _problem('nvfp4-1rank')
    with pytest.raises((interp.ModelError, AssertionError), match=FAULTS[fault]):
        runs, ys = fused.run_all(p, fault=fault)
        fused.check(p, runs, ys)


@pytest.mark.parametrize('name', ['nvfp4-1rank', 'mxfp4-1rank'])
def test_missing_l1_dependency_caught_by_data(name):
    """Without the unit-order check, the dropped L1 -> L2 wait is still caught: the L2 unit's copies read
    L2-input bytes of its token tile that no L1 epilogue had written yet."""
    p = _problem(name)
    with pytest.raises((interp.ModelError, AssertionError), match='nothing wrote|differ'):
        runs, ys = fused.run_all(p, fault='no_l1_wait', check_order=False)
        fused.check(p, runs, ys)


def test_wrong_combine_source_fails():
    """The reduction reading a slot's combine row at the wrong row (each source's pairs owned by rank 0
    given each other's rows, rolled by one) must fail; the right rows pass."""
    import numpy as np
    p = _problem('nvfp4-2rank-pull')
    runs, ys = fused.run_all(p)
    fused.check(p, runs, ys)
    shifted = []
    for s, rows in enumerate(p.data['pair_row']):
        owner0 = (p.data['idx'][s].reshape(-1).numpy() // p.experts_per_rank) == 0
        r = rows.copy()
        r[owner0] = np.roll(rows[owner0], 1)
        shifted.append(r)
    with pytest.raises(AssertionError, match='y differs'):
        fused.check(p, runs, fused.reduce(p, runs, pair_row=shifted))


# ------------------------------------------------------------------ the kind::f16 recipes (NVFP4_EXACT, BF16)
# NVFP4_EXACT: the dequant warpgroup's loop is the kernel's (mega_dequant_units over GemmPlan::dequant_tile: ld.shared
# of the stage's codes and scale atoms, dequant_chunk replayed bit for bit by tests/sm100_model/f16.py, tcgen05.st),
# kind::f16 TS; BF16: kind::f16 SS.  Token rows unpadded, h (BF16) written by the L1 epilogue (swiglu_chunk /
# swiglu_bf16_chunk), read back by the L2 units' TMA.  K of both plans a multiple of 256 for the exact layout.
F16_CONFIGS = {
    'exact-1rank': dict(recipe='nvfp4_exact', tokens=(10,), experts_per_rank=3, hidden=256, inter=256, seed=6),
    'exact-2rank-push': dict(recipe='nvfp4_exact', ranks=2, experts_per_rank=2, tokens=(9, 6), hidden=256, inter=256,
                             push=1, ctas=2, seed=3),
    'bf16-1rank': dict(recipe='bf16', tokens=(12,), hidden=256, inter=128, stages=3, lookahead_experts=1, seed=7),
    'bf16-2rank-pull': dict(recipe='bf16', ranks=2, experts_per_rank=2, tokens=(8, 5), hidden=256, inter=128, seed=4),
}
# a small exact problem for the controls: one expert, one token tile
EXACT_CTL = dict(recipe='nvfp4_exact', tokens=(4,), experts_per_rank=2, topk=1, hidden=256, inter=256,
                 empty_experts=(1,))


def _f16_problem(name):
    if name not in _CACHE:
        _CACHE[name] = fused.FusedProblem(**(EXACT_CTL if name == 'exact-ctl' else F16_CONFIGS[name])).build()
    return _CACHE[name]


def _check_f16(p, runs, ys):
    if p.recipe == 'nvfp4_exact':
        off, total = fused.check_exact(p, runs, ys)
        # no h one ulp off on this data: check_exact then also compared with reference_moe_forward (y, every slot)
        assert off == 0 and total > 0
    else:
        fused.check(p, runs, ys)


@pytest.mark.parametrize('name', sorted(F16_CONFIGS))
def test_f16_matches_reference(name):
    """Bit for bit: NVFP4_EXACT against deep_gemm.reference (reference_moe_forward, combine_slots), BF16 against
    deep_gemm.reference_recipes (bf16xbf16); every combine row, y, the receive counts."""
    p = _f16_problem(name)
    runs, ys = fused.run_all(p)
    _check_f16(p, runs, ys)
    for run in runs:
        if not run.rows:
            continue
        c = {}
        for m in run.machines.values():
            for k, v in m.counts.items():
                c[k] = c.get(k, 0) + v
        if p.recipe == 'nvfp4_exact':
            assert c.get('mma_ts', 0) > 0 and c.get('tmem_st', 0) > 0 and c.get('dequant_chunk', 0) > 0
            assert c.get('mma', 0) == 0
        else:
            assert c.get('mma', 0) > 0 and c.get('mma_ts', 0) == 0 and c.get('tmem_st', 0) == 0
        assert {u['phase'] for u in run.units_started.values()} == {0, 1}
        assert run.written[fused.T_L2_B].any()      # the L1 epilogue's h, read by the L2 units
    if p.ranks == 2 and p.push:
        assert any(r.pushes for r in runs)


def test_exact_compensation_matches_the_kernel_constant():
    """The emit program's 2^7 (it cannot include common/fp4_bits.cuh) is fp4::kNvfp4Compensation."""
    import re
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    src = (root / 'deep_gemm/include/deep_gemm/common/fp4_bits.cuh').read_text()
    emit = (root / 'tests/cpp/sm100_fused_model_emit.cpp').read_text()
    assert re.search(r'kNvfp4Compensation = 128\.0f;', src)
    assert 'kComp = kDequant ? 128.0f : 1.0f;' in emit


F16_CONTROLS = {
    # (problem, fault of the emit program, mutation of the stream (tests/sm100_model/f16.py MUTATIONS), match)
    # the dequant's first 16 k of every chunk scaled by the next block's scale byte
    'scale_byte_off_by_one_block': ('exact-ctl', None, 'wrong_scale_byte', 'h differs'),
    # the TS MMA reading A at a column half a k16 step off
    'tmem_a_column_off': ('exact-ctl', None, 'a_kk_offset', 'no tcgen05.st wrote'),
    # the dequant loop not ending at the -1 tag (reads it as its last unit again)
    'dequant_skips_end_tag': ('exact-ctl', 'dequant_skip_end', None, 'deadlock'),
    'bf16_no_tag': ('bf16-2rank-pull', 'no_tag', None, 'deadlock'),
}


@pytest.mark.parametrize('control', sorted(F16_CONTROLS))
def test_f16_broken_kernel_fails(control):
    name, fault, mutate, match = F16_CONTROLS[control]
    p = _f16_problem(name)
    with pytest.raises((interp.ModelError, AssertionError), match=match):
        runs, ys = fused.run_all(p, fault=fault, mutate=mutate)
        _check_f16(p, runs, ys)
