"""nvcc -> cubin with a content-addressed, process-safe disk cache.

A cache entry is the directory `<cache>/<name>/<key>/` holding `kernel.cu`, `kernel.cubin` and
`kernel.json` (cubin sha256 + size + ptxas resource report). Every file is written to a temp name
and `os.replace`d, the json last, so a reader that finds a json whose hash matches the cubin has a
complete entry; anything else (missing, truncated, foreign bytes) is rebuilt. A per-entry
`fcntl` lock keeps concurrent processes from compiling the same key twice.
"""
import concurrent.futures
import contextlib
import fcntl
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

# `deep_gemm/include`: the only include root of our own kernels
INCLUDE_DIR = Path(__file__).resolve().parent.parent / 'include'
# Bump when the cache layout or the meaning of an entry changes
CACHE_FORMAT = 3
# Hopper and Blackwell *arch-specific* targets only (sm_100a: B200 / GB200, sm_103a: B300 / GB300):
# the family target `sm_100f` rejects `tcgen05.mma ... kind::mxf4nvf4.block_scale.scale_vec::4X`, so it
# is refused here
SUPPORTED_ARCHS = ('sm_90a', 'sm_100a', 'sm_103a')
# compute capability -> arch-specific target
CC_ARCHS = {(9, 0): 'sm_90a', (10, 0): 'sm_100a', (10, 3): 'sm_103a'}
BASE_FLAGS = ('-std=c++17', '-O3', '--expt-relaxed-constexpr', '-cubin', '-lineinfo', '-Xptxas=-v')

# Counters for tests and `DG_JIT_DEBUG` (per process)
stats = {'nvcc_runs': 0, 'cache_hits': 0}


class JITCompileError(RuntimeError):
    """nvcc failed; `.log` holds its full output."""

    def __init__(self, name: str, cmd: Sequence[str], log: str):
        self.name, self.cmd, self.log = name, list(cmd), log
        super().__init__(f'JIT compilation of {name!r} failed:\n{" ".join(cmd)}\n{log}')


def _debug() -> bool:
    return int(os.environ.get('DG_JIT_DEBUG', '0') or '0') > 0


def cache_dir() -> Path:
    return Path(os.environ.get('DG_JIT_CACHE_DIR') or Path.home() / '.deep_gemm')


def nvcc_path() -> str:
    if os.environ.get('DG_JIT_NVCC_COMPILER'):
        return os.environ['DG_JIT_NVCC_COMPILER']
    cuda_home = os.environ.get('CUDA_HOME') or os.environ.get('CUDA_PATH')
    if cuda_home and (Path(cuda_home) / 'bin' / 'nvcc').exists():
        return str(Path(cuda_home) / 'bin' / 'nvcc')
    found = shutil.which('nvcc') or ('/usr/local/cuda/bin/nvcc' if Path('/usr/local/cuda/bin/nvcc').exists() else None)
    if found is None:
        raise RuntimeError('nvcc not found: set DG_JIT_NVCC_COMPILER or CUDA_HOME')
    return found


@functools.lru_cache(maxsize=None)
def _nvcc_version(nvcc: str) -> str:
    return subprocess.run([nvcc, '--version'], capture_output=True, text=True, timeout=60, check=True).stdout


def nvcc_version() -> str:
    return _nvcc_version(nvcc_path())


@functools.lru_cache(maxsize=None)
def cutlass_include() -> Optional[Path]:
    """CUTLASS/CuTe headers from the `nvidia-cutlass` wheel (never vendored); None if absent."""
    if os.environ.get('DG_JIT_CUTLASS_INCLUDE'):
        return Path(os.environ['DG_JIT_CUTLASS_INCLUDE'])
    spec = importlib.util.find_spec('cutlass_library')
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / 'source' / 'include'
    return path if (path / 'cutlass').is_dir() else None


@functools.lru_cache(maxsize=None)
def cutlass_version() -> str:
    inc = cutlass_include()
    if inc is None:
        return 'none'
    try:
        dist = importlib.metadata.version('nvidia-cutlass')
    except importlib.metadata.PackageNotFoundError:
        dist = 'unknown'
    version_h = inc / 'cutlass' / 'version.h'
    body = hashlib.sha256(version_h.read_bytes()).hexdigest()[:16] if version_h.exists() else ''
    return f'{dist}:{body}'


