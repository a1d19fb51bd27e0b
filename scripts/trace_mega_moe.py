"""Timeline of the fused Mega MoE kernel: where a launch spends its time, on every rank.

    python scripts/trace_mega_moe.py [tokens,...] [--experts-per-rank E] [--routing uniform]
                                                           # default 16,128,4096, E = 8, skewed
    torchrun --nproc-per-node 2 scripts/trace_mega_moe.py 128 --routing uniform   # one timeline per rank

Runs the kernel's trace variant (`kTrace`: globaltimer stamps per CTA and per unit, see
`mega::stamp` in include/deep_gemm/mega/trace.cuh) after warm-up launches of the normal kernel,
checks that its output is bitwise equal to the normal kernel's, and prints, in µs from the launch's
first stamp:
- per CTA: start -> barrier 0 passed -> own pairs counted -> every CTA counted -> work order built
  -> every CTA routed; combine start -> end (min, median and max over CTAs); and when
  its first unit was claimed, had its inputs and started, and when its last unit was done;
- per unit kind (L1, L2): count, MMA time (consumer start -> done), time between claim and inputs
  ready (the producer's wait for rows or for L1 tiles), time between ready and the consumer's start;
- CTA occupancy: the sum of unit MMA times over CTAs x span, and the idle time split into before
  the first unit, between units, and after the last one;
- tail: when the last unit would end if every CTA started at the median first start and claimed the
  units in order, each taking its measured MMA time (at decode this reproduces the measured end: the
  last partial wave of equal L2 units), against that work spread evenly over the CTAs.
Inputs as scripts/bench_mega_moe.py (DeepSeek-V4 shapes, top-6, the same seeds).  With several ranks
every rank launches the trace variant together (the kernel's cross-rank waits need it); each rank's
times are from its own first stamp (the GPUs' globaltimers are not compared).
The stamps come from one consumer warpgroup per CTA; the other runs the same units.
"""
import argparse
import contextlib
import heapq
import io
import os
import statistics
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import deep_gemm  # noqa: E402
from deep_gemm.mega import sm90  # noqa: E402
from scripts.bench_grouped_gemm import make_weights  # noqa: E402
from scripts.bench_mega_moe import fill_inputs, torchrun_group  # noqa: E402


def describe(name, xs):
    if not xs:
        return f'{name}: -'
    return f'{name}: min {min(xs):.1f}, median {statistics.median(xs):.1f}, max {max(xs):.1f}'


