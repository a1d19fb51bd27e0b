"""``MegaMoE``: one Mega MoE layer on one rank as a ``torch.nn.Module`` (buffer, weights, token casts).

::

    moe = deep_gemm.MegaMoE.from_checkpoint('/ckpt/DeepSeek-V3-NVFP4', layer=3, group=group)
    y = moe(hidden_states, topk_idx, topk_weights)      # bf16 [T, H] -> bf16 [T, H]

The module owns this rank's symmetric buffer (:func:`deep_gemm.get_symm_buffer_for_mega_moe`) and
its experts' transformed weights; ``forward`` quantizes the BF16 tokens into the buffer in the
recipe's format, copies the routing, and runs the entry point.  Everything in ``forward`` is device
work: with CUDA, nothing in it waits for the GPU while a CUDA graph is being captured (the casts'
and the entry points' value checks read the device, so they run only outside a capture, as the entry
points' own checks do).

Recipes (``recipe=``, the buffer's ``mma_type``), from a ModelOpt NVFP4 checkpoint
(:mod:`deep_gemm.checkpoint`):

* ``'fp8xnvfp4'`` (default) -- :func:`deep_gemm.fp8_nvfp4_mega_moe`: tokens cast to FP8 E4M3 with
  one float32 scale per 32 channels (``per_token_cast_to_fp8(x, False, 32)``); weights
  ``transform_nvfp4_weights_for_mega_moe`` of the checkpoint's ``weight`` / ``weight_scale`` /
  ``weight_scale_2`` (gate and up keep their own ``weight_scale_2`` as the two L1 alphas, exact, no
  folding).  ModelOpt's ``input_scale`` is **not used**: the FP8 activations carry their own block
  scales.  (W4A8: more accurate than the W4A4 the checkpoint was calibrated for.)
* ``'fp4xfp4'`` -- :func:`deep_gemm.fp4_fp4_mega_moe` (upstream's W4A4 numerics): ModelOpt's
  ``input_scale`` is the activations' NVFP4 **global** scale (``amax / (6 * 448)`` of the
  calibration inputs; a value is ``e2m1 * ue4m3 * input_scale``).  The buffer holds only E2M1 codes
  and UE4M3 block scales, so the tokens are cast with that global scale divided out,
  ``per_token_cast_to_nvfp4(x, global_scale=s_in)`` (block scale ``ue4m3(amax16 / 6 / s_in)``), and
  both global scales of the L1 product come back in ``l1_alphas = f32(s_in * weight_scale_2)``
  (gate, up: exact, one float32 product).  ``s_in`` is one value for the whole layer, the largest
  gate / up ``input_scale`` of all its experts (a token is cast once, before dispatch; ModelOpt's
  fused-experts export writes the same value for all of them).  ``a2_scales`` = down's
  ``input_scale`` (the L2 input's global scale, per expert), ``l2_alphas`` = down's
  ``weight_scale_2``.  Shared experts are not part of this module (the checkpoint's are NVFP4; the
  entry point takes BF16 ones): add them outside.  This recipe runs the reference backend for now
  (there is no GPU kernel of it yet), which is not CUDA-graph capturable.

The layer computes the routed experts only: routing (``topk_idx``, ``topk_weights``, e.g. the
output of a Hugging Face router, which already includes ``routed_scaling_factor`` for DeepSeek) is
the caller's.  Inference only: ``forward`` runs under ``torch.no_grad()``.
"""
from __future__ import annotations

import math
import os
from typing import Optional, Union

import torch

from .checkpoint import ExpertNaming, NVFP4MoELayer, load_nvfp4_moe_layer
from .mega.api import fp4_fp4_mega_moe, fp8_nvfp4_mega_moe
from .mega.buffer import get_symm_buffer_for_mega_moe
from .utils import per_token_cast_to_fp8, per_token_cast_to_nvfp4
from .utils.validation import check_activation_clamp, check_tensor
from .weights import ExpertWeights, transform_nvfp4_weights_for_mega_moe, transform_weights_for_mega_moe

__all__ = ['MegaMoE', 'RECIPES']

#: ``recipe`` -> the entry point it runs (and the buffer's ``mma_type``).
RECIPES = ('fp8xnvfp4', 'fp4xfp4')


def _capturing(device: torch.device) -> bool:
    return device.type == 'cuda' and torch.cuda.is_current_stream_capturing()


def _positive_float(name: str, v) -> float:
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(f'{name}: expected one value, got shape {tuple(v.shape)}')
        v = float(v.reshape(()))
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
        raise ValueError(f'{name}: expected a finite positive number, got {v!r}')
    return float(v)


