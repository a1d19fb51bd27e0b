"""Benchmark: the Hopper NVFP4 grouped GEMM (L1 with SwiGLU + L2) against its ceilings and torch's peers.

DeepSeek-V4 expert shapes (hidden 7168, intermediate 3072), 32 local experts, tokens per expert in
{1, 4, 16, 64, 256, 1024, 4096}.  Everything is measured in the same run: the device-copy
bandwidth (bytes read + written), the dense BF16 matmul rate (8192^3), our L1+L2, and the same
L1+L2 through ``torch._grouped_mm`` (BF16 weights) and ``torch._scaled_grouped_mm`` (FP8 weights,
row-wise scales).  Decode sizes (<= 256 tokens per expert) use the masked layout, larger ones
the contiguous layout.  Times are medians (triton.testing.do_bench).

    python scripts/bench_grouped_gemm.py [--experts 32] [--tokens 1,4,16,...] [--hidden 7168] [--inter 3072]
"""
import argparse
import statistics

import torch

from deep_gemm.gemm import m_grouped_fp8_nvfp4_gemm_nt_contiguous, m_grouped_fp8_nvfp4_gemm_nt_masked
from deep_gemm.mega.weights import transform_nvfp4_weights_for_mega_moe


def bench(fn, reps=30):
    from triton.testing import do_bench
    return do_bench(fn, warmup=25, rep=reps * 10, return_mode='median') * 1e3  # us


