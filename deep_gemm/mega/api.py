"""Python entry points of the Mega MoE layer (upstream DeepGEMM names).

Both functions validate every argument before doing any work (``TypeError`` for a wrong type or
dtype, ``ValueError`` for shapes, devices, layouts and ranges; the message names the argument),
then run one backend:

* ``'reference'`` -- :func:`deep_gemm.reference.reference_mega_moe` on ``l1.dequantize()`` /
  ``l1.alpha`` (and ``l2``), through ``buffer.group``;
* ``'sm90'`` / ``'sm100'`` -- ``deep_gemm.mega.sm90.run`` / ``deep_gemm.mega.sm100.run``;
* ``'auto'`` -- ``sm90`` on Hopper, ``sm100`` on Blackwell (when that module is present),
  else ``reference``.
"""
from __future__ import annotations

import importlib
import math
import warnings
from typing import Optional, Tuple

import torch

from ..reference import reference_mega_moe
from ..utils.math import unpack_ue8m0_from_int
from ..utils.validation import bad_ue4m3_bytes, check_activation_clamp, check_tensor
from .buffer import SymmBuffer

__all__ = ['fp8_nvfp4_mega_moe', 'fp8_fp4_mega_moe', 'bf16_mega_moe', 'fp4_fp4_mega_moe', 'BACKENDS', 'select_backend']

BACKENDS = ('auto', 'reference', 'sm90', 'sm100')


class _LazyDequant:
    """``w[e]`` dequantizes one expert at a time (so the reference never holds all experts in float)."""

    def __init__(self, weights):
        self.weights = weights

    def __len__(self) -> int:
        return self.weights.num_experts

    def __getitem__(self, e: int) -> torch.Tensor:
        return self.weights.dequantize([e])[0]


def _backend_module(name: str):
    try:
        return importlib.import_module(f'deep_gemm.mega.{name}')
    except ModuleNotFoundError as exc:
        if exc.name in (f'deep_gemm.mega.{name}',):
            return None
        raise


def select_backend(backend: str, device: torch.device) -> str:
    """Resolve ``'auto'``: sm90 on a Hopper GPU, sm100 on Blackwell (if built), else reference."""
    if backend not in BACKENDS:
        raise ValueError(f'backend: expected one of {BACKENDS}, got {backend!r}')
    if backend != 'auto':
        return backend
    if device.type != 'cuda':
        return 'reference'
    major, _ = torch.cuda.get_device_capability(device)
    arch = {9: 'sm90', 10: 'sm100'}.get(major)
    if arch is None:
        return 'reference'
    if _backend_module(arch) is None:
        warnings.warn(f"backend='auto': deep_gemm.mega.{arch} is not available; using the reference backend")
        return 'reference'
    return arch


def _check_weights(name: str, w, fmt, n: int, k: int, num_experts: int, num_alpha: int):
    for attr in ('fmt', 'n', 'k', 'num_experts', 'alpha', 'dequantize'):
        if not hasattr(w, attr):
            raise TypeError(f'{name}: expected transformed expert weights (deep_gemm.weights.ExpertWeights, from '
                            f'transform_weights_for_mega_moe), got {type(w).__name__} without `{attr}`')
    fmts = (fmt,) if isinstance(fmt, str) else tuple(fmt)
    if w.fmt not in fmts:
        raise ValueError(f'{name}: expected {" or ".join(fmts)} weights, got fmt={w.fmt!r}')
    if w.n != n:
        raise ValueError(f'{name}: n = {w.n}, expected {n}')
    if w.k != k:
        raise ValueError(f'{name}: k = {w.k}, expected {k}')
    if w.num_experts != num_experts:
        raise ValueError(f'{name}: holds {w.num_experts} experts, expected {num_experts} local experts '
                         f'(num_experts / num_ranks)')
    check_tensor(f'{name}.alpha', w.alpha, dtype=torch.float32, shape=(num_experts, num_alpha), contiguous=False)


def _capturing(device: torch.device) -> bool:
    return device.type == 'cuda' and torch.cuda.is_current_stream_capturing()


