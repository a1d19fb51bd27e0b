"""Fused Mega MoE kernel (one rank) timed over its L2 lookahead (experts) and, optionally, token-tile
widths: a CUDA graph per setting, best of 3 x 20 replays, and whether y stays bitwise equal.

    BTS=0,64 python scripts/sweep_mega_moe_lookahead.py 128        # 0 = the default tile width
    python scripts/sweep_mega_moe_lookahead.py 16,4096

Inputs as scripts/bench_mega_moe.py (DeepSeek-V4 shapes, 8 local experts, top-6, skewed routing).
Settings run in order, so back-to-back drift of the GPU's power state shows up as differences
(docs/perf-notes.md, "how noisy a single run is").
"""
import os, sys, torch
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import deep_gemm
from deep_gemm.mega import sm90
from scripts.bench_grouped_gemm import make_weights
from scripts.bench_mega_moe import fill_inputs
e_l, hidden, inter, k = 8, 7168, 3072, 6
gen = torch.Generator(device='cuda').manual_seed(0)
l1, l2 = make_weights(e_l, hidden, inter, gen)
counts = [int(v) for v in sys.argv[1].split(',')]
buf = deep_gemm.get_symm_buffer_for_mega_moe(None, e_l, max(counts), k, hidden, inter, mma_type='fp8xnvfp4')
for t in counts:
    fill_inputs(buf, t, 1000 * t)
    y = torch.empty(t, hidden, dtype=torch.bfloat16, device='cuda')
    ref = None
    for bt in os.environ.get('BTS', '0').split(','):
        if bt != '0': os.environ['DG_GROUPED_GEMM_BLOCK_T'] = bt
        else: os.environ.pop('DG_GROUPED_GEMM_BLOCK_T', None)
        for la in (0, 1, 2, 4, 8):
            sm90._LOOKAHEAD_EXPERTS = la
            f = lambda: sm90.run_fused(y, l1, l2, buf)
            for _ in range(3): f()
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                f()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            res = []
            for rep in range(3):
                s.record()
                for _ in range(20): g.replay()
                e.record(); torch.cuda.synchronize(); res.append(s.elapsed_time(e) * 1e3 / 20)
            if ref is None: ref = y.clone()
            same = torch.equal(ref.view(torch.int16), y.view(torch.int16))
            print(f'T {t} block_t {bt} lookahead {la}: {min(res):.1f} us (bitwise as first: {same})', flush=True)
