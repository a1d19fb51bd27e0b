"""The sm100 grouped expert GEMM, run on a functional model on CPU (no Blackwell GPU needed).

tests/cpp/sm100_model_emit.cpp compiles the kernel's own issue loops (scheduler/sm100_gemm_plan.cuh:
producer, MMA warp, 128 epilogue threads; descriptors and layouts from common/sm100_umma.cuh) with a
recording Ops policy and prints the op stream of one legal interleaving (a seeded cooperative scheduler
over modelled mbarriers).  tests/sm100_model/interp.py executes it from the documented semantics on real
quantized data (ModelOpt NVFP4 / MXFP4 weights, NVFP4 / FP8 tokens, laid out as the plan header's global
tensors by the model's own code); the result must equal the float64 reference of the same quantized
values (exact sums, deep_gemm.reference_recipes.exact_rows_matmul) to 1e-5 relative -- in fact bit for
bit float32 of the exact sum -- with every output written once and nothing else written.
Deliberately broken plans (tests/sm100_model/mutate.py) must fail.

Tiles come from the kernel's scheduler (GroupedTiles::get on the host) and registers are placed by the
kernel's index maps (GemmPlan::plain_out / swiglu_out); altered maps and a broken barrier protocol
(deadlock) must fail.  The epilogue math after the accumulator (alpha, SwiGLU, BF16, the SwiGLUQuant
L2-input quantization) runs the kernel's callbacks (epilogue/sm100_epilogue.cuh) in
tests/cpp/sm100_epilogue_check.cpp on exact accumulators, against deep_gemm.reference_recipes
(tests/sm100_model/epilogue.py).  Not covered (tests/sm100_model/INTERFACE-REQUESTS.md, "Left open"):
asynchrony beyond the barrier protocol (copies and MMAs complete when issued in the model).
"""
import pytest

from tests.sm100_model import interp, mutate
from tests.sm100_model.build import build
from tests.sm100_model.problem import EMIT_SRC, Problem, compare, run_model

CONFIGS = {
    'nvfp4-plain-contig': dict(recipe='nvfp4', block_n=64, stages=2, epilogue='plain', mode='contiguous', n=256, k=512,
                               counts=[100, 0, 37]),
    'nvfp4-swiglu-contig': dict(recipe='nvfp4', block_n=32, stages=2, epilogue='swiglu', mode='contiguous', n=256, k=512,
                                counts=[40, 0, 100]),
    'nvfp4-plain-masked-2cta': dict(recipe='nvfp4', block_n=128, stages=3, epilogue='plain', mode='masked', n=128, k=768,
                                    counts=[200, 0, 5], max_rows=256, ctas=2),
    'mxfp4-plain-contig-2cta': dict(recipe='mxfp4_fp8', block_n=128, stages=3, epilogue='plain', mode='contiguous', n=256,
                                    k=256, counts=[129, 0, 1], ctas=2),
    'mxfp4-swiglu-masked': dict(recipe='mxfp4_fp8', block_n=32, stages=3, epilogue='swiglu', mode='masked', n=256, k=256,
                                counts=[70, 0, 33], max_rows=128),
    'mxfp4-plain-masked': dict(recipe='mxfp4_fp8', block_n=64, stages=2, epilogue='plain', mode='masked', n=128, k=384,
                               counts=[64, 0, 0, 17], max_rows=128),
}

_CACHE = {}


