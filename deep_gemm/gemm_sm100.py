"""Blackwell (sm_100a / sm_103a) grouped expert GEMMs on tcgen05 (``impls/sm100_fp4_grouped_gemm.cuh``).

Two recipes, both with block scales applied by the tensor core:

* ``'nvfp4'``: NVFP4 weights x NVFP4 tokens (``kind::mxf4nvf4.block_scale.block16``): ``a = (x, x_sf,
  x_global_scale)``, ``x`` uint8 ``[rows, K/2]`` (two E2M1 per byte, low nibble first), ``x_sf``
  float8_e4m3fn ``[rows, K/16]`` (or already in the sm100 atom layout, uint8 ``[ceil(rows/128), K/64,
  512]``), ``x_global_scale`` a float (multiplies every output, as ``alpha`` does);
* ``'mxfp4'``: MXFP4 weights x FP8 tokens (``kind::mxf8f6f4.block_scale.block32``): ``a = (x, x_sf)``,
  ``x`` float8_e4m3fn ``[rows, K]``, ``x_sf`` UE8M0 bytes uint8 ``[rows, K/32]`` (or the atom layout).

``b`` is a :class:`~deep_gemm.weights_sm100.Sm100ExpertWeights`.  Layouts as the Hopper entry points
(``deep_gemm.gemm``): contiguous via ``expert_offsets`` int32 ``[E + 1]`` (each offset a multiple of
128: the token scale atoms are 128 rows; ``check_offsets=True`` verifies it with a host sync) and
masked via ``masked_m`` int32 ``[E]`` (``max_m`` a multiple of 128).  Epilogues ``'plain'`` (``d [rows,
N]``), ``'swiglu'`` (L1 weights, ``d [rows, N/2]``, ``route_weights``, ``activation_clamp``) and
``'swiglu_quant'`` (the L1 SwiGLU quantized into the L2 GEMM's tokens by epilogue/moe_l2_input.cuh:
NVFP4 recipe ``d`` uint8 ``[rows, N/4]`` packed E2M1 + ``d_sf`` UE4M3 atoms with ``l2_global_scale``;
MXFP4 recipe ``d`` float8_e4m3fn ``[rows, N/2]`` + ``d_sf`` UE8M0 atoms; ``d_sf`` uint8
``[ceil(rows/128), N/2/g/4, 512]``).

Two kind::f16 recipes (BF16 x BF16 -> FP32, tcgen05.mma kind::f16), for ``fp8_nvfp4_mega_moe`` /
``bf16_mega_moe`` (issue #27):

* ``'nvfp4_exact'`` weights (:func:`deep_gemm.weights_sm100.to_sm100_exact` of NVFP4 weights): the
  per-16 UE4M3 scales applied exactly (a dequant warpgroup writes BF16 A into TMEM; the TS form);
  ``a`` = BF16 tokens ``[rows, K]``, or ``(x float8_e4m3fn, x_sf uint8 UE8M0 per 32)`` converted
  exactly by :func:`fp8_tokens_to_bf16`;
* ``'bf16'`` weights (:func:`deep_gemm.weights_sm100.transform_bf16_weights_for_sm100`): BF16 x BF16,
  both from shared memory (the SS form); ``a`` as for ``'nvfp4_exact'``.
Epilogues 'plain' and 'swiglu' only.

Not run on a GPU: no Blackwell GPU was available.  The kernels compile for sm_100a and sm_103a and
their SASS is checked (tests/test_sm100_build.py); docs/sm100.md says what is verified.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch

from .gemm import _check, _check_cuda_tensor
from .jit import registry, runtime
from .weights_sm100 import SM100_STAGE_K, Sm100ExpertWeights, to_sm100_sf_layout

__all__ = ['m_grouped_fp4_gemm_nt_contiguous_sm100', 'm_grouped_fp4_gemm_nt_masked_sm100', 'smem_bytes', 'stages',
           'fp8_tokens_to_bf16', 'num_threads']

_RECIPE = {'nvfp4': 'deep_gemm::sm100::Recipe::NVFP4', 'mxfp4': 'deep_gemm::sm100::Recipe::MXFP4_FP8',
           'nvfp4_exact': 'deep_gemm::sm100::Recipe::NVFP4_EXACT', 'bf16': 'deep_gemm::sm100::Recipe::BF16'}
_EPI = {'plain': 'deep_gemm::sm100::Epilogue::Plain', 'swiglu': 'deep_gemm::sm100::Epilogue::SwiGLU',
        'swiglu_quant': 'deep_gemm::sm100::Epilogue::SwiGLUQuant'}
_L1_EPILOGUES = ('swiglu', 'swiglu_quant')
_MODE = {'contiguous': 'deep_gemm::GroupMode::Contiguous', 'masked': 'deep_gemm::GroupMode::Masked'}
_BLOCK_N_CHOICES = (32, 64, 128)
_SMEM_CAPACITY = 232448    # sm_100 max dynamic shared memory per block (227 KB)
_MAX_STAGES = 8
_SF_ALIGN_ROWS = 128

_COMMON_SASS = (r'\bUTCCP\b', r'\bLDTM\b', r'\bUTCBAR\b', r'\bUTMALDG\b', r'\bUBLKCP\b')


def _expr(recipe):
    return lambda p: (f'deep_gemm::sm100::sm100_fp4_grouped_gemm<{_RECIPE[recipe]}, {p["block_n"]}, {p["stages"]}, '
                      f'{p["epilogue"]}, {p["mode"]}, {p["fast_math"]}>')


# NVFP4 x NVFP4: the block16 MMA shows as UTCOMMA.4X on sm_100a and UTCOMMA.BLOCK16 on sm_103a
GROUPED_GEMM_NVFP4 = registry.register_kernel(registry.KernelSpec(
    name='sm100_nvfp4_grouped_gemm',
    header='sm100_fp4_grouped_gemm.cuh',
    kernel_expr_fn=_expr('nvfp4'),
    archs=('sm_100a', 'sm_103a'),
    required_sass={'sm_100a': (r'\bUTCOMMA\.4X\b',) + _COMMON_SASS,
                   'sm_103a': (r'\bUTCOMMA\.BLOCK16\b',) + _COMMON_SASS},
    forbid_local_memory=True,
    default_params=(
        {'block_n': 64, 'stages': 8, 'epilogue': _EPI['swiglu'], 'mode': _MODE['masked'], 'fast_math': True},
        {'block_n': 128, 'stages': 6, 'epilogue': _EPI['plain'], 'mode': _MODE['contiguous'], 'fast_math': True},
        {'block_n': 64, 'stages': 7, 'epilogue': _EPI['swiglu_quant'], 'mode': _MODE['contiguous'], 'fast_math': True},
    ),
))

# MXFP4 x FP8: kind::mxf8f6f4 shows as UTCQMMA
GROUPED_GEMM_MXFP4 = registry.register_kernel(registry.KernelSpec(
    name='sm100_mxfp4_fp8_grouped_gemm',
    header='sm100_fp4_grouped_gemm.cuh',
    kernel_expr_fn=_expr('mxfp4'),
    archs=('sm_100a', 'sm_103a'),
    required_sass=(r'\bUTCQMMA\b',) + _COMMON_SASS,
    forbid_local_memory=True,
    default_params=(
        {'block_n': 64, 'stages': 8, 'epilogue': _EPI['swiglu'], 'mode': _MODE['contiguous'], 'fast_math': True},
        {'block_n': 128, 'stages': 6, 'epilogue': _EPI['plain'], 'mode': _MODE['masked'], 'fast_math': True},
        {'block_n': 64, 'stages': 8, 'epilogue': _EPI['swiglu_quant'], 'mode': _MODE['masked'], 'fast_math': True},
    ),
))

# NVFP4 weights x BF16 tokens, the per-16 UE4M3 scales applied exactly (issue #27): a dequant warpgroup
# stores BF16 A into TMEM (tcgen05.st: STTM), tcgen05.mma kind::f16 in its TS form (UTCHMMA)
GROUPED_GEMM_NVFP4_EXACT = registry.register_kernel(registry.KernelSpec(
    name='sm100_nvfp4_exact_grouped_gemm',
    header='sm100_fp4_grouped_gemm.cuh',
    kernel_expr_fn=_expr('nvfp4_exact'),
    archs=('sm_100a', 'sm_103a'),
    required_sass=(r'\bUTCHMMA\b', r'\bSTTM\b') + _COMMON_SASS[1:],
    forbid_local_memory=True,
    default_params=(   # stages = stages('nvfp4_exact', block_n, 384, epilogue): what the launcher picks
        {'block_n': 32, 'stages': 6, 'epilogue': _EPI['swiglu'], 'mode': _MODE['masked'], 'fast_math': True},
        {'block_n': 64, 'stages': 4, 'epilogue': _EPI['plain'], 'mode': _MODE['contiguous'], 'fast_math': True},
        {'block_n': 128, 'stages': 2, 'epilogue': _EPI['swiglu'], 'mode': _MODE['contiguous'], 'fast_math': True},
    ),
))

# BF16 x BF16 (bf16_mega_moe): kind::f16, both operands from shared memory (UTCHMMA), no scales
GROUPED_GEMM_BF16 = registry.register_kernel(registry.KernelSpec(
    name='sm100_bf16_grouped_gemm',
    header='sm100_fp4_grouped_gemm.cuh',
    kernel_expr_fn=_expr('bf16'),
    archs=('sm_100a', 'sm_103a'),
    required_sass=(r'\bUTCHMMA\b', r'\bLDTM\b', r'\bUTCBAR\b', r'\bUTMALDG\b'),
    forbid_local_memory=True,
    default_params=(
        {'block_n': 64, 'stages': 8, 'epilogue': _EPI['swiglu'], 'mode': _MODE['masked'], 'fast_math': True},
        {'block_n': 128, 'stages': 7, 'epilogue': _EPI['plain'], 'mode': _MODE['contiguous'], 'fast_math': True},
    ),
))

_SPECS = {'nvfp4': GROUPED_GEMM_NVFP4, 'mxfp4': GROUPED_GEMM_MXFP4, 'nvfp4_exact': GROUPED_GEMM_NVFP4_EXACT,
          'bf16': GROUPED_GEMM_BF16}


# ------------------------------------------------------------------ shared memory (GemmPlan's numbers)
_F16_RECIPES = ('nvfp4_exact', 'bf16')


def _atoms(fmt: str) -> int:
    if fmt == 'bf16':
        return 0
    return SM100_STAGE_K[fmt] // (32 if fmt == 'mxfp4' else 16) // 4


def _stage_bytes(fmt: str, block_n: int) -> int:
    """GemmPlan::kStageBytes: A (128 x 128 B), B (block_n x 128 B per box: 4 boxes for nvfp4_exact), SFA
    and SFB atoms (nvfp4_exact: SFA only; bf16: none)."""
    boxes = 4 if fmt == 'nvfp4_exact' else 1
    sf_tensors = 1 if fmt == 'nvfp4_exact' else 0 if fmt == 'bf16' else 2
    return 128 * 128 + block_n * 128 * boxes + sf_tensors * 512 * _atoms(fmt)


def num_threads(fmt: str) -> int:
    """GemmPlan::kNumThreads: 256, 384 with the exact recipe's dequant warpgroup."""
    return 384 if fmt == 'nvfp4_exact' else 256


