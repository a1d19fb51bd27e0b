"""The k loops of the Hopper expert kernels in SASS, to check that a change left them alone (no GPU).

    python scripts/sass_kloops.py [--kernel fused|grouped] --save ref.json    # e.g. on the base commit
    python scripts/sass_kloops.py [--kernel fused|grouped] --compare ref.json # after the change

Builds every default parameter set of the kernel for sm_90a (the JIT, nvcc and cuobjdump/nvdisasm
on this machine), finds its k loops (backward branches of at most 400 instructions whose body
holds an HGMMA: one per MMA width and phase) and hashes each body, registers included and
immediates and branch targets masked.  ``--compare`` reports, per parameter set, how many of the
reference's loops the build still contains unchanged, and exits with 1 if any is gone.

Why: the fused kernel's consumers run their k loop under an 80 or 88-register cap (2 CTAs per SM)
or with the whole kernel around them, and ptxas reschedules and renames those loops for changes
anywhere in the kernel, even in code the consumers never run.  On an H100 (docs/perf-notes.md,
eighth session) a change whose k loops hashed equal ran as fast as its base (263.6-263.9 against
263.6-264.8 us), and one whose loops all changed ran 3.5-4 % slower with the same work, its L1
units 52.1 against 49.4 us.  Check the loops before spending device time on a measurement.
"""
import argparse
import hashlib
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from deep_gemm import gemm  # noqa: E402
from deep_gemm.jit import sass  # noqa: E402
from deep_gemm.mega import sm90  # noqa: E402

_BRANCH = re.compile(r'\bBRA(?:\.\S+)? (?:`\(\.L_x_\d+\)\s*)?(0x[0-9a-f]+)')
_HEX = re.compile(r'0x[0-9a-f]+')
_MAX_BODY = 400


def k_loops(instructions):
    """Hash of each k loop body, in address order (instruction i sits at byte 16 i)."""
    out = []
    for i, ins in enumerate(instructions):
        m = _BRANCH.search(ins)
        if not m:
            continue
        top = int(m.group(1), 16) // 16
        body = instructions[top:i + 1]
        if top < i and i - top < _MAX_BODY and any(x.startswith('HGMMA') for x in body):
            out.append(hashlib.sha256('\n'.join(_HEX.sub('X', x) for x in body).encode()).hexdigest()[:12])
    return out


def survey(spec):
    result = {}
    for p in spec.default_params:
        if p.get('trace'):
            continue
        cubin = spec.build(p, 'sm_90a')
        report = sass.check_cubin(cubin)
        key = ','.join(f'{k}={v}' for k, v in sorted(p.items()))
        result[key] = {'loops': k_loops(sass.instructions(sass.dump_sass(cubin))),
                       'registers': report.registers, 'local': len(report.local_memory)}
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--kernel', choices=('fused', 'grouped'), default='fused')
    ap.add_argument('--save', help='write the loops to this JSON file')
    ap.add_argument('--compare', help='compare with a JSON file written by --save')
    args = ap.parse_args()
    if not sass.sass_available():
        raise SystemExit('needs cuobjdump or nvdisasm (the CUDA toolkit) to read SASS')
    spec = sm90.FUSED if args.kernel == 'fused' else gemm.GROUPED_GEMM
    now = survey(spec)
    if args.save:
        with open(args.save, 'w') as f:
            json.dump(now, f, indent=1)
    changed = 0
    ref = None
    if args.compare:
        with open(args.compare) as f:
            ref = json.load(f)
    for key, v in now.items():
        line = f'{key}: {len(v["loops"])} k loops, {v["registers"]} registers, {v["local"]} local-memory instructions'
        if ref is not None:
            if key not in ref:
                line += '; not in the reference'
            else:
                kept = sum(h in v['loops'] for h in ref[key]['loops'])
                changed += kept < len(ref[key]['loops'])
                line += f'; {kept} of the reference\'s {len(ref[key]["loops"])} unchanged'
        print(line, flush=True)
    if ref is not None:
        print('k loops: ' + ('all unchanged' if changed == 0 else f'changed in {changed} parameter set(s)'))
        sys.exit(1 if changed else 0)


if __name__ == '__main__':
    main()
