"""The fused sm100 Mega MoE kernel's compute (impls/sm100_fp8_nvfp4_mega_moe.cuh), run on the functional
model on CPU (no Blackwell GPU needed): one rank and two emulated ranks, both block-scaled recipes.

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
