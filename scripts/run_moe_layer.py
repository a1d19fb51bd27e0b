#!/usr/bin/env python3
"""The main job: one DeepSeek-V4-shaped Mega MoE layer with NVFP4 expert weights.

Full shape (``--full``): hidden 7168, intermediate 3072, 384 experts, top-6.  By default the layer is
scaled down (hidden 512, intermediate 256, 16 experts, top-4, 64 tokens) so that it also runs in
seconds on a CPU with the reference backend.  ``--full`` is meant for GPUs: on a CPU it quantizes 384
full-size experts and runs the float64 reference layer, which takes tens of minutes; it prints its
estimate after the first expert, and skips the comparison (there the layer is the reference).
``--no-check`` skips the comparison with the reference.

    python scripts/run_moe_layer.py                     # one process, best backend present
    torchrun --nproc-per-node 2 scripts/run_moe_layer.py # experts split over the ranks
    python scripts/run_moe_layer.py --checkpoint DIR --layer N [--recipe fp4xfp4]

``--checkpoint DIR --layer N`` runs one real layer from disk instead: a ModelOpt NVFP4 checkpoint
(``model.safetensors.index.json`` and shards), each rank reading only its experts of layer ``N``
(``deep_gemm.MegaMoE.from_checkpoint``), on random BF16 tokens scaled to the layer's calibrated input
range, with random routing (top-k from config.json unless ``--topk``); ``--recipe`` picks
``fp8_nvfp4_mega_moe`` (``fp8xnvfp4``, default) or ``fp4_fp4_mega_moe`` (``fp4xfp4``).  The check
compares with the float64 reference fed with the checkpoint's tensors as read.

Random non-uniform weights are quantized per expert with ``cast_to_nvfp4`` (gate and up with their own
global scales), transformed with ``transform_nvfp4_weights_for_mega_moe`` and run through
``fp8_nvfp4_mega_moe``; the result is compared with ``reference_mega_moe``.
"""
import argparse
import functools
import os
import sys
import time

import torch
from tqdm import tqdm

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
    ap.add_argument('--checkpoint', metavar='DIR', help='run layer --layer of this ModelOpt NVFP4 checkpoint')
    ap.add_argument('--layer', type=int, help='with --checkpoint: the MoE layer to run')
    ap.add_argument('--recipe', default='fp8xnvfp4', choices=['fp8xnvfp4', 'fp4xfp4'],
                    help='with --checkpoint: fp8_nvfp4_mega_moe (fp8xnvfp4) or fp4_fp4_mega_moe (fp4xfp4)')
    args = ap.parse_args()
    if (args.checkpoint is None) != (args.layer is None):
        ap.error('--checkpoint and --layer go together')
    if args.checkpoint is not None:
        args.tokens = args.tokens or SMALL['tokens']     # the shape comes from the checkpoint
        return args
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


def quantize_expert(args, e, device):
    """ModelOpt NVFP4 tensors of global expert ``e`` (seeded by its id, so the same expert id gives the
    same weights at any world size), each with a leading expert dimension of 1."""
    h, i = args.hidden, args.intermediate
    # drawn on the device: at the full shape a CPU generator took minutes per rank under torchrun
    gen = torch.Generator(device=device).manual_seed(args.seed * 100003 + e)
    mag = float(torch.exp(0.5 * torch.randn((), generator=gen, device=device)))
    row = torch.exp(0.5 * torch.randn(2 * i, 1, generator=gen, device=device))
    w1 = torch.randn(2 * i, h, generator=gen, device=device) * row * mag / h ** 0.5
    w1[i:] *= 2.5  # up rows: another global scale than gate rows
    wd = torch.randn(h, i, generator=gen, device=device) * mag / i ** 0.5
    pg, sg, gg = cast_to_nvfp4(w1[:i])
    pu, su, gu = cast_to_nvfp4(w1[i:])
    pd, sd, gd = cast_to_nvfp4(wd)
    l1 = {'weight': torch.cat([pg, pu])[None], 'weight_scale': torch.cat([sg, su])[None],
          'weight_scale_2': torch.stack([gg, gu])[None]}
    l2 = {'weight': pd[None], 'weight_scale': sd[None], 'weight_scale_2': gd.reshape(1)}
    return l1, l2


