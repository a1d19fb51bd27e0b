"""sm100 descriptors and layouts against CUTLASS / CuTe, on the host (g++, no GPU).

Two programs, built once per source hash (tests/sm100_model/build.py):

* tests/cpp/sm100_conformance.cpp includes the kernel's headers (common/sm100_umma.cuh,
  scheduler/sm100_gemm_plan.cuh) and CuTe and compares, exhaustively over the kernels' shapes and types,
  every instruction descriptor, shared-memory descriptor, SW128 offset, scale layout (global atoms and
  TMEM columns), accumulator column and tcgen05.ld fragment with CuTe's builders / layouts.  Its
  negative controls perturb one kernel-side quantity each (argv[1]); the matching check must fail.
* tests/cpp/sm100_cute_oracle.cpp dumps CuTe's layouts; the functional model's own layout functions
  (tests/sm100_model/interp.py) are compared with them, so a misunderstanding shared by the kernel and
  the model is caught; wrong variants of those functions must differ from CuTe (negative controls).

What is masked, and why: the no-swizzle scale-atom descriptor (tcgen05.cp source) differs in LBO
(kernel 0, CuTe 16): its K extent is one 16-byte core matrix, so LBO addresses nothing; an 8-row SW128
tile's SBO (CuTe 0, kernel 1024): a single 8-row group, nothing to stride to.  The SW128 operand
descriptors are compared on all 64 bits (the kernel writes LBO = 16 as CuTe does; upstream DeepGEMM
writes 0: for a K-major swizzled operand the MMA's K run, 32 bytes, lies inside one 128-byte swizzle
row, so LBO is not used - the model ignores it and tests/test_sm100_model.py shows LBO = 0 gives the
same results).  Scale-atom order: the kernel's global scale tensors use CuTe's order (K-first inside a
128-row group, then the groups: experts x row tiles for weights, 128-token groups for tokens); the
TMEM copies of a stage's atoms go to consecutive 4-column slots, one per MMA of K = 64 (NVFP4), or one
atom for the 4 MMAs of K = 32 with sf_id = byte kk (MXFP4 x FP8).
"""
import numpy as np
import pytest

from tests.sm100_model import interp
from tests.sm100_model.build import CPP, assert_check_passes, build, conformance_fixtures, perturbation_mismatches, run_lines

CHECKS = ['idesc', 'smem_desc', 'sw128', 'sf_desc', 'sf_global', 'sf_tmem', 'tmem_acc', 'tmem_ld']
BREAKS = {'idesc_n': 'idesc', 'idesc_sfid': 'idesc', 'idesc_fmt': 'idesc', 'smem_sbo': 'smem_desc',
          'smem_start': 'smem_desc', 'smem_layout': 'smem_desc', 'smem_version': 'smem_desc', 'sw128_xor': 'sw128',
          'sf_atom_order': 'sf_global', 'sf_byte': 'sf_global', 'sfb_col': 'sf_tmem', 'sf_tmem_col': 'sf_tmem',
          'acc_col': 'tmem_acc', 'ld16_lane': 'tmem_ld', 'ld32_col': 'tmem_ld'}


conformance, results = conformance_fixtures('sm100_conformance.cpp')


@pytest.fixture(scope='module')
def oracle():
    exe = build(CPP / 'sm100_cute_oracle.cpp')
    _, lines, _ = run_lines(exe)
    out = {}
    for d in lines:
        out.setdefault(d['what'], []).append(d)
    return out


# ------------------------------------------------------------------------ kernel headers vs CuTe
@pytest.mark.parametrize('check', CHECKS)
def test_kernel_matches_cute(results, check):
    assert_check_passes(results, check, min_cases=101)   # more than 100 cases


@pytest.mark.parametrize('brk', sorted(BREAKS))
def test_kernel_perturbation_is_detected(conformance, brk):
    bad = perturbation_mismatches(conformance, brk)
    assert bad.get(BREAKS[brk], 0) > 0, f'perturbing {brk} went unnoticed ({bad})'