def default_arch() -> str:
    """The current device's arch-specific target (needs a GPU)."""
    import torch
    if not torch.cuda.is_available():
        raise RuntimeError(f'no CUDA device: pass `arch` explicitly (one of {SUPPORTED_ARCHS})')
    major, minor = torch.cuda.get_device_capability()
    arch = CC_ARCHS.get((major, minor))
    if arch is None:
        raise RuntimeError(f'unsupported compute capability {major}.{minor}')
    return arch


def arch_flags(arch: str) -> List[str]:
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(f'unsupported arch {arch!r}: expected one of {SUPPORTED_ARCHS} '
                         '(family targets such as sm_100f lack the block-scaled FP4 MMA)')
    num = arch[3:-1]
    return [f'-gencode=arch=compute_{num}a,code=sm_{num}a']


def include_flags() -> List[str]:
    flags = ['-I', str(INCLUDE_DIR)]
    if cutlass_include() is not None:
        flags += ['-I', str(cutlass_include())]
    return flags


def include_digest() -> str:
    """Hash of every file under deep_gemm/include: simpler and safer than tracking #includes."""
    h = hashlib.sha256()
    for path in sorted(p for p in INCLUDE_DIR.rglob('*') if p.is_file()):
        h.update(str(path.relative_to(INCLUDE_DIR)).encode() + b'\0')
        h.update(path.read_bytes() + b'\0')
    return h.hexdigest()


def cache_key(source: str, arch: str, flags: Sequence[str]) -> str:
    h = hashlib.sha256()
    for part in (f'format={CACHE_FORMAT}', source, include_digest(), cutlass_version(),
                 '\0'.join(flags), arch, nvcc_version()):
        h.update(part.encode() + b'\0\1')
    return h.hexdigest()


# ptxas -v: "Used 40 registers, used 1 barriers, 1024 bytes smem, 400 bytes cmem[0]"
#           "16 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads"
_RE_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_RE_REGS = re.compile(r'Used (\d+) registers')
_RE_SMEM = re.compile(r'(\d+) bytes smem')
_RE_FRAME = re.compile(r'(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads')
# "(C7513) Potential Performance Loss: wgmma.mma_async instructions are serialized due to <why> in the
# function '...'" (C7512 says "for the function"): ptxas then waits for every wgmma right after
# issuing it, silently.  Any other line that says wgmma and serialized is kept whole.
_RE_WGMMA_SERIAL = re.compile(r'\((C\d+)\) Potential Performance Loss: wgmma\.mma_async instructions are '
                              r'serialized due to (.*?) (?:in|for) the function')


def _wgmma_serialized(log: str) -> List[str]:
    found = set()
    for line in log.splitlines():
        if 'wgmma' in line and 'serialized' in line:
            m = _RE_WGMMA_SERIAL.search(line)
            found.add(f'{m.group(1)}: {m.group(2)}' if m else line.strip())
    return sorted(found)


def parse_ptxas(log: str) -> Dict[str, object]:
    """Resource report of the (single) entry in a ptxas -v log."""
    def first(regex, default=0):
        m = regex.search(log)
        return int(m.group(1)) if m else default
    frame = _RE_FRAME.search(log)
    entries = _RE_ENTRY.findall(log)
    return {
        'entries': sorted(set(entries)),
        'registers': first(_RE_REGS),
        'smem': first(_RE_SMEM),
        'stack': int(frame.group(1)) if frame else 0,
        'spill_stores': int(frame.group(2)) if frame else 0,
        'spill_loads': int(frame.group(3)) if frame else 0,
        'wgmma_serialized': _wgmma_serialized(log),
    }