def _bad_scale_values(buffer: SymmBuffer, t: int) -> torch.Tensor:
    """1 if any activation scale of the first ``t`` tokens is NaN / Inf (float32 scales), the UE8M0
    NaN byte 0xFF (FP8 kinds' packed words) or a UE4M3 NaN (NVFP4 activations)."""
    sf = buffer.x_sf
    if sf is None:
        return torch.zeros((), dtype=torch.int64, device=buffer.device)
    sf = sf[:t]
    if sf.is_floating_point():
        return (~torch.isfinite(sf)).any().long()
    b = sf.contiguous().view(torch.uint8)
    bad = (b == 0xFF) if buffer.mma_type in ('fp8xfp4', 'fp8xfp8') else bad_ue4m3_bytes(b)
    return bad.any().long()


def _check_values(buffer: SymmBuffer, t: int, buf_name: str, scales) -> None:
    """Expert ids in range, finite routing weights and activation scales, finite positive alphas /
    global scales (``scales``: ``(name, tensor)`` pairs), read back from the device at once (one host
    sync per call instead of one per check).  NaN inside the tokens ``x`` is data, not checked: it
    stays in that token's output row."""
    checks, msgs = [], []
    for name, v in scales:
        if v is not None:
            checks.append((~(torch.isfinite(v) & (v > 0))).any().long().to(buffer.device))
            msgs.append(f'{name}: global scales must be finite and positive')
    if t:
        idx = buffer.topk_idx[:t]
        checks += [(~torch.isfinite(buffer.topk_weights[:t])).any().long(), _bad_scale_values(buffer, t)]
        msgs += [f'{buf_name}.topk_weights: must be finite', f'{buf_name}.x_sf: activation scales must be finite']
        checks += [idx.min(), idx.max()]
    vals = torch.stack(checks).tolist() if checks else []
    if t:
        lo, hi = vals[-2:]
        if lo < -1 or hi >= buffer.num_experts:
            raise ValueError(f'{buf_name}.topk_idx: expert id {lo if lo < -1 else hi} out of range: ids must be -1 '
                             f'(masked) or in [0, {buffer.num_experts})')
    for bad, msg in zip(vals, msgs):
        if bad:
            raise ValueError(msg)


def _check_buffer(buffer, buf_name: str, mma_types: Tuple[str, ...], entry: str) -> None:
    if not isinstance(buffer, SymmBuffer):
        raise TypeError(f'{buf_name}: expected a SymmBuffer from get_symm_buffer_for_mega_moe, got {type(buffer).__name__}')
    if buffer.mma_type not in mma_types:
        want = ' or '.join(repr(m) for m in mma_types)
        raise ValueError(f'{buf_name}: {entry} requires a symmetric buffer of mma_type {want}, got '
                         f'{buffer.mma_type!r} (get_symm_buffer_for_mega_moe(..., mma_type=...))')
    if buffer.destroyed:
        raise ValueError(f'{buf_name}: this buffer was destroyed')


def _validate(y, l1, l2, buffer, stats, activation_clamp, fast_math, backend, fmt,
              names=('l1', 'l2', 'buffer'), mma_types=('fp8xnvfp4',), entry='fp8_nvfp4_mega_moe') -> int:
    l1_name, l2_name, buf_name = names
    _check_buffer(buffer, buf_name, mma_types, entry)
    check_tensor('y', y, dtype=torch.bfloat16, ndim=2, shape=(None, buffer.hidden), device=buffer.device)
    t = y.shape[0]
    if t > buffer.num_max_tokens_per_rank:
        raise ValueError(f'y: too many tokens: {t} > num_max_tokens_per_rank = {buffer.num_max_tokens_per_rank}')
    e_l = buffer.num_experts_per_rank
    if stats is not None:
        check_tensor('cumulative_local_expert_recv_stats', stats, dtype=torch.int32, shape=(e_l,),
                     device=buffer.device)
    check_activation_clamp(activation_clamp)
    if not isinstance(fast_math, bool):
        raise TypeError(f'fast_math: expected a bool, got {type(fast_math).__name__}')
    if backend not in BACKENDS:
        raise ValueError(f'backend: expected one of {BACKENDS}, got {backend!r}')
    _check_weights(l1_name, l1, fmt, 2 * buffer.intermediate_hidden, buffer.hidden, e_l, 2)
    _check_weights(l2_name, l2, fmt, buffer.hidden, buffer.intermediate_hidden, e_l, 1)
    if l1.fmt != l2.fmt:
        raise ValueError(f'{l1_name}: {l1.fmt} weights, {l2_name} are {l2.fmt}: both projections must have one format')
    # Value checks read the device (a host sync), which a CUDA graph capture forbids: while capturing
    # they are skipped, and the kernels ignore ids outside [0, num_experts) (treated as masked).
    # Ranks emulated on one GPU skip them too: a host sync (or an allocation) while another rank's
    # barrier kernel waits for this rank's launches would stall those launches until the timeout.
    if not _capturing(buffer.device) and not buffer.emulated:
        _check_values(buffer, t, buf_name, [(f'{l1_name}.alpha', l1.alpha), (f'{l2_name}.alpha', l2.alpha)])
    return t


