"""Does compute-sanitizer racecheck honour mbarrier ordering?  Runs scripts/racecheck_probe.cu (one
racy and four race-free variants of a TMA + mbarrier pipeline) under racecheck, one process per
variant, and prints the hazards each got.  Needs an sm_90 GPU and compute-sanitizer on the PATH.

    python scripts/racecheck_probe.py            # the table
    python scripts/racecheck_probe.py --mode 1   # one variant, no sanitizer (what each child runs)

The toolkit's answer decides what racecheck on the Mega MoE kernel can show
(scripts/sanitize_mega_moe.py, docs/perf-notes.md).
"""
import argparse
import re
import subprocess
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(_ROOT))
SOURCE = Path(__file__).resolve().with_suffix('.cu')
MODES = {0: 'racy (one release per warpgroup, warps 1-3 unordered)', 1: 'per-warp release',
         2: 'warpgroup bar.sync, one release', 3: 'token waits, no parity', 4: '__syncthreads, no pipeline'}
STAGES, STAGE_BYTES, BLOCKS = 4, 8192, 64    # kStages, kStageBytes, kBlocks of the .cu
SMEM = STAGES * (STAGE_BYTES + 2 * 8 + 4)     # stages, then full + empty barriers and tags
GRID = 4


def build(arch=None):
    from deep_gemm.jit import compiler
    return compiler.build('racecheck_probe', SOURCE.read_text(), arch=arch)


def run_one(mode: int):
    import torch
    from deep_gemm.jit import runtime
    kernel = runtime.load(build())
    gen = torch.Generator(device='cuda').manual_seed(mode)
    src = torch.randint(0, 256, (GRID * BLOCKS * STAGE_BYTES,), dtype=torch.uint8, device='cuda', generator=gen)
    out = torch.full((GRID * 256,), float('nan'), device='cuda')
    runtime.launch(kernel, GRID, 384, SMEM, [src, out, runtime.i32(mode)])
    torch.cuda.synchronize()
    assert not out.isnan().any(), 'a consumer thread did not finish'


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--mode', type=int, choices=sorted(MODES))
    args = ap.parse_args()
    if args.mode is not None:
        run_one(args.mode)
        return
    build()   # once, outside the sanitizer
    print(f'{"mode":<58} racecheck')
    for mode, what in MODES.items():
        res = subprocess.run(['compute-sanitizer', '--tool', 'racecheck', sys.executable, __file__, '--mode', str(mode)],
                             capture_output=True, text=True)
        text = res.stdout + res.stderr
        summary = re.search(r'RACECHECK SUMMARY: (\d+) hazards displayed \((\d+) errors', text)
        pairs = len(re.findall(r'and (?:Read|Write) access at', text))
        verdict = f'{summary.group(2)} errors ({pairs} access pairs)' if summary else f'no summary (rc {res.returncode})'
        print(f'{mode} {what:<56} {verdict}', flush=True)


if __name__ == '__main__':
    main()
