"""CPU tests of the schedulers (deep_gemm/scheduler/): the per-expert tile order (tile_order.cuh)
and the persistent Mega MoE work order (mega_moe_work.cuh).

nvcc builds tests/cpp/mega_moe_work_sim.cu as a host program: random cases against a brute-force
enumeration, static order checks and an event-driven simulation of persistent CTAs (see its
header).  Two deliberate faults show that the checks can fail.  The header is also compiled as
sm_90a/sm_100a device code and in a plain C++ translation unit.  tests/cpp/tile_order_check.cpp
(plain C++) checks the tile order against plain loops, with a fault of its own.  The fused kernels'
shared roles (deep_gemm/include/deep_gemm/mega/, which claim and wait on these units) compile for
both targets around a stub MMA core (tests/cpp/mega_roles_device.cu).  No GPU needed.
"""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
INCLUDE = ROOT / 'deep_gemm' / 'include'
CPP = Path(__file__).resolve().parent / 'cpp'
ERROR_KEYS = ('build_failures', 'mismatches', 'duplicates', 'unclaimed', 'order_errors', 'interleave_errors',
              'violations', 'deadlocks', 'bad_counters')


def _nvcc() -> str:
    from deep_gemm.jit import compiler   # the JIT's lookup: DG_JIT_NVCC_COMPILER, CUDA_HOME, PATH
    try:
        nvcc = compiler.nvcc_path()
    except RuntimeError as e:
        pytest.skip(f'{e}; these tests build a host program with nvcc')
    if shutil.which(nvcc) is None:
        pytest.skip(f'nvcc {nvcc!r} is not an executable; these tests build a host program with nvcc')
    return nvcc