class MegaMoE(torch.nn.Module):
    """One rank's Mega MoE layer: ``forward(hidden_states [T, H], topk_idx [T, k], topk_weights [T, k])
    -> bf16 [T, H]`` (module docstring: recipes and numerics).

    Build it with :meth:`from_checkpoint` (a ModelOpt NVFP4 checkpoint on disk), or from weights
    already transformed for the recipe's entry point:

    Args:
        l1, l2: :class:`deep_gemm.weights.ExpertWeights` of this rank's ``num_experts / ranks``
            experts (``transform_nvfp4_weights_for_mega_moe`` for ``'fp8xnvfp4'``,
            ``transform_weights_for_mega_moe`` of upstream's NVFP4 tuples for ``'fp4xfp4'``).
        group: the ``torch.distributed`` group of the expert-parallel ranks (None: one process).
        num_experts: the layer's routed experts over all ranks.
        num_topk: routing slots per token.
        recipe: ``'fp8xnvfp4'`` or ``'fp4xfp4'``.
        num_max_tokens_per_rank: the most tokens one ``forward`` takes on this rank (the buffer's size).
        input_scale: ``'fp4xfp4'`` only: the global scale the tokens are cast with (ModelOpt's
            ``input_scale``); its ``l1_alphas`` (float32 ``[E_l, 2]``, including it), ``l2_alphas``
            and ``a2_scales`` (float32 ``[E_l]``) as :func:`deep_gemm.fp4_fp4_mega_moe` takes them.
        activation_clamp: None or ``c > 0`` (``up = clamp(up, -c, c)``, ``gate = min(gate, c)``).
        routed_scaling_factor: ``'fp4xfp4'`` only: scales the routed sum (default 1: Hugging Face
            routers already fold it into ``topk_weights``).
        backend: the entry point's ``backend`` (``'auto'``: sm90 on Hopper, else the reference).
        device: the buffer's device (default: the current CUDA device, else CPU).
        num_max_tokens_per_wave: the buffer's wave size (None: its default).
    """

    def __init__(self, l1: ExpertWeights, l2: ExpertWeights, group, num_experts: int, num_topk: int, *,
                 recipe: str = 'fp8xnvfp4', num_max_tokens_per_rank: int = 256,
                 input_scale: Optional[float] = None, l1_alphas: Optional[torch.Tensor] = None,
                 l2_alphas: Optional[torch.Tensor] = None, a2_scales: Optional[torch.Tensor] = None,
                 activation_clamp: Optional[float] = None, routed_scaling_factor: float = 1.0,
                 backend: str = 'auto', device=None, num_max_tokens_per_wave: Optional[int] = None):
        super().__init__()
        if recipe not in RECIPES:
            raise ValueError(f'recipe: expected one of {RECIPES}, got {recipe!r}')
        for name, w in (('l1', l1), ('l2', l2)):
            if not isinstance(w, ExpertWeights):
                raise TypeError(f'{name}: expected deep_gemm.weights.ExpertWeights, got {type(w).__name__}')
        check_activation_clamp(activation_clamp)
        self.recipe = recipe
        self.hidden, self.intermediate = l1.k, l2.k
        self.num_experts, self.num_topk = num_experts, num_topk
        self.activation_clamp = activation_clamp
        self.backend = backend
        self.buffer = get_symm_buffer_for_mega_moe(group, num_experts, num_max_tokens_per_rank, num_topk,
                                                   self.hidden, self.intermediate, mma_type=recipe, device=device,
                                                   num_max_tokens_per_wave=num_max_tokens_per_wave)
        dev = self.buffer.device
        self.l1, self.l2 = l1, l2
        e_l = self.buffer.num_experts_per_rank
        if recipe == 'fp4xfp4':
            self.input_scale = _positive_float('input_scale', input_scale)
            for name, v, shape in (('l1_alphas', l1_alphas, (e_l, 2)), ('l2_alphas', l2_alphas, (e_l,)),
                                   ('a2_scales', a2_scales, (e_l,))):
                check_tensor(name, v, dtype=torch.float32, shape=shape, contiguous=False)
            self.register_buffer('l1_alphas', l1_alphas.to(dev).contiguous(), persistent=False)
            self.register_buffer('l2_alphas', l2_alphas.to(dev).contiguous(), persistent=False)
            self.register_buffer('a2_scales', a2_scales.to(dev).contiguous(), persistent=False)
            if isinstance(routed_scaling_factor, bool) or not isinstance(routed_scaling_factor, (int, float)):
                raise TypeError(f'routed_scaling_factor: expected a number, got {type(routed_scaling_factor).__name__}')
            self.routed_scaling_factor = float(routed_scaling_factor)
        else:
            for name, v in (('input_scale', input_scale), ('l1_alphas', l1_alphas), ('l2_alphas', l2_alphas),
                            ('a2_scales', a2_scales)):
                if v is not None:
                    raise ValueError(f"{name}: only the 'fp4xfp4' recipe takes it (fp8xnvfp4's alphas are the "
                                     f"weights' weight_scale_2, its activations carry their own scales)")
            if routed_scaling_factor != 1.0:
                raise ValueError("routed_scaling_factor: only the 'fp4xfp4' recipe takes it; fold it into "
                                 "topk_weights")
            self.input_scale = None
            self.routed_scaling_factor = 1.0
        self.source = None   # (path, layer) when loaded from a checkpoint

    # ------------------------------------------------------------------------------------ building
    @classmethod
    def from_loaded(cls, layer: NVFP4MoELayer, group=None, recipe: str = 'fp8xnvfp4', *, num_topk: Optional[int] = None,
                    num_max_tokens_per_rank: int = 256, activation_clamp: Union[float, None, str] = 'auto',
                    routed_scaling_factor: float = 1.0, backend: str = 'auto', device=None,
                    num_max_tokens_per_wave: Optional[int] = None) -> 'MegaMoE':
        """The module from an :class:`deep_gemm.checkpoint.NVFP4MoELayer` (see :meth:`from_checkpoint`)."""
        if recipe not in RECIPES:
            raise ValueError(f'recipe: expected one of {RECIPES}, got {recipe!r}')
        if num_topk is None:
            num_topk = layer.config.get('num_experts_per_tok')
            if not isinstance(num_topk, int):
                raise ValueError(f'num_topk: {layer.path} has no config.json num_experts_per_tok; pass num_topk=')
        if activation_clamp == 'auto':
            activation_clamp = layer.config.get('swiglu_limit')   # DeepSeek-V4's SwiGLU clamp
        if device is None:
            device = torch.device('cuda', torch.cuda.current_device()) if torch.cuda.is_available() else 'cpu'
        layer = layer.to(device)
        kw = dict(recipe=recipe, num_max_tokens_per_rank=num_max_tokens_per_rank, activation_clamp=activation_clamp,
                  backend=backend, device=device, num_max_tokens_per_wave=num_max_tokens_per_wave)
        if recipe == 'fp8xnvfp4':
            l1, l2 = transform_nvfp4_weights_for_mega_moe(*layer.fp8_nvfp4_weights())
        else:
            args = layer.fp4_fp4_weights()
            l1, l2 = transform_weights_for_mega_moe(args['l1_weights'], args['l2_weights'])
            kw.update(input_scale=layer.l1_input_scale, l1_alphas=args['l1_alphas'], l2_alphas=args['l2_alphas'],
                      a2_scales=args['a2_scales'], routed_scaling_factor=routed_scaling_factor)
        mod = cls(l1, l2, group, layer.num_experts, num_topk, **kw)
        if mod.buffer.num_ranks != layer.num_ranks or mod.buffer.rank != layer.rank:
            raise ValueError(f'layer: loaded for rank {layer.rank} of {layer.num_ranks}, the group is rank '
                             f'{mod.buffer.rank} of {mod.buffer.num_ranks}')
        mod.source = (layer.path, layer.layer)
        return mod

    @classmethod
    def from_checkpoint(cls, path: Union[str, os.PathLike], layer: int, group=None, recipe: str = 'fp8xnvfp4', *,
                        num_max_tokens_per_rank: int = 256, num_topk: Optional[int] = None,
                        expert_pattern: Union[str, ExpertNaming] = 'auto', num_experts: Optional[int] = None,
                        activation_clamp: Union[float, None, str] = 'auto', routed_scaling_factor: float = 1.0,
                        backend: str = 'auto', device=None,
                        num_max_tokens_per_wave: Optional[int] = None) -> 'MegaMoE':
        """Load this rank's experts of MoE layer ``layer`` from a ModelOpt NVFP4 checkpoint directory
        (:func:`deep_gemm.checkpoint.load_nvfp4_moe_layer`: only this rank's experts are read) and build
        the module.  Collective over ``group`` (the buffer's allocation).

        ``num_topk`` defaults to config.json's ``num_experts_per_tok``; ``activation_clamp='auto'`` to
        its ``swiglu_limit`` (DeepSeek-V4), else None; ``device`` to the current CUDA device, else CPU.
        Raises :class:`deep_gemm.checkpoint.CheckpointError` (a ValueError naming the tensor and file)
        for a malformed checkpoint."""
        loaded = load_nvfp4_moe_layer(path, layer, group=group, expert_pattern=expert_pattern,
                                      num_experts=num_experts)
        return cls.from_loaded(loaded, group, recipe, num_topk=num_topk,
                               num_max_tokens_per_rank=num_max_tokens_per_rank, activation_clamp=activation_clamp,
                               routed_scaling_factor=routed_scaling_factor, backend=backend, device=device,
                               num_max_tokens_per_wave=num_max_tokens_per_wave)

    # ------------------------------------------------------------------------------------ running
    @property
    def device(self) -> torch.device:
        return self.buffer.device

    @property
    def experts(self) -> range:
        """The global expert ids of this rank."""
        e_l = self.buffer.num_experts_per_rank
        return range(self.buffer.rank * e_l, (self.buffer.rank + 1) * e_l)

    def _quantize_tokens(self, x: torch.Tensor, t: int) -> None:
        buf, capturing = self.buffer, _capturing(self.buffer.device)
        if self.recipe == 'fp8xnvfp4':
            q, sf = per_token_cast_to_fp8(x, False, 32, check_finite=not capturing)
            buf.x[:t].copy_(q)
        else:
            q, sf = per_token_cast_to_nvfp4(x, global_scale=self.input_scale, check_finite=not capturing)
            buf.x[:t].copy_(q.view(torch.uint8))
        buf.x_sf[:t].copy_(sf)

    @torch.no_grad()
    def forward(self, hidden_states: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                cumulative_local_expert_recv_stats: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The layer on this rank's ``T`` tokens (``T`` may differ per rank, 0 included; every rank of
        the group calls it).

        Args:
            hidden_states: bfloat16 ``[T, H]`` (float16 / float32 accepted: cast from their values) on
                the module's device, ``T <= num_max_tokens_per_rank``.
            topk_idx: int64 (or int32) ``[T, num_topk]`` global expert ids, -1 = masked slot.
            topk_weights: float32 (or bf16 / fp16) ``[T, num_topk]``.
            cumulative_local_expert_recv_stats: None or int32 ``[E_l]``, incremented by the pairs each
                local expert received.

        Returns a new bfloat16 ``[T, H]`` tensor.  Raises ValueError for NaN / Inf ``hidden_states``
        (outside a CUDA graph capture) and for every argument the entry point rejects.
        """
        buf = self.buffer
        check_tensor('hidden_states', hidden_states, dtype=(torch.bfloat16, torch.float16, torch.float32), ndim=2,
                     shape=(None, self.hidden), device=buf.device, contiguous=False)
        t = hidden_states.shape[0]
        if t > buf.num_max_tokens_per_rank:
            raise ValueError(f'hidden_states: {t} tokens > num_max_tokens_per_rank = {buf.num_max_tokens_per_rank} '
                             f'(MegaMoE.from_checkpoint(..., num_max_tokens_per_rank=))')
        check_tensor('topk_idx', topk_idx, dtype=(torch.int64, torch.int32), shape=(t, self.num_topk),
                     device=buf.device, contiguous=False)
        check_tensor('topk_weights', topk_weights, dtype=(torch.float32, torch.bfloat16, torch.float16),
                     shape=(t, self.num_topk), device=buf.device, contiguous=False)
        try:
            self._quantize_tokens(hidden_states, t)
        except ValueError as exc:   # the casts name their argument `x`
            raise ValueError(f'hidden_states: {exc}'.replace('hidden_states: x: ', 'hidden_states: ')) from None
        buf.topk_idx[:t].copy_(topk_idx)
        buf.topk_weights[:t].copy_(topk_weights)
        y = torch.empty(t, self.hidden, dtype=torch.bfloat16, device=buf.device)
        stats = cumulative_local_expert_recv_stats
        if self.recipe == 'fp8xnvfp4':
            fp8_nvfp4_mega_moe(y, self.l1, self.l2, buf, cumulative_local_expert_recv_stats=stats,
                               activation_clamp=self.activation_clamp, backend=self.backend)
        else:
            fp4_fp4_mega_moe(y, self.l1, self.l2, buf, cumulative_local_expert_recv_stats=stats,
                             activation_clamp=self.activation_clamp, l1_alphas=self.l1_alphas,
                             l2_alphas=self.l2_alphas, a2_scales=self.a2_scales,
                             routed_scaling_factor=self.routed_scaling_factor, backend=self.backend)
        return y

    def destroy(self) -> None:
        """Release the buffer (collective where the buffer's allocation was)."""
        self.buffer.destroy()

    def extra_repr(self) -> str:
        e = self.experts
        src = f', source={self.source[0]!r} layer {self.source[1]}' if self.source else ''
        return (f'recipe={self.recipe!r}, hidden={self.hidden}, intermediate={self.intermediate}, '
                f'experts={e.start}..{e.stop - 1} of {self.num_experts} (rank {self.buffer.rank}/'
                f'{self.buffer.num_ranks}), top-{self.num_topk}, max_tokens={self.buffer.num_max_tokens_per_rank}, '
                f'clamp={self.activation_clamp}, backend={self.backend!r}, device={self.device}{src}')
