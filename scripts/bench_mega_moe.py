"""Benchmark: the whole Mega MoE layer (dispatch, L1 + SwiGLU, L2, combine) against its ceilings and peers.

DeepSeek-V4 shape (hidden 7168, intermediate 3072, top-6), ``--experts-per-rank`` local experts,
tokens per rank in ``--tokens`` (decode 128, prefill 4096 by default), random routing over all
ranks' experts with a non-uniform expert popularity (``--routing uniform``: equal).  Measured in the
same run, per rank:

* ceilings: the device-copy bandwidth, the BF16 matmul rate, and (several ranks) the NVLink write
  bandwidth to the next rank (a copy into its symmetric buffer);
* ours: ``fp8_nvfp4_mega_moe(backend='sm90')`` (the fused kernel; ``DG_MEGA_MOE_FUSED=0``: the
  kernel sequence) captured in a CUDA graph (as servers run it) and
  eager (one Python call; on one rank it syncs once to validate expert ids);
* the unfused baseline: on one rank, torch-op dispatch (sort by expert, gather, FP8 -> BF16) and
  combine around the same grouped GEMMs; on several ranks, NCCL ``all_to_all_single`` dispatch
  (token rows, scales, expert ids, weights), the same grouped GEMMs, ``all_to_all_single`` back
  and a slot-order combine.

Printed per token count: us (the slowest rank; fixed iteration counts, every rank in step), TFLOPS
(useful: 2 x 3 x hidden x inter per routed pair of this rank's experts), HBM GB/s of the FP4
weights of the local experts that received tokens, NVLink GB/s (bytes that reach this rank from
peers: token rows + scales it pulls at dispatch, BF16 rows of its tokens' remote slots at combine,
pushed by their owners or pulled; over our time), and baseline / ours.

``--tokens-per-wave W`` sizes the buffer's receive rows for waves of at most W tokens per rank (default:
the buffer's, see deep_gemm/mega/buffer.py); the first line prints W and the waves per token count,
so e.g. ``--tokens 4096 --tokens-per-wave 1024`` against ``--tokens-per-wave 4096`` measures the
overhead of 4 waves.

``--clocks`` then runs the fused graph and the compute-only and comm-only sequences for about 3 s each while
``nvidia-smi`` samples every rank's SM clock and board power: a kernel at the power limit runs at a
reduced clock, and only less energy per weight or per FLOP makes it faster (docs/perf-notes.md, v7).

``--peers`` (default on where its wheels are; one rank): SGLang's DeepGEMM fork, SM90 FP8 Mega MoE
(``sgl-deep-gemm`` 0.1.5.post1's ``fp8_mega_moe``, FP8 weights with FP32 per 128 x 128 blocks; wheels
in ``.whl/sgl/``), in a worker process of its own (its package is also ``deep_gemm``) on the same
routing as ours (scripts/peers/sgl_mega_moe.py); a table after ours gives both formats' weight bytes
(experts that received tokens), graph and eager us and ours / sgl.

    python scripts/bench_mega_moe.py [--experts-per-rank 8] [--tokens 128,4096] [--tokens-per-wave 1024] [--clocks]
        [--no-peers] [--peer-timeout 420]
    torchrun --nproc-per-node 4 scripts/bench_mega_moe.py --tokens 128,4096
"""
import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import deep_gemm  # noqa: E402
from deep_gemm.gemm import m_grouped_fp8_nvfp4_gemm_nt_contiguous  # noqa: E402
from deep_gemm.mega import sm90  # noqa: E402
from deep_gemm.utils import per_token_cast_to_fp8, relative_error  # noqa: E402
from scripts.bench_grouped_gemm import ceilings, make_weights  # noqa: E402
from scripts.profile_decode import sustained  # noqa: E402
from scripts.peers import unavailable, ratio  # noqa: E402

WARMUP, ITERS = 5, 30