def _fp32_scales(buffer: SymmBuffer, t: int) -> torch.Tensor:
    """The float32 per-32 activation scales of the first ``t`` tokens, whatever the FP8 kind."""
    if buffer.mma_type in ('fp8xfp4', 'fp8xfp8'):
        return unpack_ue8m0_from_int(buffer.x_sf[:t])
    return buffer.x_sf[:t]


def _stage_packed_scales(buffer: SymmBuffer, t: int) -> None:
    """Upstream's FP8 kinds hand in packed UE8M0 words; the kernels read float32 per-32 scales from
    the buffer's ``x_sf`` region (peers read it too, after barrier 0), so unpack them there first."""
    if buffer.mma_type in ('fp8xfp4', 'fp8xfp8') and t:
        buffer.views['x_sf'][:t].copy_(unpack_ue8m0_from_int(buffer.x_sf[:t]))


def _run(y, l1, l2, buffer: SymmBuffer, stats, activation_clamp, fast_math, backend, t: int):
    # A timed-out cross-rank wait of an earlier call (the record is host memory: no sync) fails
    # every later call on this buffer: its ranks are out of step.
    buffer.check_comm(synchronize=False)
    requested, backend = backend, select_backend(backend, buffer.device)
    if requested == 'auto' and backend != 'reference' and buffer.num_ranks > 1 and \
            not getattr(_backend_module(backend), 'MULTI_RANK', False):
        warnings.warn(f"backend='auto': deep_gemm.mega.{backend} runs one rank only; using the reference backend "
                      f"for this {buffer.num_ranks}-rank buffer")
        backend = 'reference'
    if requested == 'auto' and backend != 'reference':
        # a backend module may decline a call it has no kernel for (deep_gemm.mega.sm100.unsupported)
        why = getattr(_backend_module(backend), 'unsupported', lambda *_: None)(buffer, l1, l2)
        if backend == 'sm90' and _is_sm100_weights(l1):
            why = f'{l1.fmt} weights in the sm100 layout (deep_gemm.weights_sm100) have no sm90 kernel'
        if why:
            warnings.warn(f"backend='auto': {why}; using the reference backend")
            backend = 'reference'
    if backend == 'reference':
        if buffer.num_ranks > 1 and buffer.group is None:
            raise ValueError(f'buffer: an emulated {buffer.num_ranks}-rank group has no process group; '
                             f'the reference backend needs one')
        out = reference_mega_moe(buffer.x[:t], _fp32_scales(buffer, t), buffer.topk_idx[:t], buffer.topk_weights[:t],
                                 _LazyDequant(l1), l1.alpha, _LazyDequant(l2), l2.alpha, group=buffer.group,
                                 activation_clamp=activation_clamp, num_experts=buffer.num_experts,
                                 cumulative_local_expert_recv_stats=stats)
        y.copy_(out)
        return y
    if buffer.device.type != 'cuda':
        raise ValueError(f'buffer: backend {backend!r} needs a CUDA buffer, got one on {buffer.device}')
    mod = _backend_module(backend)
    if mod is None or not hasattr(mod, 'run'):
        raise NotImplementedError(f"backend={backend!r}: deep_gemm.mega.{backend} is not available in this build; "
                                  f"use backend='reference' (or 'auto')")
    _stage_packed_scales(buffer, t)
    mod.run(y, l1, l2, buffer, cumulative_local_expert_recv_stats=stats,
            activation_clamp=activation_clamp, fast_math=fast_math)
    return y


