"""Decode-shaped L1 (SwiGLU) and L2 launches of the grouped GEMM (32 experts, DeepSeek-V4 shapes).

    python scripts/profile_decode.py [tokens_per_expert]           # one timing line per GEMM (also for ncu)
    python scripts/profile_decode.py [tokens_per_expert] --clocks  # + SM clock and board power, sustained

``--clocks`` runs L1+L2 back to back for a few seconds while ``nvidia-smi`` samples the SM clock and
the power draw every 100 ms, then does the same for a device copy (the bandwidth ceiling's kernel):
whether the GEMM runs at the board's power limit (and so at a reduced clock) is what decides if
latency hiding or fewer instructions per weight can make it faster (docs/perf-notes.md, v7).
"""
import statistics
import subprocess
import sys
import time

import torch

from deep_gemm.gemm import m_grouped_fp8_nvfp4_gemm_nt_masked
from scripts.bench_grouped_gemm import make_weights


def sustained(fn, seconds=4.0, calls=None):
    """(us per call, median SM MHz, median W, power limit W) while fn runs back to back, for
    ``seconds`` or, where ranks must stay in step (each call waits on the others), exactly ``calls``
    calls."""
    query = ['nvidia-smi', '-i', str(torch.cuda.current_device()), '--query-gpu=clocks.sm,power.draw,power.limit',
             '--format=csv,noheader,nounits', '-lms', '100']
    mon = subprocess.Popen(query, stdout=subprocess.PIPE, text=True)
    start, n = time.time(), 0
    while (n < calls) if calls is not None else (time.time() - start < seconds):
        for _ in range(20 if calls is None else min(20, calls - n)):
            fn()
            n += 1
        torch.cuda.synchronize()
    elapsed = time.time() - start
    mon.terminate()
    rows = [[float(v) for v in line.split(',')] for line in mon.stdout.read().strip().splitlines()]
    rows = rows[len(rows) // 4:] or rows      # skip the ramp
    return (elapsed / n * 1e6, statistics.median(r[0] for r in rows), statistics.median(r[1] for r in rows),
            rows[-1][2])


def main():
    args = [a for a in sys.argv[1:] if not a.startswith('--')]
    tpe = int(args[0]) if args else 4
    e, hidden, inter = 32, 7168, 3072
    gen = torch.Generator(device='cuda').manual_seed(0)
    l1, l2 = make_weights(e, hidden, inter, gen)
    h = torch.randn(e, tpe, hidden, device='cuda', generator=gen).to(torch.bfloat16)
    mid = torch.empty(e, tpe, inter, dtype=torch.bfloat16, device='cuda')
    y = torch.empty(e, tpe, hidden, dtype=torch.bfloat16, device='cuda')
    counts = torch.full((e,), tpe, dtype=torch.int32, device='cuda')
    run_l1 = lambda: m_grouped_fp8_nvfp4_gemm_nt_masked(h, l1, mid, counts, tpe, epilogue='swiglu')
    run_l2 = lambda: m_grouped_fp8_nvfp4_gemm_nt_masked(mid, l2, y, counts, tpe)
    for _ in range(3):
        run_l1()
        run_l2()
    torch.cuda.synchronize()
    s, t = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for name, fn in (('L1', run_l1), ('L2', run_l2)):
        s.record()
        for _ in range(20):
            fn()
        t.record()
        torch.cuda.synchronize()
        b = sum(x.numel() for x in ((l1.codes, l1.scales) if name == 'L1' else (l2.codes, l2.scales)))
        us = s.elapsed_time(t) / 20 * 1e3
        print(f'{name}: {us:.1f} us, {b / us / 1e3:.0f} GB/s of FP4 weights')
    if '--clocks' in sys.argv:
        src = torch.randn(1 << 28, device='cuda')
        dst = torch.empty_like(src)
        for name, fn in (('L1+L2', lambda: (run_l1(), run_l2())), ('device copy 1 GiB', lambda: dst.copy_(src))):
            us, mhz, watts, limit = sustained(fn)
            print(f'{name}, sustained: {us:.1f} us per call, SM clock {mhz:.0f} MHz, {watts:.0f} W of a {limit:.0f} W limit')


if __name__ == '__main__':
    main()
