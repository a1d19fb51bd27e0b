"""What the sm100 build tests share (tests/test_sm100_build.py, test_sm100_f16_build.py,
test_sm100_fused_build.py): a fresh JIT cache per module, compiling a spec's default instantiations with
the SASS checks every sm100 kernel passes, the PTX of one instantiation, and a g++ program printing the
plans' numbers."""
import collections
import os
import subprocess

import pytest

from deep_gemm.jit import compiler, sass

INCLUDE = compiler.INCLUDE_DIR


def jit_cache_fixture(name: str):
    """A module-scoped fixture pointing DG_JIT_CACHE_DIR at a fresh temporary folder ``name`` (restored after)."""
    @pytest.fixture(scope='module')
    def cache(tmp_path_factory):
        old = os.environ.get('DG_JIT_CACHE_DIR')
        os.environ['DG_JIT_CACHE_DIR'] = str(tmp_path_factory.mktemp(name))
        yield
        if old is None:
            os.environ.pop('DG_JIT_CACHE_DIR')
        else:
            os.environ['DG_JIT_CACHE_DIR'] = old
    return cache


def compile_defaults(spec, arch):
    """Build every default instantiation of ``spec`` for ``arch`` (skips without cuobjdump / nvdisasm); each
    has the required SASS and no local memory, spills or stack.  Yields (params, report, opcode counts)."""
    if not sass.sass_available():
        pytest.skip('cuobjdump/nvdisasm not found')
    for params in spec.default_params:
        cubin = spec.build(params, arch)
        rep = sass.check_cubin(cubin, spec.required_sass_for(arch))
        assert rep.missing == [], (params, rep.missing)
        assert rep.local_memory == [] and rep.spills == 0 and rep.stack == 0, params
        assert rep.ok(spec.forbid_local_memory)
        ops = collections.Counter(i.split(' ')[0] for i in sass.instructions(sass.dump_sass(cubin)))
        yield params, rep, ops


def kernel_ptx(spec, params, arch, tmp_path):
    """The PTX of one instantiation (nvcc -ptx with the JIT's flags)."""
    src = tmp_path / 'k.cu'
    src.write_text(spec.render(params))
    out = tmp_path / 'k.ptx'
    flags = [f for f in compiler.BASE_FLAGS if f not in ('-cubin', '-Xptxas=-v')]
    subprocess.run([compiler.nvcc_path(), str(src), '-ptx', '-o', str(out), *flags,
                    f'-arch=compute_{arch[3:]}', *compiler.include_flags()], check=True, capture_output=True)
    return out.read_text()


def plan_program_lines(tmp_path, body: str):
    """Compile (g++ -Wall -Werror) and run a main() of ``body`` over scheduler/sm100_gemm_plan.cuh; its stdout lines."""
    src = tmp_path / 'p.cpp'
    src.write_text('#include <cstdio>\n#include <deep_gemm/scheduler/sm100_gemm_plan.cuh>\n'
                   f'using namespace deep_gemm::sm100;\nint main() {{\n{body}\n}}\n')
    exe = tmp_path / 'p'
    subprocess.run(['g++', '-std=c++17', '-Wall', '-Werror', '-I', str(INCLUDE), str(src), '-o', str(exe)], check=True)
    return subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.split('\n')