def fp8_nvfp4_mega_moe(y: torch.Tensor, l1, l2, buffer: SymmBuffer,
                       cumulative_local_expert_recv_stats: Optional[torch.Tensor] = None,
                       activation_clamp: Optional[float] = None, fast_math: bool = True,
                       backend: str = 'auto') -> torch.Tensor:
    """FP8 activations x NVFP4 weights Mega MoE layer (exact products), written into ``y``.

    Inputs, written by the caller into the buffer's views before the call (``T = y.shape[0]``):

    * ``buffer.x[:T]``: float8_e4m3fn ``[T, hidden]``, this rank's tokens;
    * ``buffer.x_sf[:T]``: on an ``mma_type='fp8xnvfp4'`` buffer float32 ``[T, hidden / 32]``, one
      scale per 32 channels (``deep_gemm.utils.per_token_cast_to_fp8(x, False, 32)`` makes both); on
      upstream's ``'fp8xfp4'`` buffer int32 ``[T, hidden / 128]``, packed power-of-two scales
      (``per_token_cast_to_fp8(x, True, 32, True)``); ``buffer.copy_inputs`` takes either;
    * ``buffer.topk_idx[:T]``: int64 ``[T, num_topk]``, global expert ids, -1 = masked slot;
    * ``buffer.topk_weights[:T]``: float32 ``[T, num_topk]``, routing weights.

    Args:
        y: bfloat16 ``[T, hidden]`` on the buffer's device, ``T <= buffer.num_max_tokens_per_rank``
            (``T`` may differ per rank, 0 included); overwritten with the layer's output.
        l1, l2: from :func:`~deep_gemm.transform_nvfp4_weights_for_mega_moe`, this rank's
            ``num_experts / num_ranks`` experts (L1 = gate+up ``[E_l, 2 I, hidden]``, L2 = down);
            MXFP4 weights (``transform_weights_for_mega_moe``) run the same exact path, with alpha 1.
            The sm100 backend takes ``deep_gemm.weights_sm100.to_sm100_exact`` weights ('nvfp4_exact').
        buffer: a :class:`SymmBuffer` from :func:`get_symm_buffer_for_mega_moe`.
        cumulative_local_expert_recv_stats: None or int32 ``[E_l]``, incremented by the (token, slot)
            pairs each local expert received from all ranks.
        activation_clamp: None or ``c >= 0`` (inf: none): ``up = clamp(up, -c, c)``, ``gate = min(gate, c)``.
        fast_math: accepted for upstream compatibility; every backend computes the same result.
        backend: ``'auto'`` (sm90 on Hopper, sm100 on Blackwell when built, else reference),
            ``'reference'`` (float64 PyTorch, any device, any ``torch.distributed`` group),
            ``'sm90'`` or ``'sm100'``.

    Semantics (``docs/design.md``): per slot ``h = bf16(silu(gate) * up * topk_weight)``,
    ``o = bf16(h @ W2^T * alpha2)``; ``y`` = the slots' ``o`` summed in slot order in float32.
    The GPU backends run a long call as waves of at most ``buffer.num_max_tokens_per_wave``
    tokens (same result).  NaN inside ``x`` is data: it reaches only that token's row of ``y``.

    Raises:
        TypeError: an argument of the wrong type or dtype (the message names it).
        ValueError: a wrong shape, device, layout or value: expert ids outside ``[-1, num_experts)``,
            non-finite routing weights or scales, non-positive or non-finite alphas, weights of
            another format or size, ``T`` above the buffer's maximum.  Checked before any kernel runs
            (the value checks are skipped while a CUDA graph is being captured).
        MegaMoETimeoutError: a cross-rank wait of an earlier call on this buffer timed out.
        NotImplementedError: ``backend='sm100'`` where that backend is not built.

    Returns ``y``.
    """
    t = _validate(y, l1, l2, buffer, cumulative_local_expert_recv_stats, activation_clamp, fast_math, backend,
                  ('nvfp4', 'mxfp4', 'nvfp4_exact'), mma_types=('fp8xnvfp4', 'fp8xfp4'))
    return _run(y, l1, l2, buffer, cumulative_local_expert_recv_stats, activation_clamp, fast_math, backend, t)


# ------------------------------------------------------------------------ upstream's entry points
#: The weight format each upstream buffer kind computes with, and the reference recipe of its numerics.
_KIND_FORMAT = {'fp8xfp4': 'mxfp4', 'fp8xfp8': 'fp8', 'bf16xbf16': 'bf16', 'fp4xfp4': 'nvfp4'}
_KIND_RECIPE = {'fp8xfp4': 'fp8xfp4', 'fp8xfp8': 'fp8xfp4', 'bf16xbf16': 'bf16xbf16', 'fp4xfp4': 'fp4xfp4'}
_warned_no_kernel = set()


