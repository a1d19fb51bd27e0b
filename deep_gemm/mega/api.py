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
import warnings
from typing import Optional, Tuple

import torch

from ..reference import reference_mega_moe
from ..utils.validation import check_activation_clamp, check_tensor
from .buffer import SymmBuffer

__all__ = ['fp8_nvfp4_mega_moe', 'fp8_fp4_mega_moe', 'BACKENDS', 'select_backend']

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


def _check_weights(name: str, w, fmt: str, n: int, k: int, num_experts: int, num_alpha: int):
    for attr in ('fmt', 'n', 'k', 'num_experts', 'alpha', 'dequantize'):
        if not hasattr(w, attr):
            raise TypeError(f'{name}: expected transformed expert weights (deep_gemm.mega.weights.ExpertWeights), '
                            f'got {type(w).__name__} without `{attr}`')
    if w.fmt != fmt:
        raise ValueError(f'{name}: expected {fmt} weights, got fmt={w.fmt!r}')
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


def _bad_alpha(alpha: torch.Tensor) -> torch.Tensor:
    return (~(torch.isfinite(alpha) & (alpha > 0))).any().long().to(alpha.device)


def _check_values(buffer: SymmBuffer, t: int, names, l1, l2) -> None:
    """Expert ids in range, finite routing weights and scales, finite positive alphas, read back from
    the device at once (one host sync per call instead of one per check).  NaN inside the FP8 tokens
    ``x`` is data, not checked: it stays in that token's output row."""
    l1_name, l2_name, buf_name = names
    checks = [_bad_alpha(l1.alpha).to(buffer.device), _bad_alpha(l2.alpha).to(buffer.device)]
    if t:
        idx = buffer.topk_idx[:t]
        checks += [idx.min(), idx.max(), (~torch.isfinite(buffer.topk_weights[:t])).any().long(),
                   (~torch.isfinite(buffer.x_sf[:t])).any().long()]
    vals = torch.stack(checks).tolist()
    if vals[0]:
        raise ValueError(f'{l1_name}.alpha: global scales must be finite and positive')
    if vals[1]:
        raise ValueError(f'{l2_name}.alpha: global scales must be finite and positive')
    if not t:
        return
    lo, hi, bad_w, bad_sf = vals[2:]
    if lo < -1 or hi >= buffer.num_experts:
        raise ValueError(f'{buf_name}.topk_idx: expert id {lo if lo < -1 else hi} out of range: ids must be -1 '
                         f'(masked) or in [0, {buffer.num_experts})')
    if bad_w:
        raise ValueError(f'{buf_name}.topk_weights: must be finite')
    if bad_sf:
        raise ValueError(f'{buf_name}.x_sf: must be finite')


def _validate(y, l1, l2, buffer, stats, activation_clamp, fast_math, backend, fmt: str,
              names=('l1', 'l2', 'buffer')) -> int:
    l1_name, l2_name, buf_name = names
    if not isinstance(buffer, SymmBuffer):
        raise TypeError(f'{buf_name}: expected a SymmBuffer from get_symm_buffer_for_mega_moe, got {type(buffer).__name__}')
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
    # Value checks read the device (a host sync), which a CUDA graph capture forbids: while capturing
    # they are skipped, and the kernels ignore ids outside [0, num_experts) (treated as masked).
    # Ranks emulated on one GPU skip them too: a host sync (or an allocation) while another rank's
    # barrier kernel waits for this rank's launches would stall those launches until the timeout.
    if not _capturing(buffer.device) and not buffer.emulated:
        _check_values(buffer, t, names, l1, l2)
    return t


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
    if backend == 'reference':
        if buffer.num_ranks > 1 and buffer.group is None:
            raise ValueError(f'buffer: an emulated {buffer.num_ranks}-rank group has no process group; '
                             f'the reference backend needs one')
        out = reference_mega_moe(buffer.x[:t], buffer.x_sf[:t], buffer.topk_idx[:t], buffer.topk_weights[:t],
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
    mod.run(y, l1, l2, buffer, cumulative_local_expert_recv_stats=stats,
            activation_clamp=activation_clamp, fast_math=fast_math)
    return y


def fp8_nvfp4_mega_moe(y: torch.Tensor, l1, l2, buffer: SymmBuffer,
                       cumulative_local_expert_recv_stats: Optional[torch.Tensor] = None,
                       activation_clamp: Optional[float] = None, fast_math: bool = True,
                       backend: str = 'auto') -> torch.Tensor:
    """FP8 activations x NVFP4 weights Mega MoE layer, written into ``y`` (bf16 ``[T, hidden]``).

    ``T = y.shape[0]``; the inputs are ``buffer.x[:T]``, ``buffer.x_sf[:T]``, ``buffer.topk_idx[:T]``,
    ``buffer.topk_weights[:T]``.  ``l1``/``l2`` come from ``transform_nvfp4_weights_for_mega_moe``
    (this rank's ``num_experts / num_ranks`` experts).  ``cumulative_local_expert_recv_stats`` (int32
    ``[E_local]``) is incremented by the (token, slot) pairs each local expert received.
    ``T`` is at most ``buffer.num_max_tokens_per_rank``; the GPU backends run the call as waves of at
    most ``buffer.num_max_tokens_per_wave`` tokens (same result; the reference backend needs none).
    Semantics: ``docs/design.md``.  Returns ``y``.
    """
    t = _validate(y, l1, l2, buffer, cumulative_local_expert_recv_stats, activation_clamp, fast_math, backend,
                  'nvfp4')
    return _run(y, l1, l2, buffer, cumulative_local_expert_recv_stats, activation_clamp, fast_math, backend, t)


def fp8_fp4_mega_moe(y: torch.Tensor, l1_weights, l2_weights, sym_buffer: SymmBuffer,
                     cumulative_local_expert_recv_stats: Optional[torch.Tensor] = None,
                     recipe: Tuple[int, int, int] = (1, 1, 32), activation: str = 'swiglu',
                     activation_clamp: Optional[float] = None, fast_math: bool = True,
                     backend: str = 'auto') -> torch.Tensor:
    """Upstream's FP8 x MXFP4 Mega MoE (weights from ``transform_weights_for_mega_moe``).

    Only ``recipe=(1, 1, 32)`` (per-token activations, per-32 scales) and ``activation='swiglu'``
    are supported.  Otherwise identical to :func:`fp8_nvfp4_mega_moe` (alpha is 1 for MXFP4).
    """
    if not isinstance(recipe, (tuple, list)) or tuple(recipe) != (1, 1, 32):
        raise ValueError(f'recipe: only (1, 1, 32) is supported, got {recipe!r}')
    if activation != 'swiglu':
        raise ValueError(f"activation: only 'swiglu' is supported, got {activation!r}")
    t = _validate(y, l1_weights, l2_weights, sym_buffer, cumulative_local_expert_recv_stats, activation_clamp,
                  fast_math, backend, 'mxfp4', names=('l1_weights', 'l2_weights', 'sym_buffer'))
    return _run(y, l1_weights, l2_weights, sym_buffer, cumulative_local_expert_recv_stats, activation_clamp,
                fast_math, backend, t)