def _atomic_write(path: Path, data: bytes):
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
    try:
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def load_meta(cubin: Path) -> Optional[dict]:
    """The entry's metadata if `cubin` is complete and matches it, else None."""
    cubin = Path(cubin)
    try:
        meta = json.loads(cubin.with_suffix('.json').read_text())
        data = cubin.read_bytes()
    except (OSError, ValueError):
        return None
    if meta.get('size') != len(data) or meta.get('sha256') != hashlib.sha256(data).hexdigest():
        return None
    return meta


@contextlib.contextmanager
def _file_lock(path: Path):
    with open(path, 'a+') as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _run_nvcc(cmd: List[str], timeout: float) -> Tuple[int, str]:
    """The one place nvcc is spawned (tests patch it to count builds)."""
    stats['nvcc_runs'] += 1
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or '')
        return -1, f'{out}\nnvcc timed out after {timeout} s'
    return proc.returncode, proc.stdout


def build(name: str, source: str, arch: Optional[str] = None, extra_flags: Sequence[str] = (),
          timeout: Optional[float] = None) -> Path:
    """Compile `source` to a cubin for `arch` (default: the current device's), cached on disk.

    Returns the path of the cached cubin; its metadata is `load_meta(path)`.
    Raises `JITCompileError` (with nvcc's log) on failure or timeout.
    """
    if not re.fullmatch(r'[A-Za-z0-9_.-]+', name):
        raise ValueError(f'bad kernel name {name!r}')
    arch = arch or default_arch()
    timeout = timeout or float(os.environ.get('DG_JIT_NVCC_TIMEOUT', '900'))
    flags = [*BASE_FLAGS, *arch_flags(arch), *include_flags(), *extra_flags]
    key = cache_key(source, arch, flags)
    entry = cache_dir() / 'cache' / name / f'{arch}_{key[:32]}'
    cubin = entry / 'kernel.cubin'

    # Fast path: no lock, the json-last write order makes a verified entry complete
    if load_meta(cubin) is not None:
        stats['cache_hits'] += 1
        return cubin

    entry.mkdir(parents=True, exist_ok=True)
    with _file_lock(entry / '.lock'):
        # Another process may have finished while we waited for the lock
        if load_meta(cubin) is not None:
            stats['cache_hits'] += 1
            return cubin
        # Source at a stable path: `-lineinfo` embeds it, so all builders produce identical bytes
        src = entry / 'kernel.cu'
        _atomic_write(src, source.encode())
        tmp_cubin = entry / f'.kernel.{os.getpid()}.cubin.tmp'
        cmd = [nvcc_path(), str(src), '-o', str(tmp_cubin), *flags]
        if _debug():
            print(f'[DG_JIT] nvcc: {" ".join(cmd)}', flush=True)
        start = time.perf_counter()
        try:
            rc, log = _run_nvcc(cmd, timeout)
            elapsed = time.perf_counter() - start
            if rc != 0 or not tmp_cubin.exists():
                raise JITCompileError(name, cmd, log)
            data = tmp_cubin.read_bytes()
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp_cubin.unlink()
        meta = {'name': name, 'arch': arch, 'key': key, 'flags': flags,
                'sha256': hashlib.sha256(data).hexdigest(), 'size': len(data),
                'compile_seconds': round(elapsed, 3), 'ptxas': parse_ptxas(log)}
        # Cubin first, json last: the json is the commit record
        with contextlib.suppress(FileNotFoundError):
            cubin.with_suffix('.json').unlink()
        _atomic_write(cubin, data)
        _atomic_write(cubin.with_suffix('.json'), json.dumps(meta, indent=1).encode())
        if _debug():
            print(f'[DG_JIT] built {name} ({arch}) in {elapsed:.2f} s: {meta["ptxas"]}', flush=True)
        return cubin


def compile_many(items: Iterable, jobs: int = 2) -> List[Path]:
    """Build many `(name, source, arch[, extra_flags])` tuples, `jobs` nvcc processes at a time.

    Threads suffice: the work happens in nvcc subprocesses. The first error is re-raised after
    all builds finish, so one bad kernel does not hide the others' results in the cache.
    """
    items = [tuple(it) for it in items]
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = [pool.submit(build, *it) for it in items]
        concurrent.futures.wait(futures)
    return [f.result() for f in futures]