def _activations(buffer: SymmBuffer, t: int) -> torch.Tensor:
    """The exact values of the first ``t`` tokens of an upstream-kind buffer, float32 ``[t, H]``
    (E4M3 x 2^k, BF16 and E2M1 x UE4M3 are all exact in float32)."""
    from ..utils.quant import e2m1_to_float, unpack_e2m1
    x = buffer.x[:t]
    if buffer.mma_type == 'bf16xbf16':
        return x.float()
    if buffer.mma_type == 'fp4xfp4':
        sf = buffer.x_sf[:t].contiguous().view(torch.uint8).view(torch.float8_e4m3fn).float()
        return e2m1_to_float(unpack_e2m1(x)) * sf.repeat_interleave(16, dim=1)
    return x.float() * unpack_ue8m0_from_int(buffer.x_sf[:t]).repeat_interleave(32, dim=1)


def _check_shared(buffer: SymmBuffer, shared_l1, shared_l2, fmts) -> None:
    if (shared_l1 is None) != (shared_l2 is None):
        raise ValueError('shared_l1_weights: shared L1 and L2 weights must be provided together')
    want = buffer.num_shared_experts
    if shared_l1 is None:
        if want:
            raise ValueError(f'shared_l1_weights: the buffer was made for {want} shared expert(s); pass '
                             f'shared_l1_weights and shared_l2_weights')
        return
    h, i = buffer.hidden, buffer.intermediate_hidden
    s_i = getattr(shared_l2, 'k', None)
    if not isinstance(s_i, int) or s_i % i or s_i // i != want:
        raise ValueError(f'shared_l2_weights: intermediate {s_i} is not num_shared_experts ({want}) x '
                         f'intermediate_hidden ({i}) of the buffer')
    _check_weights('shared_l1_weights', shared_l1, fmts, 2 * s_i, h, 1, 2)
    _check_weights('shared_l2_weights', shared_l2, fmts, h, s_i, 1, 1)


def _check_vector(name: str, v, shape, device) -> None:
    if v is not None:
        check_tensor(name, v, dtype=torch.float32, shape=shape, device=device)


def _upstream_backend(backend: str, buffer: SymmBuffer, entry: str, sm90_kernel: bool = False,
                      sm100_kernel: bool = False) -> str:
    chosen = select_backend(backend, buffer.device)
    if chosen == 'reference' or (chosen == 'sm90' and sm90_kernel) or (chosen == 'sm100' and sm100_kernel):
        return chosen
    if backend == 'auto':  # no GPU kernel of these numerics yet: the reference runs them on the device
        if (entry, chosen) not in _warned_no_kernel:
            _warned_no_kernel.add((entry, chosen))
            warnings.warn(f"backend='auto': {entry} has no {chosen} kernel yet; running the reference backend "
                          f"(float64 PyTorch on {buffer.device})")
        return 'reference'
    raise NotImplementedError(f"backend={backend!r}: {entry} (mma_type={buffer.mma_type!r}) has no {chosen} "
                              f"kernel in this build; use backend='reference' or 'auto'")


def _sm90_runs(buffer: SymmBuffer, l1, shared_l1) -> bool:
    """Whether sm90 has kernels for this call: MXFP4 / BF16 / NVFP4 routed weights of the buffer's kind,
    and BF16 shared experts or none (FP8 weights, routed or shared, run the reference)."""
    routed = _backend_module('sm90').UPSTREAM_WEIGHTS.get(buffer.mma_type)
    return routed == l1.fmt and (shared_l1 is None or shared_l1.fmt == 'bf16') and \
        not _is_sm100_weights(l1)


def _is_sm100_weights(w) -> bool:
    from ..weights_sm100 import Sm100ExpertWeights
    return isinstance(w, Sm100ExpertWeights)


def _sm100_runs(buffer: SymmBuffer, l1, shared_l1, routed_scaling_factor: float) -> bool:
    """Whether the sm100 fused kernel takes this call (deep_gemm.mega.sm100.run_fused): sm100-layout
    weights (deep_gemm.weights_sm100) of the buffer's recipe, no shared experts, no routed scaling."""
    mod = _backend_module('sm100')
    return mod is not None and _is_sm100_weights(l1) and mod.RECIPES.get(buffer.mma_type) == l1.fmt and \
        shared_l1 is None and float(routed_scaling_factor) == 1.0


