"""GPU tests of the JIT runtime: correctness, CUDA graphs, TMA, clusters, concurrency, launch overhead."""
import json
import os
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope='module', autouse=True)
def cache(tmp_path_factory):
    # A private cache: the test must compile for real, not trust a user's ~/.deep_gemm
    old = os.environ.get('DG_JIT_CACHE_DIR')
    os.environ['DG_JIT_CACHE_DIR'] = str(tmp_path_factory.mktemp('dg_jit_gpu_cache'))
    yield
    if old is None:
        os.environ.pop('DG_JIT_CACHE_DIR')
    else:
        os.environ['DG_JIT_CACHE_DIR'] = old


def _reference(x, a, b):
    return (a * x.float() + b).to(x.dtype)


def _assert_close(out, ref):
    assert not out.isnan().any()
    if out.dtype == torch.bfloat16:
        # Kernel FMA vs torch mul+add can round to neighbouring bf16 values
        torch.testing.assert_close(out.float(), ref.float(), rtol=2 ** -7, atol=1e-2)
    else:
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_axpb(dtype):
    from deep_gemm.jit import smoke
    torch.manual_seed(0)
    n = 1_000_003  # not a multiple of the block: exercises the tail guard
    x = torch.randn(n, device='cuda', dtype=dtype)
    out = torch.full_like(x, float('nan'))
    smoke.axpb(x, 1.5, -0.25, out=out)
    torch.cuda.synchronize()
    _assert_close(out, _reference(x, 1.5, -0.25))


def test_cuda_graph_replay():
    from deep_gemm.jit import smoke
    x = torch.randn(4096, device='cuda')
    out = torch.full_like(x, float('nan'))
    smoke.axpb(x, 2.0, 1.0, out=out)  # warm-up: compile + load outside the capture
    torch.cuda.synchronize()

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        smoke.axpb(x, 2.0, 1.0, out=out)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        out.fill_(float('nan'))
        graph.replay()
        torch.cuda.synchronize()
        _assert_close(out, _reference(x, 2.0, 1.0))


@pytest.mark.parametrize('dtype,box_rows,box_cols,swizzle', [
    (torch.bfloat16, 32, 64, 128),
    (torch.bfloat16, 16, 32, 64),
    (torch.bfloat16, 8, 16, 32),
    (torch.bfloat16, 64, 64, 0),
    (torch.float32, 32, 32, 128),
])
def test_tma(dtype, box_rows, box_cols, swizzle):
    from deep_gemm.jit import smoke
    torch.manual_seed(1)
    # Ragged shape: the last boxes hang over both edges (TMA zero-fills, the kernel guards writes)
    x = torch.randn(333, 392, device='cuda', dtype=dtype)
    out = torch.full_like(x, float('nan'))
    smoke.axpb_tma(x, 0.5, 3.0, out=out, box_rows=box_rows, box_cols=box_cols, swizzle=swizzle)
    torch.cuda.synchronize()
    _assert_close(out, _reference(x, 0.5, 3.0))


def test_cluster_and_large_smem():
    from deep_gemm.jit import registry, runtime, smoke
    kernel = registry.get_kernel(smoke.AXPB.name, {'T': 'float', 'num_threads': 256})
    x = torch.randn(256 * 8, device='cuda')
    out = torch.full_like(x, float('nan'))
    # 2-CTA clusters and 100 KiB of (unused) dynamic smem: both launch paths must work
    runtime.launch(kernel, 8, 256, 100 * 1024, [out, x, runtime.f32(3.0), runtime.f32(0.0), runtime.u32(x.numel())],
                   cluster=(2, 1, 1))
    torch.cuda.synchronize()
    _assert_close(out, _reference(x, 3.0, 0.0))
    assert kernel.max_dynamic_smem == 100 * 1024


def test_launch_error_names_cuda_result():
    from deep_gemm.jit import registry, runtime, smoke
    kernel = registry.get_kernel(smoke.AXPB.name, {'T': 'float', 'num_threads': 256})
    x = torch.zeros(16, device='cuda')
    with pytest.raises(RuntimeError, match='CUDA_ERROR_'):
        runtime.launch(kernel, 1, 4096, 0, [x, x, runtime.f32(1), runtime.f32(0), runtime.u32(16)])


_WORKER = textwrap.dedent("""\
    import json, torch
    from deep_gemm.jit import compiler, smoke
    x = torch.randn(10007, device='cuda', dtype=torch.bfloat16)
    out = torch.full_like(x, float('nan'))
    smoke.axpb(x, -2.0, 0.5, out=out, num_threads=96)
    torch.cuda.synchronize()
    ok = torch.allclose(out.float(), (-2.0 * x.float() + 0.5).to(torch.bfloat16).float(), rtol=1e-2, atol=1e-2)
    print(json.dumps({'ok': bool(ok), 'nvcc_runs': compiler.stats['nvcc_runs']}))
    """)


def test_two_processes_compile_and_run(tmp_path):
    env = dict(os.environ, DG_JIT_CACHE_DIR=str(tmp_path / 'cache'), PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([sys.executable, '-c', _WORKER], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert all(r['ok'] for r in results)
    assert sum(r['nvcc_runs'] for r in results) == 1


def test_launch_overhead():
    from deep_gemm.jit import registry, runtime, smoke
    kernel = registry.get_kernel(smoke.AXPB.name, {'T': 'float', 'num_threads': 256})
    x = torch.randn(256, device='cuda')
    out = torch.empty_like(x)
    args = [out, x, runtime.f32(1.0), runtime.f32(0.0), runtime.u32(256)]

    def per_call_us(fn, calls=200, rounds=15):
        samples = []
        for _ in range(rounds):
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            samples.append((time.perf_counter() - start) / calls * 1e6)
        torch.cuda.synchronize()
        return statistics.median(samples)

    raw = per_call_us(lambda: runtime.launch(kernel, 1, 256, 0, args))
    wrapped = per_call_us(lambda: smoke.axpb(x, 1.0, 0.0, out=out))
    desc_x = torch.randn(64, 64, device='cuda', dtype=torch.bfloat16)
    tma_call = per_call_us(lambda: smoke.axpb_tma(desc_x, 1.0, 0.0, out=desc_x))
    print(f'\n[JIT launch overhead, median per call] runtime.launch: {raw:.1f} us, '
          f'smoke.axpb (lookup + launch): {wrapped:.1f} us, smoke.axpb_tma (+ TMA encode): {tma_call:.1f} us')
    # Generous bound: catches pathological regressions (e.g. rebuilding or reloading per call)
    assert raw < 200