def _compile(args, timeout=300):
    proc = subprocess.run([_nvcc(), '-std=c++17', f'-I{INCLUDE}', *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f'nvcc failed:\n{proc.stdout}\n{proc.stderr}'


def _run(exe, *args):
    """Run a check program; its `name k=v ...` lines by name (values as strings), `scenario=name
    k=v ...` lines in a list, and the whole output."""
    proc = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = {'scenario': [], 'text': proc.stdout}
    for line in proc.stdout.splitlines():
        if line.startswith('scenario='):
            out['scenario'].append(dict(kv.split('=', 1) for kv in line.split()))
        else:
            head, _, rest = line.partition(' ')
            out[head] = dict(kv.split('=', 1) for kv in rest.split())
    return out


@pytest.fixture(scope='module')
def sim(tmp_path_factory):
    exe = tmp_path_factory.mktemp('mega_sched') / 'mega_moe_work_sim'
    _compile(['-O2', CPP / 'mega_moe_work_sim.cu', '-o', exe])
    return lambda *args: _run(exe, *args)


def _ints(csv):
    return {int(v) for v in csv.split(',') if v}


@pytest.mark.parametrize('seed', [1, 2])
def test_random_cases(sim, seed):
    out = sim('--cases', 4000, '--seed', seed)
    s, cov, lim = out['summary'], out['coverage'], out['limits']
    assert {k: int(s[k]) for k in ERROR_KEYS} == dict.fromkeys(ERROR_KEYS, 0), out['text']
    assert int(s['cases']) == 4000 and int(s['units']) > 10 ** 6
    assert int(s['claims']) == int(s['units'])      # every unit claimed (exactly once: 'unclaimed' counts both)
    # the coverage the brief asks for
    assert {1, 8, 16, 48, 64} <= _ints(cov['experts'])
    assert {1, 2, 7, 132, 264} == _ints(cov['ctas'])
    assert {0, 1, 2, 3} <= _ints(cov['lookahead']) and max(_ints(cov['lookahead'])) > 3
    assert {'48x56', '1x1'} <= set(cov['row_tiles'].split(','))
    assert int(cov['min_block_t']) == 8 and int(cov['max_block_t']) == 128
    for k in ('zero_expert_cases', 'empty_cases', 'one_token_cases', 'grouped_cases'):
        assert int(cov[k]) > 0, k
    # units near INT_MAX (sampled) and inputs that build() must refuse
    assert int(lim['cases']) >= 20 and int(lim['errors']) == 0, out['text']


def test_l2_before_l1_is_caught(sim):
    # each expert's L2 block placed before its L1 block: L2 units wait on later units
    s = sim('--cases', 300, '--fault', 'l2_first')['summary']
    assert int(s['order_errors']) > 0
    assert int(s['deadlocks']) > 0        # with one or two CTAs the simulation hangs


def test_short_wait_is_caught(sim):
    # L2 units that wait for one L1 row tile less start on unfinished inputs
    s = sim('--cases', 300, '--fault', 'short_wait')['summary']
    assert int(s['violations']) > 0 and int(s['deadlocks']) == 0


def test_lookahead_hides_l1_latency(sim):
    # 132 CTAs, real row-tile counts, even durations: without a lookahead most L2 units wait on
    # the L1 tiles just claimed before them; a lookahead of twice the CTAs in L1 units hides that
    # at decode (one token tile per expert) and prefill alike.
    rows = sim('--cases', 0, '--report-lookahead')['scenario']
    stall = {(r['scenario'], int(r['lookahead']), int(r['lookahead_units'])): float(r['stall']) for r in rows}
    assert all(int(r['errors']) == 0 for r in rows)
    for name in ('decode', 'prefill'):
        assert stall[name, 0, 0] > 0.1, stall
        assert stall[name, 0, 264] < 0.01, stall


def test_header_compiles(tmp_path):
    # device code for both targets (shared-memory schedule, atomic claims), then a plain C++ TU
    for name in ('mega_moe_work_device', 'mega_moe_work_build_warp'):
        _compile(['-gencode', 'arch=compute_90a,code=sm_90a', '-gencode', 'arch=compute_100a,code=sm_100a',
                  '-c', CPP / f'{name}.cu', '-o', tmp_path / f'{name}.o'])
    _compile(['-c', CPP / 'mega_moe_work_host_only.cpp', '-o', tmp_path / 'host_only.o'])


def test_fused_roles_compile(tmp_path):
    # the roles an sm100 kernel is to share with the sm90 one, around a core with no wgmma
    from deep_gemm.jit import compiler
    cutlass = compiler.cutlass_include()
    if cutlass is None:
        pytest.skip('the CUTLASS headers (nvidia-cutlass) are not installed')
    _compile(['--expt-relaxed-constexpr', '-I', cutlass, '-gencode', 'arch=compute_90a,code=sm_90a',
              '-gencode', 'arch=compute_100a,code=sm_100a', '-c', CPP / 'mega_roles_device.cu',
              '-o', tmp_path / 'mega_roles_device.o'])


def test_tile_order(tmp_path):
    # token groups inside an expert (grouped GEMM and Mega MoE alike), built as plain C++
    exe = tmp_path / 'tile_order_check'
    _compile(['-O2', '-x', 'c++', CPP / 'tile_order_check.cpp', '-o', exe])
    s = {k: int(v) for k, v in _run(exe)['summary'].items()}
    assert s['mismatches'] == s['duplicates'] == s['one_group_errors'] == 0, s
    assert s['cases'] > 5000 and s['grouped_cases'] > 1000 and s['pairs'] > 10 ** 6
    assert int(_run(exe, '--fault')['summary']['mismatches']) > 0     # groups one token tile too large


def test_token_groups_of_the_launchers(monkeypatch):
    from deep_gemm import gemm
    monkeypatch.delenv('DG_GROUPED_GEMM_TOKEN_GROUP', raising=False)
    # 4096 tokens per expert at BLOCK_T 256: L1 (K = 7168) two tiles of 3.7 MB, L2 (K = 3072) five of 1.6 MB
    assert (gemm._token_group(256, 7168), gemm._token_group(256, 3072)) == (2, 5)
    assert gemm._token_group(256, 1 << 20) == 1                 # never below one tile
    assert gemm._token_group(16, 7168) * 16 >= 256              # decode: one group holds every tile
    for block_t, k in ((256, 7168), (128, 3072), (64, 7168)):
        assert gemm._token_group(block_t, k) * block_t * k * 2 <= gemm._TOKEN_GROUP_BYTES
    monkeypatch.setenv('DG_GROUPED_GEMM_TOKEN_GROUP', '3')
    assert gemm._token_group(256, 7168) == 3