def timed(fn, group) -> float:
    """Median-free mean us per call over a fixed count (every rank runs the same count, so calls
    that wait for each other stay in step); the slowest rank's figure."""
    for _ in range(WARMUP):
        fn()
    torch.cuda.synchronize()
    if group is not None:
        dist.barrier(group)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(ITERS):
        fn()
    end.record()
    torch.cuda.synchronize()
    us = torch.tensor(start.elapsed_time(end) * 1e3 / ITERS, device='cuda')
    if group is not None:
        dist.all_reduce(us, dist.ReduceOp.MAX, group)
    return us.item()


def _expert_gemms(a, offsets, w, l1, l2, k, e_l, t):
    h = torch.empty(a.shape[0], l1.n // 2, dtype=torch.bfloat16, device=a.device)
    m_grouped_fp8_nvfp4_gemm_nt_contiguous(a, l1, h, offsets, epilogue='swiglu', route_weights=w,
                                           expected_m=max(1, t * k // e_l))
    o = torch.empty(a.shape[0], l2.n, dtype=torch.bfloat16, device=a.device)
    m_grouped_fp8_nvfp4_gemm_nt_contiguous(h, l2, o, offsets, expected_m=max(1, t * k // e_l))
    return o


def _slot_combine(o_rows, pair_ids, topk_idx, t, k, hidden):
    """y[t] = sum over slots j in increasing order of the pair's row (masked slots skipped), FP32."""
    per_slot = torch.zeros(t * k, hidden, dtype=torch.float32, device=o_rows.device)
    per_slot[pair_ids] = o_rows.float()
    per_slot = per_slot.view(t, k, hidden)
    y = torch.zeros(t, hidden, dtype=torch.float32, device=o_rows.device)
    for j in range(k):
        y = torch.where((topk_idx[:, j] >= 0).unsqueeze(1), y + per_slot[:, j], y)
    return y.to(torch.bfloat16)


def _sort_by_expert(e, num_local_experts):
    order = torch.argsort(e, stable=True)
    counts = torch.bincount(e, minlength=num_local_experts).to(torch.int32)
    offsets = torch.zeros(num_local_experts + 1, dtype=torch.int32, device=e.device)
    offsets[1:] = torch.cumsum(counts, 0)
    return order, offsets


def baseline_one_rank(buf, l1, l2, t, k, e_l):
    """Unfused on one GPU: torch-op dispatch and combine around the same grouped GEMMs."""
    idx = buf.topk_idx[:t].reshape(-1)
    valid = idx >= 0
    rows = torch.argsort(torch.where(valid, idx, e_l), stable=True)   # masked pairs sort last, past offsets[-1]
    _, offsets = _sort_by_expert(idx[valid], e_l)
    x = (buf.x[:t].float().view(t, -1, 32) * buf.x_sf[:t].unsqueeze(-1)).view(t, -1).to(torch.bfloat16)
    a = x[rows // k]
    w = buf.topk_weights[:t].reshape(-1)[rows].contiguous()
    o = _expert_gemms(a, offsets, w, l1, l2, k, e_l, t)
    return _slot_combine(o, rows, buf.topk_idx[:t], t, k, l2.n)


def ep_all_to_all(buf, t, k, e_l, group, experts):
    """Unfused EP around ``experts``: all_to_all_single dispatch of every routed pair's FP8 row, scales,
    local expert id and routing weight to the expert's owner, ``experts(x, x_sf, local_expert, weight)
    -> o`` (BF16 ``[n, hidden]``, one row per received pair, in received order) there,
    all_to_all_single back, and a slot-order combine at the source.  NCCL on GPUs, gloo on CPU."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    idx = buf.topk_idx[:t].reshape(-1)
    dest = torch.where((idx >= 0) & (idx < world * e_l), idx // e_l, world)
    pairs = torch.argsort(dest, stable=True)
    send = torch.bincount(dest, minlength=world + 1)[:world]
    pairs = pairs[:int(send.sum())]
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    send_l, recv_l = send.tolist(), recv.tolist()      # the split sizes: a host sync, as NCCL needs
    n_recv = sum(recv_l)
    tok = pairs // k

    def a2a(src, rows_out, in_split, out_split):
        out = torch.empty((rows_out,) + tuple(src.shape[1:]), dtype=src.dtype, device=src.device)
        dist.all_to_all_single(out, src.contiguous(), out_split, in_split, group=group)
        return out

    rx = a2a(buf.x[:t].view(torch.uint8)[tok], n_recv, send_l, recv_l).view(torch.float8_e4m3fn)
    rsf = a2a(buf.x_sf[:t][tok], n_recv, send_l, recv_l)
    re = a2a(idx[pairs], n_recv, send_l, recv_l) - rank * e_l
    rw = a2a(buf.topk_weights[:t].reshape(-1)[pairs], n_recv, send_l, recv_l)
    o = experts(rx, rsf, re, rw)
    o_src = a2a(o, pairs.numel(), recv_l, send_l)
    return _slot_combine(o_src, pairs, buf.topk_idx[:t], t, k, buf.hidden)


def baseline_nccl(buf, l1, l2, t, k, e_l, group):
    """Unfused EP on GPUs: NCCL all_to_all_single around the same grouped GEMMs."""
    def experts(rx, rsf, re, rw):
        n = rx.shape[0]
        order, offsets = _sort_by_expert(re, e_l)
        a = (rx[order].float().view(n, -1, 32) * rsf[order].unsqueeze(-1)).view(n, -1).to(torch.bfloat16)
        o = _expert_gemms(a, offsets, rw[order].contiguous(), l1, l2, k, e_l, t)
        back = torch.empty_like(o)
        back[order] = o
        return back
    return ep_all_to_all(buf, t, k, e_l, group, experts)


def torchrun_group():
    """(group, rank, world size): under torchrun with several ranks, this rank's GPU and an NCCL
    group of all ranks; else (None, 0, 1)."""
    world = int(os.environ.get('WORLD_SIZE', '1'))
    if world == 1:
        return None, 0, 1
    torch.cuda.set_device(int(os.environ.get('LOCAL_RANK', '0')))
    dist.init_process_group('nccl', device_id=torch.device('cuda', torch.cuda.current_device()))
    return dist.group.WORLD, dist.get_rank(), world


def sustained_in_step(fn, us_per_call, group, seconds=3.0):
    """scripts.profile_decode.sustained over the same call count on every rank (each call waits on
    the others); every rank's (us, SM MHz, W, limit W)."""
    calls = torch.tensor(int(seconds * 1e6 / us_per_call) + 1, device='cuda')
    if group is not None:
        dist.all_reduce(calls, dist.ReduceOp.MAX, group)
        dist.barrier(group)
    mine = torch.tensor(sustained(fn, calls=int(calls)), device='cuda', dtype=torch.float64)
    if group is None:
        return [mine.tolist()]
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, mine, group=group)
    return [p.tolist() for p in parts]


def sgl_peer_table(routes, ours, e_l, hidden, inter, k, copy_gbs, timeout_s, say=print):
    """SGLang's SM90 FP8 Mega MoE (scripts/peers/sgl_mega_moe.py) on each token count's routing, one rank,
    beside ours: graph and eager us, the weight bytes of the experts that received tokens, ours / sgl."""
    from scripts.peers import sgl_mega_moe as sp
    say(f'peer sgl: {sp.NAME}, same routing, own activations and weights (randn * 0.05, FP8 per 128 x 128), '
        f'worker process (first calls JIT-compile, up to {timeout_s:.0f} s)')
    rows, why = sp.run_peer(routes, e_l, hidden, inter, k, timeout_s=timeout_s, say=say)
    if why and not rows:
        say(unavailable('sgl', why))
        return
    fmt = '{:>7} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8} {:>8} {:>8}'
    say(fmt.format('tokens', 'ours us', 'sgl us', 'ours eag', 'sgl eag', 'ours MB', 'sgl MB', 'ours/sgl', 'sgl GB/s',
                   'sgl err', 'JIT s'))
    for t in sorted(ours):
        t_ours, t_eager, _touched, wbytes = ours[t]
        r = rows.get(t)
        if r is None or 'error' in r:
            say(f'{t:>7} {t_ours:>9.1f} sgl: {r.get("error") if r else "no result"}')
            continue
        g = r.get('graph_us', float('nan'))
        say(fmt.format(t, f'{t_ours:.1f}', f'{g:.1f}', f'{t_eager:.1f}', f'{r["eager_us"]:.1f}', f'{wbytes / 1e6:.0f}',
                       f'{r["weight_bytes"] / 1e6:.0f}', f'{ratio(t_ours, g):.2f}',
                       f'{r["weight_bytes"] / g / 1e3:.0f}', f'{r.get("rel_err", float("nan")):.1e}',
                       f'{r.get("first_call_s", float("nan")):.0f}')
            + ('' if r.get('idempotent', True) else '  (inputs re-staged per call)')
            + (f'  (graph: {r["graph_error"]})' if 'graph_error' in r else ''))
    if why:
        say(unavailable('sgl', why) + ' for the missing rows')
    say(f'(sgl: FP8 E4M3 weights with FP32 per 128 x 128 block, {sp.fp8_weight_bytes(1, hidden, inter) / 1e6:.1f} MB '
        f'per expert vs ours NVFP4; MB = experts that received tokens; ours/sgl < 1 = ours faster; sgl err vs a float '
        f'reference of its own FP8 operands; copy ceiling {copy_gbs:.0f} GB/s)')


def fill_inputs(buf, t: int, seed: int, routing: str = 'skewed') -> None:
    """The first ``t`` tokens of ``buf``: per-token log-normal magnitudes, FP8 with UE8M0 per-32
    scales, top-k routing skewed towards the higher expert ids (``routing='uniform'``: every expert
    equally likely), softmax routing weights."""
    xg = torch.Generator().manual_seed(seed)
    x = torch.randn(t, buf.hidden, generator=xg) * torch.exp(0.5 * torch.randn(t, 1, generator=xg))
    q, sf = per_token_cast_to_fp8(x, True, 32)
    scores = torch.rand(t, buf.num_experts, generator=xg)
    if routing == 'skewed':
        scores += torch.linspace(0, 0.5, buf.num_experts)
    buf.x[:t].copy_(q)
    buf.x_sf[:t].copy_(sf)
    buf.topk_idx[:t].copy_(scores.topk(buf.num_topk, dim=1).indices)
    buf.topk_weights[:t].copy_(torch.softmax(torch.randn(t, buf.num_topk, generator=xg), 1))


def nvlink_ceiling(buf, group) -> float:
    """GB/s of one copy into the next rank's symmetric buffer (every rank writes at once)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    dst = buf.peer_region('l1_x', (rank + 1) % world).view(-1)
    n = min(dst.numel(), 1 << 27)
    src = torch.randn(n, device='cuda').to(torch.bfloat16)
    us = timed(lambda: dst[:n].copy_(src), group)
    dist.barrier(group)
    return n * 2 / us / 1e3


def add_layer_args(ap: argparse.ArgumentParser, tokens: str) -> None:
    """The layer shape and token counts of a Mega MoE benchmark (DeepSeek-V4's by default)."""
    ap.add_argument('--experts-per-rank', type=int, default=8)
    ap.add_argument('--hidden', type=int, default=7168)
    ap.add_argument('--inter', type=int, default=3072)
    ap.add_argument('--topk', type=int, default=6)
    ap.add_argument('--tokens', default=tokens)


def main():
    ap = argparse.ArgumentParser()
    add_layer_args(ap, '128,4096')
    ap.add_argument('--tokens-per-wave', type=int, default=None,
                    help='num_max_tokens_per_wave of the buffer (default: the buffer\'s own)')
    ap.add_argument('--routing', choices=['skewed', 'uniform'], default='skewed',
                    help='expert popularity: rising with the expert id (default), or equal')
    ap.add_argument('--clocks', action='store_true',
                    help='also run the fused graph and the compute-only and comm-only sequences for ~3 s each while '
                         'nvidia-smi samples every rank\'s SM clock and board power')
    ap.add_argument('--peers', action=argparse.BooleanOptionalAction, default=True,
                    help='SGLang\'s SM90 FP8 Mega MoE (sgl-deep-gemm, wheels in .whl/sgl/) on the same routing, in a '
                         'worker process, one rank (default: on where its wheels are; a one-line note otherwise)')
    ap.add_argument('--peer-timeout', type=float, default=420.0,
                    help='seconds for the SGLang worker (it JIT-compiles its kernels on the first call)')
    args = ap.parse_args()
    group, rank, world = torchrun_group()
    say = print if rank == 0 else (lambda *a, **kw: None)
    e_l, hidden, inter, k = args.experts_per_rank, args.hidden, args.inter, args.topk
    num_experts = e_l * world
    gen = torch.Generator(device='cuda').manual_seed(rank)
    copy_gbs, bf16_tflops = ceilings()
    l1, l2 = make_weights(e_l, hidden, inter, gen)
    per_expert_bytes = sum(v.numel() for v in (l1.codes, l1.scales, l2.codes, l2.scales)) / e_l
    token_counts = [int(v) for v in args.tokens.split(',')]
    max_t = max(token_counts)
    buf = deep_gemm.get_symm_buffer_for_mega_moe(group, num_experts, max_t, k, hidden, inter,
                                                 num_max_tokens_per_wave=args.tokens_per_wave, mma_type='fp8xnvfp4')
    nvl_gbs = nvlink_ceiling(buf, group) if group is not None else float('nan')
    say(f'device: {torch.cuda.get_device_name()} x {world}; rank 0: device copy {copy_gbs:.0f} GB/s (read+write), '
        f'bf16 8192^3 matmul {bf16_tflops:.0f} TFLOPS' + (f', NVLink write to the next rank {nvl_gbs:.0f} GB/s'
                                                          if group is not None else '') +
        f'; EP {world}, {e_l} experts per rank, top-{k}, {hidden}/{inter}; buffer {buf.num_bytes / 1e9:.2f} GB, '
        f'W = {buf.num_max_tokens_per_wave} tokens per wave, waves: ' +
        ', '.join(f'{buf.num_waves(t)} at {t} tokens' for t in token_counts))
    say(f'{"tokens":>7} {"graph us":>9} {"eager us":>9} {"TFLOPS":>7} {"%bf16":>6} {"wt GB/s":>8} {"%copy":>6} '
        f'{"NVL GB/s":>9} {"%NVL":>5} {"baseline us":>12} {"x graph":>8} {"x eager":>8} {"rel err":>8} '
        f'{"seq us":>8} {"x seq":>6} {"compute":>8} {"comm":>7} {"/max":>5} {"seq err":>8} {"bitwise":>7} '
        f'{"rows/exp":>9} {"BLOCK_T":>7}')
    peer_routes, peer_ours = {}, {}
    for t in token_counts:
        fill_inputs(buf, t, 1000 * t + rank, args.routing)
        if args.peers and group is None:
            peer_routes[t] = (buf.topk_idx[:t].cpu(), buf.topk_weights[:t].cpu())
        y = torch.empty(t, hidden, dtype=torch.bfloat16, device='cuda')
        run = lambda: deep_gemm.fp8_nvfp4_mega_moe(y, l1, l2, buf, backend='sm90')  # noqa: E731
        base = (lambda: baseline_nccl(buf, l1, l2, t, k, e_l, group)) if group is not None else \
            (lambda: baseline_one_rank(buf, l1, l2, t, k, e_l))
        run()
        torch.cuda.synchronize()
        y_base = base()
        err = relative_error(y, y_base)
        t_eager = timed(run, group)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run()
        t_ours = timed(graph.replay, group)
        t_base = timed(base, group)
        # the unfused sm90 sequence, and its compute-only (expert GEMMs) and communication-only (barriers,
        # dispatch, combine) parts, each in a CUDA graph (issue #6: fused <= 1.15 x max(compute, comm))
        y_seq = torch.empty_like(y)
        seq_times, clocks = [], []
        if args.clocks:
            clocks.append(('fused', sustained_in_step(graph.replay, t_ours, group)))
        for parts in (dict(), dict(comm=False), dict(compute=False)):
            out = y_seq if not parts else torch.empty_like(y)
            fn = lambda: sm90.run_sequence(out, l1, l2, buf, **parts)  # noqa: E731
            fn()
            g2 = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g2):
                fn()
            seq_times.append(timed(g2.replay, group))
            if args.clocks and parts:
                clocks.append(('compute-only' if parts == dict(comm=False) else 'comm-only',
                               sustained_in_step(g2.replay, seq_times[-1], group)))
            del g2
        t_seq, t_compute, t_comm = seq_times
        sm90.run_sequence(y_seq, l1, l2, buf)
        run()
        torch.cuda.synchronize()
        seq_err = relative_error(y, y_seq)
        bitwise = bool(torch.equal(y.view(torch.int16), y_seq.view(torch.int16)))
        buf.check_comm()
        # this rank's work and traffic, from every rank's routing
        all_idx = buf.topk_idx[:t]
        if group is not None:
            parts = [torch.empty_like(all_idx) for _ in range(world)]
            dist.all_gather(parts, all_idx.contiguous(), group=group)
        else:
            parts = [all_idx]
        mine = torch.stack([((p >= rank * e_l) & (p < (rank + 1) * e_l)).sum() for p in parts]).cpu()
        pairs = int(mine.sum())
        pulled_rows = int(mine.sum() - mine[rank])
        own = parts[rank]
        remote_pairs = int(((own >= 0) & ((own < rank * e_l) | (own >= (rank + 1) * e_l))).sum())
        nvl_bytes = pulled_rows * (hidden + hidden // 32 * 4) + remote_pairs * hidden * 2
        local = torch.cat([p[(p >= rank * e_l) & (p < (rank + 1) * e_l)] for p in parts]) - rank * e_l
        rows = torch.bincount(local, minlength=e_l)
        touched = int((rows > 0).sum())
        flops = 2 * 3 * hidden * inter * pairs
        wgbs = touched * per_expert_bytes / t_ours / 1e3
        nvl = nvl_bytes / t_ours / 1e3
        say(f'{t:>7} {t_ours:>9.1f} {t_eager:>9.1f} {flops / t_ours / 1e6:>7.1f} '
            f'{100 * flops / t_ours / 1e6 / bf16_tflops:>6.1f} {wgbs:>8.0f} {100 * wgbs / copy_gbs:>6.1f} '
            f'{nvl:>9.1f} {100 * nvl / nvl_gbs if group is not None else float("nan"):>5.1f} {t_base:>12.1f} '
            f'{t_base / t_ours:>8.2f} {t_base / t_eager:>8.2f} {err:>8.1e} {t_seq:>8.1f} {t_seq / t_ours:>6.2f} '
            f'{t_compute:>8.1f} {t_comm:>7.1f} {t_ours / max(t_compute, t_comm):>5.2f} {seq_err:>8.1e} {str(bitwise):>7} '
            f'{f"{int(rows.min())}-{int(rows.max())}":>9} {sm90.block_t_for(buf, t):>7}')
        peer_ours[t] = (t_ours, t_eager, touched, touched * per_expert_bytes)
        for name, per_rank in clocks:
            say(f'{"":>7} sustained {name}: ' + ', '.join(
                f'rank {r} {us:.1f} us, SM {mhz:.0f} MHz, {w:.0f} of {lim:.0f} W' for r, (us, mhz, w, lim) in
                enumerate(per_rank)))
        del graph
    say('(us: slowest rank, graph = the layer captured in a CUDA graph; rates are rank 0\'s over the graph time; '
        'x graph / x eager = baseline us / ours; seq = the unfused sm90 kernel sequence, x seq = seq / ours; '
        'compute / comm = its GEMMs alone / its barriers+dispatch+combine alone; /max = ours / max(compute, comm); '
        'seq err, bitwise: ours vs seq; rows/exp: fewest-most rows of this rank\'s experts; BLOCK_T: the token tile)')
    say(f'ceilings: copy {copy_gbs:.0f} GB/s, bf16 {bf16_tflops:.0f} TFLOPS; weight floor '
        f'{e_l * per_expert_bytes / copy_gbs / 1e3:.0f} us for all {e_l} local experts')
    if args.peers:
        if group is not None:
            say(unavailable('sgl', 'one rank only: the SGLang worker runs EP 1 in a process of its own'))
        else:
            sgl_peer_table(peer_routes, peer_ours, e_l, hidden, inter, k, copy_gbs, args.peer_timeout, say)
    if group is not None:
        dist.destroy_process_group()


if __name__ == '__main__':
    main()
