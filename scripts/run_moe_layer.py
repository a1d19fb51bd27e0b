#!/usr/bin/env python3
"""The main job: one DeepSeek-V4-shaped Mega MoE layer with NVFP4 expert weights.

Full shape (``--full``): hidden 7168, intermediate 3072, 384 experts, top-6.  By default the layer is
scaled down (hidden 512, intermediate 256, 16 experts, top-4, 64 tokens) so that it also runs in
seconds on a CPU with the reference backend (``--full`` is meant for GPUs: on a CPU, quantizing 384
full-size experts and the float64 reference take a long time; ``--no-check`` skips the reference).

    python scripts/run_moe_layer.py                     # one process, best backend present
    torchrun --nproc-per-node 2 scripts/run_moe_layer.py # experts split over the ranks

Random non-uniform weights are quantized per expert with ``cast_to_nvfp4`` (gate and up with their own
global scales), transformed with ``transform_nvfp4_weights_for_mega_moe`` and run through
``fp8_nvfp4_mega_moe``; the result is compared with ``reference_mega_moe``.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

import deep_gemm  # noqa: E402
from deep_gemm.mega.api import select_backend  # noqa: E402
from deep_gemm.utils import cast_to_nvfp4, dequant_nvfp4, per_token_cast_to_fp8  # noqa: E402

FULL = dict(hidden=7168, intermediate=3072, experts=384, topk=6, tokens=64)
SMALL = dict(hidden=512, intermediate=256, experts=16, topk=4, tokens=64)


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--full', action='store_true', help='DeepSeek-V4 shape (7168 / 3072 / 384 experts / top-6)')
    ap.add_argument('--hidden', type=int)
    ap.add_argument('--intermediate', type=int)
    ap.add_argument('--experts', type=int)
    ap.add_argument('--topk', type=int)
    ap.add_argument('--tokens', type=int, help='tokens per rank')
    ap.add_argument('--max-tokens', type=int, help='num_max_tokens_per_rank of the buffer (default: --tokens)')
    ap.add_argument('--mask-frac', type=float, default=0.02, help='fraction of masked (-1) routing slots')
    ap.add_argument('--activation-clamp', type=float, default=None)
    ap.add_argument('--ue8m0', action='store_true', help='power-of-two activation scales')
    ap.add_argument('--backend', default='auto', choices=['auto', 'reference', 'sm90', 'sm100'])
    ap.add_argument('--iters', type=int, default=None, help='timed iterations (default 1 on reference, 10 else)')
    ap.add_argument('--no-check', action='store_true', help='skip the comparison with reference_mega_moe')
    ap.add_argument('--seed', type=int, default=0)
    args = ap.parse_args()
    base = FULL if args.full else SMALL
    for key in base:
        if getattr(args, key) is None:
            setattr(args, key, base[key])
    return args


def init_distributed():
    world = int(os.environ.get('WORLD_SIZE', '1'))
    if torch.cuda.is_available():
        device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', '0')))
        torch.cuda.set_device(device)
    else:
        device = torch.device('cpu')
    if world == 1:
        return None, 0, 1, device
    import torch.distributed as dist
    dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    return dist.group.WORLD, dist.get_rank(), dist.get_world_size(), device


def make_expert_weights(args, experts, device):
    """NVFP4 ModelOpt tensors for the given global expert ids (each expert seeded by its id)."""
    h, i = args.hidden, args.intermediate
    w13, s13, g13, w2, s2, g2 = [], [], [], [], [], []
    for e in experts:
        # drawn on the device: at the full shape a CPU generator took minutes per rank under torchrun
        # (one thread per process); the same expert id gives the same weights at any world size
        gen = torch.Generator(device=device).manual_seed(args.seed * 100003 + e)
        mag = float(torch.exp(0.5 * torch.randn((), generator=gen, device=device)))
        row = torch.exp(0.5 * torch.randn(2 * i, 1, generator=gen, device=device))
        w1 = torch.randn(2 * i, h, generator=gen, device=device) * row * mag / h ** 0.5
        w1[i:] *= 2.5  # up rows: another global scale than gate rows
        wd = torch.randn(h, i, generator=gen, device=device) * mag / i ** 0.5
        pg, sg, gg = cast_to_nvfp4(w1[:i])
        pu, su, gu = cast_to_nvfp4(w1[i:])
        pd, sd, gd = cast_to_nvfp4(wd)
        w13.append(torch.cat([pg, pu]))
        s13.append(torch.cat([sg, su]))
        g13.append(torch.stack([gg, gu]))
        w2.append(pd)
        s2.append(sd)
        g2.append(gd)
    l1 = {'weight': torch.stack(w13), 'weight_scale': torch.stack(s13), 'weight_scale_2': torch.stack(g13)}
    l2 = {'weight': torch.stack(w2), 'weight_scale': torch.stack(s2), 'weight_scale_2': torch.stack(g2)}
    return l1, l2


def make_tokens(args, rank, device):
    gen = torch.Generator(device='cpu').manual_seed(args.seed * 7919 + 1 + rank)
    t = args.tokens
    x = torch.randn(t, args.hidden, generator=gen) * torch.exp(0.5 * torch.randn(t, 1, generator=gen))
    x_fp8, x_sf = per_token_cast_to_fp8(x, 32, use_ue8m0=args.ue8m0)
    bias = torch.linspace(0, 0.5, args.experts)  # non-uniform expert popularity
    scores = torch.rand(t, args.experts, generator=gen) + bias
    topk_idx = scores.topk(args.topk, dim=1).indices.to(torch.int64)
    topk_idx[torch.rand(t, args.topk, generator=gen) < args.mask_frac] = -1
    topk_weights = torch.softmax(torch.randn(t, args.topk, generator=gen), dim=1)
    return [v.to(device) for v in (x_fp8, x_sf, topk_idx, topk_weights)]


class _Lazy:
    """The reference's weights, one expert at a time: the checkpoint's NVFP4 tensors (block-scaled,
    without the global scale) dequantized where they lie.  Not the transformed weights' dequantize(),
    which undoes the transform on the CPU: at the full shape that took 94 of the 112 s of a one-GPU
    run (H100, 384 experts), and it would check the transform against its own inverse."""
    def __init__(self, w):
        self.w = w

    def __len__(self):
        return self.w['weight'].shape[0]

    def __getitem__(self, e):
        return dequant_nvfp4(self.w['weight'][e], self.w['weight_scale'][e])


def main():
    args = parse_args()
    group, rank, world, device = init_distributed()
    log = print if rank == 0 else (lambda *a, **k: None)
    if args.experts % world:
        raise SystemExit(f'--experts {args.experts} must be a multiple of the world size {world}')
    if not hasattr(deep_gemm, 'transform_nvfp4_weights_for_mega_moe'):
        raise SystemExit('deep_gemm.mega.weights (transform_nvfp4_weights_for_mega_moe) is missing from this checkout')
    e_l = args.experts // world
    backend = select_backend(args.backend, device)
    log(f'deep_gemm {deep_gemm.__version__}: backend={backend} device={device} ranks={world}')
    log(f'shape: tokens/rank={args.tokens} hidden={args.hidden} intermediate={args.intermediate} '
        f'experts={args.experts} ({e_l}/rank) top-{args.topk} clamp={args.activation_clamp}')

    t0 = time.perf_counter()
    l1, l2 = make_expert_weights(args, range(rank * e_l, (rank + 1) * e_l), device)
    L1, L2 = deep_gemm.transform_nvfp4_weights_for_mega_moe(l1, l2)
    log(f'weights: L1 {tuple(l1["weight"].shape)} L2 {tuple(l2["weight"].shape)} uint8 per rank, '
        f'quantized + transformed in {time.perf_counter() - t0:.2f} s')

    x, x_sf, topk_idx, topk_weights = make_tokens(args, rank, device)
    buf = deep_gemm.get_symm_buffer_for_mega_moe(group, args.experts, args.max_tokens or args.tokens, args.topk,
                                                 args.hidden, args.intermediate, device=device)
    t = args.tokens
    buf.x[:t].copy_(x)
    buf.x_sf[:t].copy_(x_sf)
    buf.topk_idx[:t].copy_(topk_idx)
    buf.topk_weights[:t].copy_(topk_weights)
    y = torch.empty(t, args.hidden, dtype=torch.bfloat16, device=device)
    stats = torch.zeros(e_l, dtype=torch.int32, device=device)

    iters = args.iters if args.iters is not None else (1 if backend == 'reference' else 10)
    if backend != 'reference':  # warm-up (JIT compilation)
        deep_gemm.fp8_nvfp4_mega_moe(y, L1, L2, buf, activation_clamp=args.activation_clamp, backend=backend)
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        deep_gemm.fp8_nvfp4_mega_moe(y, L1, L2, buf, cumulative_local_expert_recv_stats=stats,
                                     activation_clamp=args.activation_clamp, backend=backend)
    sync()
    dt = (time.perf_counter() - t0) / max(iters, 1)
    log(f'fp8_nvfp4_mega_moe: y {tuple(y.shape)} bf16, {dt * 1e3:.3f} ms/iter over {iters} iter(s)')
    log(f'rank {rank} local expert recv stats (cumulative): {stats.tolist()}')

    if not args.no_check:
        t0 = time.perf_counter()
        y_ref = deep_gemm.reference_mega_moe(x, x_sf, topk_idx, topk_weights, _Lazy(l1), L1.alpha, _Lazy(l2),
                                             L2.alpha, group=group, activation_clamp=args.activation_clamp,
                                             num_experts=args.experts)
        num = (y.double() - y_ref.double()).norm() ** 2
        den = y_ref.double().norm() ** 2
        if group is not None:
            import torch.distributed as dist
            v = torch.stack([num, den]).to(device)
            dist.all_reduce(v, group=group)
            num, den = v[0], v[1]
        rel = (num.sqrt() / den.sqrt().clamp(min=1e-300)).item()
        log(f'rel. error vs reference_mega_moe: {rel:.3e} (reference took {time.perf_counter() - t0:.2f} s)')
    if group is not None:
        import torch.distributed as dist
        dist.destroy_process_group()


if __name__ == '__main__':
    main()
