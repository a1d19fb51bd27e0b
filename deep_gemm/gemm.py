"""Hopper grouped GEMMs over experts: FP8 tokens x NVFP4/MXFP4 weights -> BF16 (register dequant, BF16 wgmma).

Entry points (upstream-style names):

* ``m_grouped_fp8_nvfp4_gemm_nt_contiguous(a, b, d, expert_offsets, ...)`` -- prefill layout: the
  rows of ``a`` are grouped by expert, ``expert_offsets`` int32 ``[E + 1]`` (device) are the
  prefix sums (rows of expert e are ``[offsets[e], offsets[e + 1])``).
* ``m_grouped_fp8_nvfp4_gemm_nt_masked(a, b, d, masked_m, expected_m, ...)`` -- decode layout:
  ``a`` is ``[E, max_m, K]``, expert e uses its first ``masked_m[e]`` rows (device counts: no host
  sync, fixed shapes, CUDA-graph capturable).

``a`` is BF16 tokens (used as they are: the L2 input of the MoE), or ``a = (x_fp8, x_sf)``: E4M3 ``[rows, K]`` with float32 per-token block scales ``[rows, K / gran]``
(gran 32 or 128).  They are converted once to BF16 (exact when the scales are powers of two,
e.g. ``per_token_cast_to_fp8(..., use_ue8m0=True)``; otherwise rounded once to BF16).  ``b`` is
an :class:`~deep_gemm.weights.ExpertWeights` (``transform_nvfp4_weights_for_grouped_gemm``
or the Mega MoE transforms).  ``epilogue='swiglu'`` is the L1 epilogue: ``b`` must be an L1
(gate/up interleaved) weight, ``d`` is ``[rows, N / 2]`` and receives
``silu(clamp(gate)) * clamp(up) * route_weights[row]`` in BF16.  ``epilogue='swiglu_fp8'`` is the L1
epilogue of upstream's ``fp8_fp4_mega_moe`` (docs/design.md, fp8xfp4): gate and up rounded to BF16
(``bf16(acc * alpha)``; alpha = 1 for MXFP4), clamped in BF16, ``a = f32(f32(silu(g) * u) * w)``, then
requantized to FP8 E4M3 with one power-of-two scale per 32 channels of a row
(``epilogue/moe_l2_input.cuh``); ``d`` receives ``q * scale`` in BF16 (exact).
"""
from __future__ import annotations

import math
import os
from typing import Optional, Tuple

import torch

from .jit import registry, runtime
from .weights import BLOCK_K, BLOCK_N, ExpertWeights

__all__ = ['set_pdl', 'get_pdl', 'use_deterministic_algorithms',
           'm_grouped_fp8_nvfp4_gemm_nt_contiguous', 'm_grouped_fp8_nvfp4_gemm_nt_masked', 'fp8_to_bf16_tokens',
           'set_num_sms', 'get_num_sms']

_FMT = {'nvfp4': 'deep_gemm::sm90::WeightFormat::NVFP4', 'mxfp4': 'deep_gemm::sm90::WeightFormat::MXFP4',
        'bf16': 'deep_gemm::sm90::WeightFormat::BF16'}
_EPI = {'plain': 'deep_gemm::Epilogue::Plain', 'swiglu': 'deep_gemm::Epilogue::SwiGLU',
        'swiglu_fp8': 'deep_gemm::Epilogue::SwiGLUFP8', 'swiglu_bf16': 'deep_gemm::Epilogue::SwiGLUBF16',
        'swiglu_nvfp4': 'deep_gemm::Epilogue::SwiGLUNVFP4', 'weighted': 'deep_gemm::Epilogue::Weighted'}
_L1_EPILOGUES = ('swiglu', 'swiglu_fp8', 'swiglu_bf16', 'swiglu_nvfp4')
#: Epilogues that read ``route_weights`` (optional for the L1 ones, required for 'weighted').
_WEIGHTED_EPILOGUES = _L1_EPILOGUES + ('weighted',)
#: Epilogues with the per-block amax scratch (sm90::kRequantScratchBytes).
_REQUANT_EPILOGUES = ('swiglu_fp8', 'swiglu_nvfp4')
_MODE = {'contiguous': 'deep_gemm::GroupMode::Contiguous', 'masked': 'deep_gemm::GroupMode::Masked'}
_SMEM_CAPACITY = 232448  # sm_90 max dynamic shared memory per block
_SMEM_PER_SM = 233472    # sm_90 shared memory per SM (1 KB of it reserved per CTA)
_BLOCK_T_CHOICES = (8, 16, 32, 64, 128, 256)
_MAX_STAGES = 12

