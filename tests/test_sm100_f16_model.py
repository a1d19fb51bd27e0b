"""Functional model of the sm100 kind::f16 recipes (tests/sm100_model/f16.py on interp.py; the op stream of
the kernel's own issue loops, GemmPlan::producer / mma / dequant / epilogue, recorded by
tests/cpp/sm100_f16_model_emit.cpp under a seeded cooperative scheduler of all roles).

* Recipe::NVFP4_EXACT (NVFP4 weights, FP8 tokens made BF16 exactly, the dequant warpgroup's BF16 A
  through tcgen05.st into TMEM, kind::f16 MMAs with A from TMEM): every output equals float32 of the exact
  float64 sum of the quantized products (times 2^-7: the model stores raw accumulators), Plain and
  SwiGLU, contiguous and masked, with A slots reused across k blocks and tiles.
* Recipe::BF16 (SS): the same, both operands from shared memory.
* The dequant's bit operations, on every E2M1 code in every position of a word and every UE4M3 scale in
  both positions of a chunk, are code * scale * 2^-7 exactly.
* Broken plans fail: A stored at the wrong columns, MMA reading A half a step off, the wrong scale byte,
  the A slots' commits dropped (a wait that cannot complete), a tcgen05.st over A that an uncommitted MMA
  still reads.
"""
import numpy as np
import pytest

from tests.sm100_model import f16, interp
from tests.sm100_model.problem import compare

E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def _problem(recipe, epilogue, mode, counts, block_n=32, stages=2, n=128, k=512, seed=1):
    p = f16.F16Problem(recipe=recipe, block_n=block_n, stages=stages, epilogue=epilogue, mode=mode, n=n, k=k,
                       counts=counts, max_rows=128 if mode == 'masked' else 0, seed=seed)
    ops = p.emit()
    p.build_data()
    return p, ops


@pytest.fixture(scope='module')
def exact_plain():
    return _problem('nvfp4_exact', 'plain', 'contiguous', [40])


def test_exact_recipe_plain_contiguous(exact_plain):
    p, ops = exact_plain
    head = ops[0]
    assert head['threads'] == 384 and head['tmem_cols'] == 512
    outs, _, machines = f16.run_model_f16(p, ops)
    compare(p, outs)
    c = machines[0].counts
    # the expert's 40 rows padded to 128 (contiguous offsets are multiples of 128, and the kernel's
    # GroupedTiles computes the padding rows too): 4 token tiles x 2 k blocks; 128 dequant threads x 8
    # k blocks x (8 code chunks + 4 scale words) loads, 8 chunks each dequantized and stored; 16 MMAs per k block
    assert c['lds'] == 128 * 8 * 12 and c['dequant_chunk'] == c['tmem_st'] == 128 * 8 * 8
    assert c['mma_ts'] == 8 * 16 and 'utccp' not in c and 'mma' not in c


@pytest.mark.parametrize('recipe,epilogue,mode,counts,block_n,stages', [
    ('nvfp4_exact', 'swiglu', 'masked', [20, 33], 32, 2),
    ('nvfp4_exact', 'plain', 'masked', [64, 0, 7], 64, 3),
    ('bf16', 'plain', 'contiguous', [40, 70], 32, 3),
    ('bf16', 'swiglu', 'masked', [64, 5], 64, 2),
], ids=['exact-swiglu-masked', 'exact-plain-masked-n64', 'bf16-plain-contiguous', 'bf16-swiglu-masked'])
def test_recipes_match_the_reference(recipe, epilogue, mode, counts, block_n, stages):
    p, ops = _problem(recipe, epilogue, mode, counts, block_n, stages, seed=2)
    outs, _, machines = f16.run_model_f16(p, ops)
    compare(p, outs)
    ops_seen = set().union(*(m.counts for m in machines.values()))
    if recipe == 'bf16':
        assert 'mma' in ops_seen and 'mma_ts' not in ops_seen and 'tmem_st' not in ops_seen
    else:
        assert 'mma_ts' in ops_seen and 'mma' not in ops_seen


def test_dequant_every_code_and_scale_exact():
    """dequant_chunk (the bit-exact replay of sm100_dequant.cuh) on words from the real transform
    (weights_sm100.to_sm100_exact): register 4 w + i, half h = code(k = 8 w + 2 i + h) * scale * 2^-7."""
    import torch
    from deep_gemm import weights_sm100 as w100
    # one row per (scale code, position): 127 finite UE4M3 codes; codes: every nibble in every k of a chunk
    rows = 128
    gen = torch.Generator().manual_seed(5)
    codes = torch.randint(0, 256, (1, rows, 256 // 2), generator=gen, dtype=torch.uint8)
    codes[0, :, :16] = torch.arange(256, dtype=torch.int32).to(torch.uint8).reshape(16, 16).repeat(8, 1)[:rows, :16]
    sc = (torch.arange(rows * 16).reshape(1, rows, 16) % 127).to(torch.uint8)
    ws = w100.to_sm100_exact(w100.transform_nvfp4_weights_for_sm100(codes, sc.view(torch.float8_e4m3fn), torch.ones(1)))
    cw = ws.codes[0].contiguous().view(torch.int32).numpy().view(np.uint32).astype(np.uint64)      # [rows, 32] words
    atoms = ws.scales[0, 0].numpy()                                                                  # [4, 512]
    e4m3 = interp.E4M3_VALUES
    for m in range(rows):
        for c in range(8):
            off = 16 * (m % 32) + 4 * (m // 32)
            sw = int.from_bytes(atoms[c // 2, off:off + 4].tobytes(), 'little')
            regs = f16.dequant_chunk(cw[m, 4 * c:4 * c + 4], sw, (2 * c) % 4)
            got = np.stack([f16.bf16_bits_to_f64(regs & 0xFFFF), f16.bf16_bits_to_f64(regs >> 16)], -1).reshape(-1)
            k = 32 * c + np.arange(32)
            byte = codes[0, m, k // 2].numpy().astype(np.int64)
            nib = (byte >> (4 * (k % 2))) & 0xF
            want = E2M1[nib] * e4m3[sc[0, m, k // 16].numpy().astype(np.int64)] / f16.COMPENSATION
            assert np.array_equal(got, want), (m, c)


@pytest.mark.parametrize('name', sorted(f16.MUTATIONS))
def test_broken_plan_fails(exact_plain, name):
    p, ops = exact_plain
    with pytest.raises((interp.ModelError, AssertionError)):
        outs, _, _ = f16.run_model_f16(p, f16.MUTATIONS[name](ops))
        compare(p, outs)