def ceilings():
    n = 1 << 30
    src = torch.randn(n // 4, device='cuda')
    dst = torch.empty_like(src)
    t = bench(lambda: dst.copy_(src))
    copy_gbs = 2 * n / t / 1e3
    a = torch.randn(8192, 8192, device='cuda', dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device='cuda', dtype=torch.bfloat16)
    t = bench(lambda: a @ b)
    bf16_tflops = 2 * 8192 ** 3 / t / 1e6
    del src, dst, a, b
    return copy_gbs, bf16_tflops


def make_weights(e, hidden, inter, gen):
    def rand(n, k):
        codes = torch.randint(0, 256, (e, n, k // 2), dtype=torch.uint8, device='cuda', generator=gen)
        scale = torch.randint(0x28, 0x48, (e, n, k // 16), dtype=torch.uint8, device='cuda', generator=gen)
        return codes, scale.view(torch.float8_e4m3fn)
    c1, s1 = rand(2 * inter, hidden)
    c2, s2 = rand(hidden, inter)
    g1 = torch.rand(e, 2, device='cuda', generator=gen) * 1e-2 + 1e-3
    g2 = torch.rand(e, device='cuda', generator=gen) * 1e-2 + 1e-3
    return transform_nvfp4_weights_for_mega_moe((c1, s1, g1), (c2, s2, g2))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--experts', type=int, default=32)
    ap.add_argument('--hidden', type=int, default=7168)
    ap.add_argument('--inter', type=int, default=3072)
    ap.add_argument('--tokens', default='1,4,16,64,256,1024,4096')
    ap.add_argument('--no-torch', action='store_true', help='skip the torch peers')
    args = ap.parse_args()
    e, hidden, inter = args.experts, args.hidden, args.inter
    gen = torch.Generator(device='cuda').manual_seed(0)
    dev = torch.cuda.get_device_name()
    copy_gbs, bf16_tflops = ceilings()
    print(f'device: {dev}; device copy {copy_gbs:.0f} GB/s (read+write); bf16 8192^3 matmul {bf16_tflops:.0f} TFLOPS')

    l1, l2 = make_weights(e, hidden, inter, gen)
    fp4_bytes = sum(t.numel() for t in (l1.codes, l1.scales, l2.codes, l2.scales))
    floor_us = fp4_bytes / copy_gbs / 1e3
    print(f'FP4 weight bytes (codes + scales) {fp4_bytes / 1e6:.0f} MB -> bytes floor {floor_us:.0f} us at the copy rate')

    # torch peers: dense BF16 and FP8 (row-wise scales) weights of the same experts
    w1 = w2 = w1f = w2f = None
    if not args.no_torch:
        w1 = (torch.randn(e, 2 * inter, hidden, device='cuda', dtype=torch.bfloat16, generator=gen) * 0.02)
        w2 = (torch.randn(e, hidden, inter, device='cuda', dtype=torch.bfloat16, generator=gen) * 0.02)
        w1f = w1.to(torch.float8_e4m3fn)
        w2f = w2.to(torch.float8_e4m3fn)
        s1f = torch.ones(e, 2 * inter, device='cuda')
        s2f = torch.ones(e, hidden, device='cuda')

    rows_fmt = '{:>7} {:>9} {:>8} {:>9} {:>7} {:>7} {:>10} {:>10} {:>8} {:>8}'
    print(rows_fmt.format('tok/exp', 'ours us', 'TFLOPS', 'wt GB/s', '%copy', '%bf16', 'torch bf16', 'torch fp8', 'x bf16', 'x fp8'))
    for tpe in [int(t) for t in args.tokens.split(',')]:
        rows = e * tpe
        x = torch.randn(rows, hidden, device='cuda', generator=gen)
        sf = torch.exp2(torch.ceil(torch.log2(x.abs().reshape(rows, -1, 32).amax(-1) / 448)))
        q = (x.reshape(rows, -1, 32) / sf[..., None]).to(torch.float8_e4m3fn).reshape(rows, hidden)
        rw = torch.rand(rows, device='cuda', generator=gen)
        h = torch.empty(rows, inter, dtype=torch.bfloat16, device='cuda')
        y = torch.empty(rows, hidden, dtype=torch.bfloat16, device='cuda')
        if tpe <= 256:
            counts = torch.full((e,), tpe, dtype=torch.int32, device='cuda')

            def ours():
                m_grouped_fp8_nvfp4_gemm_nt_masked((q.view(e, tpe, hidden), sf.view(e, tpe, -1)), l1, h.view(e, tpe, inter),
                                                   counts, tpe, epilogue='swiglu', route_weights=rw.view(e, tpe))
                m_grouped_fp8_nvfp4_gemm_nt_masked(h.view(e, tpe, inter), l2, y.view(e, tpe, hidden), counts, tpe)
        else:
            offsets = torch.arange(0, rows + 1, tpe, dtype=torch.int32, device='cuda')

            def ours():
                m_grouped_fp8_nvfp4_gemm_nt_contiguous((q, sf), l1, h, offsets, epilogue='swiglu', route_weights=rw,
                                                       expected_m=tpe)
                m_grouped_fp8_nvfp4_gemm_nt_contiguous(h, l2, y, offsets, expected_m=tpe)
        ours()
        torch.cuda.synchronize()
        assert not torch.isnan(y.float()).any()
        t = bench(ours)
        flops = 2 * rows * (hidden * 2 * inter + inter * hidden)
        tflops = flops / t / 1e6
        wgbs = fp4_bytes / t / 1e3
        tb = tf = float('nan')
        if w1 is not None:
            offs = torch.arange(tpe, rows + 1, tpe, dtype=torch.int32, device='cuda')
            xb = x.to(torch.bfloat16)

            def torch_bf16():
                hh = torch._grouped_mm(xb, w1.transpose(-2, -1), offs=offs)
                g, u = hh[:, :inter], hh[:, inter:]
                torch._grouped_mm((torch.nn.functional.silu(g) * u * rw[:, None]).to(torch.bfloat16),
                                  w2.transpose(-2, -1), offs=offs)
            try:
                tb = bench(torch_bf16)
            except Exception as ex:  # private API: report, don't die
                print(f'  torch._grouped_mm failed: {type(ex).__name__}: {str(ex)[:120]}')
            xq = x.to(torch.float8_e4m3fn)
            sa = torch.ones(rows, device='cuda')
            ia = torch.ones(rows, device='cuda')

            def torch_fp8():
                hh = torch._scaled_grouped_mm(xq, w1f.transpose(-2, -1), sa, s1f, offs=offs, out_dtype=torch.bfloat16)
                g, u = hh[:, :inter], hh[:, inter:]
                hq = (torch.nn.functional.silu(g) * u * rw[:, None]).to(torch.float8_e4m3fn)
                torch._scaled_grouped_mm(hq, w2f.transpose(-2, -1), ia, s2f, offs=offs, out_dtype=torch.bfloat16)
            try:
                tf = bench(torch_fp8)
            except Exception as ex:
                print(f'  torch._scaled_grouped_mm failed: {type(ex).__name__}: {str(ex)[:120]}')
        print(rows_fmt.format(tpe, f'{t:.1f}', f'{tflops:.1f}', f'{wgbs:.0f}', f'{100 * wgbs / copy_gbs:.1f}',
                              f'{100 * tflops / bf16_tflops:.1f}', f'{tb:.1f}', f'{tf:.1f}',
                              f'{tb / t:.2f}', f'{tf / t:.2f}'))
    print(f'ceilings: copy {copy_gbs:.0f} GB/s, bf16 {bf16_tflops:.0f} TFLOPS; bytes floor {floor_us:.0f} us')


if __name__ == '__main__':
    main()
