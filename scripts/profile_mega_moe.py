"""Per-kernel time of the Mega MoE layer on one GPU (torch.profiler over CUDA graph replays).

    python scripts/profile_mega_moe.py [--tokens 16,128,4096] [--experts-per-rank 8] [--emulate-ranks 2]

Prints, per token count, each kernel's mean us per layer call and the graph's wall time per call,
so the gap between the kernels' sum and the wall time (launch gaps, tails) shows too.
``--emulate-ranks N`` also profiles N ranks emulated on the one GPU (eager; ranks share the SMs, so
only the barrier and dispatch/combine kernels' own costs mean anything there).
"""
import argparse
import collections
import gc
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import deep_gemm  # noqa: E402
from deep_gemm.mega import sm90  # noqa: E402
from deep_gemm.mega.buffer import SymmBuffer  # noqa: E402
from deep_gemm.utils import per_token_cast_to_fp8  # noqa: E402
from scripts.bench_grouped_gemm import make_weights  # noqa: E402

ITERS = 20


def fill(buf, t, num_experts, k, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, buf.hidden, generator=g)
    q, sf = per_token_cast_to_fp8(x, True, 32)
    buf.x[:t].copy_(q)
    buf.x_sf[:t].copy_(sf)
    scores = torch.rand(t, num_experts, generator=g) + torch.linspace(0, 0.5, num_experts)
    buf.topk_idx[:t].copy_(scores.topk(k, dim=1).indices)
    buf.topk_weights[:t].copy_(torch.rand(t, k, generator=g))


def table(prof, calls, wall_us=None):
    per = collections.defaultdict(float)
    for ev in prof.key_averages():
        if ev.device_type == torch.autograd.DeviceType.CUDA and ev.device_time_total > 0:
            per[ev.key[:60]] += ev.device_time_total / calls
    total = sum(per.values())
    for name, us in sorted(per.items(), key=lambda kv: -kv[1]):
        print(f'    {us:9.1f} us  {name}')
    print(f'    {total:9.1f} us  sum of kernels' + (f'; {wall_us:.1f} us wall per call' if wall_us else ''))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--tokens', default='16,128,4096')
    ap.add_argument('--experts-per-rank', type=int, default=8)
    ap.add_argument('--topk', type=int, default=6)
    ap.add_argument('--emulate-ranks', type=int, default=0)
    args = ap.parse_args()
    e_l, k, hidden, inter = args.experts_per_rank, args.topk, 7168, 3072
    l1, l2 = make_weights(e_l, hidden, inter, torch.Generator(device='cuda').manual_seed(0))
    for t in [int(v) for v in args.tokens.split(',')]:
        buf = deep_gemm.get_symm_buffer_for_mega_moe(None, e_l, t, k, hidden, inter, mma_type='fp8xnvfp4')
        fill(buf, t, e_l, k, t)
        y = torch.empty(t, hidden, dtype=torch.bfloat16, device='cuda')
        deep_gemm.fp8_nvfp4_mega_moe(y, l1, l2, buf, backend='sm90')
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            deep_gemm.fp8_nvfp4_mega_moe(y, l1, l2, buf, backend='sm90')
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(ITERS):
            graph.replay()
        e.record()
        torch.cuda.synchronize()
        wall = s.elapsed_time(e) * 1e3 / ITERS
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(ITERS):
                graph.replay()
            torch.cuda.synchronize()
        print(f'one rank, {t} tokens, {e_l} experts, top-{k} (graph):')
        table(prof, ITERS, wall)
        del graph, buf
    if args.emulate_ranks > 1:
        n = args.emulate_ranks
        t = int(args.tokens.split(',')[0])
        bufs = SymmBuffer.emulated_group(n, e_l * n, t, k, hidden, inter, device='cuda', timeout_s=30, mma_type='fp8xnvfp4')
        for r, b in enumerate(bufs):
            fill(b, t, e_l * n, k, 100 + r)
        ys = [torch.empty(t, hidden, dtype=torch.bfloat16, device='cuda') for _ in bufs]
        streams = [torch.cuda.Stream() for _ in bufs]
        for b in bufs:
            sm90.prepare(b, l1, l2, t)

        def step():
            for r, b in enumerate(bufs):
                with torch.cuda.stream(streams[r]):
                    deep_gemm.fp8_nvfp4_mega_moe(ys[r], l1, l2, b, backend='sm90')
            torch.cuda.synchronize()

        gc.collect()
        gc.disable()
        step()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(ITERS):
                step()
        gc.enable()
        for b in bufs:
            b.check_comm()
        print(f'{n} ranks emulated on one GPU, {t} tokens per rank (eager, per rank and call):')
        table(prof, ITERS * n)


if __name__ == '__main__':
    main()