def test_kernel_legality_tables_match_the_isa(results):
    """The kernel's is_legal_combo / is_legal_sf_id / is_legal_shape against the model's PTX ISA table,
    every kind x element format x scale format, sf id and N; and the model rejects each illegal
    combination's descriptor."""
    combos = [d for d in results if d.get('legal') == 'combo']
    assert len(combos) == 2 * 5 * 5 * 2
    scale = {0: 'ue4m3', 1: 'ue8m0'}
    for d in combos:
        want = interp.ptx_legal_combo(d['kind'], d['a'], d['b'], scale[d['scale']])
        assert bool(d['ok']) == want, d
        if not want and d['kind'] == 'mxf8f6f4.block32':   # mxf4nvf4 encodes every format as E2M1
            with pytest.raises(interp.ModelError):
                interp.check_mma_legal(d['kind'], interp.decode_idesc(d['idesc']))
    for d in (d for d in results if d.get('legal') == 'sf_id'):
        assert bool(d['ok']) == interp.ptx_legal_sf_id(d['kind'], d['id']), d
    shapes = [d for d in results if d.get('legal') == 'shape']
    assert shapes
    for d in shapes:
        assert bool(d['ok']) == interp.ptx_legal_shape(d['m'], d['n']), d
    # the illegal E4M3 x E2M1 with UE4M3 that CuTe encodes without complaint
    assert any(not d['ok'] and d['a'] == 'e4m3' and d['scale'] == 0 and d['kind'] == 'mxf8f6f4.block32' for d in combos)


# ------------------------------------------------------------------------ the model's layouts vs CuTe
FMT_CODES = {'mxf4nvf4.block16': {'e2m1': 1}, 'mxf8f6f4.block32': {'e4m3': 0, 'e2m1': 5}}


def test_model_decodes_cute_instruction_descriptors(oracle):
    rows = oracle['idesc']
    assert len(rows) > 1000
    for d in rows:
        f = interp.decode_idesc(d['value'])
        kind = d['kind']
        assert (f['m'], f['n'], f['sfa_id'], f['sfb_id']) == (128, d['n'], d['sfa_id'], d['sfb_id']), d
        assert f['scale_fmt'] == {'ue4m3': 0, 'ue8m0': 1}[d['sf']], d
        if kind.startswith('illegal'):
            with pytest.raises(interp.ModelError, match='illegal'):
                interp.check_mma_legal('mxf8f6f4.block32', f)
            continue
        assert (f['a_fmt'], f['b_fmt']) == (FMT_CODES[kind][d['a']], FMT_CODES[kind][d['b']]), d
        if interp.ptx_legal_sf_id(kind, d['sfa_id']) and interp.ptx_legal_sf_id(kind, d['sfb_id']):
            assert interp.check_mma_legal(kind, f) == (d['a'], d['b'], d['sf'])
        else:
            with pytest.raises(interp.ModelError, match='sf._id'):
                interp.check_mma_legal(kind, f)


def test_model_decodes_cute_smem_descriptors(oracle):
    rows = oracle['smem_desc']
    assert len(rows) == 2 * 5 * 32 * 4
    for d in rows:
        f = interp.decode_smem_desc(d['value'])
        assert f['start'] == d['base'] + 32 * d['kk'], d
        assert (f['version'], f['layout'], f['base_offset'], f['lbo_mode'], f['reserved']) == (1, 2, 0, 0, 0), d
        assert f['sbo'] == (1024 if d['rows'] > 8 else 0), d
        assert f['lbo'] == 16, d
    for d in oracle['utccp_desc']:
        f = interp.decode_smem_desc(d['value'])
        assert (f['layout'], f['sbo'], f['start'], f['version']) == (0, 128, d['base'], 1), d
        # the model's tcgen05.cp source rows: the scale atom's 32 rows of 16 bytes, contiguous
        assert np.array_equal(interp.utccp_rows(f['start'], f['sbo']), d['base'] + 16 * np.arange(32))