GROUPED_GEMM = registry.register_kernel(registry.KernelSpec(
    name='sm90_fp8_nvfp4_grouped_gemm',
    header='sm90_fp8_nvfp4_grouped_gemm.cuh',
    kernel_expr_fn=lambda p: (f'deep_gemm::sm90_fp8_nvfp4_grouped_gemm<{p["fmt"]}, {p["block_t"]}, {p["stages"]}, '
                              f'{p["epilogue"]}, {p["mode"]}, {p["fast_math"]}, {p["ctas_per_sm"]}>'),
    archs=('sm_90a',),
    required_sass=(r'\bHGMMA\.64x\d+x16\.F32\.BF16\b', r'\bUTMALDG\b', r'\bUBLKCP\b', r'\bHMUL2\.BF16'),
    forbid_local_memory=True,
    default_params=(
        {'fmt': _FMT['nvfp4'], 'block_t': 16, 'stages': 8, 'epilogue': _EPI['swiglu'], 'mode': _MODE['masked'], 'fast_math': True, 'ctas_per_sm': 2},
        {'fmt': _FMT['nvfp4'], 'block_t': 16, 'stages': 8, 'epilogue': _EPI['plain'], 'mode': _MODE['masked'], 'fast_math': True, 'ctas_per_sm': 2},
        {'fmt': _FMT['nvfp4'], 'block_t': 32, 'stages': 6, 'epilogue': _EPI['swiglu'], 'mode': _MODE['contiguous'], 'fast_math': True, 'ctas_per_sm': 2},
        {'fmt': _FMT['nvfp4'], 'block_t': 64, 'stages': 4, 'epilogue': _EPI['plain'], 'mode': _MODE['masked'], 'fast_math': True, 'ctas_per_sm': 2},
        {'fmt': _FMT['nvfp4'], 'block_t': 256, 'stages': 3, 'epilogue': _EPI['plain'], 'mode': _MODE['contiguous'], 'fast_math': True, 'ctas_per_sm': 1},
        {'fmt': _FMT['mxfp4'], 'block_t': 64, 'stages': 4, 'epilogue': _EPI['swiglu'], 'mode': _MODE['contiguous'], 'fast_math': True, 'ctas_per_sm': 2},
        # fp8_fp4_mega_moe's L1 (deep_gemm.mega.sm90.run_upstream_fp8): the tiles a Mega MoE call picks
        # (32 / 64 rows at decode, 128 / 256 at prefill), stages as _stages gives them for 8 local experts
        {'fmt': _FMT['mxfp4'], 'block_t': 32, 'stages': 6, 'epilogue': _EPI['swiglu_fp8'], 'mode': _MODE['contiguous'], 'fast_math': True, 'ctas_per_sm': 2},
        {'fmt': _FMT['mxfp4'], 'block_t': 64, 'stages': 4, 'epilogue': _EPI['swiglu_fp8'], 'mode': _MODE['contiguous'], 'fast_math': True, 'ctas_per_sm': 2},
        {'fmt': _FMT['mxfp4'], 'block_t': 128, 'stages': 5, 'epilogue': _EPI['swiglu_fp8'], 'mode': _MODE['contiguous'], 'fast_math': True, 'ctas_per_sm': 1},
        {'fmt': _FMT['mxfp4'], 'block_t': 256, 'stages': 3, 'epilogue': _EPI['swiglu_fp8'], 'mode': _MODE['contiguous'], 'fast_math': True, 'ctas_per_sm': 1},
        # fp4_fp4_mega_moe (sm90.run_upstream): L1 NVFP4 L2 input, L2 with the top-k weight after it
        {'fmt': _FMT['nvfp4'], 'block_t': 32, 'stages': 6, 'epilogue': _EPI['swiglu_nvfp4'], 'mode': _MODE['contiguous'], 'fast_math': True, 'ctas_per_sm': 2},
        {'fmt': _FMT['nvfp4'], 'block_t': 128, 'stages': 5, 'epilogue': _EPI['swiglu_nvfp4'], 'mode': _MODE['contiguous'], 'fast_math': True, 'ctas_per_sm': 1},
        {'fmt': _FMT['nvfp4'], 'block_t': 32, 'stages': 6, 'epilogue': _EPI['weighted'], 'mode': _MODE['contiguous'], 'fast_math': True, 'ctas_per_sm': 2},
    ),
))

