"""CPU tests of the JIT: rendering, nvcc + cache, corruption, concurrency, errors, --compile-all.

No GPU needed (nvcc compiles for sm_90a/sm_100a anywhere); runtime/TMA launches live in
tests/gpu/test_jit_gpu.py.
"""
import ctypes
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from deep_gemm.jit import compiler, registry, runtime, sass, tma
from deep_gemm.jit import __main__ as jit_main
from deep_gemm.jit import smoke

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ('sm_90a', 'sm_100a')

@pytest.fixture(scope='session')
def session_cache(tmp_path_factory):
    """One cache for the session: kernels compiled by one test are cache hits in the next."""
    return tmp_path_factory.mktemp('dg_jit_cache')


@pytest.fixture
def cache(session_cache, monkeypatch):
    monkeypatch.setenv('DG_JIT_CACHE_DIR', str(session_cache))
    return session_cache


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv('DG_JIT_CACHE_DIR', str(tmp_path / 'cache'))
    return tmp_path / 'cache'


@pytest.fixture
def count_nvcc(monkeypatch):
    """Counts nvcc runs in this process (every build goes through compiler._run_nvcc)."""
    calls = []
    real = compiler._run_nvcc

    def counting(cmd, timeout):
        calls.append(cmd)
        return real(cmd, timeout)
    monkeypatch.setattr(compiler, '_run_nvcc', counting)
    return calls


def test_render():
    src = smoke.AXPB.render({'T': '__nv_bfloat16', 'num_threads': 128})
    assert '#include <deep_gemm/impls/smxx_jit_smoke.cuh>' in src
    assert 'reinterpret_cast<void*>(&deep_gemm::smxx_jit_smoke_axpb<__nv_bfloat16, 128>)' in src
    # Exactly one instantiation line
    assert src.count('__dg_instantiate') == 1
    # Bools render as C++ literals
    spec = registry.KernelSpec('x', 'smxx_jit_smoke.cuh', lambda p: f'f<{p["flag"]}, {p["n"]}>')
    assert '&f<true, 3>' in spec.render({'flag': True, 'n': 3})
    assert smoke.AXPB.params_tag({'T': '__nv_bfloat16', 'num_threads': 256}) == 'bf16_256'
    assert smoke.AXPB.params_tag({'T': 'float', 'num_threads': 256}) == 'f32_256'


def test_registry_modules(monkeypatch):
    # Every kernel module exists now: a missing one is an error, not skipped
    monkeypatch.setattr(registry, 'KERNEL_MODULES', ['deep_gemm.jit.smoke', 'deep_gemm.jit._no_such_module'])
    with pytest.raises(ModuleNotFoundError, match='_no_such_module'):
        registry.all_specs()
    monkeypatch.setattr(registry, 'KERNEL_MODULES', ['deep_gemm.jit.smoke'])
    names = [s.name for s in registry.all_specs()]
    assert 'smxx_jit_smoke_axpb' in names and 'smxx_jit_smoke_tma' in names
    assert registry.get_spec('smxx_jit_smoke_tma').required_sass_for('sm_90a')
    with pytest.raises(FileNotFoundError):
        registry.register_kernel(registry.KernelSpec('bad', 'no_such_header.cuh', lambda p: 'f'))


def test_arch_flags():
    assert compiler.arch_flags('sm_90a') == ['-gencode=arch=compute_90a,code=sm_90a']
    assert compiler.arch_flags('sm_100a') == ['-gencode=arch=compute_100a,code=sm_100a']
    # The family target lacks the block-scaled FP4 MMA: never accepted
    for bad in ('sm_100f', 'sm_90', 'sm_100'):
        with pytest.raises(ValueError):
            compiler.arch_flags(bad)


def test_ptxas_parse():
    log = textwrap.dedent("""\
        ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90a'
        ptxas info    : Function properties for _Z3fooPf
            16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
        ptxas info    : Used 40 registers, used 1 barriers, 2048 bytes smem, 400 bytes cmem[0]
        """)
    assert compiler.parse_ptxas(log) == {'entries': ['_Z3fooPf'], 'registers': 40, 'smem': 2048, 'stack': 16,
                                         'spill_stores': 8, 'spill_loads': 4, 'wgmma_serialized': []}


