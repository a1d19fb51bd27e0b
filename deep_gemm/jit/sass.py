"""SASS checks on compiled cubins: required instructions present, no local memory in hot kernels, no
wgmma that ptxas serialized.

`cuobjdump --dump-sass` needs `nvdisasm` beside it (or on PATH); both come as wheels
(`nvidia-cuda-cuobjdump`, `nvidia-cuda-nvdisasm`) or with a CUDA toolkit.
"""
import dataclasses
import functools
import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import List, Optional, Sequence

from . import compiler


@functools.lru_cache(maxsize=None)
def find_tool(name: str) -> Optional[str]:
    """`DG_JIT_<NAME>` env var, then the nvidia-* wheels, then PATH, then $CUDA_HOME/bin."""
    env = os.environ.get(f'DG_JIT_{name.upper()}')
    if env:
        return env if Path(env).is_file() else None
    spec = importlib.util.find_spec('nvidia')
    # `nvidia` is a namespace package: the wheels put tools under nvidia/<cuXX or pkg>/bin/
    for base in (spec.submodule_search_locations or []) if spec else []:
        for candidate in sorted(Path(base).glob(f'*/bin/{name}')) + sorted(Path(base).glob(f'bin/{name}')):
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    found = shutil.which(name)
    if found:
        return found
    for home in (os.environ.get('CUDA_HOME'), os.environ.get('CUDA_PATH'), '/usr/local/cuda'):
        if home and (Path(home) / 'bin' / name).is_file():
            return str(Path(home) / 'bin' / name)
    return None


def sass_available() -> bool:
    return find_tool('cuobjdump') is not None and find_tool('nvdisasm') is not None


def dump_sass(cubin: Path) -> str:
    cuobjdump, nvdisasm = find_tool('cuobjdump'), find_tool('nvdisasm')
    if cuobjdump is None or nvdisasm is None:
        raise RuntimeError('SASS dump needs cuobjdump and nvdisasm: '
                           'pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm (or set DG_JIT_CUOBJDUMP/DG_JIT_NVDISASM)')
    # cuobjdump delegates disassembly to nvdisasm, which it looks up on PATH
    env = dict(os.environ, PATH=f'{Path(nvdisasm).parent}{os.pathsep}{os.environ.get("PATH", "")}')
    proc = subprocess.run([cuobjdump, '--dump-sass', str(cubin)], capture_output=True, text=True, timeout=300, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f'cuobjdump failed on {cubin}:\n{proc.stderr}')
    return proc.stdout


# "/*0190*/   @!P0 SYNCS.EXCH.64 URZ, [UR9], UR4 ;" -> "SYNCS.EXCH.64 URZ, [UR9], UR4"
_RE_INSTR = re.compile(r'^\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([^;]*);', re.MULTILINE)


def instructions(sass: str) -> List[str]:
    return [m.group(1).strip() for m in _RE_INSTR.finditer(sass)]


@dataclasses.dataclass
class SassReport:
    cubin: Path
    missing: List[str]          # required patterns that no instruction matched
    local_memory: List[str]     # LDL/STL instructions found
    registers: int = 0
    smem: int = 0
    stack: int = 0
    spills: int = 0
    wgmma_serialized: List[str] = dataclasses.field(default_factory=list)   # ptxas C751x reasons

    def ok(self, forbid_local_memory: bool) -> bool:
        if self.missing or self.wgmma_serialized:
            return False
        return not forbid_local_memory or (not self.local_memory and self.spills == 0 and self.stack == 0)


def check_cubin(cubin: Path, required: Sequence[str] = ()) -> SassReport:
    instrs = instructions(dump_sass(cubin))
    missing = [p for p in required if not any(re.search(p, i) for i in instrs)]
    local = [i for i in instrs if i.split(' ')[0].split('.')[0] in ('LDL', 'STL')]
    meta = compiler.load_meta(cubin) or {}
    ptxas = meta.get('ptxas', {})
    return SassReport(Path(cubin), missing, local, ptxas.get('registers', 0), ptxas.get('smem', 0),
                      ptxas.get('stack', 0), ptxas.get('spill_stores', 0) + ptxas.get('spill_loads', 0),
                      list(ptxas.get('wgmma_serialized', [])))
