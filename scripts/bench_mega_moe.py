"""Benchmark: the whole Mega MoE layer (dispatch, L1 + SwiGLU, L2, combine) against its ceilings and peers.

DeepSeek-V4 shape (hidden 7168, intermediate 3072, top-6), ``--experts-per-rank`` local experts,
tokens per rank in ``--tokens`` (decode 128, prefill 4096 by default), random routing with a
non-uniform expert popularity.  Measured in the same run, per rank: the device-copy bandwidth
and the BF16 matmul rate (ceilings), our layer (``backend='sm90'``), and the unfused baseline:
torch-op dispatch (sort by expert, gather, FP8 -> BF16), the same grouped GEMMs, torch-op combine
(slot order).  Times are medians (triton.testing.do_bench).  Printed per row: us,
TFLOPS (useful FLOPs: 2 x 3 x hidden x inter per routed pair), HBM GB/s of the FP4 weights of the
experts that received tokens, % of the copy bandwidth and % of the BF16 rate, and ours / baseline.

One GPU today: the sm90 backend has no multi-rank dispatch yet, so ``torchrun`` with more than one
process exits with that message.

    python scripts/bench_mega_moe.py [--experts-per-rank 8] [--tokens 128,4096]
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import deep_gemm  # noqa: E402
from deep_gemm.gemm import m_grouped_fp8_nvfp4_gemm_nt_contiguous  # noqa: E402
from deep_gemm.utils import per_token_cast_to_fp8  # noqa: E402
from scripts.bench_grouped_gemm import bench, ceilings, make_weights  # noqa: E402


def baseline(buf, l1, l2, t, k, e_l):
    """Unfused: torch-op dispatch and combine around the same grouped GEMMs."""
    idx = buf.topk_idx[:t].reshape(-1)
    valid = idx >= 0
    rows = torch.argsort(torch.where(valid, idx, e_l), stable=True)   # masked pairs sort last, past offsets[-1]
    counts = torch.bincount(idx[valid], minlength=e_l).to(torch.int32)
    offsets = torch.zeros(e_l + 1, dtype=torch.int32, device=idx.device)
    offsets[1:] = torch.cumsum(counts, 0)
    tok = rows // k
    x = (buf.x[:t].float().view(t, -1, 32) * buf.x_sf[:t].unsqueeze(-1)).view(t, -1).to(torch.bfloat16)
    a = x[tok]
    w = buf.topk_weights[:t].reshape(-1)[rows].contiguous()
    h = torch.empty(a.shape[0], l1.n // 2, dtype=torch.bfloat16, device=a.device)
    m_grouped_fp8_nvfp4_gemm_nt_contiguous(a, l1, h, offsets, epilogue='swiglu', route_weights=w,
                                           expected_m=max(1, t * k // e_l))
    o = torch.empty(a.shape[0], l2.n, dtype=torch.bfloat16, device=a.device)
    m_grouped_fp8_nvfp4_gemm_nt_contiguous(h, l2, o, offsets, expected_m=max(1, t * k // e_l))
    per_slot = torch.zeros(t * k, l2.n, dtype=torch.float32, device=a.device)
    per_slot[rows] = o.float()
    per_slot = per_slot.view(t, k, -1)
    y = torch.zeros(t, l2.n, dtype=torch.float32, device=a.device)
    for j in range(k):
        y = torch.where((buf.topk_idx[:t, j] >= 0).unsqueeze(1), y + per_slot[:, j], y)
    return y.to(torch.bfloat16)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--experts-per-rank', type=int, default=8)
    ap.add_argument('--hidden', type=int, default=7168)
    ap.add_argument('--inter', type=int, default=3072)
    ap.add_argument('--topk', type=int, default=6)
    ap.add_argument('--tokens', default='128,4096')
    args = ap.parse_args()
    if int(os.environ.get('WORLD_SIZE', '1')) > 1:
        sys.exit('bench_mega_moe: the sm90 backend has no multi-rank dispatch yet; run it on one GPU')
    e_l, hidden, inter, k = args.experts_per_rank, args.hidden, args.inter, args.topk
    gen = torch.Generator(device='cuda').manual_seed(0)
    copy_gbs, bf16_tflops = ceilings()
    print(f'device: {torch.cuda.get_device_name()}; device copy {copy_gbs:.0f} GB/s (read+write); '
          f'bf16 8192^3 matmul {bf16_tflops:.0f} TFLOPS; EP 1, {e_l} experts, top-{k}, {hidden}/{inter}')
    l1, l2 = make_weights(e_l, hidden, inter, gen)
    per_expert_bytes = sum(v.numel() for v in (l1.codes, l1.scales, l2.codes, l2.scales)) / e_l
    print(f'{"tokens":>7} {"graph us":>9} {"eager us":>9} {"TFLOPS":>7} {"wt GB/s":>8} {"%copy":>6} {"%bf16":>6} '
          f'{"baseline us":>12} {"x base":>7} {"rel err":>8}')
    print('(graph: the layer captured in a CUDA graph, as servers run it; eager: one Python call, which syncs once\n'
          ' to validate expert ids / scales; x base = baseline / eager; rates use the graph time)')
    for t in [int(v) for v in args.tokens.split(',')]:
        buf = deep_gemm.get_symm_buffer_for_mega_moe(None, e_l, t, k, hidden, inter)
        xg = torch.Generator().manual_seed(t)
        x = torch.randn(t, hidden, generator=xg) * torch.exp(0.5 * torch.randn(t, 1, generator=xg))
        q, sf = per_token_cast_to_fp8(x, 32, use_ue8m0=True)
        scores = torch.rand(t, e_l, generator=xg) + torch.linspace(0, 0.5, e_l)
        buf.x.copy_(q)
        buf.x_sf.copy_(sf)
        buf.topk_idx.copy_(scores.topk(k, dim=1).indices)
        buf.topk_weights.copy_(torch.softmax(torch.randn(t, k, generator=xg), 1))
        y = torch.empty(t, hidden, dtype=torch.bfloat16, device='cuda')
        run = lambda: deep_gemm.fp8_nvfp4_mega_moe(y, l1, l2, buf, backend='sm90')  # noqa: E731
        run()
        y_base = baseline(buf, l1, l2, t, k, e_l)
        err = ((y.double() - y_base.double()).norm() / y_base.double().norm()).item()
        t_eager = bench(run)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run()
        t_ours = bench(graph.replay)
        t_base = bench(lambda: baseline(buf, l1, l2, t, k, e_l))
        pairs = int((buf.topk_idx >= 0).sum())
        touched = int(torch.unique(buf.topk_idx[buf.topk_idx >= 0]).numel())
        flops = 2 * 3 * hidden * inter * pairs
        wgbs = touched * per_expert_bytes / t_ours / 1e3
        print(f'{t:>7} {t_ours:>9.1f} {t_eager:>9.1f} {flops / t_ours / 1e6:>7.1f} {wgbs:>8.0f} {100 * wgbs / copy_gbs:>6.1f} '
              f'{100 * flops / t_ours / 1e6 / bf16_tflops:>6.1f} {t_base:>12.1f} {t_base / t_eager:>7.2f} {err:>8.1e}')
        del buf
    print(f'ceilings: copy {copy_gbs:.0f} GB/s, bf16 {bf16_tflops:.0f} TFLOPS; weight floor '
          f'{e_l * per_expert_bytes / copy_gbs / 1e3:.0f} us for all {e_l} experts')


if __name__ == '__main__':
    main()