def _stack(parts):
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


def build_weights(args, experts, device, keep_checkpoint: bool, progress, on_first=None):
    """Quantize and transform this rank's experts one at a time (a progress bar over both), so that
    only the transformed weights need to stay in memory.  Returns ``(L1, L2, l1, l2)``, the ModelOpt
    dicts ``l1``/``l2`` only when ``keep_checkpoint`` (else None)."""
    t_l1, t_l2, c_l1, c_l2 = [], [], [], []
    for n, e in enumerate(progress(experts, desc='quantize + transform', unit='expert')):
        t0 = time.perf_counter()
        l1, l2 = quantize_expert(args, e, device)
        L1, L2 = deep_gemm.transform_nvfp4_weights_for_mega_moe(l1, l2)
        t_l1.append(L1)
        t_l2.append(L2)
        if keep_checkpoint:
            c_l1.append(l1)
            c_l2.append(l2)
        if n == 0 and on_first is not None:
            on_first(time.perf_counter() - t0, L1, L2)
    L1, L2 = deep_gemm.ExpertWeights.cat(t_l1), deep_gemm.ExpertWeights.cat(t_l2)
    return (L1, L2, _stack(c_l1), _stack(c_l2)) if keep_checkpoint else (L1, L2, None, None)


def make_tokens(args, rank, device):
    gen = torch.Generator(device='cpu').manual_seed(args.seed * 7919 + 1 + rank)
    t = args.tokens
    x = torch.randn(t, args.hidden, generator=gen) * torch.exp(0.5 * torch.randn(t, 1, generator=gen))
    x_fp8, x_sf = per_token_cast_to_fp8(x, args.ue8m0, 32)
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