def analyse(tr, grid, num_units):
    tr = tr.cpu().tolist()
    cta = [tr[8 * b: 8 * b + 8] for b in range(grid)]
    t0 = min(c[0] for c in cta)
    us = lambda v: (v - t0) / 1e3  # noqa: E731
    units = []
    base = sm90.TRACE_UNITS
    for u in range(num_units):
        claim, ready, start, done = tr[base + 4 * u: base + 4 * u + 4]
        cta_phase = tr[base + 4 * num_units + u]      # 2 x CTA + (1 for an L2 unit)
        units.append((u, cta_phase // 2, us(claim), us(ready), us(start), us(done), 'L2' if cta_phase % 2 else 'L1'))
    end = max(us(c[3]) for c in cta)
    print(f'  span {end:.1f} us, {grid} CTAs, {num_units} units')
    print('  ' + describe('CTA start', [us(c[0]) for c in cta]))
    print('  ' + describe('barrier 0 passed', [us(c[4]) for c in cta]))
    print('  ' + describe('own pairs counted', [us(c[5]) for c in cta]))
    print('  ' + describe('every CTA counted', [us(c[6]) for c in cta]))
    print('  ' + describe('work order built', [us(c[1]) for c in cta]))
    print('  ' + describe('every CTA routed', [us(c[7]) for c in cta]))
    print('  ' + describe('combine start', [us(c[2]) for c in cta]))
    print('  ' + describe('CTA end', [us(c[3]) for c in cta]))
    return units, end


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('tokens', nargs='?', default='16,128,4096')
    ap.add_argument('--experts-per-rank', type=int, default=8)
    ap.add_argument('--routing', choices=['skewed', 'uniform'], default='skewed')
    args = ap.parse_args()
    tokens = [int(v) for v in args.tokens.split(',')]
    group, rank, world = torchrun_group()
    e_l, hidden, inter, k = args.experts_per_rank, 7168, 3072, 6
    gen = torch.Generator(device='cuda').manual_seed(rank)
    l1, l2 = make_weights(e_l, hidden, inter, gen)
    buf = deep_gemm.get_symm_buffer_for_mega_moe(group, e_l * world, max(tokens), k, hidden, inter, mma_type='fp8xnvfp4')
    if rank == 0:
        print(f'device: {torch.cuda.get_device_name()}; {world} rank(s), {e_l} experts per rank, top-{k}, '
              f'{hidden}/{inter}, {args.routing} routing', flush=True)
    for t in tokens:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            trace_one(buf, l1, l2, t, args.routing)
        texts = [out.getvalue()]
        if group is not None:
            texts = [None] * world
            dist.all_gather_object(texts, out.getvalue(), group=group)
        if rank == 0:
            for r, text in enumerate(texts):
                print((f'rank {r}: ' if world > 1 else '') + text, end='', flush=True)
    if group is not None:
        dist.destroy_process_group()


def trace_one(buf, l1, l2, t, routing):
    """Trace one call of ``t`` tokens per rank on ``buf``'s rank (every rank of its group at once) and
    print the timeline."""
    group, e_l, hidden, inter = buf.group, buf.num_experts_per_rank, buf.hidden, buf.intermediate_hidden
    fill_inputs(buf, t, 1000 * t + buf.rank, routing)
    y = torch.empty(t, hidden, dtype=torch.bfloat16, device='cuda')
    for _ in range(3):
        sm90.run_fused(y, l1, l2, buf)
    torch.cuda.synchronize()
    ref = y.clone()
    _, block_t, ctas, _ = sm90._fused_config(buf, l1, sm90._expected_m(buf, t), True)
    grid = sm90.fused_grid(buf, ctas)
    trace = torch.zeros(sm90.trace_size(buf, block_t), dtype=torch.int64, device='cuda')
    try:
        for _ in range(2):   # the second launch runs warm (module loaded, caches as in steady state)
            trace.zero_()
            y.fill_(float('nan'))
            if group is not None:
                dist.barrier(group)
            sm90.run_fused(y, l1, l2, buf, trace=trace)
    except Exception as ex:  # one rank: a variant that fails to build or launch is reported, the rest go on
        if group is not None:
            raise
        print(f'{t} tokens: no trace variant ({type(ex).__name__}: {str(ex)[:160]})')
        return
    torch.cuda.synchronize()
    same = torch.equal(y, ref)
    counts = buf.region('expert_offsets')[:e_l + 1].diff().tolist()
    tiles = [-(-c // block_t) for c in counts if c > 0]
    l1_rt, l2_rt = 2 * inter // 128, hidden // 128
    num_units = sum(tiles) * (l1_rt + l2_rt)
    shown = counts if e_l <= 16 else f'{min(counts)}-{max(counts)} ({sum(c > 0 for c in counts)} experts with rows)'
    print(f'{t} tokens: BLOCK_T {block_t}, {ctas} CTA/SM, rows per expert {shown}, trace output equal: {same}')
    units, end = analyse(trace, grid, num_units)
    for phase in ('L1', 'L2'):
        sel = [x for x in units if x[6] == phase]
        mma = [x[5] - x[4] for x in sel]
        wait = [x[3] - x[2] for x in sel]
        queue = [x[4] - x[3] for x in sel]
        print(f'  {phase}: {len(sel)} units; ' + describe('MMA us', mma) + '; ' + describe('claim -> ready us', wait)
              + '; ' + describe('ready -> consumer start us', queue)
              + f'; first start {min(x[4] for x in sel):.1f}, last done {max(x[5] for x in sel):.1f}')
    busy = sum(x[5] - x[4] for x in units)
    per_cta = {}
    for x in units:
        per_cta.setdefault(x[1], []).append(x)
    before = after = between = 0.0
    for b in range(grid):
        xs = sorted(per_cta.get(b, []), key=lambda x: x[4])
        if not xs:
            continue
        before += xs[0][4]
        after += end - xs[-1][5]
        between += sum(max(0.0, xs[i + 1][4] - xs[i][5]) for i in range(len(xs) - 1))
    firsts = [min(xs, key=lambda x: x[2]) for xs in per_cta.values()]
    print('  first unit of each CTA: ' + describe('claimed', [x[2] for x in firsts]) + '; '
          + describe('ready', [x[3] for x in firsts]) + '; ' + describe('consumer start', [x[4] for x in firsts]))
    print('  ' + describe('last unit done per CTA', [max(x[5] for x in xs) for xs in per_cta.values()]))
    total = grid * end
    print(f'  CTA time {total:.0f} CTA-us: units {100 * busy / total:.1f} %, before the first unit '
          f'{100 * before / total:.1f} %, between units {100 * between / total:.1f} %, after the last '
          f'{100 * after / total:.1f} %')
    start = statistics.median(x[4] for x in firsts)
    print(f'  tail: {claim_model(units, grid, start):.1f} us if every CTA starts at {start:.1f} and claims the '
          f'units in order, each taking its measured MMA time; {start + busy / grid:.1f} us with that work spread '
          f'evenly over the CTAs')


def claim_model(units, grid, start):
    """When the last unit would finish if ``grid`` CTAs all began at ``start`` and claimed ``units`` (as
    analyse returns them: in claim order) from one counter, each running for its measured MMA time (no
    waits): the part of the end that comes from whole units alone (at decode, the last partial wave of
    equal L2 units)."""
    free = [start] * grid
    heapq.heapify(free)
    end = start
    for x in units:
        done = heapq.heappop(free) + x[5] - x[4]
        end = max(end, done)
        heapq.heappush(free, done)
    return end


if __name__ == '__main__':
    main()