def _sw_ok(fn, oracle):
    for d in oracle['sw128']:
        base, rows = d['base'], d['rows']
        r = np.arange(rows)[:, None]
        if d['elem'] == 'u8':
            k = np.arange(128)[None, :]
            if not np.array_equal(fn(base, 1024, r, k).reshape(-1), np.asarray(d['offsets'])):
                return False
        else:
            k = np.arange(256)[None, :]
            want = 2 * fn(base, 1024, r, k // 2) + k % 2
            if not np.array_equal(want.reshape(-1), np.asarray(d['nibbles'])):
                return False
    return True


def test_model_sw128_matches_cute(oracle):
    assert len(oracle['sw128']) == 6
    assert _sw_ok(interp.kmajor_sw_addr, oracle)
    # the descriptor-driven form (k block kk = start + 32 kk) is the same function at shifted starts
    d = next(x for x in oracle['sw128'] if x['elem'] == 'u8' and x['base'] == 3072)
    off = np.asarray(d['offsets']).reshape(32, 128)
    for kk in range(4):
        got = interp.kmajor_sw_addr(3072 + 32 * kk, 1024, np.arange(32)[:, None], np.arange(32)[None, :])
        assert np.array_equal(got, off[:, 32 * kk:32 * kk + 32])


def test_model_sw128_negative_controls(oracle):
    def bits_8_10(start, sbo, row, kbyte):
        lin = start + (np.asarray(row) // 8) * sbo + (np.asarray(row) % 8) * 128 + np.asarray(kbyte)
        return lin ^ (((lin >> 8) & 7) << 4)

    def no_swizzle(start, sbo, row, kbyte):
        return start + (np.asarray(row) // 8) * sbo + (np.asarray(row) % 8) * 128 + np.asarray(kbyte)

    def relative(start, sbo, row, kbyte):   # swizzle on the offset from the tile start, not the address
        return start + interp.kmajor_sw_addr(0, sbo, row, kbyte)

    assert not _sw_ok(bits_8_10, oracle)
    assert not _sw_ok(no_swizzle, oracle)
    assert not _sw_ok(relative, oracle)     # differs at the base that is only 128-aligned (4352)


def _sf_ok(fn, oracle):
    for d in oracle['sf_layout']:
        kb = d['k'] // d['vec']
        m, k = np.meshgrid(np.arange(d['mn']), np.arange(kb), indexing='ij')
        if not np.array_equal(fn(m, k, kb).reshape(-1), np.asarray(d['offsets'])):
            return False
    return True


def test_model_scale_layout_matches_cute(oracle):
    assert len(oracle['sf_layout']) == 2
    assert _sf_ok(interp.sf_global_offset, oracle)

    def mn_first(mn, kb, num_kb):   # atoms MN-first: the swapped atom order
        atom = (kb // 4) * 2 + mn // 128
        return atom * 512 + 16 * (mn % 32) + 4 * ((mn // 32) % 4) + kb % 4

    def byte_swapped(mn, kb, num_kb):
        return (interp.sf_global_offset(mn, kb, num_kb) & ~15) + 4 * (kb % 4) + (mn // 32) % 4

    assert not _sf_ok(mn_first, oracle)
    assert not _sf_ok(byte_swapped, oracle)


def test_model_tmem_scale_columns_match_cute(oracle):
    atoms = oracle['tmem_sf_atom']
    assert len(atoms) == 3
    for d in atoms:
        nsf, mn = d['nsf'], d['mn']
        m, r, j = np.meshgrid(np.arange(mn), np.arange(4), np.arange(nsf), indexing='ij')
        lane_q, col, byte = interp.sf_tmem_location(m, j)
        assert np.array_equal((32 * r + lane_q).reshape(-1), np.asarray(d['lanes'])), d['mn']
        assert np.array_equal((4 * col + byte).reshape(-1), np.asarray(d['bytes'])), d['mn']
        # negative control: replicas at +1 lane instead of +32 (no warpx4), column m % 4
        assert not np.array_equal((r + lane_q).reshape(-1), np.asarray(d['lanes']))
        assert not np.array_equal((4 * (m % 4) + byte).reshape(-1), np.asarray(d['bytes']))
    for d in oracle['tmem_sf']:   # the tiled MMA fragment (replica 0) agrees too
        m, j = np.meshgrid(np.arange(d['mn']), np.arange(d['nsf']), indexing='ij')
        lane_q, col, byte = interp.sf_tmem_location(m, j)
        assert np.array_equal(lane_q.reshape(-1), np.asarray(d['lanes']))
        assert np.array_equal((4 * col + byte).reshape(-1), np.asarray(d['bytes']))


def test_model_accumulator_and_tmem_ld_match_cute(oracle):
    for d in oracle['tmem_acc']:
        m, n = np.meshgrid(np.arange(128), np.arange(d['n']), indexing='ij')
        assert np.array_equal(np.asarray(d['lanes']), m.reshape(-1))      # the model's D: lane m, column d + n
        assert np.array_equal(np.asarray(d['cols']), n.reshape(-1))
    lds = oracle['tmem_ld']
    assert len(lds) == 10
    for d in lds:
        lane, col = interp.tmem_ld_map(d['shape'], d['num'])
        assert lane.shape[1] == d['regs']
        assert np.array_equal(lane.reshape(-1), np.asarray(d['lanes'])), (d['shape'], d['num'])
        assert np.array_equal(col.reshape(-1), np.asarray(d['cols'])), (d['shape'], d['num'])
        if d['shape'] == '16x256b':     # negative control: rows t/4 + 8 (r % 2), columns 2 (t % 4) + r / 2
            t = np.arange(32)[:, None]
            r = np.arange(d['regs'])[None, :]
            bad_lane = t // 4 + 8 * (r % 2)
            assert not np.array_equal(np.broadcast_to(bad_lane, lane.shape).reshape(-1), np.asarray(d['lanes']))


def test_model_utccp_matches_cute(oracle):
    """The model's tcgen05.cp executed on a random atom, against CuTe's 4x32dp128bit bit map."""
    d = oracle['utccp'][0]
    rng = np.random.default_rng(3)
    atom = rng.integers(0, 256, 512, dtype=np.uint8)
    m = interp.Machine({7: interp.GTensor(atom, dims=[512], strides=[])})
    m._op_bulk_copy({'tensor': 7, 'gofs': 0, 'bytes': 512, 'smem': 2048})
    m._op_utccp({'desc': (2048 >> 4) | (8 << 32) | (1 << 46), 'taddr': 40})   # start 2048, SBO 128, version 1
    lanes, bits = np.asarray(d['lanes']).reshape(32, 128, 4), np.asarray(d['bits']).reshape(32, 128, 4)
    i, j, _ = np.meshgrid(np.arange(32), np.arange(128), np.arange(4), indexing='ij')
    src_bit = (atom.reshape(32, 16)[i, j // 8] >> (j % 8)) & 1
    col = 40 + bits // 32
    got = (m.tmem[lanes, col] >> (bits % 32).astype(np.uint32)) & 1
    assert np.array_equal(got, src_bit)
    # negative control: a copy that fills only the first lane quarter
    m2 = interp.Machine({7: interp.GTensor(atom, dims=[512], strides=[])})
    m2._op_bulk_copy({'tensor': 7, 'gofs': 0, 'bytes': 512, 'smem': 2048})
    m2._op_utccp({'desc': (2048 >> 4) | (8 << 32) | (1 << 46), 'taddr': 40})
    m2.tmem[32:, 40:44] = 0
    assert not np.array_equal((m2.tmem[lanes, col] >> (bits % 32).astype(np.uint32)) & 1, src_bit)