def run_checkpoint(args, group, rank, world, device, log):
    """One real layer from disk: ``MegaMoE`` on this rank's experts of ``--layer``."""
    from deep_gemm.reference_recipes import reference_recipe_moe
    t0 = time.perf_counter()
    layer = deep_gemm.load_nvfp4_moe_layer(args.checkpoint, args.layer, group=group)
    moe = deep_gemm.MegaMoE.from_loaded(layer, group, args.recipe, num_topk=args.topk, device=device,
                                        num_max_tokens_per_rank=args.max_tokens or args.tokens,
                                        backend=args.backend, **({} if args.activation_clamp is None else
                                                                 dict(activation_clamp=args.activation_clamp)))
    log(f'checkpoint {args.checkpoint}: layer {args.layer} of {layer.num_experts} experts '
        f'({layer.num_local_experts}/rank, {len(layer.files)} shard(s) read on rank 0), hidden={layer.hidden} '
        f'intermediate={layer.intermediate} top-{moe.num_topk}, recipe={args.recipe}, L1 input scale '
        f'{layer.l1_input_scale:.4g}; loaded + transformed in {time.perf_counter() - t0:.2f} s')
    log(f'module: {moe}')
    gen = torch.Generator(device='cpu').manual_seed(args.seed * 7919 + 1 + rank)
    t, e = args.tokens, layer.num_experts
    x = torch.randn(t, layer.hidden, generator=gen)
    x = (x * (0.9 * layer.l1_input_scale * 2688.0 / x.abs().max().clamp(min=1e-30))).bfloat16()  # calibrated range
    topk_idx = torch.rand(t, e, generator=gen).topk(moe.num_topk, dim=1).indices.to(torch.int64)
    topk_idx[torch.rand(t, moe.num_topk, generator=gen) < args.mask_frac] = -1
    topk_weights = torch.softmax(torch.randn(t, moe.num_topk, generator=gen), dim=1)
    x, topk_idx, topk_weights = x.to(device), topk_idx.to(device), topk_weights.to(device)
    iters = args.iters if args.iters is not None else (1 if moe.backend == 'reference' or device.type != 'cuda' else 10)
    y = moe(x, topk_idx, topk_weights)      # warm-up (JIT compilation on a GPU)
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        y = moe(x, topk_idx, topk_weights)
    sync()
    log(f'MegaMoE ({args.recipe}): y {tuple(y.shape)} bf16, {(time.perf_counter() - t0) / iters * 1e3:.3f} ms/iter '
        f'over {iters} iter(s)')
    if args.no_check:
        return
    t0 = time.perf_counter()
    l1, l2 = layer.l1, layer.l2
    if args.recipe == 'fp8xnvfp4':
        xq, xsf = per_token_cast_to_fp8(x, False, 32)
        y_ref = deep_gemm.reference_mega_moe(xq, xsf, topk_idx, topk_weights, _Lazy(l1), l1['weight_scale_2'],
                                             _Lazy(l2), l2['weight_scale_2'].reshape(-1, 1), group=group,
                                             activation_clamp=moe.activation_clamp, num_experts=e)
    else:
        from deep_gemm.utils import e2m1_to_float, per_token_cast_to_nvfp4, unpack_e2m1
        c, s = per_token_cast_to_nvfp4(x, global_scale=layer.l1_input_scale, use_packed_sf=False)
        xv = e2m1_to_float(unpack_e2m1(c.view(torch.uint8))) * s.repeat_interleave(16, 1)
        fp4 = layer.fp4_fp4_weights()
        y_ref = reference_recipe_moe('fp4xfp4', xv, topk_idx, topk_weights, _Lazy(l1), _Lazy(l2), group,
                                     num_experts=e, l1_alphas=fp4['l1_alphas'], l2_alphas=fp4['l2_alphas'],
                                     a2_scales=fp4['a2_scales'], activation_clamp=moe.activation_clamp)
    rel = rel_error_over_ranks(y, y_ref, group, device)
    log(f'rel. error vs reference from the checkpoint\'s tensors: {rel:.3e} (reference took '
        f'{time.perf_counter() - t0:.2f} s)')
    moe.destroy()


def rel_error_over_ranks(y, y_ref, group, device) -> float:
    """||y - y_ref|| / ||y_ref|| over every rank's tokens (this rank's rows summed with the others')."""
    num = (y.double() - y_ref.double()).norm() ** 2
    den = y_ref.double().norm() ** 2
    if group is not None:
        import torch.distributed as dist
        v = torch.stack([num, den]).to(device)
        dist.all_reduce(v, group=group)
        num, den = v[0], v[1]
    return (num.sqrt() / den.sqrt().clamp(min=1e-300)).item()