def _scratch_bytes(epilogue: str, block_n: int) -> int:
    """kEpilogueScratchBytes: the SwiGLUQuant staging, float [64][block_n]."""
    return 64 * block_n * 4 if epilogue == 'swiglu_quant' else 0


def smem_bytes(fmt: str, block_n: int, num_stages: int, num_experts: int, epilogue: str = 'plain') -> int:
    """Dynamic shared memory of one launch: 1024 for the alignment, GemmPlan::kSmemBytes (stages,
    2 S + 4 barriers, the TMEM slot), the epilogue's scratch, the tile prefix (int [E + 1])."""
    barriers = 2 * num_stages + 4 + (4 if fmt == 'nvfp4_exact' else 0)
    plan = num_stages * _stage_bytes(fmt, block_n) + 8 * barriers + 16
    return 1024 + plan + _scratch_bytes(epilogue, block_n) + 4 * (num_experts + 1)


def stages(fmt: str, block_n: int, num_experts: int, epilogue: str = 'plain') -> int:
    fixed = smem_bytes(fmt, block_n, 0, num_experts, epilogue)
    return max(2, min(_MAX_STAGES, (_SMEM_CAPACITY - fixed) // (_stage_bytes(fmt, block_n) + 16)))


def _block_n(tokens_per_expert: int, block_n: Optional[int]) -> int:
    if block_n is None:
        block_n = int(os.environ.get('DG_SM100_BLOCK_N', 0)) or next(
            (b for b in _BLOCK_N_CHOICES if tokens_per_expert <= b), _BLOCK_N_CHOICES[-1])
    if block_n not in _BLOCK_N_CHOICES:
        raise ValueError(f'block_n: expected one of {_BLOCK_N_CHOICES}, got {block_n}')
    return block_n


def _token_group(block_n: int, k_bytes: int) -> int:
    return max(1, (8 << 20) // (block_n * k_bytes))


# ------------------------------------------------------------------ argument checks: gemm.py's
def _check_weights(b):
    _check(isinstance(b, Sm100ExpertWeights), TypeError,
           f'b: expected deep_gemm Sm100ExpertWeights (see deep_gemm.weights_sm100), got {type(b).__name__}')
    _check(b.codes.is_cuda, ValueError, f'b: weights must be on a CUDA device, got {b.codes.device}')


def _check_epilogue(epilogue, b, route_weights, rows, device):
    _check(epilogue in _EPI, ValueError, f"epilogue: expected 'plain', 'swiglu' or 'swiglu_quant', got {epilogue!r}")
    if epilogue in _L1_EPILOGUES:
        _check(b.kind == 'l1', ValueError, f"b: the {epilogue!r} epilogue needs L1 (gate/up interleaved) weights")
    if route_weights is not None:
        _check(epilogue in _L1_EPILOGUES, ValueError, "route_weights: only used by the L1 epilogues")
        _check_cuda_tensor('route_weights', route_weights, torch.float32, 1, device)
        _check(route_weights.shape[0] == rows, ValueError,
               f'route_weights: expected [{rows}], got {tuple(route_weights.shape)}')


def fp8_tokens_to_bf16(x: torch.Tensor, x_sf: torch.Tensor, gran: int = 32) -> torch.Tensor:
    """FP8 E4M3 tokens ``[..., K]`` with UE8M0 scales (uint8 ``[..., K / gran]``) -> BF16, exactly: an E4M3
    value (4 significant bits) times a power of two is a BF16 (8 bits) while the result stays in BF16's
    normal range (checked).  The token side of the kind::f16 recipes (the Hopper gather's conversion)."""
    _check(x.dtype == torch.float8_e4m3fn and x_sf.dtype == torch.uint8, TypeError,
           'x / x_sf: expected float8_e4m3fn tokens and uint8 UE8M0 scales')
    _check(tuple(x_sf.shape) == tuple(x.shape[:-1]) + (x.shape[-1] // gran,), ValueError,
           f'x_sf: expected {tuple(x.shape[:-1]) + (x.shape[-1] // gran,)}, got {tuple(x_sf.shape)}')
    v = x.to(torch.float32) * torch.exp2(x_sf.to(torch.float32) - 127.0).repeat_interleave(gran, dim=-1)
    out = v.to(torch.bfloat16)
    _check(bool((out.to(torch.float32) == v).all()), ValueError, 'fp8_tokens_to_bf16: a value is not exact in BF16')
    return out


def _split_tokens(a, b: Sm100ExpertWeights, rows_dims: int):
    """``a`` -> (tokens 2-D, scales in the atom layout, global scale); every check named after ``a``."""
    if b.fmt in _F16_RECIPES:   # BF16 tokens (or FP8 + UE8M0, converted exactly); no token scales
        if isinstance(a, (tuple, list)):
            x = a[0] if len(a) == 1 else fp8_tokens_to_bf16(a[0], a[1])
        else:
            x = a
        _check_cuda_tensor('a', x, torch.bfloat16, rows_dims, b.device)
        _check(x.shape[-1] == b.k, ValueError, f'a: K = {x.shape[-1]} does not match the weights (K = {b.k})')
        rows = math.prod(x.shape[:-1])
        return x.reshape(rows, b.k), None, 1.0
    want = 3 if b.fmt == 'nvfp4' else 2
    _check(isinstance(a, (tuple, list)) and len(a) == want, TypeError,
           f'a: expected {"(x uint8, x_sf float8_e4m3fn, x_global_scale)" if want == 3 else "(x float8_e4m3fn, x_sf uint8)"} '
           f'for {b.fmt} weights')
    x, sf = a[0], a[1]
    gs = float(a[2]) if want == 3 else 1.0
    _check(math.isfinite(gs) and gs > 0, ValueError, f'a[2]: the token global scale must be finite and positive, got {gs}')
    xdt = torch.uint8 if b.fmt == 'nvfp4' else torch.float8_e4m3fn
    _check_cuda_tensor('a[0]', x, xdt, rows_dims, b.device)
    k = x.shape[-1] * (2 if b.fmt == 'nvfp4' else 1)
    _check(k == b.k, ValueError, f'a[0]: K = {k} does not match the weights (K = {b.k})')
    rows = math.prod(x.shape[:-1])
    x2 = x.reshape(rows, x.shape[-1])
    blocks = b.k // b.gran
    _check(isinstance(sf, torch.Tensor), TypeError, f'a[1]: expected a torch.Tensor, got {type(sf).__name__}')
    if sf.dim() == 3 and sf.shape[-1] == 512 and sf.dtype == torch.uint8 and rows_dims == 2:
        _check(tuple(sf.shape) == (-(-rows // 128), blocks // 4, 512), ValueError,
               f'a[1]: atom-layout scales must be [{-(-rows // 128)}, {blocks // 4}, 512], got {tuple(sf.shape)}')
        _check_cuda_tensor('a[1]', sf, torch.uint8, 3, b.device)
        return x2, sf, gs
    sdt = torch.float8_e4m3fn if b.fmt == 'nvfp4' else torch.uint8
    _check_cuda_tensor('a[1]', sf, sdt, rows_dims, b.device)
    _check(tuple(sf.shape) == tuple(x.shape[:-1]) + (blocks,), ValueError,
           f'a[1]: expected {tuple(x.shape[:-1]) + (blocks,)}, got {tuple(sf.shape)}')
    return x2, to_sm100_sf_layout(sf.reshape(rows, blocks)), gs


# ------------------------------------------------------------------ TMA descriptors
def _tma(tensor: torch.Tensor, rows: int, cols_elems: int, row_bytes: int, box_rows: int, dtype_name: str,
         box_inner: int = 128):
    """2-D tensor map over a row-major byte buffer: (cols_elems x rows) elements of `dtype_name`,
    box (box_inner elements: 128 bytes, box_rows), SWIZZLE_128B, out-of-bounds rows read as zero."""
    d = runtime.driver()
    _check(tensor.data_ptr() % 16 == 0, ValueError, 'TMA base address must be 16-byte aligned')
    _check(row_bytes % 16 == 0, ValueError, f'TMA row stride must be a multiple of 16 bytes, got {row_bytes}')
    dtype = getattr(d.CUtensorMapDataType, dtype_name, None)
    if dtype is None:
        raise RuntimeError(f'this cuda-bindings has no {dtype_name} (needs CUDA >= 12.8)')
    u32, u64 = d.cuuint32_t, d.cuuint64_t
    return runtime.check(d.cuTensorMapEncodeTiled(
        dtype, u32(2), tensor.data_ptr(), [u64(cols_elems), u64(rows)], [u64(row_bytes)], [u32(box_inner), u32(box_rows)],
        [u32(1), u32(1)], d.CUtensorMapInterleave.CU_TENSOR_MAP_INTERLEAVE_NONE,
        d.CUtensorMapSwizzle.CU_TENSOR_MAP_SWIZZLE_128B, d.CUtensorMapL2promotion.CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
        d.CUtensorMapFloatOOBfill.CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE))


def _weight_map(b: Sm100ExpertWeights):
    rows = b.num_experts * b.n
    if b.fmt in ('nvfp4', 'nvfp4_exact'):   # packed bytes are the elements
        return _tma(b.codes, rows, b.k // 2, b.k // 2, 128, 'CU_TENSOR_MAP_DATA_TYPE_UINT8')
    if b.fmt == 'bf16':
        return _tma(b.codes, rows, b.k, 2 * b.k, 128, 'CU_TENSOR_MAP_DATA_TYPE_BFLOAT16', 64)
    # MXFP4: 4-bit elements, unpacked to one per byte in shared memory (the mxf8f6f4 operand format)
    return _tma(b.codes, rows, b.k, b.k // 2, 128, 'CU_TENSOR_MAP_DATA_TYPE_16U4_ALIGN16B')


def _check_out(epilogue, b, d, lead, d_sf, l2_global_scale):
    """``d`` (and for 'swiglu_quant' ``d_sf``, the L2 global scale) -> (d, d_sf or None, 1 / global scale)."""
    rows = math.prod(lead)
    if epilogue != 'swiglu_quant':
        _check(d_sf is None and l2_global_scale is None, ValueError,
               "d_sf / l2_global_scale: only used by the 'swiglu_quant' epilogue")
        n_out = b.n // 2 if epilogue == 'swiglu' else b.n
        _check_cuda_tensor('d', d, torch.bfloat16, len(lead) + 1, b.device)
        _check(tuple(d.shape) == tuple(lead) + (n_out,), ValueError,
               f'd: expected shape {tuple(lead) + (n_out,)}, got {tuple(d.shape)}')
        return d, None, 1.0
    _check(b.fmt not in _F16_RECIPES, ValueError, f"epilogue: 'swiglu_quant' is not built for {b.fmt} weights")
    inter = b.n // 2
    if b.fmt == 'nvfp4':   # the L2 GEMM's NVFP4 tokens: packed E2M1, UE4M3 per 16, a global scale
        width, gran, ddt = inter // 2, 16, torch.uint8
        _check(l2_global_scale is not None and math.isfinite(float(l2_global_scale)) and float(l2_global_scale) > 0,
               ValueError, f'l2_global_scale: a finite positive float is required for NVFP4, got {l2_global_scale!r}')
        inv_g = float(torch.tensor(1.0, dtype=torch.float32) / torch.tensor(float(l2_global_scale), dtype=torch.float32))
    else:                  # FP8 E4M3 tokens with UE8M0 per 32
        width, gran, ddt, inv_g = inter, 32, torch.float8_e4m3fn, 1.0
        _check(l2_global_scale is None, ValueError, 'l2_global_scale: only used with NVFP4 weights')
    _check_cuda_tensor('d', d, ddt, len(lead) + 1, b.device)
    _check(tuple(d.shape) == tuple(lead) + (width,), ValueError,
           f'd: expected shape {tuple(lead) + (width,)}, got {tuple(d.shape)}')
    want = (-(-rows // 128), inter // gran // 4, 512)
    _check_cuda_tensor('d_sf', d_sf, torch.uint8, 3, b.device)
    _check(tuple(d_sf.shape) == want, ValueError, f'd_sf: expected the atom layout {want}, got {tuple(d_sf.shape)}')
    _check(inter % 64 == 0, ValueError, f'b: intermediate {inter} must be a multiple of 64')
    return d, d_sf, inv_g


def _launch(x2, sfb, gs, b, d, layout, mode, max_rows, per_expert, epilogue, route_weights, clamp, fast_math, block_n,
            d_sf=None, inv_g=1.0):
    from .gemm import get_num_sms
    block_n = _block_n(per_expert, block_n)
    num_stages = stages(b.fmt, block_n, b.num_experts, epilogue)
    params = {'block_n': block_n, 'stages': num_stages, 'epilogue': _EPI[epilogue], 'mode': _MODE[mode],
              'fast_math': bool(fast_math)}
    kernel = registry.get_kernel(_SPECS[b.fmt].name, params, device=x2.device.index)
    smem = smem_bytes(b.fmt, block_n, num_stages, b.num_experts, epilogue)
    kernel.ensure_dynamic_smem(smem)
    k_bytes = x2.shape[1]
    a_map = _weight_map(b)
    if b.fmt in _F16_RECIPES:   # BF16 tokens: boxes of 64 elements (128 bytes)
        k_bytes = 2 * x2.shape[1]
        b_map = _tma(x2, x2.shape[0], x2.shape[1], k_bytes, block_n, 'CU_TENSOR_MAP_DATA_TYPE_BFLOAT16', 64)
    else:
        b_map = _tma(x2, x2.shape[0], k_bytes, k_bytes, block_n, 'CU_TENSOR_MAP_DATA_TYPE_UINT8')
    clamp_v = math.inf if clamp is None else float(clamp)
    runtime.launch(kernel, get_num_sms(), num_threads(b.fmt), smem,
                   [a_map, b_map, b.scales, sfb, b.alpha, runtime.f32(gs), layout, d, route_weights, runtime.f32(clamp_v),
                    runtime.i32(b.num_experts), runtime.i32(b.n), runtime.i32(b.k), runtime.i32(max_rows),
                    runtime.i32(b.alpha.shape[1]), runtime.i32(_token_group(block_n, k_bytes)), d_sf, runtime.f32(inv_g)])


def m_grouped_fp4_gemm_nt_contiguous_sm100(a, b: Sm100ExpertWeights, d: torch.Tensor, expert_offsets: torch.Tensor,
                                           epilogue: str = 'plain', route_weights: Optional[torch.Tensor] = None,
                                           activation_clamp: Optional[float] = None, fast_math: bool = True,
                                           expected_m: Optional[int] = None, block_n: Optional[int] = None,
                                           check_offsets: bool = False, d_sf: Optional[torch.Tensor] = None,
                                           l2_global_scale: Optional[float] = None) -> torch.Tensor:
    """``d[r] = a[r] @ W_e^T * alpha_e * x_global_scale`` for rows ``r`` of expert ``e`` (contiguous).
    ``epilogue='swiglu_quant'``: ``d`` (codes) and ``d_sf`` (atom-layout scales) receive the L2 GEMM's tokens."""
    _check_weights(b)
    x2, sfb, gs = _split_tokens(a, b, 2)
    rows = x2.shape[0]
    _check_cuda_tensor('expert_offsets', expert_offsets, torch.int32, 1, b.device)
    _check(expert_offsets.shape[0] == b.num_experts + 1, ValueError,
           f'expert_offsets: expected [{b.num_experts + 1}], got {tuple(expert_offsets.shape)}')
    if check_offsets:   # a host sync: off by default (CUDA-graph capture)
        bad = (expert_offsets % _SF_ALIGN_ROWS != 0).nonzero()
        _check(bad.numel() == 0, ValueError, f'expert_offsets: every offset must be a multiple of {_SF_ALIGN_ROWS} '
                                             f'(first bad index {bad.flatten()[:1].tolist()})')
    _check_epilogue(epilogue, b, route_weights, rows, b.device)
    d, d_sf, inv_g = _check_out(epilogue, b, d, (rows,), d_sf, l2_global_scale)
    if rows == 0:
        return d
    per_expert = expected_m if expected_m is not None else max(1, rows // max(1, b.num_experts))
    _launch(x2, sfb, gs, b, d, expert_offsets, 'contiguous', rows, per_expert, epilogue, route_weights,
            activation_clamp, fast_math, block_n, d_sf, inv_g)
    return d


def m_grouped_fp4_gemm_nt_masked_sm100(a, b: Sm100ExpertWeights, d: torch.Tensor, masked_m: torch.Tensor,
                                       expected_m: int, epilogue: str = 'plain',
                                       route_weights: Optional[torch.Tensor] = None,
                                       activation_clamp: Optional[float] = None, fast_math: bool = True,
                                       block_n: Optional[int] = None, d_sf: Optional[torch.Tensor] = None,
                                       l2_global_scale: Optional[float] = None) -> torch.Tensor:
    """``d[e, i] = a[e, i] @ W_e^T * alpha_e * x_global_scale`` for ``i < masked_m[e]`` (other rows untouched)."""
    _check_weights(b)
    if b.fmt in _F16_RECIPES and isinstance(a, torch.Tensor):
        a = (a,)     # BF16 tokens [E, max_m, K]
    _check(isinstance(a, (tuple, list)) and len(a) >= 1 and isinstance(a[0], torch.Tensor), TypeError,
           'a: expected a tuple of token tensors')
    _check(a[0].dim() == 3, ValueError, f'a[0]: expected [E, max_m, K(/2)], got shape {tuple(a[0].shape)}')
    e, max_m = a[0].shape[:2]
    _check(e == b.num_experts, ValueError, f'a[0]: {e} experts, the weights have {b.num_experts}')
    _check(max_m % _SF_ALIGN_ROWS == 0, ValueError, f'a[0]: max_m = {max_m} must be a multiple of {_SF_ALIGN_ROWS}')
    x2, sfb, gs = _split_tokens(a, b, 3)
    _check_cuda_tensor('masked_m', masked_m, torch.int32, 1, b.device)
    _check(masked_m.shape[0] == e, ValueError, f'masked_m: expected [{e}], got {tuple(masked_m.shape)}')
    _check(isinstance(expected_m, int) and expected_m > 0, ValueError, f'expected_m: expected a positive int, got {expected_m!r}')
    rw = None if route_weights is None else route_weights.reshape(-1)
    _check_epilogue(epilogue, b, rw, e * max_m, b.device)
    d, d_sf, inv_g = _check_out(epilogue, b, d, (e, max_m), d_sf, l2_global_scale)
    _launch(x2, sfb, gs, b, d.view(e * max_m, d.shape[-1]), masked_m, 'masked', max_m, min(expected_m, max_m), epilogue,
            rw, activation_clamp, fast_math, block_n, d_sf, inv_g)
    return d
