"""Peer: SGLang's DeepGEMM fork, SM90 FP8 Mega MoE (``deep_gemm.fp8_mega_moe``, sgl-deep-gemm 0.1.5.post1).

Its package is also named ``deep_gemm``, so it runs in a worker process of its own: this file, run as
a script with ``PYTHONPATH`` = a folder holding only the wheels of ``.whl/sgl/`` (``sgl-deep-gemm``
0.1.5.post1 and its one dependency ``apache-tvm-ffi`` 0.1.11; installed there with pip on first use)
and its own ``DG_JIT_CACHE_DIR`` (it JIT-compiles its kernels with nvcc on the first call of each
configuration, which can take minutes).

Their format (``tests/bench_mega_moe_sm90.py`` of sgl-project/DeepGEMM): FP8 E4M3 weights with one
FP32 scale per 128 x 128 block (``[E, N/128, K/128]``), L1 rows gate then up, transformed by
``transform_weights_for_mega_moe_sm90`` (gate/up interleaved by 8 rows); FP8 activations with one FP32
scale per 128 channels; recipe (128, 128, 128); one symmetric buffer from
``get_symm_buffer_for_mega_moe`` (on SM90 an ``SM90SymmBuffer``: torch symmetric memory over a process
group, here an NCCL group of one rank; a plain allocation if that fails) whose ``x``, ``x_sf``,
``topk_idx``, ``topk_weights`` views the caller fills before ``fp8_mega_moe(y, l1, l2, buffer)``.

The parent (``scripts/bench_mega_moe.py``) passes each token count's routing (the same ``topk_idx``
and weights as ours); the worker draws its own activations and weights (same shapes), times the call
eager and captured in a CUDA graph (as ours: 5 warm-up calls, then the mean of 30; where a second call
without re-staging the inputs changes the output, the inputs are re-staged before every call, outside
the timed events), checks the output against a float reference of its own FP8 weights for small token
counts, and prints one ``SGLPEER {json}`` line per token count.

    python scripts/peers/sgl_mega_moe.py --tokens 16,128,4096   # standalone: random routing, EP 1
"""
import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

try:  # the parent side (imported as scripts.peers.sgl_mega_moe)
    from . import WHL_DIR, unavailable
except ImportError:  # run as a script: the worker, with SGLang's deep_gemm on the path (or standalone)
    WHL_DIR = Path(os.environ.get('DG_PEER_WHL_DIR') or Path(__file__).resolve().parents[2] / '.whl')
    unavailable = None

NAME = 'sgl (sgl-deep-gemm 0.1.5.post1 fp8_mega_moe, FP8 128x128 blocks)'
TAG = 'SGLPEER '
BLOCK = 128
WARMUP, ITERS = 5, 30
SAFETY_ENV = {'NCCL_NVLS_ENABLE': '0', 'TORCH_SYMM_MEM_DISABLE_MULTICAST': '1', 'NVSHMEM_DISABLE_NVLS': '1'}
_DIST_ENV = ('MASTER_ADDR', 'MASTER_PORT', 'WORLD_SIZE', 'RANK', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE', 'GROUP_RANK',
             'ROLE_RANK', 'TORCHELASTIC_RUN_ID')


