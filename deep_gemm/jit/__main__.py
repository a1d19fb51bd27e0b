"""`python -m deep_gemm.jit --compile-all --arch sm_90a,sm_100a --out DIR [--jobs 2]`

Compiles every registered kernel's default params for each requested arch it supports (no GPU
needed), copies the cubins to DIR and checks their SASS. Exits non-zero on any failure.
"""
import argparse
import concurrent.futures
import json
import re
import shutil
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

from . import compiler, registry, sass


def _jobs(archs: Sequence[str], kernel_filter: Optional[str]):
    for spec in registry.all_specs():
        if kernel_filter and not re.search(kernel_filter, spec.name):
            continue
        many = len(spec.default_params) > 1
        tags = [spec.params_tag(p) for p in spec.default_params]
        for i, params in enumerate(spec.default_params):
            # Tags must be unique per kernel: fall back to the index on a collision
            tag = tags[i] if tags.count(tags[i]) == 1 else f'{tags[i]}_{i}'
            for arch in archs:
                if arch in spec.archs:
                    stem = f'{spec.name}_{tag}_{arch}' if many else f'{spec.name}_{arch}'
                    yield spec, params, arch, stem


def compile_all(archs: Sequence[str], out: Path, jobs: int = 2, kernel_filter: Optional[str] = None,
                check_sass: bool = True) -> bool:
    out.mkdir(parents=True, exist_ok=True)
    todo = list(_jobs(archs, kernel_filter))
    if check_sass and not sass.sass_available():
        print('error: SASS check needs cuobjdump and nvdisasm '
              '(pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm), or pass --no-sass', file=sys.stderr)
        return False

    def one(job):
        spec, params, arch, stem = job
        start = time.perf_counter()
        try:
            cubin = spec.build(params, arch)
        except compiler.JITCompileError as e:
            return {'file': f'{stem}.cubin', 'ok': False, 'error': e.log[-4000:]}
        row = {'file': f'{stem}.cubin', 'seconds': round(time.perf_counter() - start, 2)}
        shutil.copyfile(cubin, out / f'{stem}.cubin')
        if check_sass:
            rep = sass.check_cubin(cubin, spec.required_sass_for(arch))
            row.update(regs=rep.registers, smem=rep.smem, stack=rep.stack, spills=rep.spills,
                       missing=rep.missing, local_memory=rep.local_memory[:4],
                       wgmma_serialized=rep.wgmma_serialized, ok=rep.ok(spec.forbid_local_memory))
        else:
            ptxas = (compiler.load_meta(cubin) or {}).get('ptxas', {})
            row.update(regs=ptxas.get('registers'), smem=ptxas.get('smem'), stack=ptxas.get('stack'),
                       spills=ptxas.get('spill_stores', 0) + ptxas.get('spill_loads', 0), missing=[], ok=True)
        return row

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        rows = list(pool.map(one, todo))
    elapsed = time.perf_counter() - start

    width = max([len(r['file']) for r in rows] + [16])
    header = f'{"kernel file":<{width}} {"regs":>5} {"smem":>7} {"stack":>6} {"spills":>6}  {"sec":>6}  required SASS'
    print(header)
    print('-' * len(header))
    for (spec, _, arch, _), row in zip(todo, rows):
        if 'error' in row:
            print(f'{row["file"]:<{width}} COMPILE ERROR\n{row["error"]}')
            continue
        found = 'MISSING ' + ', '.join(row['missing']) if row['missing'] else \
            ('found' if spec.required_sass_for(arch) else '-')
        if row.get('local_memory') or (spec.forbid_local_memory and (row['spills'] or row['stack'])):
            found += f'  LOCAL MEMORY in a hot kernel: {row.get("local_memory")}'
        if row.get('wgmma_serialized'):
            found += f'  WGMMA SERIALIZED by ptxas: {row["wgmma_serialized"]}'
        print(f'{row["file"]:<{width}} {row["regs"]:>5} {row["smem"]:>7} {row["stack"]:>6} {row["spills"]:>6}  '
              f'{row.get("seconds", 0):>6.2f}  {found}{"" if row["ok"] else "  FAIL"}')
    ok = all(r['ok'] for r in rows)
    (out / 'report.json').write_text(json.dumps(rows, indent=1))
    print(f'{len(rows)} cubins, {sum(not r["ok"] for r in rows)} failed, {elapsed:.1f} s ({jobs} jobs)')
    return ok


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m deep_gemm.jit', description=__doc__.split('\n\n')[1])
    parser.add_argument('--compile-all', action='store_true', help='compile every registered kernel')
    parser.add_argument('--arch', default=','.join(compiler.SUPPORTED_ARCHS), help='comma-separated targets')
    parser.add_argument('--out', type=Path, help='output directory for the cubins')
    parser.add_argument('--jobs', type=int, default=2, help='parallel nvcc processes')
    parser.add_argument('--kernels', default=None, help='regex filter on kernel names')
    parser.add_argument('--no-sass', action='store_true', help='skip the cuobjdump SASS check')
    parser.add_argument('--list', action='store_true', help='list registered kernels and exit')
    args = parser.parse_args(argv)

    if args.list:
        for spec in registry.all_specs():
            print(f'{spec.name}: {spec.header} archs={",".join(spec.archs)} params={list(map(dict, spec.default_params))}')
        return 0
    if not args.compile_all or args.out is None:
        parser.error('nothing to do: use --compile-all --out DIR (or --list)')
    archs = [a.strip() for a in args.arch.split(',') if a.strip()]
    for arch in archs:
        compiler.arch_flags(arch)  # rejects unsupported targets such as sm_100f early
    return 0 if compile_all(archs, args.out, args.jobs, args.kernels, not args.no_sass) else 1


if __name__ == '__main__':
    sys.exit(main())
