"""Benchmark: the Hopper NVFP4 grouped GEMM (L1 with SwiGLU + L2) against its ceilings and torch's peers.

DeepSeek-V4 expert shapes (hidden 7168, intermediate 3072), 32 local experts, tokens per expert in
{1, 4, 16, 64, 256, 1024, 4096}.  Everything is measured in the same run: the device-copy
bandwidth (bytes read + written), the dense BF16 matmul rate (8192^3), our L1+L2, and the same
L1+L2 through ``torch._grouped_mm`` (BF16 weights) and ``torch._scaled_grouped_mm`` (FP8 weights,
row-wise scales).  Decode sizes (<= 256 tokens per expert) use the masked layout, larger ones
the contiguous layout.  Times are medians (triton.testing.do_bench).

``--peers`` (default on where it loads): vLLM's Marlin MoE GEMM (``_moe_C.moe_wna16_marlin_gemm`` of
vllm 0.20.2, ``.whl/vllm_moe/_moe_C.abi3.so``; scripts/peers/marlin_nvfp4.py) on the same NVFP4 experts
(the same bytes, repacked to Marlin's layout) and rows, BF16 activations: L1, SwiGLU (torch), L2 with
the routing weights, as vLLM's ``fused_marlin_moe`` runs it; first a small correctness check against
torch.  A second table gives both formats' weight bytes, times and ours / marlin.

``--sustained``: for ``--sustained-tokens`` (decode), ours and Marlin each captured in a CUDA graph and
timed short (do_bench) and sustained (``--sustained-seconds`` of back-to-back replays) while
``nvidia-smi`` samples the SM clock and board power (scripts/profile_decode.py's ``sustained``), and
the same for the 1 GiB device copy: whether the kernels are held at their bytes floor's multiple by
the board's power limit (a reduced clock at the limit for both) or by the kernel.

    python scripts/bench_grouped_gemm.py [--experts 32] [--tokens 1,4,16,...] [--hidden 7168] [--inter 3072]
        [--no-torch] [--no-peers] [--sustained [--sustained-tokens 1,16] [--sustained-seconds 3]]
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from deep_gemm.gemm import m_grouped_fp8_nvfp4_gemm_nt_contiguous, m_grouped_fp8_nvfp4_gemm_nt_masked  # noqa: E402
from deep_gemm.weights import transform_nvfp4_weights_for_mega_moe  # noqa: E402
from scripts.peers import unavailable, ratio  # noqa: E402


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


def make_raw_weights(e, hidden, inter, gen):
    """ModelOpt-form NVFP4 experts, random bytes: ``(codes uint8 [E, N, K/2], scales e4m3 [E, N, K/16],
    global scales)`` for L1 (``[E, 2]``: gate, up) and L2 (``[E]``)."""
    def rand(n, k):
        codes = torch.randint(0, 256, (e, n, k // 2), dtype=torch.uint8, device='cuda', generator=gen)
        scale = torch.randint(0x28, 0x48, (e, n, k // 16), dtype=torch.uint8, device='cuda', generator=gen)
        return codes, scale.view(torch.float8_e4m3fn)
    c1, s1 = rand(2 * inter, hidden)
    c2, s2 = rand(hidden, inter)
    g1 = torch.rand(e, 2, device='cuda', generator=gen) * 1e-2 + 1e-3
    g2 = torch.rand(e, device='cuda', generator=gen) * 1e-2 + 1e-3
    return (c1, s1, g1), (c2, s2, g2)


def make_weights(e, hidden, inter, gen):
    return transform_nvfp4_weights_for_mega_moe(*make_raw_weights(e, hidden, inter, gen))


def build_parser():
    ap = argparse.ArgumentParser(description='NVFP4 grouped GEMM (L1 + SwiGLU, L2) vs ceilings and peers')
    ap.add_argument('--experts', type=int, default=32)
    ap.add_argument('--hidden', type=int, default=7168)
    ap.add_argument('--inter', type=int, default=3072)
    ap.add_argument('--tokens', default='1,4,16,64,256,1024,4096')
    ap.add_argument('--no-torch', action='store_true', help='skip the torch peers')
    ap.add_argument('--peers', action=argparse.BooleanOptionalAction, default=True,
                    help='vLLM Marlin NVFP4 MoE GEMM beside ours (default: on where .whl/vllm_moe/_moe_C.abi3.so '
                         'loads; a one-line note otherwise)')
    ap.add_argument('--no-peer-check', action='store_true', help='skip the Marlin correctness check')
    ap.add_argument('--sustained', action='store_true',
                    help='decode: short and sustained graph replays of ours and Marlin with SM clock and board power')
    ap.add_argument('--sustained-tokens', default='1,16', help='tokens per expert for --sustained')
    ap.add_argument('--sustained-seconds', type=float, default=3.0)
    return ap


def parse_tokens(s: str):
    out = [int(v) for v in s.split(',') if v.strip()]
    if not out or min(out) < 1:
        raise ValueError(f'tokens: expected positive integers, got {s!r}')
    return out


def make_inputs(e, tpe, hidden, inter, gen):
    """FP8 rows (UE8M0 per 32), routing weights and outputs of ``tpe`` rows per expert."""
    rows = e * tpe
    x = torch.randn(rows, hidden, device='cuda', generator=gen)
    sf = torch.exp2(torch.ceil(torch.log2(x.abs().reshape(rows, -1, 32).amax(-1) / 448)))
    q = (x.reshape(rows, -1, 32) / sf[..., None]).to(torch.float8_e4m3fn).reshape(rows, hidden)
    rw = torch.rand(rows, device='cuda', generator=gen)
    h = torch.empty(rows, inter, dtype=torch.bfloat16, device='cuda')
    y = torch.empty(rows, hidden, dtype=torch.bfloat16, device='cuda')
    return x, q, sf, rw, h, y


def ours_call(l1, l2, e, tpe, hidden, inter, q, sf, rw, h, y):
    """Our L1 (SwiGLU, routing weights) + L2: masked layout at <= 256 tokens per expert, else contiguous."""
    rows = e * tpe
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
    return ours


def setup_marlin(raw1, raw2, check: bool):
    """(ops, (w1, w2), None) with the Marlin-layout copies of the same experts, or (None, None, reason)."""
    from scripts.peers import marlin_nvfp4 as mp
    ops, why = mp.MarlinOps.load()
    if ops is None:
        return None, None, why
    try:
        if check:
            print(mp.check_line(mp.check(ops)))
        (c1, s1, g1), (c2, s2, g2) = raw1, raw2
        w1 = mp.prepare_nvfp4(c1, s1, g1[:, 0].contiguous())   # Marlin: one global scale per expert (gate's)
        w2 = mp.prepare_nvfp4(c2, s2, g2)
        torch.cuda.synchronize()
    except Exception as ex:
        return None, None, f'setup failed: {type(ex).__name__}: {ex}'
    return ops, (w1, w2), None


def marlin_call(ops, w, e, tpe, x, rw):
    """(chain, gemms-only, block size) of Marlin on rows grouped by expert (top_k = 1)."""
    from scripts.peers import marlin_nvfp4 as mp
    ids = torch.arange(e, dtype=torch.int32, device='cuda').repeat_interleave(tpe)[:, None]
    moe = mp.MarlinMoE(ops, w[0], w[1], ids, rw[:, None])
    xb = x.to(torch.bfloat16)
    return (lambda: moe(xb)), (lambda: moe.gemms(xb)), moe.block_size


def graph_of(fn):
    """``fn`` captured in a CUDA graph (replay), or (fn, reason) where capture fails."""
    fn()
    torch.cuda.synchronize()
    try:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        g.replay()
        torch.cuda.synchronize()
        return g.replay, None
    except Exception as ex:
        torch.cuda.synchronize()
        return fn, f'graph capture failed ({type(ex).__name__}: {str(ex)[:80]}); eager'


def run_sustained(args, l1, l2, marlin, fp4_bytes, marlin_bytes, copy_gbs, gen):
    from scripts.profile_decode import sustained
    e, hidden, inter = args.experts, args.hidden, args.inter
    secs = args.sustained_seconds
    print(f'sustained: each kernel captured in a CUDA graph, short = do_bench median, sustained = {secs:g} s of '
          f'back-to-back replays with nvidia-smi sampling every 100 ms (median after the first quarter); '
          f'xfl = us / (weight bytes at the short copy rate {copy_gbs:.0f} GB/s), short and sustained; xsfl = '
          f'sustained us / (bytes at the sustained copy rate)')
    src = torch.randn(1 << 28, device='cuda')
    dst = torch.empty_like(src)
    copy = lambda: dst.copy_(src)  # noqa: E731
    c_short = bench(copy)
    c_us, c_mhz, c_w, c_lim = sustained(copy, seconds=secs)
    s_copy_gbs = 2 * src.numel() * 4 / c_us / 1e3
    print(f'  device copy 1 GiB: short {c_short:.1f} us ({2 * src.numel() * 4 / c_short / 1e3:.0f} GB/s), sustained '
          f'{c_us:.1f} us ({s_copy_gbs:.0f} GB/s), SM {c_mhz:.0f} MHz, {c_w:.0f} of {c_lim:.0f} W')
    del src, dst
    fmt = '{:>7} {:>14} {:>9} {:>9} {:>7} {:>6} {:>7} {:>8} {:>8} {:>8} {:>8} {:>8}'
    print(fmt.format('tok/exp', 'kernel', 'short us', 'sust us', 'SM MHz', 'W', 'limit W', 'xfl shrt', 'xfl sust',
                     'xsfl sus', 'sust/shr', 'wt MB'))
    for tpe in parse_tokens(args.sustained_tokens):
        x, q, sf, rw, h, y = make_inputs(e, tpe, hidden, inter, gen)
        cands = [('ours', ours_call(l1, l2, e, tpe, hidden, inter, q, sf, rw, h, y), fp4_bytes)]
        if marlin is not None:
            full, gemms, _ = marlin_call(marlin[0], marlin[1], e, tpe, x, rw)
            cands += [('marlin', full, marlin_bytes), ('marlin gemms', gemms, marlin_bytes)]
        for name, fn, nbytes in cands:
            try:
                rep, note = graph_of(fn)
                short = bench(rep)
                us, mhz, watts, limit = sustained(rep, seconds=secs)
            except Exception as ex:
                print(f'{tpe:>7} {name:>14} failed: {type(ex).__name__}: {str(ex)[:120]}')
                continue
            floor = nbytes / copy_gbs / 1e3
            sfloor = nbytes / s_copy_gbs / 1e3
            print(fmt.format(tpe, name, f'{short:.1f}', f'{us:.1f}', f'{mhz:.0f}', f'{watts:.0f}', f'{limit:.0f}',
                             f'{short / floor:.2f}', f'{us / floor:.2f}', f'{us / sfloor:.2f}', f'{us / short:.2f}',
                             f'{nbytes / 1e6:.1f}')
                  + (f'  ({note})' if note else ''))
        del x, q, sf, rw, h, y


def main(argv=None):
    args = build_parser().parse_args(argv)
    e, hidden, inter = args.experts, args.hidden, args.inter
    token_list = parse_tokens(args.tokens)
    gen = torch.Generator(device='cuda').manual_seed(0)
    dev = torch.cuda.get_device_name()
    copy_gbs, bf16_tflops = ceilings()
    print(f'device: {dev}; device copy {copy_gbs:.0f} GB/s (read+write); bf16 8192^3 matmul {bf16_tflops:.0f} TFLOPS')

    raw1, raw2 = make_raw_weights(e, hidden, inter, gen)
    l1, l2 = transform_nvfp4_weights_for_mega_moe(raw1, raw2)
    fp4_bytes = sum(t.numel() for t in (l1.codes, l1.scales, l2.codes, l2.scales))
    floor_us = fp4_bytes / copy_gbs / 1e3
    print(f'FP4 weight bytes (codes + scales) {fp4_bytes / 1e6:.0f} MB -> bytes floor {floor_us:.0f} us at the copy rate')

    marlin, marlin_bytes = None, 0
    if args.peers:
        ops, mw, why = setup_marlin(raw1, raw2, not args.no_peer_check)
        if ops is None:
            print(unavailable('marlin', why))
        else:
            marlin = (ops, mw)
            marlin_bytes = mw[0].nbytes + mw[1].nbytes
    del raw1, raw2

    # torch peers: dense BF16 and FP8 (row-wise scales) weights of the same experts
    w1 = w2 = w1f = w2f = None
    if not args.no_torch:
        w1 = (torch.randn(e, 2 * inter, hidden, device='cuda', dtype=torch.bfloat16, generator=gen) * 0.02)
        w2 = (torch.randn(e, hidden, inter, device='cuda', dtype=torch.bfloat16, generator=gen) * 0.02)
        w1f = w1.to(torch.float8_e4m3fn)
        w2f = w2.to(torch.float8_e4m3fn)
        s1f = torch.ones(e, 2 * inter, device='cuda')
        s2f = torch.ones(e, hidden, device='cuda')

    peer_rows = []
    rows_fmt = '{:>7} {:>9} {:>8} {:>9} {:>7} {:>7} {:>10} {:>10} {:>8} {:>8}'
    print(rows_fmt.format('tok/exp', 'ours us', 'TFLOPS', 'wt GB/s', '%copy', '%bf16', 'torch bf16', 'torch fp8', 'x bf16', 'x fp8'))
    for tpe in token_list:
        rows = e * tpe
        x, q, sf, rw, h, y = make_inputs(e, tpe, hidden, inter, gen)
        ours = ours_call(l1, l2, e, tpe, hidden, inter, q, sf, rw, h, y)
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
        if marlin is not None:
            try:
                full, gemms, bs = marlin_call(marlin[0], marlin[1], e, tpe, x, rw)
                full()
                torch.cuda.synchronize()
                peer_rows.append((tpe, t, bench(gemms), bench(full), bs))
            except Exception as ex:
                print(f'  peer marlin failed at {tpe} tokens/expert: {type(ex).__name__}: {str(ex)[:200]}')
                marlin = None
        print(rows_fmt.format(tpe, f'{t:.1f}', f'{tflops:.1f}', f'{wgbs:.0f}', f'{100 * wgbs / copy_gbs:.1f}',
                              f'{100 * tflops / bf16_tflops:.1f}', f'{tb:.1f}', f'{tf:.1f}',
                              f'{tb / t:.2f}', f'{tf / t:.2f}'))
    print(f'ceilings: copy {copy_gbs:.0f} GB/s, bf16 {bf16_tflops:.0f} TFLOPS; bytes floor {floor_us:.0f} us')
    if peer_rows:
        m_floor = marlin_bytes / copy_gbs / 1e3
        print(f'peer marlin: vllm 0.20.2 moe_wna16_marlin_gemm, NVFP4 weights (E2M1, E4M3 per 16 re-encoded S0E5M3, '
              f'FP32 per expert) in Marlin\'s layout, BF16 activations (W4A16), same experts and rows; marlin = L1, '
              f'torch SwiGLU, L2 (routing weights in L2, as fused_marlin_moe), gemms = L1 + L2 alone; ours/marlin '
              f'< 1 = ours faster')
        pfmt = '{:>7} {:>5} {:>9} {:>9} {:>10} {:>8} {:>9} {:>11} {:>8} {:>9}'
        print(pfmt.format('tok/exp', 'block', 'ours us', 'marlin us', 'm gemms us', 'ours MB', 'marlin MB',
                          'ours/marlin', 'ours xfl', 'marl xfl'))
        for tpe, t, tg, tfull, bs in peer_rows:
            print(pfmt.format(tpe, bs, f'{t:.1f}', f'{tfull:.1f}', f'{tg:.1f}', f'{fp4_bytes / 1e6:.1f}',
                              f'{marlin_bytes / 1e6:.1f}', f'{ratio(t, tfull):.2f}', f'{t / floor_us:.2f}',
                              f'{tfull / m_floor:.2f}'))
    if args.sustained:
        del w1, w2, w1f, w2f
        run_sustained(args, l1, l2, marlin, fp4_bytes, marlin_bytes, copy_gbs, gen)


if __name__ == '__main__':
    main()