def fp8_weight_bytes(experts: int, hidden: int, inter: int) -> int:
    """Bytes of their L1 + L2 for ``experts`` experts: one byte per weight plus an FP32 per 128 x 128."""
    per = 2 * inter * hidden + hidden * inter
    return experts * (per + 4 * per // (BLOCK * BLOCK))


# ---------------------------------------------------------------------------------------- parent side
def _wheels(whl_dir: Path) -> Tuple[List[Path], Optional[str]]:
    sgl = sorted(whl_dir.glob('sgl_deep_gemm-*.whl'))
    tvm = sorted(whl_dir.glob('apache_tvm_ffi-*.whl'))
    if not sgl or not tvm:
        return [], f'wheels not found in {whl_dir} (need sgl_deep_gemm-*.whl and apache_tvm_ffi-*.whl)'
    return [sgl[-1], tvm[-1]], None


def _site_ok(site: Path) -> bool:
    return (site / 'deep_gemm' / '_C.so').exists() and (site / 'tvm_ffi').is_dir()


def find_site(whl_dir: Optional[Path] = None, dest: Optional[Path] = None) -> Tuple[Optional[Path], Optional[str]]:
    """A folder with SGLang's ``deep_gemm`` and ``tvm_ffi`` (and nothing else of ours):
    ``$DG_PEER_SGL_SITE`` if it holds them, else the wheels of ``.whl/sgl/`` installed into ``dest``
    (default ``$TMPDIR/dg_peer_sgl_site``) with pip (no index, no deps), or unzipped if pip fails."""
    env = os.environ.get('DG_PEER_SGL_SITE')
    if env and _site_ok(Path(env)):
        return Path(env), None
    whl_dir = Path(whl_dir or WHL_DIR / 'sgl')
    wheels, why = _wheels(whl_dir)
    if why:
        return None, why
    dest = Path(dest or Path(tempfile.gettempdir()) / 'dg_peer_sgl_site')
    if _site_ok(dest):
        return dest, None
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, '-m', 'pip', 'install', '-q', '--no-index', '--no-deps', '--no-compile', '--no-cache-dir',
           '--upgrade', '--target', str(dest), *map(str, wheels)]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    except Exception:
        for w in wheels:  # a wheel is a zip of the installed files
            with zipfile.ZipFile(w) as z:
                z.extractall(dest)
    if not _site_ok(dest):
        return None, f'installing {", ".join(w.name for w in wheels)} into {dest} did not give deep_gemm/_C.so'
    return dest, None


def _lib_dirs(site: Path) -> List[str]:
    """Folders for the worker's LD_LIBRARY_PATH: tvm_ffi's, CUDA's, and the pip CUDA libraries beside torch
    (their ``_C.so`` needs libtvm_ffi, libcudart/libnvrtc/libcublas 13 and libtorch)."""
    dirs = [site / 'tvm_ffi' / 'lib']
    cuda = os.environ.get('CUDA_HOME') or os.environ.get('CUDA_PATH')
    nvcc = shutil.which('nvcc')
    for home in filter(None, (cuda, str(Path(nvcc).parent.parent) if nvcc else None, '/usr/local/cuda')):
        dirs += [Path(home) / 'lib64', Path(home) / 'lib']
    try:
        import torch
        tdir = Path(torch.__file__).resolve().parent
        dirs.append(tdir / 'lib')
        nv = tdir.parent / 'nvidia'
        if nv.is_dir():
            dirs += sorted(p for p in nv.glob('**/lib') if p.is_dir())
    except Exception:
        pass
    out: List[str] = []
    for d in dirs:
        if d.is_dir() and str(d) not in out:
            out.append(str(d))
    return out