def _problem(name, **over):
    key = (name, tuple(sorted(over.items())))
    if key not in _CACHE:
        p = Problem(**{**CONFIGS[name], **over})
        ops = p.emit()
        p.build_data()
        _CACHE[key] = (p, ops)
    return _CACHE[key]


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_matches_reference(name):
    p, ops = _problem(name)
    outs, written, machines = run_model(p, ops)
    compare(p, outs)
    assert sum(m.counts.get('mma', 0) for m in machines.values()) > 0
    # an expert with no tokens owns no tiles: its weights are never read
    head = ops[0]
    empty = [e for e, c in enumerate(p.counts) if c == 0]
    assert empty and all(t[0] not in empty for t in head['tiles'])
    loaded_rows = {o['coords'][1] // p.n for o in ops if o['op'] == 'tma_load' and o['tensor'] == 0}
    assert not loaded_rows & set(empty)


def test_interleavings_differ_results_do_not():
    base, ops0 = _problem('nvfp4-swiglu-contig')
    ref = run_model(base, ops0)[0]
    orders = {tuple(o['op'] for o in ops0)}
    for seed in (1, 2):
        p, ops = _problem('nvfp4-swiglu-contig', seed=seed)
        orders.add(tuple(o['op'] for o in ops))
        p.tensors, p.w_dq, p.x_dq = base.tensors, base.w_dq, base.x_dq      # same data
        outs = run_model(p, ops)[0]
        for tid in ref:
            assert ((outs[tid] == ref[tid]) | ((outs[tid] != outs[tid]) & (ref[tid] != ref[tid]))).all()
    assert len(orders) == 3, 'the scheduler seeds should give different interleavings'


def test_no_tokens_at_all():
    p = Problem(recipe='nvfp4', block_n=64, stages=2, epilogue='plain', mode='masked', n=128, k=256, counts=[0, 0],
                max_rows=128)
    ops = p.emit()
    p.build_data()
    assert not [o for o in ops if o['op'] in ('tma_load', 'mma', 'tmem_ld')]
    outs, written, _ = run_model(p, ops)
    assert not written[4].any()


MUTATED = ['nvfp4-swiglu-contig', 'mxfp4-swiglu-masked']


@pytest.mark.parametrize('name', MUTATED)
@pytest.mark.parametrize('bug', sorted(mutate.BROKEN))
def test_broken_plan_fails(name, bug):
    p, ops = _problem(name)
    bad = mutate.BROKEN[bug](ops)
    if bug == 'swap_sf_atoms_in_stage' and p.recipe == 'mxfp4_fp8':
        assert bad == ops          # one scale atom per stage: nothing to swap (the across-k variant covers it)
        return
    if bug == 'wrong_sf_id' and p.recipe == 'nvfp4':
        with pytest.raises(interp.ModelError, match='illegal for scale_vec::4X'):
            run_model(p, bad)
        return
    with pytest.raises((interp.ModelError, AssertionError)):
        outs, _, _ = run_model(p, bad)
        compare(p, outs)


@pytest.mark.parametrize('name', MUTATED)
def test_lbo_is_not_used(name):
    """LBO of a K-major SW128 operand addresses nothing (the MMA's 32-byte K run lies in one swizzle row):
    the model ignores it, so upstream's LBO = 0 gives the same result as CuTe's 16."""
    p, ops = _problem(name)
    outs, _, _ = run_model(p, mutate.lbo_zero(ops))
    compare(p, outs)
    assert any(interp.decode_smem_desc(o['adesc'])['lbo'] == 16 for o in ops if o['op'] == 'mma')


def test_model_rejects_reads_of_unwritten_memory():
    """A load the plan forgot (the B tile of the first stage dropped) is an error, not zeros."""
    p, ops = _problem('nvfp4-plain-contig')
    first_b = next(i for i, o in enumerate(ops) if o['op'] == 'tma_load' and o['tensor'] == 2)
    bad = ops[:first_b] + ops[first_b + 1:]
    with pytest.raises(interp.ModelError, match='no copy wrote|cannot have completed'):
        run_model(p, bad)


def test_model_rejects_overwrite_under_an_uncommitted_mma():
    """A stage refilled before the MMAs reading it were committed (the producer not waiting on empty):
    moving the first commit after the next refill of that stage must be caught."""
    p, ops = _problem('nvfp4-plain-contig')
    c = next(i for i, o in enumerate(ops) if o['op'] == 'commit')
    stage_a = next(o['smem'] for o in ops if o['op'] == 'tma_load' and o['tensor'] == 0)
    refill = next(i for i, o in enumerate(ops) if i > c and o['op'] == 'tma_load' and o['tensor'] == 0 and o['smem'] == stage_a)
    commit = ops[c]
    bad = ops[:c] + ops[c + 1:refill] + ops[refill:refill + 1] + [commit] + ops[refill + 1:]
    with pytest.raises(interp.ModelError, match='uncommitted MMA|cannot have completed'):
        run_model(p, bad)


# ------------------------------------------------------------------ negative controls of the emit program
def _fault_exe():
    return build(EMIT_SRC, cute=False, defines=['DG_EMIT_FAULTS'], name='sm100_model_emit_faults')


def _emit_with_fault(monkeypatch, name, fault):
    """The op stream of CONFIGS[name] with one fault of the emit program (tests/cpp/sm100_model_emit.cpp,
    -DDG_EMIT_FAULTS) applied to the kernel functions' results; the data of the clean problem."""
    base, _ = _problem(name)
    monkeypatch.setenv('DG_EMIT_FAULT', fault)
    p = Problem(**CONFIGS[name])
    ops = p.emit(_fault_exe())
    p.tensors, p.w_dq, p.x_dq = base.tensors, base.w_dq, base.x_dq
    return p, ops


def test_fault_build_without_fault_passes(monkeypatch):
    """The fault build with no fault selected is the clean model (the controls below differ by the fault only)."""
    p, ops = _emit_with_fault(monkeypatch, 'nvfp4-swiglu-contig', 'none')
    compare(p, run_model(p, ops)[0])


@pytest.mark.parametrize('name,fault', [('nvfp4-plain-contig', 'plain'), ('nvfp4-swiglu-contig', 'swiglu'),
                                        ('mxfp4-swiglu-masked', 'swiglu')])
def test_altered_kernel_map_fails(monkeypatch, name, fault):
    """The emit program places registers with the kernel's GemmPlan::plain_out / swiglu_out: a map whose
    output column (channel) is off by one must make the model fail."""
    p, ops = _emit_with_fault(monkeypatch, name, fault)
    with pytest.raises((interp.ModelError, AssertionError)):
        compare(p, run_model(p, ops)[0])


def test_scheduler_reports_deadlock(monkeypatch):
    """The cooperative scheduler's deadlock detection: with the epilogue's arrivals on tmem_empty dropped,
    the MMA warp waits forever for an accumulator buffer from the third tile of a CTA on (8 tiles here)."""
    with pytest.raises(interp.ModelError, match='deadlock'):
        _emit_with_fault(monkeypatch, 'nvfp4-plain-contig', 'deadlock')


def test_token_groups_from_the_kernel_scheduler():
    """GroupedTiles::get (the kernel's scheduler, host form) with token tiles in groups of 1: row tiles
    inner; the model result is unchanged and every (expert, row tile, token tile) appears once."""
    p = Problem(**{**CONFIGS['mxfp4-swiglu-masked']})
    ops = p.emit(token_group=1)
    p.build_data()
    compare(p, run_model(p, ops)[0])
    tiles = [tuple(t[:3]) for t in ops[0]['tiles']]
    assert len(set(tiles)) == len(tiles)
    e0 = [t for t in tiles if t[0] == 0]
    assert e0[:2] == [(0, 0, 0), (0, 1, 0)], 'groups of one token tile: the row tiles of token tile 0 first'


# ------------------------------------------------------------------ the epilogue math (tests/sm100_model/epilogue.py)
EPI_CASES = {
    'nvfp4-plain-masked': dict(recipe='nvfp4', epilogue='plain', block_n=64, mode='masked', n=256, counts=[70, 0, 5],
                               max_rows=128),
    'nvfp4-plain-contig-weighted': dict(recipe='nvfp4', epilogue='plain', block_n=32, mode='contiguous', n=256,
                                        counts=[128, 0, 256], weighted=True),
    'mxfp4-swiglu-contig-weighted': dict(recipe='mxfp4_fp8', epilogue='swiglu', block_n=32, mode='contiguous', n=256,
                                         counts=[128, 0, 256], weighted=True),
    'nvfp4-swiglu_quant-masked': dict(recipe='nvfp4', epilogue='swiglu_quant', block_n=64, mode='masked', n=256,
                                      counts=[100, 0, 37], max_rows=128, clamp=641.3),
    'nvfp4-swiglu_quant-contig': dict(recipe='nvfp4', epilogue='swiglu_quant', block_n=128, mode='contiguous', n=128,
                                      counts=[128, 128]),
    'mxfp4-swiglu_quant-masked-weighted': dict(recipe='mxfp4_fp8', epilogue='swiglu_quant', block_n=32, mode='masked',
                                               n=256, counts=[33, 90], max_rows=128, weighted=True, clamp=641.3),
    'mxfp4-swiglu_quant-contig': dict(recipe='mxfp4_fp8', epilogue='swiglu_quant', block_n=128, mode='contiguous', n=384,
                                      counts=[128]),
}


@pytest.mark.parametrize('name', sorted(EPI_CASES))
def test_epilogue_math_matches_reference(name):
    from tests.sm100_model.epilogue import Case
    case = Case(**EPI_CASES[name])
    case.check(case.run())


@pytest.mark.parametrize('name,fault', [('nvfp4-swiglu_quant-masked', 'gate_up'), ('mxfp4-swiglu_quant-masked-weighted', 'gate_up'),
                                        ('mxfp4-swiglu-contig-weighted', 'gate_up'), ('nvfp4-swiglu_quant-masked', 'block'),
                                        ('mxfp4-swiglu_quant-masked-weighted', 'block'), ('nvfp4-plain-contig-weighted', 'weight_rows'),
                                        ('nvfp4-swiglu_quant-masked', 'none')])
def test_broken_epilogue_fails(name, fault):
    """The check program built with its faults (-DDG_EPI_FAULTS): gate and up swapped before the kernel's
    callbacks, the L2 block's amax over half the block, or the weighted L2's route weights read from row 0
    instead of the tile's first row, must fail; no fault selected must pass."""
    from tests.sm100_model.epilogue import Case
    case = Case(**EPI_CASES[name])
    if fault == 'none':
        case.check(case.run(fault='none'))
        return
    with pytest.raises(AssertionError):
        case.check(case.run(fault=fault))