def _shared_input(buffer: SymmBuffer, t: int, x_bf16) -> torch.Tensor:
    """The shared experts' BF16 input ``[t, H]``: fp4xfp4 ``x_bf16``, bf16xbf16 the tokens themselves,
    the FP8 kinds the tokens x their (staged float32) scales, exact."""
    if buffer.mma_type == 'fp4xfp4':
        return x_bf16[:t]
    if buffer.mma_type == 'bf16xbf16':
        return buffer.x[:t]
    from ..gemm import fp8_to_bf16_tokens
    return fp8_to_bf16_tokens(buffer.x[:t], buffer.views['x_sf'][:t])


def _upstream_call(entry: str, y, l1, l2, buffer, shared_l1, shared_l2, stats, activation, activation_clamp,
                   fast_math, backend, mma_types, shared_fmts, *, x_bf16=None, l1_alphas=None, l2_alphas=None,
                   a2_scales=None, routed_scaling_factor: float = 1.0):
    _check_buffer(buffer, 'sym_buffer', mma_types, entry)
    if activation != buffer.activation:
        raise ValueError(f'activation: {activation!r} does not match the buffer\'s {buffer.activation!r}')
    t = _validate(y, l1, l2, buffer, stats, activation_clamp, fast_math, backend, _KIND_FORMAT[buffer.mma_type],
                  names=('l1_weights', 'l2_weights', 'sym_buffer'), mma_types=mma_types, entry=entry)
    _check_shared(buffer, shared_l1, shared_l2, shared_fmts)
    e_l = buffer.num_experts_per_rank
    _check_vector('l1_alphas', l1_alphas, (e_l, 2), buffer.device)
    _check_vector('l2_alphas', l2_alphas, (e_l,), buffer.device)
    _check_vector('a2_scales', a2_scales, (e_l,), buffer.device)
    if isinstance(routed_scaling_factor, bool) or not isinstance(routed_scaling_factor, (int, float)) or \
            not math.isfinite(routed_scaling_factor):
        raise ValueError(f'routed_scaling_factor: expected a finite number, got {routed_scaling_factor!r}')
    if x_bf16 is not None:
        check_tensor('x_bf16', x_bf16, dtype=torch.bfloat16, ndim=2, device=buffer.device)
        if x_bf16.shape[0] < t or x_bf16.shape[1] != buffer.hidden:
            raise ValueError(f'x_bf16: expected [>= {t}, {buffer.hidden}] (the output tokens, the buffer\'s hidden), '
                             f'got {tuple(x_bf16.shape)}')
    if not _capturing(buffer.device) and not buffer.emulated:
        _check_values(buffer, 0, 'sym_buffer', [('l1_alphas', l1_alphas), ('l2_alphas', l2_alphas),
                                                ('a2_scales', a2_scales)])
    buffer.check_comm(synchronize=False)
    chosen = _upstream_backend(backend, buffer, entry, _sm90_runs(buffer, l1, shared_l1),
                               _sm100_runs(buffer, l1, shared_l1, routed_scaling_factor))
    if chosen == 'sm100':
        _backend_module('sm100').run_fused(y, l1, l2, buffer, stats, activation_clamp, fast_math, l1_alphas, l2_alphas,
                                           a2_scales, float(routed_scaling_factor))
        return y
    if chosen == 'sm90':
        if buffer.device.type != 'cuda':
            raise ValueError(f"sym_buffer: backend 'sm90' needs a CUDA buffer, got one on {buffer.device}")
        _stage_packed_scales(buffer, t)
        sm90 = importlib.import_module('deep_gemm.mega.sm90')
        recipe = sm90.upstream_recipe(buffer.mma_type, buffer.num_experts_per_rank, buffer.device, l1_alphas,
                                      l2_alphas, a2_scales, float(routed_scaling_factor))
        x_shared = None
        if shared_l1 is not None:
            x_shared = _shared_input(buffer, t, x_bf16)
        sm90.run_upstream(y, l1, l2, buffer, recipe, stats, activation_clamp, fast_math, shared_l1, shared_l2, x_shared)
        return y
    if buffer.num_ranks > 1 and buffer.group is None:
        raise ValueError(f'sym_buffer: an emulated {buffer.num_ranks}-rank group has no process group; '
                         f'the reference backend needs one')
    from ..reference_recipes import reference_recipe_moe
    xv = _activations(buffer, t)
    shared = {}
    if shared_l1 is not None:
        shared = dict(shared_w1=shared_l1.dequantize([0])[0].to(buffer.device),
                      shared_w2=shared_l2.dequantize([0])[0].to(buffer.device),
                      x_shared=x_bf16[:t].float() if x_bf16 is not None else xv)
    out = reference_recipe_moe(_KIND_RECIPE[buffer.mma_type], xv, buffer.topk_idx[:t], buffer.topk_weights[:t],
                               _LazyDequant(l1), _LazyDequant(l2), buffer.group, num_experts=buffer.num_experts,
                               l1_alphas=l1_alphas, l2_alphas=l2_alphas, a2_scales=a2_scales,
                               routed_scaling_factor=float(routed_scaling_factor),
                               activation_clamp=activation_clamp, cumulative_local_expert_recv_stats=stats, **shared)
    y.copy_(out)
    return y