@pytest.mark.parametrize('arch', ARCHS)
def test_compile_and_cache_hit(cache, count_nvcc, arch):
    params = {'T': 'float', 'num_threads': 256}
    cubin = smoke.AXPB.build(params, arch)
    meta = compiler.load_meta(cubin)
    assert meta is not None and meta['arch'] == arch
    assert meta['ptxas']['registers'] > 0 and meta['ptxas']['stack'] == 0
    assert cubin.read_bytes()[:4] == b'\x7fELF'
    runs = len(count_nvcc)
    # Second build: same path, served from disk without nvcc
    assert smoke.AXPB.build(params, arch) == cubin
    assert len(count_nvcc) == runs
    # A different param set is a different entry
    assert smoke.AXPB.build({'T': '__nv_bfloat16', 'num_threads': 256}, arch) != cubin


def test_cache_key_covers_inputs(cache):
    flags = ['-O3']
    base = compiler.cache_key('a', 'sm_90a', flags)
    assert base == compiler.cache_key('a', 'sm_90a', flags)
    assert base != compiler.cache_key('b', 'sm_90a', flags)
    assert base != compiler.cache_key('a', 'sm_100a', flags)
    assert base != compiler.cache_key('a', 'sm_90a', ['-O2'])


def test_corrupt_cache_is_rebuilt(fresh_cache, count_nvcc):
    params = {'T': 'float', 'num_threads': 128}
    cubin = smoke.AXPB.build(params, 'sm_90a')
    good = cubin.read_bytes()
    assert len(count_nvcc) == 1

    # Truncated cubin (e.g. a crash mid-copy by some other tool): detected by size/sha256
    cubin.write_bytes(good[: len(good) // 2])
    assert compiler.load_meta(cubin) is None
    assert smoke.AXPB.build(params, 'sm_90a') == cubin
    assert len(count_nvcc) == 2 and cubin.read_bytes() == good

    # Same size, flipped bytes
    cubin.write_bytes(bytes([good[0] ^ 0xFF]) + good[1:])
    smoke.AXPB.build(params, 'sm_90a')
    assert len(count_nvcc) == 3 and cubin.read_bytes() == good

    # Missing metadata (a write interrupted before its commit record)
    cubin.with_suffix('.json').unlink()
    smoke.AXPB.build(params, 'sm_90a')
    assert len(count_nvcc) == 4 and compiler.load_meta(cubin) is not None


_WORKER = textwrap.dedent("""\
    import hashlib, json, sys
    from deep_gemm.jit import compiler, smoke
    path = smoke.AXPB.build({'T': '__nv_bfloat16', 'num_threads': 64}, 'sm_100a')
    print(json.dumps({'path': str(path), 'sha': hashlib.sha256(path.read_bytes()).hexdigest(),
                      'nvcc_runs': compiler.stats['nvcc_runs']}))
    """)


def test_concurrent_processes(fresh_cache):
    env = dict(os.environ, DG_JIT_CACHE_DIR=str(fresh_cache), PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([sys.executable, '-c', _WORKER], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert results[0]['path'] == results[1]['path']
    assert results[0]['sha'] == results[1]['sha']
    assert compiler.load_meta(Path(results[0]['path'])) is not None
    # The per-entry lock lets only one of them run nvcc
    assert results[0]['nvcc_runs'] + results[1]['nvcc_runs'] == 1
    # No temp files left behind
    assert not [p for p in Path(results[0]['path']).parent.iterdir() if p.name.endswith('.tmp')]


def test_compile_error(fresh_cache):
    source = '#include <deep_gemm/impls/smxx_jit_smoke.cuh>\n__global__ void broken() { this_is_not_defined(); }\n'
    with pytest.raises(compiler.JITCompileError) as info:
        compiler.build('broken', source, 'sm_90a')
    assert 'this_is_not_defined' in info.value.log and 'error' in info.value.log
    assert 'this_is_not_defined' in str(info.value)
    # Nothing committed to the cache for a failed build
    assert not list(Path(fresh_cache).rglob('kernel.json'))


def test_compile_many(cache):
    spec = smoke.AXPB
    items = [(spec.name, spec.render({'T': t, 'num_threads': 256}), arch)
             for t in ('float', '__nv_bfloat16') for arch in ARCHS]
    paths = compiler.compile_many(items, jobs=2)
    assert len(set(paths)) == 4 and all(compiler.load_meta(p) for p in paths)


def test_tma_params_validation():
    x = torch.empty(100, 256, dtype=torch.bfloat16)
    p = tma.tma_2d_params(x, 32, 64, 128)
    assert p.global_dim == (256, 100) and p.global_stride == (512,) and p.box_dim == (64, 32)
    assert p.dtype_name == 'CU_TENSOR_MAP_DATA_TYPE_BFLOAT16'
    assert tma.tma_2d_params(torch.empty(8, 64, dtype=torch.float8_e4m3fn), 8, 64, 64).dtype_name == \
        'CU_TENSOR_MAP_DATA_TYPE_UINT8'
    with pytest.raises(ValueError, match='16 bytes'):
        tma.tma_2d_params(torch.empty(8, 12, dtype=torch.bfloat16), 8, 8, 0)   # 24 B row stride
    with pytest.raises(ValueError, match='swizzle span'):
        tma.tma_2d_params(x, 32, 128, 128)                                     # 256 B > 128 B
    with pytest.raises(ValueError, match='aligned'):
        tma.tma_2d_params(torch.empty(1024, dtype=torch.bfloat16)[1:513].view(2, 256), 2, 64, 128)
    with pytest.raises(ValueError, match='contiguous'):
        tma.tma_2d_params(x.t(), 32, 64, 128)
    with pytest.raises(ValueError, match='swizzle_bytes'):
        tma.tma_2d_params(x, 32, 64, 96)
    with pytest.raises(ValueError, match='dtype'):
        tma.tma_2d_params(x.to(torch.float64), 32, 16, 128)


def test_runtime_args_without_driver():
    # Importing the runtime must not need cuda-bindings or a driver
    assert runtime._driver is None or 'cuda.bindings' in sys.modules
    t = torch.zeros(4)
    desc = type('FakeTensorMap', (), {'getPtr': lambda self: 1234})()
    values, types = runtime.pack_args([t, runtime.u32(7), (-5, ctypes.c_int64), runtime.f32(1.5), None, desc])
    assert values[0] == t.data_ptr() and types[0] is ctypes.c_void_p
    assert values[1].value == 7 and types[1] is ctypes.c_uint32
    assert values[2:5] == (-5, values[3], 0) and types[2] is ctypes.c_int64 and types[3] is ctypes.c_float
    assert values[5] is desc and types[5] is None  # by value, through getPtr()
    with pytest.raises(OverflowError):
        runtime.u32(-1)
    with pytest.raises(TypeError):
        runtime.pack_args([3])   # bare ints have no C type
    assert runtime._triple(5) == (5, 1, 1) and runtime._triple((2, 3)) == (2, 3, 1)


def test_compile_all(cache, tmp_path, capsys):
    out = tmp_path / 'cubins'
    argv = ['--compile-all', '--arch', ','.join(ARCHS), '--out', str(out), '--jobs', '2']
    # Without a disassembler still compile everything; only the SASS half is skipped (and said so)
    has_sass = sass.sass_available()
    rc = jit_main.main(argv + ([] if has_sass else ['--no-sass']))
    printed = capsys.readouterr().out
    print(printed)
    assert rc == 0, printed
    names = {p.name for p in out.glob('*.cubin')}
    # Several default param sets -> tagged names; one -> plain <kernel>_<arch>.cubin
    for arch in ARCHS:
        assert f'smxx_jit_smoke_tma_{arch}.cubin' in names
        assert f'smxx_jit_smoke_axpb_bf16_256_{arch}.cubin' in names
    # Every registered kernel (others' too, once they register) for every arch it supports
    expected = sum(len(s.default_params) * len(set(s.archs) & set(ARCHS)) for s in registry.all_specs())
    assert len(names) == expected
    report = json.loads((out / 'report.json').read_text())
    assert all(r['ok'] for r in report)
    if not has_sass:
        pytest.skip('compiled, but no SASS check: pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm')


def test_sass_check_catches_missing_and_local_memory(fresh_cache):
    if not sass.sass_available():
        pytest.skip('cuobjdump/nvdisasm not found')
    # A kernel that must touch local memory: dynamically indexed per-thread array
    source = textwrap.dedent("""\
        __global__ void lmem(float* y, const int* idx) {
            float buf[256];  // data-dependent writes and reads: cannot live in registers
            for (int i = 0; i < 256; ++i) buf[(idx[i] + threadIdx.x) & 255] = y[i];
            y[threadIdx.x] = buf[idx[threadIdx.x] & 255];
        }
        """)
    cubin = compiler.build('lmem', source, 'sm_90a')
    rep = sass.check_cubin(cubin, [r'\bHGMMA\b'])
    assert rep.missing == [r'\bHGMMA\b']
    assert rep.local_memory and rep.stack > 0
    assert not rep.ok(forbid_local_memory=True)


# ptxas -v lines as nvcc 13.0 printed them for two pipelined variants of the expert GEMM's k loop
# (perf-notes v12), the C7512 wording of the fused kernel at BLOCK_T 64 (v14), and a made-up one;
# the cubins still worked, with a wait after every wgmma.
_PTXAS_SERIALIZED = (
    "ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90a'\n"
    "ptxas info    : (C7511) Potential Performance Loss: wgmma.mma_async instructions are serialized due to "
    "insufficient register resources for the wgmma pipeline in the function '_Z3fooPf'\n"
    "ptxas info    : (C7513) Potential Performance Loss: wgmma.mma_async instructions are serialized due to "
    "non wgmma instructions defining input registers of a wgmma between start and end of the pipeline stage "
    "in the function '_Z3fooPf'\n"
    "ptxas info    : (C7512) Potential Performance Loss: wgmma.mma_async instructions are serialized due to "
    "insufficient register resources for the function '_Z3fooPf'\n"
    "ptxas info    : (C7599) wgmma.mma_async instructions are serialized for a reason not seen yet\n"
    "ptxas info    : Used 168 registers, used 1 barriers, 2448 bytes smem\n")


def test_sass_check_catches_serialized_wgmma(fresh_cache):
    # ptxas reports serialized wgmmas only as an info line, so the JIT reads its log; a report that
    # carries one fails like missing SASS does.
    meta = compiler.parse_ptxas(_PTXAS_SERIALIZED)
    assert meta['registers'] == 168
    assert meta['wgmma_serialized'] == [
        'C7511: insufficient register resources for the wgmma pipeline',
        'C7512: insufficient register resources',
        'C7513: non wgmma instructions defining input registers of a wgmma between start and end of the pipeline stage',
        'ptxas info    : (C7599) wgmma.mma_async instructions are serialized for a reason not seen yet']
    assert compiler.parse_ptxas(_PTXAS_SERIALIZED.replace('serialized', 'pipelined'))['wgmma_serialized'] == []
    clean = sass.SassReport(Path('k.cubin'), [], [])
    assert clean.ok(forbid_local_memory=True)
    assert not dataclasses.replace(clean, wgmma_serialized=meta['wgmma_serialized']).ok(forbid_local_memory=False)
    # and the real log of a real build lands in its cached meta
    cubin = compiler.build('regs', '__global__ void regs(float* y) { y[threadIdx.x] *= 2.0f; }', 'sm_90a')
    assert compiler.load_meta(cubin)['ptxas']['wgmma_serialized'] == []


def test_racecheck_probe_compiles(cache):
    # scripts/racecheck_probe.cu backs what docs/perf-notes.md says of racecheck: it must stay buildable
    from scripts import racecheck_probe
    meta = compiler.load_meta(racecheck_probe.build('sm_90a'))
    assert meta['ptxas']['entries'] == ['racecheck_probe'] and meta['ptxas']['spill_stores'] == 0


def test_sass_kloops_finds_only_backward_branches_around_hgmma():
    # scripts/sass_kloops.py: a k loop is a backward branch of at most 400 instructions over an HGMMA
    # (instruction i at byte 16 i); bodies hash with immediates masked, registers kept
    sys.path.insert(0, str(ROOT))
    from scripts.sass_kloops import k_loops
    body = ['LDS.128 R8, [R66+0x10]', 'HGMMA.64x48x16.F32.BF16 R24, R56, gdesc[UR12], R24', 'IADD3 R1, R1, 0x1, RZ']
    prog = ['MOV R0, RZ'] + body + ['BRA 0x10'] + ['NOP'] + ['IADD3 R2, R2, 0x1, RZ', 'BRA 0x60'] + ['BRA 0x90', 'EXIT']
    loops = k_loops(prog)
    assert len(loops) == 1                      # the loop without HGMMA and the forward branch are not k loops
    moved = ['MOV R0, RZ'] + [body[0].replace('0x10', '0x20')] + body[1:] + ['BRA 0x10']
    assert k_loops(moved) == loops              # immediates do not count
    renamed = ['MOV R0, RZ'] + [body[0].replace('R8', 'R10')] + body[1:] + ['BRA 0x10']
    assert k_loops(renamed) != loops            # registers do
    assert k_loops(['NOP'] * 500 + body + ['BRA 0x0']) == []   # longer than 400 instructions