def main():
    args = parse_args()
    group, rank, world, device = init_distributed()
    if args.checkpoint is not None:
        log = functools.partial(print, flush=True) if rank == 0 else (lambda *a, **k: None)
        log(f'deep_gemm {deep_gemm.__version__}: backend={select_backend(args.backend, device)} device={device} '
            f'ranks={world}')
        run_checkpoint(args, group, rank, world, device, log)
        if group is not None:
            import torch.distributed as dist
            dist.destroy_process_group()
        return
    log = functools.partial(print, flush=True) if rank == 0 else (lambda *a, **k: None)
    if args.experts % world:
        raise SystemExit(f'--experts {args.experts} must be a multiple of the world size {world}')
    e_l = args.experts // world
    backend = select_backend(args.backend, device)
    log(f'deep_gemm {deep_gemm.__version__}: backend={backend} device={device} ranks={world}')
    log(f'shape: tokens/rank={args.tokens} hidden={args.hidden} intermediate={args.intermediate} '
        f'experts={args.experts} ({e_l}/rank) top-{args.topk} clamp={args.activation_clamp}')

    x, x_sf, topk_idx, topk_weights = make_tokens(args, rank, device)
    on_reference = backend == 'reference'
    # On the reference backend the layer is the reference itself: at the full shape the comparison would
    # double a long run for nothing, and dropping the checkpoint tensors after the transform halves
    # the memory (384 experts: 14 GB instead of 29 GB).
    check = not args.no_check and not (on_reference and args.full)
    if not check and not args.no_check:
        log('the reference backend is the reference: no comparison at this size (run without --full, or on a GPU)')
    # a terminal gets a live bar; a log (CI, a device call) one line every 10 s
    progress = functools.partial(tqdm, disable=rank != 0, dynamic_ncols=True, leave=True,
                                 mininterval=0.1 if sys.stderr.isatty() else 10.0)

    def estimate(first_s, L1, L2):
        """After the first expert: the whole run's duration, said before the rest of the work."""
        build = first_s * e_l
        pairs = world * args.tokens * args.topk
        hit = e_l * (1 - (1 - 1 / args.experts) ** pairs)  # expected local experts with rows
        layer = 0.0
        if on_reference:
            t0 = time.perf_counter()
            L1.dequantize([0]), L2.dequantize([0])
            layer = (time.perf_counter() - t0) * hit * (iters + (1 if check else 0))
        total = build + layer
        if total > 30:
            log(f'estimated time: {total / 60:.1f} min ({build / 60:.1f} min for {e_l} experts at {first_s:.2f} s '
                f'each' + (f', {layer / 60:.1f} min for the float64 layer on {hit:.0f} experts with rows'
                          if on_reference else '') + '); --experts N runs a smaller layer')

    iters = args.iters if args.iters is not None else (1 if on_reference else 10)
    t0 = time.perf_counter()
    L1, L2, l1, l2 = build_weights(args, range(rank * e_l, (rank + 1) * e_l), device, check, progress, estimate)
    log(f'weights: L1 {L1!r}, L2 {L2!r} per rank, quantized + transformed in {time.perf_counter() - t0:.2f} s')

    buf = deep_gemm.get_symm_buffer_for_mega_moe(group, args.experts, args.max_tokens or args.tokens, args.topk,
                                                 args.hidden, args.intermediate, device=device, mma_type='fp8xnvfp4')
    t = args.tokens
    buf.x[:t].copy_(x)
    buf.x_sf[:t].copy_(x_sf)
    buf.topk_idx[:t].copy_(topk_idx)
    buf.topk_weights[:t].copy_(topk_weights)
    y = torch.empty(t, args.hidden, dtype=torch.bfloat16, device=device)
    stats = torch.zeros(e_l, dtype=torch.int32, device=device)

    if not on_reference:  # warm-up (JIT compilation)
        deep_gemm.fp8_nvfp4_mega_moe(y, L1, L2, buf, activation_clamp=args.activation_clamp, backend=backend)
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in progress(range(iters), desc='layer runs', unit='run'):
        deep_gemm.fp8_nvfp4_mega_moe(y, L1, L2, buf, cumulative_local_expert_recv_stats=stats,
                                     activation_clamp=args.activation_clamp, backend=backend)
    sync()
    dt = (time.perf_counter() - t0) / max(iters, 1)
    log(f'fp8_nvfp4_mega_moe: y {tuple(y.shape)} bf16, {dt * 1e3:.3f} ms/iter over {iters} iter(s)')
    log(f'rank {rank} local expert recv stats (cumulative): {stats.tolist()}')

    if check:
        t0 = time.perf_counter()
        y_ref = deep_gemm.reference_mega_moe(x, x_sf, topk_idx, topk_weights, _Lazy(l1), L1.alpha, _Lazy(l2),
                                             L2.alpha, group=group, activation_clamp=args.activation_clamp,
                                             num_experts=args.experts)
        rel = rel_error_over_ranks(y, y_ref, group, device)
        log(f'rel. error vs reference_mega_moe: {rel:.3e} (reference took {time.perf_counter() - t0:.2f} s)')
    if group is not None:
        import torch.distributed as dist
        dist.destroy_process_group()


if __name__ == '__main__':
    main()