def _check_recipe(recipe, want) -> None:
    if not isinstance(recipe, (tuple, list)) or tuple(recipe) != want:
        raise ValueError(f'recipe: only {want} is supported, got {recipe!r}')


def fp8_fp4_mega_moe(y: torch.Tensor, l1_weights, l2_weights, sym_buffer: SymmBuffer,
                     shared_l1_weights=None, shared_l2_weights=None,
                     cumulative_local_expert_recv_stats: Optional[torch.Tensor] = None,
                     recipe: Tuple[int, int, int] = (1, 1, 32), activation: str = 'swiglu',
                     activation_clamp: Optional[float] = None, fast_math: bool = True,
                     situ_beta: Optional[float] = None, situ_linear_beta: Optional[float] = None, *,
                     backend: str = 'auto') -> torch.Tensor:
    """Upstream's FP8 x MXFP4 (``mma_type='fp8xfp4'``) or FP8 x FP8 (``'fp8xfp8'``) Mega MoE layer.

    Upstream's signature and numerics (``docs/design.md``, "Upstream entry points"): tokens
    ``sym_buffer.x`` FP8 with packed UE8M0 ``sym_buffer.x_sf`` (one power of two per 32 channels);
    weights from :func:`~deep_gemm.transform_weights_for_mega_moe`; gate and up rounded to BF16, the
    routing weight applied before L2, the L2 input re-quantized to FP8 E4M3 with one power-of-two
    scale per 32 channels; optional shared experts (``shared_l1_weights`` / ``shared_l2_weights``,
    FP8 or BF16) added last in the combine.  ``recipe`` must be ``(1, 1, 32)``, ``activation``
    ``'swiglu'`` (``situ_*`` must stay None).  ``backend`` (ours, keyword-only): on Hopper, MXFP4 weights
    with BF16 shared experts or none run sm90's fused kernel (``DG_MEGA_MOE_FUSED=0``: the kernel
    sequence; ``sm90.run_upstream``, the same bits either way); FP8 weights
    (routed or shared) run the reference backend for now (``'auto'`` uses it, with a warning, on a GPU).

    Raises ValueError for a buffer of another ``mma_type`` (and every bad argument, naming it),
    TypeError for wrong types, MegaMoETimeoutError after a timed-out wait, NotImplementedError for a
    GPU backend asked for by name.  Returns ``y``.
    """
    _check_buffer(sym_buffer, 'sym_buffer', ('fp8xfp4', 'fp8xfp8'), 'fp8_fp4_mega_moe')
    _check_recipe(recipe, (1, 1, 32))
    if situ_beta is not None or situ_linear_beta is not None:
        raise ValueError("situ_beta: the 'situ' activation is not supported (activation='swiglu' only)")
    return _upstream_call('fp8_fp4_mega_moe', y, l1_weights, l2_weights, sym_buffer, shared_l1_weights,
                          shared_l2_weights, cumulative_local_expert_recv_stats, activation, activation_clamp,
                          fast_math, backend, ('fp8xfp4', 'fp8xfp8'), ('fp8', 'bf16'))


