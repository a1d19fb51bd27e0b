"""g++ builds of the host programs of the sm100 tests, cached by a hash of the sources and flags.

The cache lives in ``$DG_TEST_CACHE`` or ``<tmp>/deep_gemm_sm100_tests``; a build is reused when the
program's source, every header under deep_gemm/include, the CUTLASS headers' version file and the
flags are unchanged (CuTe translation units take ~20-40 s to compile)."""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import pytest

ROOT = Path(__file__).resolve().parents[2]
INCLUDE = ROOT / 'deep_gemm' / 'include'
CPP = ROOT / 'tests' / 'cpp'


def cxx() -> str:
    c = shutil.which('g++') or shutil.which('c++')
    if c is None:
        pytest.skip('no host C++ compiler (g++)')
    return c


def cutlass_include() -> Path:
    env = os.environ.get('CUTLASS_INCLUDE')
    cands = [Path(env)] if env else []
    try:
        import cutlass_library
        cands.append(Path(cutlass_library.__file__).resolve().parent / 'source' / 'include')
    except ImportError:
        pass
    for c in cands:
        if (c / 'cute' / 'tensor.hpp').exists():
            return c
    pytest.skip('CUTLASS/CuTe headers not found (pip install nvidia-cutlass, or set CUTLASS_INCLUDE)')


def cuda_include() -> Optional[Path]:
    for base in filter(None, [os.environ.get('CUDA_HOME'), os.environ.get('CUDA_PATH'), '/usr/local/cuda']):
        p = Path(base) / 'include'
        if (p / 'cuda_runtime_api.h').exists() or (p / 'cuda.h').exists():
            return p
    nvcc = shutil.which('nvcc')
    if nvcc:
        p = Path(nvcc).resolve().parent.parent / 'include'
        if p.exists():
            return p
    return None


def _hash(paths: Sequence[Path], flags: Sequence[str]) -> str:
    h = hashlib.sha256()
    for p in sorted(set(paths)):
        h.update(str(p).encode())
        h.update(p.read_bytes())
    h.update('\0'.join(flags).encode())
    return h.hexdigest()[:20]


def _local_includes(src: Path, seen: Optional[set] = None) -> list:
    """``src`` and the files it #includes with quotes (tests/cpp/*.h, an included .cpp), recursively."""
    seen = set() if seen is None else seen
    if src in seen or not src.exists():
        return []
    seen.add(src)
    out = [src]
    for inc in re.findall(r'^\s*#\s*include\s+"([^"]+)"', src.read_text(), flags=re.M):
        out += _local_includes((src.parent / inc).resolve(), seen)
    return out


def build(src: Path, *, cute: bool = True, defines: Sequence[str] = (), name: Optional[str] = None) -> Path:
    """Compile ``src`` (a tests/cpp program) with g++ -std=c++17; returns the executable."""
    compiler = cxx()
    flags = ['-std=c++17', '-O1', '-w', f'-I{INCLUDE}']
    deps = _local_includes(src) + sorted(INCLUDE.rglob('*.cuh'))
    if cute:
        inc = cutlass_include()
        flags.append(f'-I{inc}')
        deps.append(inc / 'cutlass' / 'version.h')
        cuda = cuda_include()
        if cuda is not None:
            flags += [f'-I{cuda}', f'-I{cuda / "cccl"}']
    flags += [f'-D{d}' for d in defines]
    key = _hash(deps, [compiler] + flags)
    cache = Path(os.environ.get('DG_TEST_CACHE', Path(tempfile.gettempdir()) / 'deep_gemm_sm100_tests'))
    cache.mkdir(parents=True, exist_ok=True)
    exe = cache / f'{name or src.stem}-{key}'
    if exe.exists():
        return exe
    tmp = exe.with_suffix(f'.tmp{os.getpid()}')
    proc = subprocess.run([compiler, *flags, str(src), '-o', str(tmp)], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f'g++ failed for {src.name}:\n{proc.stderr[-6000:]}')
    os.replace(tmp, exe)
    return exe


def run_lines(exe: Path, *args, timeout: int = 300, check: bool = True):
    """Run a program; returns (returncode, list of parsed JSON lines, stderr)."""
    import json
    proc = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f'{exe.name} {args} failed ({proc.returncode}):\n{proc.stderr[-4000:]}')
    lines = [json.loads(l) for l in proc.stdout.splitlines() if l.startswith('{')]
    return proc.returncode, lines, proc.stderr


# ------------------------------------------------------------------ the conformance programs' output
# tests/cpp/sm100_conformance.cpp and sm100_f16_conformance.cpp print one {"check", "cases", "mismatches",
# "first"} line per check; argv[1] names a negative control (one kernel-side quantity perturbed).

def assert_check_passes(lines, check: str, min_cases: int) -> None:
    """Exactly one line for ``check``, with at least ``min_cases`` cases and no mismatch with CuTe."""
    rows = [d for d in lines if d.get('check') == check]
    assert len(rows) == 1, f'check {check} missing from the program output'
    d = rows[0]
    assert d['cases'] >= min_cases, d
    assert d['mismatches'] == 0, f'{check}: {d["mismatches"]} of {d["cases"]} differ from CuTe, first: {d["first"]}'


def perturbation_mismatches(exe: Path, brk: str) -> dict:
    """Run ``exe`` with the negative control ``brk``; returns {check: mismatches} of the checks that failed."""
    _, lines, _ = run_lines(exe, brk)
    return {d['check']: d['mismatches'] for d in lines if 'check' in d and d['mismatches']}


def conformance_fixtures(src_name: str):
    """Module-scoped fixtures (conformance, results): the program tests/cpp/``src_name`` built, and the
    lines of its unperturbed run.  Use as ``conformance, results = conformance_fixtures('x.cpp')``."""
    @pytest.fixture(scope='module')
    def conformance():
        return build(CPP / src_name)

    @pytest.fixture(scope='module')
    def results(conformance):
        _, lines, _ = run_lines(conformance)
        return lines

    return conformance, results
