"""The Hopper backend of the Mega MoE layer: one fused persistent kernel (default), or the same
protocol as a sequence of kernels on one stream (``fused=False``, or ``DG_MEGA_MOE_FUSED=0``).

Unfused sequence:

barrier (inputs ready on every rank) -> dispatch layout (every rank's routing -> local rows) ->
dispatch gather (pull FP8 tokens from their source ranks, -> BF16 rows grouped by local expert) ->
L1 grouped GEMM (SwiGLU, routing weight) -> L2 grouped GEMM (rows into ``combine``) -> barrier
(expert outputs ready) -> combine (each rank pulls its pairs' rows from their experts' owners and
reduces them in slot order).  The fused kernel runs the same protocol in one launch, except that
the owners push finished token tiles' rows to their sources before barrier 1 (``push_enabled``).
Peers are reached through NVLink mappings of the symmetric buffer; a group of one runs the same
kernels on its own buffer, without the barriers.  No host
synchronisation: every shape is fixed by the buffer, counts stay on the device, so a call can be
captured in a CUDA graph (the barriers count calls on the device).

Upstream's entry points run the same sequence with upstream's numerics (``run_upstream``, recipes in
docs/design.md, "Upstream's entry points"): the dispatch gather takes the buffer's activation format
(FP8 x power-of-two scales, NVFP4 -- half the NVLink bytes -- or BF16; all exact in BF16), the L1
epilogue produces the recipe's L2 input (``'swiglu_fp8'``: FP8 with a power-of-two scale per 32;
``'swiglu_nvfp4'``: unweighted, NVFP4 per 16 with the expert's ``a2`` as global scale;
``'swiglu_bf16'``: BF16), fp4xfp4's L2 applies the top-k weight after L2 (``'weighted'``), shared
experts (BF16 weights) run as one local expert over every local token before the first barrier, and
the combine adds their rows (and ``routed_scaling_factor``) in the recipe's order.  The fused kernel
runs each recipe too (template parameters: token format, L1 epilogue, L2 weighting, upstream's
combine steps; the same device functions, so the same bits), and ``run_upstream`` takes it unless
``DG_MEGA_MOE_FUSED=0``.

Prefill waves: a call runs as ``buffer.waves(num_tokens)``, slices of at most
``buffer.num_max_tokens_per_wave`` tokens, one after the other on the stream, each exactly the
layer on that slice of every rank's tokens (per-token region offsets shifted by the wave's first
token); the receive rows, ``combine`` and the counters, sized for one wave, serve them all.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Optional

import torch

from .. import gemm
from ..jit import registry, runtime
from . import kernels

__all__ = ['run', 'run_upstream', 'run_upstream_fp8', 'prepare', 'UpstreamRecipe', 'upstream_recipe', 'UPSTREAM_WEIGHTS',
           'MULTI_RANK', 'FUSED', 'fused_enabled', 'push_enabled']

MULTI_RANK = True

FUSED = registry.register_kernel(registry.KernelSpec(
    name='sm90_fp8_nvfp4_mega_moe',
    header='sm90_fp8_nvfp4_mega_moe.cuh',
    kernel_expr_fn=lambda p: (f'deep_gemm::sm90_fp8_nvfp4_mega_moe<{p["fmt"]}, {p["block_t"]}, {p["stages"]}, '
                              f'{p["fast_math"]}, {p["ctas_per_sm"]}, {p["max_experts"]}, {p["gran_k"]}, '
                              f'{p.get("trace", "false")}, {p.get("token_fmt", 0)}, {p.get("l1_input", -1)}, '
                              f'{p.get("l2_weighted", "false")}, {p.get("upstream", "false")}>'),
    archs=('sm_90a',),
    required_sass=(r'\bHGMMA\.64x\d+x16\.F32\.BF16\b', r'\bUTMALDG\b', r'\bUBLKCP\b', r'\bSTG\.E\.STRONG\.SYS\b',
                   r'\bSR_GLOBALTIMER'),
    forbid_local_memory=True,
    default_params=(
        {'fmt': gemm._FMT['nvfp4'], 'block_t': 16, 'stages': 6, 'fast_math': True, 'ctas_per_sm': 2,
         'max_experts': 8, 'gran_k': 32},
        # decode at EP 8 (48 local experts): the smallest tile a call picks (_MIN_TILE_ROWS), and the
        # one of 128 tokens per rank (_MIN_TILE_ROWS_BUSY)
        {'fmt': gemm._FMT['nvfp4'], 'block_t': 32, 'stages': 6, 'fast_math': True, 'ctas_per_sm': 2,
         'max_experts': 64, 'gran_k': 32},
        {'fmt': gemm._FMT['nvfp4'], 'block_t': 64, 'stages': 4, 'fast_math': True, 'ctas_per_sm': 2,
         'max_experts': 64, 'gran_k': 32},
        {'fmt': gemm._FMT['nvfp4'], 'block_t': 128, 'stages': 5, 'fast_math': True, 'ctas_per_sm': 1,
         'max_experts': 64, 'gran_k': 32},
        {'fmt': gemm._FMT['nvfp4'], 'block_t': 256, 'stages': 3, 'fast_math': True, 'ctas_per_sm': 1,
         'max_experts': 8, 'gran_k': 32},
        {'fmt': gemm._FMT['mxfp4'], 'block_t': 64, 'stages': 4, 'fast_math': True, 'ctas_per_sm': 2,
         'max_experts': 8, 'gran_k': 32},
        # the timeline variant (scripts/trace_mega_moe.py), so that CI keeps it compiling
        {'fmt': gemm._FMT['nvfp4'], 'block_t': 128, 'stages': 5, 'fast_math': True, 'ctas_per_sm': 1,
         'max_experts': 8, 'gran_k': 32, 'trace': True},
        # upstream's recipes (run_upstream, _upstream_params): fp4xfp4 (NVFP4 tokens, 'swiglu_nvfp4',
        # 'weighted'), fp8xfp4 (MXFP4, 'swiglu_fp8'), bf16xbf16 (BF16 tokens and weights, 'swiglu_bf16')
        {'fmt': gemm._FMT['nvfp4'], 'block_t': 32, 'stages': 6, 'fast_math': True, 'ctas_per_sm': 2,
         'max_experts': 8, 'gran_k': 16, 'token_fmt': 1, 'l1_input': 2, 'l2_weighted': True, 'upstream': True},
        {'fmt': gemm._FMT['mxfp4'], 'block_t': 32, 'stages': 6, 'fast_math': True, 'ctas_per_sm': 2,
         'max_experts': 8, 'gran_k': 32, 'token_fmt': 0, 'l1_input': 1, 'l2_weighted': False, 'upstream': True},
        {'fmt': gemm._FMT['bf16'], 'block_t': 32, 'stages': 2, 'fast_math': True, 'ctas_per_sm': 2,
         'max_experts': 8, 'gran_k': 1, 'token_fmt': 2, 'l1_input': 0, 'l2_weighted': False, 'upstream': True},
    ),
))

_MAX_RANKS = 128              # mega::kMaxRanks
_LOOKAHEAD_EXPERTS = 2        # docs/perf-notes.md, "Fused kernel (issue #6)"


def push_enabled(buffer) -> bool:
    """Whether the fused kernel pushes the combine rows of other ranks' pairs to their sources as
    token tiles finish (``combine_in``), or every source pulls them after barrier 1
    (``DG_MEGA_MOE_PUSH=0``).  Results are the same bits either way; one rank has nothing to push."""
    return buffer.num_ranks > 1 and os.environ.get('DG_MEGA_MOE_PUSH', '1') != '0'


def fused_enabled(fused: Optional[bool] = None) -> bool:
    if fused is not None:
        return bool(fused)
    return os.environ.get('DG_MEGA_MOE_FUSED', '1') != '0'


def _fused_shared_bytes(max_experts: int) -> int:
    # mega::Shared: an mbarrier, MegaMoEWork (6 + M + 3 (M + 1) ints), three per-expert arrays,
    # source prefix, 16 stage tags, 5 ints; plus 256 bytes of slack for padding (checked against the
    # cubin at load)
    m = max_experts
    return 8 + 4 * (6 + m + 3 * (m + 1)) + 12 * m + 4 * (_MAX_RANKS + 1) + 4 * 16 + 20 + 256


#: The fused kernel's kL1Input per L1 epilogue: -1 ours (exact BF16 h), else the sm90::L2Input of
#: upstream's L1 (epilogue_swiglu_requant, the grouped GEMM's 'swiglu_*' epilogues).
_L1_INPUT = {'swiglu': -1, 'swiglu_bf16': 0, 'swiglu_fp8': 1, 'swiglu_nvfp4': 2}


def _upstream_params(buffer, l1_epilogue: str, l2_epilogue: str) -> dict:
    """The fused kernel's template parameters of an upstream recipe (run_upstream): the buffer's token
    format (kernels.dispatch_gather's), the L1 epilogue, the L2 weighting, upstream's combine steps."""
    return {'token_fmt': kernels._ACT_FORMAT.get(buffer.mma_type, 0), 'l1_input': _L1_INPUT[l1_epilogue],
            'l2_weighted': l2_epilogue == 'weighted', 'upstream': True}


def _fused_config(buffer, l1, expected_m: int, fast_math: bool, trace: bool = False,
                  l1_epilogue: str = 'swiglu', l2_epilogue: str = 'plain'):
    block_t = gemm._block_t(expected_m)
    ctas = gemm._ctas_per_sm(block_t)
    max_experts = max(8, 1 << (buffer.num_experts_per_rank - 1).bit_length())
    # dynamic: alignment slack + stages (mega::Shared and the quantizing L1 epilogues' amax scratch are
    # static shared memory, counted against the same cap)
    static_budget = _fused_shared_bytes(max_experts) + gemm._epilogue_bytes(l1_epilogue, block_t)
    stages = gemm._fit_stages(l1.fmt, block_t, ctas, 1024 + 64 + static_budget)
    smem = 1024 + gemm._pipe_bytes(l1.fmt, block_t, stages) + 64
    params = {'fmt': gemm._FMT[l1.fmt], 'block_t': block_t, 'stages': stages, 'fast_math': bool(fast_math),
              'ctas_per_sm': ctas, 'max_experts': max_experts, 'gran_k': kernels._gran(buffer)}
    if trace:
        params['trace'] = True
    if l1_epilogue != 'swiglu':
        params.update(_upstream_params(buffer, l1_epilogue, l2_epilogue))
    kernel = registry.get_kernel(FUSED.name, params, device=buffer.device.index)
    static = kernel.attribute('CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES')
    if static > static_budget:
        raise RuntimeError(f'sm90_fp8_nvfp4_mega_moe: {static} B of static shared memory, more than the '
                           f'{static_budget} B its launcher budgets (mega::Shared grew?)')
    kernel.ensure_dynamic_smem(smem)
    return kernel, block_t, ctas, smem


# The token tile of a Mega MoE call holds at least _MIN_TILE_ROWS rows, and at least
# _MIN_TILE_ROWS_BUSY once the mean rows per local expert exceed _BUSY_MEAN_ROWS.  Routing is
# uneven: with 16 rows per expert on average the busiest experts of a call get 25-46 (48 experts,
# uniform / skewed routing), and a tile sized for the mean makes them stream and dequantize their
# weights 2-3 times.  A tile costs an expert with a few rows nothing in MMA width
# (FP4Consumer::mma_tile narrows it to the rows present, in steps of 8), and tiles of up to 64 rows
# run 2 CTAs per SM.  H200 (docs/perf-notes.md, v12 and v14):
#   - 32 rows against the mean's tile, 48 experts: 12-39 % faster at 32-128 tokens under skewed
#     routing, 21-24 % at 64-128 under uniform routing, 1.7 % slower at 32 uniform;
#   - 64 rows against 32, 48 experts: 10-12 % faster at 128 tokens skewed (mean 16 rows), 1 % uniform,
#     16-20 % at 256 tokens (mean 32); 2-6 % slower at 32 / 64 tokens (mean 4 / 8);
#   - 8 experts: 64 rows 11 % faster than the mean's 128 at 64 tokens (mean 48), 6 % slower than 32
#     at 16 tokens (mean 12, at most 20 rows an expert).
_MIN_TILE_ROWS = 32
_MIN_TILE_ROWS_BUSY = 64
_BUSY_MEAN_ROWS = 12


def _expected_m(buffer, t: int) -> int:
    # Block-size hint only (the counts stay on the device): the mean rows per local expert of one
    # wave if every rank has t tokens, raised to the tile floor above.  The same for every wave of a
    # call, so one set of kernels (loaded by prepare) serves them all.
    t = min(t, buffer.num_max_tokens_per_wave)
    mean = -(-t * buffer.num_topk * buffer.num_ranks // buffer.num_experts)
    return max(_MIN_TILE_ROWS if mean <= _BUSY_MEAN_ROWS else _MIN_TILE_ROWS_BUSY, mean)


def block_t_for(buffer, num_tokens: int) -> int:
    """The token tile (BLOCK_T) that a call with ``num_tokens`` tokens per rank runs, fused or not."""
    return gemm._block_t(_expected_m(buffer, num_tokens))


def prepare(buffer, l1, l2, num_tokens: int, fast_math: bool = True, fused: Optional[bool] = None,
            l1_epilogue: str = 'swiglu', l2_epilogue: str = 'plain') -> None:
    """Compile and load every kernel a call with ``num_tokens`` tokens launches.  ``run`` does this
    itself before its first barrier; ranks emulated on one GPU must do it for every rank before the
    first rank launches (a module load while a barrier kernel runs may wait for that kernel).
    ``l1_epilogue`` / ``l2_epilogue`` other than ``'swiglu'`` / ``'plain'``: the kernels of
    ``run_upstream`` (the fused kernel's upstream variant, or the sequence)."""
    expected_m = _expected_m(buffer, num_tokens)
    if fused_enabled(fused):
        _fused_config(buffer, l1, expected_m, fast_math, l1_epilogue=l1_epilogue, l2_epilogue=l2_epilogue)
        return
    kernels.prepare(buffer)
    gemm.prepare_grouped_contiguous(l1, expected_m, l1_epilogue, fast_math)
    gemm.prepare_grouped_contiguous(l2, expected_m, l2_epilogue)


def trace_size(buffer, block_t: int) -> int:
    """int64 entries a ``run_fused(trace=...)`` launch may stamp (layout: the kernel's mega::stamp)."""
    units = (buffer.region('l1_x').shape[0] // block_t + buffer.num_experts_per_rank) * \
        (2 * buffer.intermediate_hidden + buffer.hidden) // 128
    return TRACE_UNITS + 5 * units


_TRACE_MAX_CTAS = 1024                 # mega::kTraceMaxCTAs
TRACE_UNITS = 8 * _TRACE_MAX_CTAS      # mega::kTraceUnits: the units' stamps follow 8 per CTA


def fused_grid(buffer, ctas: int) -> int:
    """CTAs of a fused launch: every CTA must be resident (the kernel's grid-wide waits), ``ctas`` per
    SM; ranks emulated on one GPU share its SMs."""
    return max(1, gemm.get_num_sms() // (buffer.num_ranks if buffer.emulated else 1)) * ctas


def run_fused(y: torch.Tensor, l1, l2, buffer, stats: Optional[torch.Tensor] = None,
              activation_clamp: Optional[float] = None, fast_math: bool = True,
              trace: Optional[torch.Tensor] = None, recipe: Optional['UpstreamRecipe'] = None,
              shared: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The layer as one launch of ``impls/sm90_fp8_nvfp4_mega_moe.cuh`` per wave (grid: every SM, all
    resident).  ``trace`` (int64, ``trace_size`` entries, one wave): run the kernel's timeline
    variant, which stamps globaltimer there (scripts/trace_mega_moe.py reads it).  ``recipe`` /
    ``shared``: one of upstream's (``run_upstream``; the sequence's epilogues and combine, the same
    bits), with its BF16 shared-expert rows ``[len(y), H]`` or None."""
    from ..jit.tma import make_tma_2d
    t = y.shape[0]
    if buffer.num_ranks > _MAX_RANKS:
        raise ValueError(f'buffer: {buffer.num_ranks} ranks > {_MAX_RANKS}, the most the fused kernel takes')
    rc = recipe if recipe is not None else UpstreamRecipe('swiglu')
    kernel, block_t, ctas, smem = _fused_config(buffer, l1, _expected_m(buffer, t), fast_math, trace is not None,
                                                rc.l1_epilogue, rc.l2_epilogue)
    l1_alpha, l2_alpha = _fused_alphas(l1, l2, rc)
    grid = fused_grid(buffer, ctas)
    if trace is not None and (trace.dtype != torch.int64 or trace.numel() < trace_size(buffer, block_t)
                              or grid > _TRACE_MAX_CTAS or len(buffer.waves(t)) != 1):
        raise ValueError(f'trace: expected int64 with >= {trace_size(buffer, block_t)} entries, one wave, '
                         f'<= {_TRACE_MAX_CTAS} CTAs')
    l1_x, l2_x = buffer.region('l1_x'), buffer.region('l2_x')
    push = push_enabled(buffer)
    maps = (make_tma_2d(l1_x, block_t, 64, 128), make_tma_2d(l2_x, block_t, 64, 128))
    clamp = math.inf if activation_clamp is None else float(activation_clamp)
    u64, i32 = runtime.u64, runtime.i32
    # One launch per wave, each a whole call of the protocol (why the waves may share the rows, the
    # `combine` rows and the counters: the wave loop of run_sequence).  The kernel's `work` counters
    # are zeroed by each launch's last CTA, before the next launch starts on this stream.
    for t0, n in buffer.waves(t):
        runtime.launch(kernel, grid, 384, smem, [
            *maps, l1.codes, l1.scales, l1_alpha, l2.codes, l2.scales, l2_alpha,
            buffer.peer_bases, u64(buffer.offset('x', t0)), u64(kernels._x_sf_offset(buffer, t0)),
            u64(buffer.offset('topk_idx', t0)), u64(buffer.offset('topk_weights', t0)),
            u64(buffer.offset('pair_row', t0)), u64(buffer.offset('combine')), u64(buffer.offset('combine_in')),
            u64(buffer.offset('meta')), u64(buffer.offset('flags')),
            l1_x, buffer.region('l1_src'), buffer.region('l1_topk_weights'), l2_x, buffer.region('combine'),
            buffer.region('expert_offsets'), buffer.region('meta'), buffer.region('flags'), buffer.region('work'),
            buffer.topk_idx[t0:], buffer.region('pair_row')[t0:], y[t0:t0 + n], stats,
            i32(buffer.rank), i32(buffer.num_ranks), i32(n), i32(buffer.num_max_tokens_per_wave),
            i32(buffer.num_topk), i32(buffer.num_experts_per_rank), i32(l1_x.shape[0]), i32(buffer.hidden),
            i32(buffer.intermediate_hidden), runtime.f32(clamp), i32(_LOOKAHEAD_EXPERTS), i32(2 * grid),
            i32(gemm._token_group(block_t, buffer.hidden)), i32(gemm._token_group(block_t, buffer.intermediate_hidden)),
            i32(int(push)), u64(int(buffer.timeout_s * 1e9)), u64(buffer.error_record_ptr), trace,
            rc.epi_scales, None if shared is None else shared[t0:t0 + n], runtime.f32(rc.routed_scaling_factor),
            i32(int(rc.nvfp4_combine))])
    return y


def run(y: torch.Tensor, l1, l2, buffer, cumulative_local_expert_recv_stats: Optional[torch.Tensor] = None,
        activation_clamp: Optional[float] = None, fast_math: bool = True, fused: Optional[bool] = None) -> torch.Tensor:
    return _fused_or_sequence(y, l1, l2, buffer, cumulative_local_expert_recv_stats, activation_clamp, fast_math,
                              fused)


def _fused_alphas(l1, l2, recipe):
    """The alphas the fused kernel reads (the recipe's, else the weights'), checked: contiguous [E, 2] / [E, 1]."""
    l1_alpha = l1.alpha if recipe is None or recipe.l1_alpha is None else recipe.l1_alpha
    l2_alpha = l2.alpha if recipe is None or recipe.l2_alpha is None else recipe.l2_alpha
    if l1_alpha.stride(0) != 2 or l2_alpha.stride(0) != 1 or not (l1_alpha.is_contiguous() and l2_alpha.is_contiguous()):
        raise ValueError('l1.alpha / l2.alpha: the fused kernel needs contiguous [E, 2] / [E, 1] alphas')
    return l1_alpha, l2_alpha


def _fused_or_sequence(y, l1, l2, buffer, stats, activation_clamp, fast_math, fused, recipe=None, shared=None):
    """``run_fused`` where ``fused_enabled(fused)``, else ``run_sequence``; bad alphas are named before
    anything returns early."""
    if fused_enabled(fused):
        if buffer.peer_bases is None:
            raise ValueError('buffer: a multi-rank buffer without peer mappings (CPU?); sm90 needs symmetric memory')
        _fused_alphas(l1, l2, recipe)
        if y.shape[0] == 0 and buffer.num_ranks == 1:
            return y
        return run_fused(y, l1, l2, buffer, stats, activation_clamp, fast_math, recipe=recipe, shared=shared)
    return run_sequence(y, l1, l2, buffer, stats, activation_clamp, fast_math, recipe=recipe, shared=shared)


#: The routed weights' format each upstream buffer kind runs on this backend's kernel sequence
#: (``run_upstream``); FP8 weights (``'fp8xfp8'``) have no sm90 kernel.
UPSTREAM_WEIGHTS = {'fp8xfp4': 'mxfp4', 'bf16xbf16': 'bf16', 'fp4xfp4': 'nvfp4'}


@dataclasses.dataclass
class UpstreamRecipe:
    """What the kernel sequence does differently for one of upstream's entry points (``upstream_recipe``).

    ``l1_epilogue`` / ``l2_epilogue``: the grouped GEMMs' epilogues; ``l1_weighted``: whether L1 takes
    the routing weights (else L2 does, ``'weighted'``); ``l1_alpha`` / ``l2_alpha``: float32 alphas in
    place of the weights' own (``[E_l, 2]`` / ``[E_l, 1]``), ``epi_scales``: float32 ``[E_l]``,
    ``f32(1 / a2)``; ``shared_epilogue``: the shared expert's L1 epilogue; ``routed_scaling_factor``
    and ``nvfp4_combine``: the combine's order (kernels.combine)."""
    l1_epilogue: str
    l2_epilogue: str = 'plain'
    l1_weighted: bool = True
    l1_alpha: Optional[torch.Tensor] = None
    l2_alpha: Optional[torch.Tensor] = None
    epi_scales: Optional[torch.Tensor] = None
    shared_epilogue: str = 'swiglu_bf16'
    routed_scaling_factor: float = 1.0
    nvfp4_combine: bool = False


def upstream_recipe(mma_type: str, num_experts: int, device, l1_alphas=None, l2_alphas=None, a2_scales=None,
                    routed_scaling_factor: float = 1.0) -> UpstreamRecipe:
    """The sequence's recipe for a buffer kind (docs/design.md, "Upstream's entry points").  Device
    tensor arithmetic only (no host sync: capturable); float32 products and quotients as the reference
    forms them (``f32(l2_alpha * a2)``, ``f32(1 / a2)``)."""
    if mma_type in ('fp8xfp4', 'fp8xfp8'):
        return UpstreamRecipe('swiglu_fp8', shared_epilogue='swiglu_fp8')
    if mma_type == 'bf16xbf16':
        return UpstreamRecipe('swiglu_bf16')
    if mma_type != 'fp4xfp4':
        raise ValueError(f'mma_type: {mma_type!r} is not one of upstream\'s kinds')
    f32 = dict(dtype=torch.float32, device=device)
    a1 = torch.ones(num_experts, 2, **f32) if l1_alphas is None else l1_alphas.to(**f32).contiguous()
    a2 = torch.ones(num_experts, **f32) if a2_scales is None else a2_scales.to(**f32)
    l2a = torch.ones(num_experts, **f32) if l2_alphas is None else l2_alphas.to(**f32)
    return UpstreamRecipe('swiglu_nvfp4', 'weighted', l1_weighted=False, l1_alpha=a1,
                          l2_alpha=(l2a * a2).reshape(num_experts, 1).contiguous(),
                          epi_scales=(torch.ones_like(a2) / a2).contiguous(),
                          routed_scaling_factor=float(routed_scaling_factor), nvfp4_combine=True)


def _shared_rows(recipe: UpstreamRecipe, shared_l1, shared_l2, x_shared: torch.Tensor,
                 activation_clamp: Optional[float], fast_math: bool) -> torch.Tensor:
    """The shared experts (one expert of intermediate ``S``, BF16 weights) on the local tokens
    ``x_shared`` (BF16 ``[T, H]``): ``bf16(h @ W2s^T)`` with ``h`` the recipe's shared L2 input (weight 1)."""
    t = x_shared.shape[0]
    h = torch.empty(t, shared_l1.n // 2, dtype=torch.bfloat16, device=x_shared.device)
    out = torch.empty(t, shared_l2.n, dtype=torch.bfloat16, device=x_shared.device)
    offsets = torch.arange(2, dtype=torch.int32, device=x_shared.device) * t      # one expert: rows [0, t)
    gemm.m_grouped_fp8_nvfp4_gemm_nt_contiguous(x_shared, shared_l1, h, offsets, epilogue=recipe.shared_epilogue,
                                                activation_clamp=activation_clamp, fast_math=fast_math, expected_m=t)
    gemm.m_grouped_fp8_nvfp4_gemm_nt_contiguous(h, shared_l2, out, offsets, expected_m=t)
    return out


def run_upstream(y: torch.Tensor, l1, l2, buffer, recipe: UpstreamRecipe, stats: Optional[torch.Tensor] = None,
                 activation_clamp: Optional[float] = None, fast_math: bool = True, shared_l1=None, shared_l2=None,
                 x_shared: Optional[torch.Tensor] = None, fused: Optional[bool] = None) -> torch.Tensor:
    """One of upstream's entry points (``fp8_fp4_mega_moe`` on MXFP4 weights, ``bf16_mega_moe``,
    ``fp4_fp4_mega_moe``) as the kernel sequence with that recipe's numerics (``recipe``:
    ``upstream_recipe(buffer.mma_type, ...)``; docs/design.md, "Upstream's entry points"):
    dispatch (the buffer's tokens -> BF16, exact), L1 grouped GEMM with the recipe's L1 epilogue, L2
    grouped GEMM (plain, or fp4xfp4's top-k weight after L2), combine (slots in order in float32; the
    recipe's BF16 roundings, routed scaling and shared rows).  The accumulators are the tensor cores'
    FP32 sums (the reference's are exact), and ``fast_math`` picks ``__expf`` over ``expf``.

    ``buffer``: an upstream-kind buffer (FP8 kinds: the float32 ``x_sf`` region holds the tokens'
    scales, ``api._stage_packed_scales`` unpacks the caller's packed UE8M0 words there); ``l1`` / ``l2``:
    :class:`~deep_gemm.weights.ExpertWeights` of the kind's format (MXFP4, BF16, NVFP4);
    ``shared_l1`` / ``shared_l2``: BF16 shared-expert weights (one expert) and ``x_shared`` BF16
    ``[len(y), H]`` their input, or all None.  Prefill waves and several ranks work as in
    ``run_sequence``.  ``fused`` (default: ``DG_MEGA_MOE_FUSED`` is not ``'0'``, as ``run``): the fused
    kernel's variant of the recipe (``run_fused``: the same epilogue and combine code, the same bits),
    else the kernel sequence; the shared rows are computed before either starts."""
    want = UPSTREAM_WEIGHTS.get(buffer.mma_type)
    if want is None:
        raise ValueError(f'buffer: mma_type {buffer.mma_type!r} has no sm90 kernel sequence')
    if l1.fmt != want or l2.fmt != want:
        raise ValueError(f'l1 / l2: a {buffer.mma_type!r} buffer runs {want} weights on sm90, got {l1.fmt} / {l2.fmt}')
    shared = None
    if shared_l1 is not None:
        if shared_l1.fmt != 'bf16' or shared_l2.fmt != 'bf16':
            raise ValueError(f'shared_l1 / shared_l2: sm90 runs BF16 shared experts, got {shared_l1.fmt} / {shared_l2.fmt}')
        check = x_shared is not None and x_shared.dtype == torch.bfloat16 and tuple(x_shared.shape) == tuple(y.shape)
        if not check:
            raise ValueError(f'x_shared: expected BF16 {tuple(y.shape)}, got '
                             f'{None if x_shared is None else (x_shared.dtype, tuple(x_shared.shape))}')
        # Local work before the first barrier: its JIT and allocations never happen while peers wait.
        shared = _shared_rows(recipe, shared_l1, shared_l2, x_shared, activation_clamp, fast_math) if len(y) else None
    return _fused_or_sequence(y, l1, l2, buffer, stats, activation_clamp, fast_math, fused, recipe, shared)


def run_upstream_fp8(y: torch.Tensor, l1, l2, buffer, stats: Optional[torch.Tensor] = None,
                     activation_clamp: Optional[float] = None, fast_math: bool = True) -> torch.Tensor:
    """``fp8_fp4_mega_moe`` on MXFP4 weights without shared experts: ``run_upstream`` with the fp8xfp4
    recipe (L1 epilogue ``'swiglu_fp8'``: ``g = bf16(acc_gate)``, ``u = bf16(acc_up)``, clamp in BF16,
    ``a = f32(f32(silu(g) * u) * w)``, the L2 input FP8 E4M3 with one power-of-two scale per 32
    channels, written as BF16 ``q * scale``; L2 plain, alpha 1)."""
    return run_upstream(y, l1, l2, buffer, upstream_recipe(buffer.mma_type, buffer.num_experts_per_rank,
                                                           buffer.device), stats, activation_clamp, fast_math)


def run_sequence(y: torch.Tensor, l1, l2, buffer, stats: Optional[torch.Tensor] = None,
                 activation_clamp: Optional[float] = None, fast_math: bool = True, compute: bool = True,
                 comm: bool = True, recipe: Optional[UpstreamRecipe] = None,
                 shared: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The layer as a kernel sequence.  ``compute=False`` / ``comm=False`` leave out the expert GEMMs
    / the dispatch, barriers and combine (benchmarks: the compute-only and communication-only times
    of the fused kernel's target; the result is then not the layer's).  ``recipe``: None (ours: the
    exact BF16 intermediate) or one of upstream's (``run_upstream``), with ``shared`` its BF16
    shared-expert rows ``[len(y), H]`` (or None)."""
    if buffer.num_topk > kernels.MAX_TOPK:
        raise ValueError(f'buffer: num_topk = {buffer.num_topk} > {kernels.MAX_TOPK}, the most the combine kernel takes')
    if buffer.peer_bases is None:
        raise ValueError('buffer: a multi-rank buffer without peer mappings (CPU?); sm90 needs symmetric memory')
    t, multi = y.shape[0], buffer.num_ranks > 1
    if t == 0 and not multi:
        return y        # with peers, a rank without tokens still serves its experts
    row_src, row_weight = buffer.region('l1_src'), buffer.region('l1_topk_weights')
    tokens, h, o = buffer.region('l1_x'), buffer.region('l2_x'), buffer.region('combine')
    offsets = buffer.region('expert_offsets')
    expected_m = _expected_m(buffer, t)
    rc = recipe if recipe is not None else UpstreamRecipe('swiglu')
    l1_route = row_weight if rc.l1_weighted else None
    l2_route = None if rc.l1_weighted else row_weight
    if multi:
        # JIT work (a cold compile takes tens of seconds) happens before this rank signals, never
        # while it holds peers at a barrier.
        prepare(buffer, l1, l2, t, fast_math, fused=False, l1_epilogue=rc.l1_epilogue, l2_epilogue=rc.l2_epilogue)
    # Waves: one pass of the protocol per wave, every rank running the same waves in the same order
    # (buffer.waves; with peers ceil(T / W) of them, also those without tokens of this rank, which
    # still serve its experts).  Token indices are relative to the offsets and tensors a wave passes,
    # so wave w is exactly a call on tokens [t0, t0 + n) of every rank.  One set of rows, `combine`
    # rows and counters serves every wave because
    # - a rank signals barrier 0 of wave w + 1 only after its wave-w launches finished on its stream,
    #   its combine (which reads the peers' `combine` rows) included;
    # - a rank writes its `combine` rows and the peers' `pair_row` entries of wave w + 1 only after it
    #   passed barrier 0 of wave w + 1, i.e. after every rank finished wave w;
    # - it publishes its wave-(w + 1) token count only after its wave w, which waited at barrier 1
    #   for every peer to have routed wave w (the only reads of that count).
    # The caller's inputs are not rewritten during the call, so any wave's gather reads them.
    for t0, n in buffer.waves(t):
        if multi and comm:
            kernels.barrier(buffer, 0, n)
        if comm:
            kernels.dispatch_layout(buffer, n, row_src, row_weight, stats, t0)
            kernels.dispatch_gather(buffer, row_src, tokens, t0)
        if compute:
            gemm.m_grouped_fp8_nvfp4_gemm_nt_contiguous(tokens, l1, h, offsets, epilogue=rc.l1_epilogue,
                                                        route_weights=l1_route, activation_clamp=activation_clamp,
                                                        fast_math=fast_math, expected_m=expected_m,
                                                        alpha=rc.l1_alpha, epi_scales=rc.epi_scales)
            gemm.m_grouped_fp8_nvfp4_gemm_nt_contiguous(h, l2, o, offsets, epilogue=rc.l2_epilogue,
                                                        route_weights=l2_route, expected_m=expected_m,
                                                        alpha=rc.l2_alpha)
        if multi and comm:
            kernels.barrier(buffer, 1, n)
        if comm:
            kernels.combine(buffer, y[t0:t0 + n], t0, None if shared is None else shared[t0:t0 + n],
                            rc.routed_scaling_factor, rc.nvfp4_combine)
    return y