# The same template on BF16 weights (bf16_mega_moe, the shared experts): fragments loaded from shared
# memory in load order (LDS.128), nothing to dequantize (no HMUL2).
GROUPED_GEMM_BF16 = registry.register_kernel(registry.KernelSpec(
    name='sm90_bf16_grouped_gemm',
    header='sm90_fp8_nvfp4_grouped_gemm.cuh',
    kernel_expr_fn=GROUPED_GEMM.kernel_expr_fn,
    archs=('sm_90a',),
    required_sass=(r'\bHGMMA\.64x\d+x16\.F32\.BF16\b', r'\bUTMALDG\b', r'\bUBLKCP\b', r'\bLDS\.128\b'),
    forbid_local_memory=True,
    default_params=(
        {'fmt': _FMT['bf16'], 'block_t': 32, 'stages': 2, 'epilogue': _EPI['swiglu_bf16'], 'mode': _MODE['contiguous'], 'fast_math': True, 'ctas_per_sm': 2},
        {'fmt': _FMT['bf16'], 'block_t': 128, 'stages': 3, 'epilogue': _EPI['plain'], 'mode': _MODE['contiguous'], 'fast_math': True, 'ctas_per_sm': 1},
    ),
))

FP8_TO_BF16 = registry.register_kernel(registry.KernelSpec(
    name='smxx_fp8_to_bf16',
    header='smxx_fp8_to_bf16.cuh',
    kernel_expr_fn=lambda p: f'deep_gemm::smxx_fp8_to_bf16<{p["gran_k"]}>',
    archs=('sm_90a', 'sm_100a'),
    required_sass=(r'\bSTG\.E\.128\b',),
    forbid_local_memory=True,
    default_params=({'gran_k': 32}, {'gran_k': 128}),
))

_num_sms: Optional[int] = None


def set_num_sms(num_sms: int):
    """Cap the number of SMs the persistent kernels use (upstream's ``deep_gemm.set_num_sms``)."""
    global _num_sms
    if not isinstance(num_sms, int) or num_sms < 1:
        raise ValueError(f'num_sms: expected a positive int, got {num_sms!r}')
    _num_sms = num_sms


def get_num_sms() -> int:
    count = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    return count if _num_sms is None else min(_num_sms, count)


_pdl = False


def set_pdl(enable: bool) -> None:
    """Upstream's switch for programmatic dependent launch.  Accepted for its callers; our Mega MoE
    launches keep plain stream order either way (upstream's NVFP4 layer does too)."""
    global _pdl
    if not isinstance(enable, bool):
        raise TypeError(f'enable: expected a bool, got {type(enable).__name__}')
    _pdl = enable


def get_pdl() -> bool:
    return _pdl


def use_deterministic_algorithms(enable: bool = True) -> None:
    """Upstream's switch.  Every kernel here is deterministic already (fixed accumulation orders, the
    same bits run to run), so this only checks its argument."""
    if not isinstance(enable, bool):
        raise TypeError(f'enable: expected a bool, got {type(enable).__name__}')


def _check(cond, exc, msg):
    if not cond:
        raise exc(msg)


def _check_cuda_tensor(name, t, dtype=None, ndim=None, device=None):
    _check(isinstance(t, torch.Tensor), TypeError, f'{name}: expected a torch.Tensor, got {type(t).__name__}')
    if dtype is not None:
        _check(t.dtype == dtype, TypeError, f'{name}: expected dtype {dtype}, got {t.dtype}')
    if ndim is not None:
        _check(t.dim() == ndim, ValueError, f'{name}: expected {ndim} dims, got shape {tuple(t.shape)}')
    _check(t.is_cuda, ValueError, f'{name}: expected a CUDA tensor, got device {t.device}')
    if device is not None:
        _check(t.device == device, ValueError, f'{name}: on {t.device}, expected {device}')
    _check(t.is_contiguous(), ValueError, f'{name}: must be contiguous')