def worker_env(site: Path, cache_dir: Path, base: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The worker's environment: ``PYTHONPATH`` = ``site`` only (our repo and ``/tmp/site`` stay off the
    path: both could hold another ``deep_gemm``), its own JIT caches, NVLink multicast off, no torchrun
    variables, unbuffered output."""
    env = dict(os.environ if base is None else base)
    for k in _DIST_ENV:
        env.pop(k, None)
    env['PYTHONPATH'] = str(site)
    env['DG_JIT_CACHE_DIR'] = str(cache_dir / 'deep_gemm')
    env['TVM_FFI_CACHE_DIR'] = str(cache_dir / 'tvm-ffi')
    env['PYTHONUNBUFFERED'] = '1'
    env.update(SAFETY_ENV)
    libs = _lib_dirs(site)
    if env.get('LD_LIBRARY_PATH'):
        libs.append(env['LD_LIBRARY_PATH'])
    env['LD_LIBRARY_PATH'] = os.pathsep.join(libs)
    return env


def parse_worker_line(line: str) -> Optional[dict]:
    """The JSON of one ``SGLPEER {...}`` line, else None."""
    line = line.strip()
    if not line.startswith(TAG):
        return None
    try:
        return json.loads(line[len(TAG):])
    except json.JSONDecodeError:
        return None


def run_peer(routes: Dict[int, Tuple['torch.Tensor', 'torch.Tensor']], experts: int, hidden: int, inter: int,
             topk: int, timeout_s: float = 420.0, say=print, ref_max_tokens: int = 128,
             whl_dir: Optional[Path] = None) -> Tuple[Dict[int, dict], Optional[str]]:
    """Runs the worker on the routing of each token count (``routes[t] = (topk_idx [t, k], weights [t, k])``
    over ``experts`` local experts, one rank).  Returns ``({t: row}, None)`` or ``(partial rows, reason)``."""
    import torch
    site, why = find_site(whl_dir)
    if site is None:
        return {}, why
    if not torch.cuda.is_available():
        return {}, 'no CUDA device'
    work = Path(tempfile.mkdtemp(prefix='dg_peer_sgl_'))
    cache = Path(os.environ.get('DG_PEER_SGL_CACHE') or Path(tempfile.gettempdir()) / 'dg_peer_sgl_cache')
    spec = {'experts': experts, 'hidden': hidden, 'inter': inter, 'topk': topk, 'ref_max_tokens': ref_max_tokens,
            'tokens': sorted(routes), 'routes': {t: (routes[t][0].cpu(), routes[t][1].cpu()) for t in routes}}
    torch.save(spec, work / 'spec.pt')
    cmd = [sys.executable, str(Path(__file__).resolve()), '--worker', str(work / 'spec.pt')]
    rows: Dict[int, dict] = {}
    tail: List[str] = []
    proc = subprocess.Popen(cmd, env=worker_env(site, cache), cwd=str(work), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)

    def pump():
        for line in proc.stdout:
            row = parse_worker_line(line)
            if row is not None:
                if 'tokens' in row:
                    rows[int(row['tokens'])] = row
                continue
            tail.append(line.rstrip())
            del tail[:-20]
            say(f'  [sgl] {line.rstrip()}')

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    start = time.time()
    try:
        rc = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        reader.join(5)
        return rows, f'timed out after {timeout_s:.0f} s ({len(rows)} of {len(routes)} token counts done)'
    reader.join(5)
    shutil.rmtree(work, ignore_errors=True)
    if rc != 0:
        last = next((t for t in reversed(tail) if t.strip()), '')
        return rows, f'worker exited with {rc} after {time.time() - start:.0f} s: {last[-200:]}'
    missing = [t for t in routes if t not in rows]
    return rows, (f'no result for tokens {missing}' if missing else None)


# ---------------------------------------------------------------------------------------- worker side
def quant_block_fp8(w):
    """``[G, N, K]`` -> (E4M3 ``[G, N, K]``, FP32 ``[G, N/128, K/128]``): amax / 448 per 128 x 128 block."""
    import torch
    g, n, k = w.shape
    v = w.view(g, n // BLOCK, BLOCK, k // BLOCK, BLOCK).float()
    sf = v.abs().amax(dim=(2, 4)).clamp(min=1e-4) / 448.0
    q = (v / sf[:, :, None, :, None]).to(torch.float8_e4m3fn).view(g, n, k)
    return q.contiguous(), sf.contiguous()


def dequant_block_fp8(q, sf):
    g, n, k = q.shape
    return (q.float().view(g, n // BLOCK, BLOCK, k // BLOCK, BLOCK) * sf[:, :, None, :, None]).view(g, n, k)


def quant_token_fp8(x):
    """``[T, H]`` -> (E4M3 ``[T, H]``, FP32 ``[T, H/128]``): amax / 448 per token and 128 channels."""
    import torch
    t, h = x.shape
    v = x.float().view(t, h // BLOCK, BLOCK)
    sf = v.abs().amax(-1).clamp(min=1e-4) / 448.0
    return (v / sf[..., None]).to(torch.float8_e4m3fn).view(t, h).contiguous(), sf.contiguous()


def reference(xq, xsf, idx, wts, w1q, s1, w2q, s2):
    """Float32 layer on the dequantized FP8 operands (SwiGLU gate = first half, routing weight before L2)."""
    import torch
    t, hidden = xq.shape
    x = (xq.float().view(t, -1, BLOCK) * xsf[..., None]).view(t, hidden)
    y = torch.zeros(t, hidden, device=xq.device)
    inter = w2q.shape[2]
    for e in range(w1q.shape[0]):
        tok, slot = (idx == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        w1 = dequant_block_fp8(w1q[e:e + 1], s1[e:e + 1])[0]
        w2 = dequant_block_fp8(w2q[e:e + 1], s2[e:e + 1])[0]
        h = x[tok] @ w1.t()
        a = torch.nn.functional.silu(h[:, :inter]) * h[:, inter:] * wts[tok, slot].float()[:, None]
        y.index_add_(0, tok, a @ w2.t())
    return y


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


class _OneRank:
    def rank(self):
        return 0

    def size(self):
        return 1

    def barrier(self):
        pass


def _buffer(dg, group, experts, max_t, topk, hidden, inter):
    """Their buffer; where torch symmetric memory fails on one rank, the same layout in a plain allocation."""
    import torch
    try:
        return dg.get_symm_buffer_for_mega_moe(group, experts, max_t, topk, hidden, inter), 'symm_mem'
    except Exception as ex:
        print(f'get_symm_buffer_for_mega_moe failed ({type(ex).__name__}: {str(ex)[:200]}); plain allocation')
    from types import SimpleNamespace
    n_max = -(-max_t // dg._C.get_token_alignment_for_mega_moe()) * dg._C.get_token_alignment_for_mega_moe()
    nbytes, slicer = dg._C.get_symm_buffer_size_for_sm90_mega_moe(1, experts, n_max, topk, hidden, inter, True,
                                                                   'swiglu')
    raw = torch.zeros(nbytes, dtype=torch.int8, device='cuda')
    parts = slicer(raw)
    conv = dg._from_dlpack_if_needed
    b = SimpleNamespace(buffer=raw, handle=SimpleNamespace(buffer_ptrs=[raw.data_ptr()]), group=_OneRank(),
                        num_experts=experts, num_max_tokens_per_rank=n_max, num_topk=topk, hidden=hidden,
                        intermediate_hidden=inter)
    b.x, b.x_sf, b.topk_idx, b.topk_weights = (conv(parts[0], torch.float8_e4m3fn), conv(parts[1]), conv(parts[2]),
                                               conv(parts[3]))
    return b, 'plain'


def _timed(fn, stage=None) -> float:
    """Mean us per call over ITERS after WARMUP (as ours); with ``stage``, re-staged before each call,
    outside the timed events."""
    import torch
    for _ in range(WARMUP):
        if stage:
            stage()
        fn()
    torch.cuda.synchronize()
    if stage is None:
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(ITERS):
            fn()
        e.record()
        torch.cuda.synchronize()
        return s.elapsed_time(e) * 1e3 / ITERS
    evs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(ITERS)]
    for s, e in evs:
        stage()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return sum(s.elapsed_time(e) for s, e in evs) * 1e3 / ITERS


def worker_main(spec_path: Optional[str], tokens: Optional[List[int]] = None, experts: int = 8, hidden: int = 7168,
                inter: int = 3072, topk: int = 6) -> int:
    import torch
    import torch.distributed as dist
    t0 = time.time()
    import deep_gemm as dg
    here = Path(__file__).resolve().parents[2]
    if Path(dg.__file__).resolve().is_relative_to(here):
        print(f'deep_gemm from {dg.__file__} is ours, not SGLang\'s: check PYTHONPATH')
        return 2
    print(f'SGLang deep_gemm {getattr(dg, "__version__", "?")} from {Path(dg.__file__).parent} '
          f'(import {time.time() - t0:.1f} s); torch {torch.__version__}')
    if spec_path:
        spec = torch.load(spec_path)
        experts, hidden, inter, topk = spec['experts'], spec['hidden'], spec['inter'], spec['topk']
        tokens, routes, ref_max = spec['tokens'], spec['routes'], spec['ref_max_tokens']
    else:
        routes, ref_max = {}, 128
        for t in tokens:
            g = torch.Generator().manual_seed(t)
            scores = torch.rand(t, experts, generator=g)
            routes[t] = (scores.topk(topk, dim=1).indices, torch.softmax(torch.randn(t, topk, generator=g), 1))
    torch.cuda.set_device(0)
    dist.init_process_group('nccl', init_method=f'tcp://127.0.0.1:{_free_port()}', world_size=1, rank=0,
                            device_id=torch.device('cuda', 0))
    group = dist.new_group([0])
    gen = torch.Generator(device='cuda').manual_seed(0)
    l1_bf = torch.randn(experts, 2 * inter, hidden, device='cuda', generator=gen).to(torch.bfloat16) * 0.05
    w1q, s1 = quant_block_fp8(l1_bf)
    del l1_bf
    l2_bf = torch.randn(experts, hidden, inter, device='cuda', generator=gen).to(torch.bfloat16) * 0.05
    w2q, s2 = quant_block_fp8(l2_bf)
    del l2_bf
    l1, l2 = dg.transform_weights_for_mega_moe_sm90((w1q, s1), (w2q, s2))
    buf, kind = _buffer(dg, group, experts, max(tokens), topk, hidden, inter)
    per_expert = fp8_weight_bytes(1, hidden, inter)
    print(f'buffer: {kind}, {buf.buffer.numel() / 1e9:.2f} GB; x {buf.x.dtype}, x_sf {buf.x_sf.dtype}, topk_idx '
          f'{buf.topk_idx.dtype}, topk_weights {buf.topk_weights.dtype}; weights {experts * per_expert / 1e6:.0f} MB')
    for t in tokens:
        idx, wts = routes[t]
        idx, wts = idx.to('cuda'), wts.to('cuda', torch.float32)
        xg = torch.Generator(device='cuda').manual_seed(1000 * t)
        x = torch.randn(t, hidden, device='cuda', generator=xg) * torch.exp(
            0.5 * torch.randn(t, 1, device='cuda', generator=xg))
        xq, xsf = quant_token_fp8(x)

        def stage():
            buf.x[:t].copy_(xq)
            buf.x_sf[:t].copy_(xsf)
            buf.topk_idx[:t].copy_(idx)
            buf.topk_weights[:t].copy_(wts)

        y = torch.empty(t, hidden, dtype=torch.bfloat16, device='cuda')
        call = lambda: dg.fp8_mega_moe(y, l1, l2, buf, recipe=(BLOCK, BLOCK, BLOCK), activation='swiglu',  # noqa: E731
                                       activation_clamp=None, fast_math=True)
        row = {'tokens': t, 'buffer': kind}
        try:
            stage()
            tj = time.time()
            call()
            torch.cuda.synchronize()
            row['first_call_s'] = round(time.time() - tj, 1)
            y1 = y.clone()
            call()
            torch.cuda.synchronize()
            row['idempotent'] = bool(torch.equal(y1.view(torch.int16), y.view(torch.int16)))
            stg = None if row['idempotent'] else stage
            if t <= ref_max:
                stage()
                call()
                ref = reference(xq, xsf, idx, wts, w1q, s1, w2q, s2)
                row['rel_err'] = float((y.float() - ref).norm() / ref.norm())
            row['eager_us'] = _timed(call, stg)
            try:
                stage()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    call()
                row['graph_us'] = _timed(graph.replay, stg)
                del graph
            except Exception as ex:
                row['graph_error'] = f'{type(ex).__name__}: {str(ex)[:160]}'
            touched = int(torch.unique(idx[(idx >= 0) & (idx < experts)]).numel())
            row.update(touched=touched, weight_bytes=touched * per_expert, all_weight_bytes=experts * per_expert)
        except Exception as ex:
            row['error'] = f'{type(ex).__name__}: {str(ex)[:300]}'
        print(TAG + json.dumps(row), flush=True)
    dist.destroy_process_group()
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--worker', metavar='SPEC', help='(internal) run the worker on a spec written by run_peer')
    ap.add_argument('--tokens', default='16,128,4096')
    ap.add_argument('--experts-per-rank', type=int, default=8)
    ap.add_argument('--hidden', type=int, default=7168)
    ap.add_argument('--inter', type=int, default=3072)
    ap.add_argument('--topk', type=int, default=6)
    args = ap.parse_args(argv)
    if args.worker:
        return worker_main(args.worker)
    # standalone: re-run this file as the worker with SGLang's site on the path
    if unavailable is None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
        from scripts.peers import unavailable as _u
    else:
        _u = unavailable
    site, why = find_site()
    if site is None:
        print(_u('sgl', why))
        return 1
    cache = Path(tempfile.gettempdir()) / 'dg_peer_sgl_cache'
    cmd = [sys.executable, str(Path(__file__).resolve()), '--worker-standalone', args.tokens,
           str(args.experts_per_rank), str(args.hidden), str(args.inter), str(args.topk)]
    return subprocess.call(cmd, env=worker_env(site, cache), cwd=tempfile.gettempdir())


if __name__ == '__main__':
    if len(sys.argv) == 7 and sys.argv[1] == '--worker-standalone':
        _, _, toks, e, h, i, k = sys.argv
        sys.exit(worker_main(None, [int(v) for v in toks.split(',')], int(e), int(h), int(i), int(k)))
    sys.exit(main())