def bf16_mega_moe(y: torch.Tensor, l1_weights, l2_weights, sym_buffer: SymmBuffer,
                  shared_l1_weights=None, shared_l2_weights=None,
                  cumulative_local_expert_recv_stats: Optional[torch.Tensor] = None,
                  activation: str = 'swiglu', activation_clamp: Optional[float] = None, fast_math: bool = True, *,
                  backend: str = 'auto') -> torch.Tensor:
    """Upstream's BF16 Mega MoE layer (``mma_type='bf16xbf16'``): BF16 tokens ``sym_buffer.x``, BF16
    weights from :func:`~deep_gemm.transform_weights_for_mega_moe`; gate and up rounded to BF16,
    ``h = bf16(silu(gate) * up * routing weight)``, ``o = bf16(h @ W2^T)``, optional BF16 shared experts
    added last.  Same errors as :func:`fp8_fp4_mega_moe`; ``backend``: on Hopper sm90's fused kernel or
    kernel sequence as :func:`fp8_fp4_mega_moe` (``sm90.run_upstream``: BF16 weights loaded in fragment
    order, no dequant).  Returns ``y``."""
    return _upstream_call('bf16_mega_moe', y, l1_weights, l2_weights, sym_buffer, shared_l1_weights,
                          shared_l2_weights, cumulative_local_expert_recv_stats, activation, activation_clamp,
                          fast_math, backend, ('bf16xbf16',), ('bf16',))


def fp4_fp4_mega_moe(y: torch.Tensor, l1_weights, l2_weights, sym_buffer: SymmBuffer,
                     shared_l1_weights=None, shared_l2_weights=None, x_bf16: Optional[torch.Tensor] = None,
                     cumulative_local_expert_recv_stats: Optional[torch.Tensor] = None,
                     recipe: Tuple[int, int, int] = (1, 1, 16), activation: str = 'swiglu',
                     activation_clamp: Optional[float] = None, fast_math: bool = True,
                     l1_alphas: Optional[torch.Tensor] = None, l2_alphas: Optional[torch.Tensor] = None,
                     a2_scales: Optional[torch.Tensor] = None, routed_scaling_factor: float = 1.0, *,
                     backend: str = 'auto') -> torch.Tensor:
    """Upstream's NVFP4 x NVFP4 (W4A4) Mega MoE layer (``mma_type='fp4xfp4'``).

    Tokens ``sym_buffer.x`` packed E2M1 with ``sym_buffer.x_sf`` UE4M3 per 16 (no global scale: fold
    the input scale into ``l1_alphas``); weights from :func:`~deep_gemm.transform_weights_for_mega_moe`
    (upstream's (int8, int32 packed UE4M3) tuples).  ``l1_alphas`` float32 ``[E_l, 2]`` (gate, up),
    ``l2_alphas`` and ``a2_scales`` float32 ``[E_l]`` (None = 1), all finite and positive.  Numerics
    (``docs/design.md``): ``gate, up = bf16(acc * alpha)``, the unweighted SwiGLU output quantized to
    NVFP4 with ``a2`` as its global scale, ``p = bf16(acc2 * l2_alpha * a2)``, the routing weight
    after L2 (``bf16(p * w)``), ``routed_scaling_factor`` after the routed sum, then the BF16 shared
    experts (on ``x_bf16``, required with them) added.  ``recipe`` must be ``(1, 1, 16)``.  Same errors
    as :func:`fp8_fp4_mega_moe`; ``backend``: on Hopper sm90's fused kernel or kernel sequence as
    :func:`fp8_fp4_mega_moe` (``sm90.run_upstream``: NVFP4 tokens cross NVLink as NVFP4 and become BF16
    exactly in the gather).  Returns ``y``.
    """
    if not isinstance(sym_buffer, SymmBuffer) or sym_buffer.mma_type != 'fp4xfp4':
        got = sym_buffer.mma_type if isinstance(sym_buffer, SymmBuffer) else type(sym_buffer).__name__
        raise ValueError(f'sym_buffer: NVFP4 MegaMoE requires an fp4xfp4 symmetric buffer, got {got!r}')
    _check_recipe(recipe, (1, 1, 16))
    if (shared_l1_weights is None) != (x_bf16 is None):
        raise ValueError('x_bf16: shared L1 weights, shared L2 weights, and x_bf16 must be provided together')
    return _upstream_call('fp4_fp4_mega_moe', y, l1_weights, l2_weights, sym_buffer, shared_l1_weights,
                          shared_l2_weights, cumulative_local_expert_recv_stats, activation, activation_clamp,
                          fast_math, backend, ('fp4xfp4',), ('bf16',), x_bf16=x_bf16, l1_alphas=l1_alphas,
                          l2_alphas=l2_alphas, a2_scales=a2_scales, routed_scaling_factor=routed_scaling_factor)