def fp8_to_bf16_tokens(x: torch.Tensor, sf: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """E4M3 ``[rows, K]`` x float32 block scales ``[rows, K / gran]`` -> BF16 ``[rows, K]``."""
    _check_cuda_tensor('x', x, torch.float8_e4m3fn, 2)
    _check_cuda_tensor('x_sf', sf, torch.float32, 2, x.device)
    rows, k = x.shape
    _check(sf.shape[0] == rows and sf.shape[1] > 0 and k % sf.shape[1] == 0, ValueError,
           f'x_sf: expected [{rows}, K / gran], got {tuple(sf.shape)}')
    gran = k // sf.shape[1]
    _check(gran in (32, 128), ValueError, f'x_sf: block size K / x_sf.shape[1] = {gran} must be 32 or 128')
    out = torch.empty(rows, k, dtype=torch.bfloat16, device=x.device) if out is None else out
    if rows == 0:
        return out
    kernel = registry.get_kernel(FP8_TO_BF16.name, {'gran_k': gran})
    total = rows * (k // 16)
    runtime.launch(kernel, (total + 255) // 256, 256, 0,
                   [x.view(torch.uint8), sf, out, runtime.i32(rows), runtime.i32(k)])
    return out


def _pick_block_t(tokens_per_expert: int) -> int:
    for bt in _BLOCK_T_CHOICES:
        if tokens_per_expert <= bt:
            return bt
    return _BLOCK_T_CHOICES[-1]


def _block_t(tokens_per_expert: int, block_t: Optional[int] = None) -> int:
    """The token tile: ``block_t`` if given, else ``$DG_GROUPED_GEMM_BLOCK_T``, else the smallest
    choice that holds ``tokens_per_expert``."""
    return block_t or int(os.environ.get('DG_GROUPED_GEMM_BLOCK_T', 0)) or _pick_block_t(tokens_per_expert)


def _ctas_per_sm(block_t: int) -> int:
    # Tiles of up to 64 tokens are latency-bound in the dequant: two CTAs per SM (4 consumer
    # warpgroups, 80 registers at compile time, half a block of A in registers).  Measured on H200:
    # L1+L2 at 48 tokens per expert 552-555 us vs 583-591 with one CTA at BLOCK_T 64 (H100, v4: 553 vs
    # 628 us at BLOCK_T 16; docs/perf-notes.md, v14).  128-token tiles need more registers (64
    # accumulators).  DG_GROUPED_GEMM_CTAS_PER_SM=1 or 2 overrides it for tiles of up to 64 tokens.
    env = os.environ.get('DG_GROUPED_GEMM_CTAS_PER_SM')
    if env in ('1', '2') and block_t <= 64:
        return int(env)
    return 1 if block_t > 64 else 2


# Token bytes a group of token tiles may hold (scheduler/tile_order.cuh): a group is read from HBM
# once for all of an expert's weight-row tiles while those tiles stream past it, so it must stay in
# L2 (50 MB on H100 / H200) beside the weights in flight.  8 MB was the fastest of 4 / 8 / 16 / 32 MB
# (H200, 4096 tokens per expert: L1 -8 %, L2 -2 % against no groups; docs/perf-notes.md, v11).
_TOKEN_GROUP_BYTES = 8 << 20


def _token_group(block_t: int, k: int) -> int:
    """Token tiles per group of the tile order: ``$DG_GROUPED_GEMM_TOKEN_GROUP`` if set, else as many
    BF16 token tiles of ``k`` columns as fit in ``_TOKEN_GROUP_BYTES`` (at least one)."""
    env = int(os.environ.get('DG_GROUPED_GEMM_TOKEN_GROUP', 0))
    return env if env > 0 else max(1, _TOKEN_GROUP_BYTES // (block_t * k * 2))


def _stage_bytes(fmt: str, block_t: int) -> int:
    """Shared memory of one pipeline stage (common/sm90_fp4_pipeline.cuh): tokens, codes, scales
    (BF16 weights: 2 bytes per weight, no scales)."""
    if fmt == 'bf16':
        return block_t * BLOCK_K * 2 + BLOCK_N * BLOCK_K * 2
    return block_t * BLOCK_K * 2 + BLOCK_N * BLOCK_K // 2 + (1024 if fmt == 'nvfp4' else 512)


def _pipe_bytes(fmt: str, block_t: int, stages: int) -> int:
    """FP4Pipeline::kBytes: the stages, their 16 bytes of barriers, and for NVFP4 the consumer warps'
    scale scratch (8 warps x 2 x 256 bytes)."""
    return stages * (_stage_bytes(fmt, block_t) + 16) + (4096 if fmt == 'nvfp4' else 0)


def _fit_stages(fmt: str, block_t: int, ctas_per_sm: int, other_bytes: int) -> int:
    """Pipeline stages that fit beside ``other_bytes`` in one CTA's share of the SM's shared memory."""
    capacity = _SMEM_CAPACITY if ctas_per_sm == 1 else _SMEM_PER_SM // ctas_per_sm - 1024
    fixed = _pipe_bytes(fmt, block_t, 0)
    return max(2, min(_MAX_STAGES, (capacity - other_bytes - fixed) // (_stage_bytes(fmt, block_t) + 16)))


def _epilogue_bytes(epilogue: str, block_t: int) -> int:
    """Shared memory of the epilogue between the pipeline and the tile prefix: the quantizing
    epilogues' amax scratch (sm90::kRequantScratchBytes: 4 warps x BLOCK_T floats per consumer
    warpgroup, 2 of them)."""
    return 2 * 4 * block_t * 4 if epilogue in _REQUANT_EPILOGUES else 0


def _stages(fmt: str, block_t: int, num_experts: int, ctas_per_sm: int = 1, epilogue: str = 'plain') -> int:
    return _fit_stages(fmt, block_t, ctas_per_sm, 1024 + _epilogue_bytes(epilogue, block_t) + 4 * (num_experts + 1) + 64)


def _smem_bytes(fmt: str, block_t: int, stages: int, num_experts: int, epilogue: str = 'plain') -> int:
    return 1024 + _pipe_bytes(fmt, block_t, stages) + _epilogue_bytes(epilogue, block_t) + 4 * (num_experts + 1) + 64


def _grouped_config(b: ExpertWeights, tokens_per_expert: int, epilogue: str, fast_math: bool, mode: str,
                    device: int, block_t: Optional[int] = None):
    """(kernel, BLOCK_T, CTAs per SM, stages) for one launch; compiles and loads the kernel if needed."""
    block_t = _block_t(tokens_per_expert, block_t)
    ctas = _ctas_per_sm(block_t)
    stages = _stages(b.fmt, block_t, b.num_experts, ctas, epilogue)
    params = {'fmt': _FMT[b.fmt], 'block_t': block_t, 'stages': stages, 'epilogue': _EPI[epilogue],
              'mode': _MODE[mode], 'fast_math': bool(fast_math), 'ctas_per_sm': ctas}
    spec = GROUPED_GEMM_BF16 if b.fmt == 'bf16' else GROUPED_GEMM
    return registry.get_kernel(spec.name, params, device=device), block_t, ctas, stages


def prepare_grouped_contiguous(b: ExpertWeights, expected_m: int, epilogue: str = 'plain', fast_math: bool = True) -> None:
    """Compile and load the kernel that ``m_grouped_fp8_nvfp4_gemm_nt_contiguous`` with these arguments
    will launch (so that a later launch does no JIT or driver set-up work, e.g. while peers wait at a barrier)."""
    kernel, block_t, _, stages = _grouped_config(b, expected_m, epilogue, fast_math, 'contiguous', b.codes.device.index)
    kernel.ensure_dynamic_smem(_smem_bytes(b.fmt, block_t, stages, b.num_experts, epilogue))


def _launch_grouped(tokens: torch.Tensor, b: ExpertWeights, d: torch.Tensor, layout: torch.Tensor, mode: str,
                    max_rows: int, tokens_per_expert: int, epilogue: str, route_weights: Optional[torch.Tensor],
                    clamp: Optional[float], fast_math: bool, block_t: Optional[int] = None,
                    alpha: Optional[torch.Tensor] = None, epi_scales: Optional[torch.Tensor] = None):
    from .jit.tma import make_tma_2d
    kernel, block_t, ctas, stages = _grouped_config(b, tokens_per_expert, epilogue, fast_math, mode,
                                                    tokens.device.index, block_t)
    alpha = b.alpha if alpha is None else alpha
    tmap = make_tma_2d(tokens, block_t, 64, 128)
    smem = _smem_bytes(b.fmt, block_t, stages, b.num_experts, epilogue)
    clamp_v = math.inf if clamp is None else float(clamp)
    runtime.launch(kernel, get_num_sms() * ctas, 384, smem,
                   [tmap, b.codes, b.scales, alpha, layout, d, route_weights, epi_scales, runtime.f32(clamp_v),
                    runtime.i32(b.num_experts), runtime.i32(b.n), runtime.i32(b.k), runtime.i32(max_rows),
                    runtime.i32(alpha.shape[1]), runtime.i32(_token_group(block_t, b.k))])


def _split_tokens(a):
    """``a`` -> (tokens, scales or None): BF16 tokens are used as they are, FP8 come with scales."""
    if isinstance(a, torch.Tensor):
        _check(a.dtype == torch.bfloat16, TypeError,
               f'a: expected BF16 tokens or a (float8_e4m3fn tokens, float32 scales) pair, got {a.dtype}')
        return a, None
    _check(isinstance(a, (tuple, list)) and len(a) == 2, TypeError,
           'a: expected BF16 tokens or a (float8_e4m3fn tokens, float32 scales) pair')
    return a[0], a[1]


def _check_weights(b, name='b'):
    _check(isinstance(b, ExpertWeights), TypeError,
           f'{name}: expected deep_gemm ExpertWeights (see transform_nvfp4_weights_for_grouped_gemm), got {type(b).__name__}')
    _check(b.codes.is_cuda, ValueError, f'{name}: weights must be on a CUDA device, got {b.codes.device}')


def _check_epilogue(epilogue, b, route_weights, rows, device, alpha=None, epi_scales=None):
    _check(epilogue in _EPI, ValueError, f"epilogue: expected one of {', '.join(map(repr, _EPI))}, got {epilogue!r}")
    _check(b.fmt in _FMT, ValueError, f"b: {b.fmt} weights have no Hopper kernel (nvfp4, mxfp4 or bf16)")
    if epilogue in _L1_EPILOGUES:
        _check(b.kind == 'l1', ValueError, f"b: the {epilogue!r} epilogue needs L1 (gate/up interleaved) weights")
    if epilogue == 'weighted':
        _check(route_weights is not None, ValueError, "route_weights: the 'weighted' epilogue needs them")
    if route_weights is not None:
        _check(epilogue in _WEIGHTED_EPILOGUES, ValueError,
               f"route_weights: only used by the {', '.join(map(repr, _WEIGHTED_EPILOGUES))} epilogues")
        _check_cuda_tensor('route_weights', route_weights, torch.float32, 1, device)
        _check(route_weights.shape[0] == rows, ValueError,
               f'route_weights: expected [{rows}], got {tuple(route_weights.shape)}')
    if alpha is not None:
        _check_cuda_tensor('alpha', alpha, torch.float32, 2, device)
        _check(tuple(alpha.shape) == tuple(b.alpha.shape), ValueError,
               f'alpha: expected {tuple(b.alpha.shape)} (the weights\' alpha shape), got {tuple(alpha.shape)}')
    _check((epi_scales is not None) == (epilogue == 'swiglu_nvfp4'), ValueError,
           "epi_scales: the 'swiglu_nvfp4' epilogue, and only it, takes the experts' f32(1 / a2) scales")
    if epi_scales is not None:
        _check_cuda_tensor('epi_scales', epi_scales, torch.float32, 1, device)
        _check(epi_scales.shape[0] == b.num_experts, ValueError,
               f'epi_scales: expected [{b.num_experts}], got {tuple(epi_scales.shape)}')


def m_grouped_fp8_nvfp4_gemm_nt_contiguous(a: Tuple[torch.Tensor, torch.Tensor], b: ExpertWeights, d: torch.Tensor,
                                           expert_offsets: torch.Tensor, epilogue: str = 'plain',
                                           route_weights: Optional[torch.Tensor] = None,
                                           activation_clamp: Optional[float] = None, fast_math: bool = True,
                                           expected_m: Optional[int] = None, alpha: Optional[torch.Tensor] = None,
                                           epi_scales: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``d[r] = a[r] @ W_e^T * alpha_e`` for rows ``r`` of expert ``e`` (contiguous layout).  ``alpha``:
    float32 in place of ``b.alpha`` (upstream's per-call ``l1_alphas`` / ``l2_alphas``); ``epi_scales``:
    float32 ``[E]``, ``f32(1 / a2)`` per expert, for ``epilogue='swiglu_nvfp4'``."""
    _check_weights(b)
    x, sf = _split_tokens(a)
    _check_cuda_tensor('a[0]', x, x.dtype if sf is None else torch.float8_e4m3fn, 2, b.device)
    rows, k = x.shape
    _check(k == b.k, ValueError, f'a[0]: K = {k} does not match the weights (K = {b.k})')
    _check_cuda_tensor('expert_offsets', expert_offsets, torch.int32, 1, b.device)
    _check(expert_offsets.shape[0] == b.num_experts + 1, ValueError,
           f'expert_offsets: expected [{b.num_experts + 1}], got {tuple(expert_offsets.shape)}')
    _check_epilogue(epilogue, b, route_weights, rows, b.device, alpha, epi_scales)
    n_out = b.n // 2 if epilogue in _L1_EPILOGUES else b.n
    _check_cuda_tensor('d', d, torch.bfloat16, 2, b.device)
    _check(tuple(d.shape) == (rows, n_out), ValueError, f'd: expected shape {(rows, n_out)}, got {tuple(d.shape)}')
    tokens = x if sf is None else fp8_to_bf16_tokens(x, sf)
    if rows == 0:
        return d
    per_expert = expected_m if expected_m is not None else max(1, rows // max(1, b.num_experts))
    _launch_grouped(tokens, b, d, expert_offsets, 'contiguous', rows, per_expert, epilogue, route_weights,
                    activation_clamp, fast_math, alpha=alpha, epi_scales=epi_scales)
    return d


def m_grouped_fp8_nvfp4_gemm_nt_masked(a: Tuple[torch.Tensor, torch.Tensor], b: ExpertWeights, d: torch.Tensor,
                                       masked_m: torch.Tensor, expected_m: int, epilogue: str = 'plain',
                                       route_weights: Optional[torch.Tensor] = None,
                                       activation_clamp: Optional[float] = None, fast_math: bool = True) -> torch.Tensor:
    """``d[e, i] = a[e, i] @ W_e^T * alpha_e`` for ``i < masked_m[e]`` (rows past it are left untouched)."""
    _check_weights(b)
    x, sf = _split_tokens(a)
    _check_cuda_tensor('a[0]', x, x.dtype if sf is None else torch.float8_e4m3fn, 3, b.device)
    e, max_m, k = x.shape
    _check(e == b.num_experts, ValueError, f'a[0]: {e} experts, the weights have {b.num_experts}')
    _check(k == b.k, ValueError, f'a[0]: K = {k} does not match the weights (K = {b.k})')
    if sf is not None:
        _check_cuda_tensor('a[1]', sf, torch.float32, 3, b.device)
    _check_cuda_tensor('masked_m', masked_m, torch.int32, 1, b.device)
    _check(masked_m.shape[0] == e, ValueError, f'masked_m: expected [{e}], got {tuple(masked_m.shape)}')
    _check(isinstance(expected_m, int) and expected_m > 0, ValueError, f'expected_m: expected a positive int, got {expected_m!r}')
    _check_epilogue(epilogue, b, None if route_weights is None else route_weights.reshape(-1), e * max_m, b.device)
    n_out = b.n // 2 if epilogue in _L1_EPILOGUES else b.n
    _check_cuda_tensor('d', d, torch.bfloat16, 3, b.device)
    _check(tuple(d.shape) == (e, max_m, n_out), ValueError, f'd: expected shape {(e, max_m, n_out)}, got {tuple(d.shape)}')
    tokens = x.reshape(e * max_m, k) if sf is None else fp8_to_bf16_tokens(x.reshape(e * max_m, k), sf.reshape(e * max_m, -1))
    _launch_grouped(tokens, b, d.view(e * max_m, n_out), masked_m, 'masked', max_m, min(expected_m, max_m),
                    epilogue, None if route_weights is None else route_weights.reshape(-1), activation_clamp, fast_math)
    return d
