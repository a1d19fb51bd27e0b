"""Upstream's Mega MoE entry points on sm90 (``sm90.run_upstream``: the fused kernel, and the kernel sequence
with ``DG_MEGA_MOE_FUSED=0``), one rank, CUDA graphs.

    python scripts/bench_upstream_recipes.py [--experts-per-rank 8] [--tokens 16,128,4096] [--shared 1]

For each recipe -- ``fp8_fp4_mega_moe`` (FP8 x MXFP4), ``fp4_fp4_mega_moe`` (NVFP4 x NVFP4, alphas, a2,
routed scaling), ``bf16_mega_moe`` (BF16 weights) -- and, as the yardstick in the same run, our
``fp8_nvfp4_mega_moe`` (the fused kernel, and its kernel sequence): the layer's time in a CUDA graph,
the weight bytes the touched experts stream and their time at the device copy rate measured here
(% copy), and the same with ``--shared`` BF16 shared experts where the recipe has them.  Inputs: the
casts upstream's tests use, log-normal per-token magnitudes, skewed top-k routing (as
bench_mega_moe.py).  Correctness lives in tests/gpu/test_mega_sm90.py; this prints timings only.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import deep_gemm  # noqa: E402
from deep_gemm.mega import sm90  # noqa: E402
from deep_gemm.utils import per_token_cast_to_fp4, per_token_cast_to_fp8, per_token_cast_to_nvfp4  # noqa: E402
from deep_gemm.utils import transform_sf_into_required_layout  # noqa: E402
from scripts.bench_grouped_gemm import ceilings  # noqa: E402
from scripts.bench_mega_moe import add_layer_args, fill_inputs, timed  # noqa: E402


def _on_sequence(fn):
    """fn() on the kernel sequence (DG_MEGA_MOE_FUSED=0, read by the call)."""
    old = os.environ.get('DG_MEGA_MOE_FUSED')
    os.environ['DG_MEGA_MOE_FUSED'] = '0'
    try:
        return fn()
    finally:
        if old is None:
            del os.environ['DG_MEGA_MOE_FUSED']
        else:
            os.environ['DG_MEGA_MOE_FUSED'] = old


def _weights(kind, e, n, k, gen):
    w = (0.05 * torch.randn(e, n, k, generator=gen, device='cuda')).bfloat16()
    if kind == 'bf16':
        return w
    if kind == 'mxfp4':
        codes, sfs = zip(*[per_token_cast_to_fp4(w[i], use_ue8m0=True, gran_k=32) for i in range(e)])
        return torch.stack(codes), transform_sf_into_required_layout(torch.stack(sfs), n, k, (1, 32), e)
    codes, sfs = zip(*[per_token_cast_to_nvfp4(w[i]) for i in range(e)])
    return torch.stack(codes), torch.stack(sfs)


def _bytes(w) -> int:
    return sum(t.numel() * t.element_size() for t in (w.codes, w.scales))


def main():
    ap = argparse.ArgumentParser()
    add_layer_args(ap, '16,128,4096')
    ap.add_argument('--shared', type=int, default=1, help='shared experts (BF16) for the recipes that have them; 0: none')
    args = ap.parse_args()
    e, h, i, k = args.experts_per_rank, args.hidden, args.inter, args.topk
    tokens = [int(v) for v in args.tokens.split(',')]
    gen = torch.Generator(device='cuda').manual_seed(0)
    copy_gbs, bf16_tflops = ceilings()
    print(f'device: {torch.cuda.get_device_name()}; device copy {copy_gbs:.0f} GB/s (read+write), bf16 8192^3 matmul '
          f'{bf16_tflops:.0f} TFLOPS; one rank, {e} experts, top-{k}, {h}/{i}, shared experts {args.shared} (BF16)')
    shared_w = None
    if args.shared:
        s = args.shared * i
        shared_w = deep_gemm.transform_weights_for_mega_moe(
            (0.05 * torch.randn(2 * s, h, generator=gen, device='cuda')).bfloat16(),
            (0.05 * torch.randn(h, s, generator=gen, device='cuda')).bfloat16())
    recipes = {}
    for mt, kind in (('fp8xfp4', 'mxfp4'), ('fp4xfp4', 'nvfp4'), ('bf16xbf16', 'bf16')):
        recipes[mt] = deep_gemm.transform_weights_for_mega_moe(_weights(kind, e, 2 * i, h, gen),
                                                              _weights(kind, e, h, i, gen))
    alphas = dict(l1_alphas=0.5 + torch.rand(e, 2, generator=gen, device='cuda'),
                  l2_alphas=0.5 + torch.rand(e, generator=gen, device='cuda'),
                  a2_scales=0.5 + torch.rand(e, generator=gen, device='cuda'), routed_scaling_factor=2.5)
    ours = deep_gemm.transform_nvfp4_weights_for_mega_moe(
        *[dict(weight=c.view(torch.uint8), weight_scale=s.contiguous().view(torch.uint8).view(torch.float8_e4m3fn),
               weight_scale_2=torch.ones(e, device='cuda')) for c, s in
          (_weights('nvfp4', e, 2 * i, h, gen), _weights('nvfp4', e, h, i, gen))])
    shared_bytes = 0 if shared_w is None else sum(_bytes(w) for w in shared_w)
    print(f'{"recipe":>22} {"tokens":>6} {"graph us":>9} {"touched":>7} {"wt MB":>7} {"floor us":>8} {"%copy":>6} '
          f'{"vs ours":>7}')
    for t in tokens:
        base = deep_gemm.get_symm_buffer_for_mega_moe(None, e, t, k, h, i, device='cuda', mma_type='fp8xnvfp4')
        fill_inputs(base, t, 1000 * t)
        idx, wts = base.topk_idx[:t].clone(), base.topk_weights[:t].clone()
        x = (torch.randn(t, h, generator=gen, device='cuda') *
             torch.exp(0.5 * torch.randn(t, 1, generator=gen, device='cuda'))).bfloat16()
        touched = int(torch.unique(idx[idx >= 0]).numel())
        rows = []

        def bench(name, fn, nbytes):
            fn()
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            us = timed(graph.replay, None)
            rows.append((name, us, nbytes))
            del graph

        y = torch.empty(t, h, dtype=torch.bfloat16, device='cuda')
        ours_bytes = touched * sum(_bytes(w) for w in ours) // e
        bench('fp8_nvfp4 (ours, fused)', lambda: deep_gemm.fp8_nvfp4_mega_moe(y, *ours, base, backend='sm90'), ours_bytes)
        bench('fp8_nvfp4 (ours, seq)', lambda: sm90.run_sequence(y, *ours, base), ours_bytes)
        for mt, (l1, l2) in recipes.items():
            nb = touched * (_bytes(l1) + _bytes(l2)) // e
            for with_shared in ((False, True) if shared_w is not None else (False,)):
                buf = deep_gemm.get_symm_buffer_for_mega_moe(None, e, t, k, h, i, device='cuda', mma_type=mt,
                                                             num_shared_experts=args.shared if with_shared else 0)
                if mt == 'fp8xfp4':
                    q, sf = per_token_cast_to_fp8(x, use_ue8m0=True, gran_k=32, use_packed_ue8m0=True)
                    buf.x[:t].copy_(q)
                    buf.x_sf[:t].copy_(sf)
                elif mt == 'fp4xfp4':
                    q, sf = per_token_cast_to_nvfp4(x)
                    buf.x[:t].copy_(q.view(torch.uint8))
                    buf.x_sf[:t].copy_(sf)
                else:
                    buf.x[:t].copy_(x)
                buf.topk_idx[:t].copy_(idx)
                buf.topk_weights[:t].copy_(wts)
                kw = dict(shared_l1_weights=shared_w[0], shared_l2_weights=shared_w[1]) if with_shared else {}
                if mt == 'fp4xfp4':
                    kw.update(alphas, **(dict(x_bf16=x) if with_shared else {}))
                entry = {'fp8xfp4': deep_gemm.fp8_fp4_mega_moe, 'fp4xfp4': deep_gemm.fp4_fp4_mega_moe,
                         'bf16xbf16': deep_gemm.bf16_mega_moe}[mt]
                name = {'fp8xfp4': 'fp8_fp4', 'fp4xfp4': 'fp4_fp4', 'bf16xbf16': 'bf16'}[mt] + (' +shared' if with_shared else '')
                call = lambda: entry(y, l1, l2, buf, backend='sm90', **kw)  # noqa: E731
                bench(name, call, nb + (shared_bytes if with_shared else 0))
                bench(name + ' (seq)', lambda: _on_sequence(call), nb + (shared_bytes if with_shared else 0))
                buf.destroy()
        ref = rows[0][1]
        for name, us, nb in rows:
            floor = nb / copy_gbs / 1e3
            print(f'{name:>22} {t:>6} {us:>9.1f} {touched:>7} {nb / 1e6:>7.0f} {floor:>8.1f} {100 * floor / us:>6.1f} '
                  f'{us / ref:>7.2f}')
        base.destroy()
    print('(graph us: the layer in a CUDA graph, mean of 30 replays; touched: local experts with tokens; wt MB: their '
          'weight bytes (+ the shared experts\'); floor: those bytes at the device copy rate; %copy = floor / time; '
          'vs ours = time / fp8_nvfp4 fused)')


if __name__ == '__main__':
    main()
