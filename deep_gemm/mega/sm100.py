"""The Blackwell backend of the Mega MoE layer: one fused persistent kernel per wave
(``impls/sm100_fp8_nvfp4_mega_moe.cuh``, one template, the recipe a parameter) for upstream's two
block-scaled entry points, its BF16 one and our exact one:

* ``fp4_fp4_mega_moe`` (``mma_type='fp4xfp4'``): NVFP4 tokens x NVFP4 weights (tcgen05
  kind::mxf4nvf4.block16); L1 unweighted, its output NVFP4 with the expert's ``a2`` as global
  scale; L2 alpha ``l2_alpha x a2``, the top-k weight after L2;
* ``fp8_fp4_mega_moe`` (``mma_type='fp8xfp4'``): FP8 tokens (UE8M0 per 32) x MXFP4 weights
  (kind::mxf8f6f4.block32); L1 weighted, its output FP8 E4M3 with a power-of-two scale per 32;
* ``bf16_mega_moe`` (``mma_type='bf16xbf16'``, ``'bf16'`` weights): BF16 x BF16 (kind::f16, SS form);
  L1 weighted, its output BF16 with sm90 SwiGLUBF16's roundings; L2 plain;
* ``fp8_nvfp4_mega_moe`` (``run``; ``'fp8xnvfp4'`` or ``'fp8xfp4'`` buffers, ``'nvfp4_exact'`` weights from
  ``weights_sm100.to_sm100_exact``): FP8 tokens gathered as BF16 (exact) x NVFP4 weights dequantized
  exactly to BF16 in TMEM (kind::f16, TS form); L1 weighted, ``h = bf16(swiglu(...) x w)``
  (docs/design.md); L2 plain with the weights' alphas.

Same buffer (``SymmBuffer``, the regions of ``get_symm_buffer_layout``), protocol, barriers,
timeouts, waves and combine as the Hopper fused kernel (``deep_gemm.mega.sm90``, whose helpers this
module imports: grid, push, token tile hint, recipe alphas); no host synchronisation (every shape is
fixed by the buffer, counts stay on the device), so a call can be captured in a CUDA graph.  The
kernel's token rows (L1 and L2 inputs) live inside the buffer's ``l1_x`` / ``l2_x`` regions: in the
MMA's format padded per token tile for the block-scaled recipes (``token_layout``), BF16 at the
unpadded rows for the kind::f16 ones.  Weights: ``deep_gemm.weights_sm100``'s
:class:`~deep_gemm.weights_sm100.Sm100ExpertWeights` (``kind='l1'`` and ``'l2'``).

Not run on a GPU: no CC 10.x GPU was available.  The kernels compile for sm_100a and sm_103a with
their SASS checked (tests/test_sm100_fused_build.py); docs/sm100.md, "The fused kernel", says
what is verified and what is not.  Not supported yet (NotImplementedError): shared experts,
``routed_scaling_factor != 1``, the ``fp8xfp8`` kind.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch

from .. import gemm_sm100
from ..jit import registry, runtime
from ..weights_sm100 import SM100_STAGE_K, Sm100ExpertWeights
from . import sm90
from .sm90 import _LOOKAHEAD_EXPERTS, _MAX_RANKS, _expected_m, _fused_shared_bytes, fused_grid, push_enabled

__all__ = ['run', 'run_fused', 'prepare', 'token_layout', 'MULTI_RANK', 'FUSED_NVFP4', 'FUSED_MXFP4', 'FUSED_EXACT',
           'FUSED_BF16', 'RECIPES']

MULTI_RANK = True

#: buffer kind -> the kernel's recipe (weights' fmt)
RECIPES = {'fp4xfp4': 'nvfp4', 'fp8xfp4': 'mxfp4', 'bf16xbf16': 'bf16'}
#: the buffer kinds ``run`` (``fp8_nvfp4_mega_moe``) takes, with ``'nvfp4_exact'`` weights
EXACT_KINDS = ('fp8xnvfp4', 'fp8xfp4')
_RECIPE_EXPR = {'nvfp4': 'deep_gemm::sm100::Recipe::NVFP4', 'mxfp4': 'deep_gemm::sm100::Recipe::MXFP4_FP8',
                'nvfp4_exact': 'deep_gemm::sm100::Recipe::NVFP4_EXACT', 'bf16': 'deep_gemm::sm100::Recipe::BF16'}
_F16 = ('nvfp4_exact', 'bf16')
_THREADS = 384
_HANDOVER_BYTES = 32          # mega::sm100_layout::Handover (two mbarriers, two ints), aligned
_MAX_STAGES = 8

# The comm roles' system-scope release and acquire (barrier signals st.release.sys, their waits
# ld.acquire.sys), their timeouts, and the tcgen05 core every recipe has: LDTM (tcgen05.ld), UTCBAR
# (tcgen05.commit), TMA; the block-scaled recipes add UTCCP (scale atoms to TMEM) and bulk copies.
_CORE_SASS = (r'\bLDTM\b', r'\bUTCBAR\b', r'\bUTMALDG\b', r'\bSTG\.E\.STRONG\.SYS\b', r'\bLDG\.E\.STRONG\.SYS\b',
              r'\bSR_GLOBALTIMER')
_COMMON_SASS = (r'\bUTCCP\b', r'\bUBLKCP\b') + _CORE_SASS


def _expr(recipe: str):
    return lambda p: (f'deep_gemm::sm100_fp8_nvfp4_mega_moe<{_RECIPE_EXPR[recipe]}, {p["block_t"]}, {p["stages"]}, '
                      f'{p["fast_math"]}, {p["max_experts"]}>')


def _smem_bytes(fmt: str, block_t: int, stages: int) -> int:
    """Dynamic shared memory: 1024 alignment slack, GemmPlan::kSmemBytes (stages, 2 S + 4 barriers, 4 more
    for the exact recipe's A slots, the TMEM slot), the block-scaled L1 epilogue's staging (float
    [64][block_t]; the kind::f16 recipes' L1 writes BF16 rows directly)."""
    barriers = 2 * stages + 4 + (4 if fmt == 'nvfp4_exact' else 0)
    plan = stages * gemm_sm100._stage_bytes(fmt, block_t) + 8 * barriers + 16
    return 1024 + plan + gemm_sm100._scratch_bytes('plain' if fmt in _F16 else 'swiglu_quant', block_t)


def stages_for(fmt: str, block_t: int, max_experts: int) -> int:
    """Pipeline stages that fit next to the static shared memory (mega::Shared + the hand-over)."""
    static = _fused_shared_bytes(max_experts) + _HANDOVER_BYTES
    room = gemm_sm100._SMEM_CAPACITY - static - _smem_bytes(fmt, block_t, 0)
    return max(2, min(_MAX_STAGES, room // (gemm_sm100._stage_bytes(fmt, block_t) + 16)))


def _defaults(fmt: str, block_ts, max_experts: int = 64):
    return tuple({'block_t': bt, 'stages': stages_for(fmt, bt, max_experts), 'fast_math': True,
                  'max_experts': max_experts} for bt in block_ts)


def _register(name: str, fmt: str, required_sass, block_ts):
    """One recipe of the header as a registered spec (sm_100a + sm_103a, no local memory allowed)."""
    return registry.register_kernel(registry.KernelSpec(
        name=name, header='sm100_fp8_nvfp4_mega_moe.cuh', kernel_expr_fn=_expr(fmt), archs=('sm_100a', 'sm_103a'),
        required_sass=required_sass, forbid_local_memory=True, default_params=_defaults(fmt, block_ts)))


# NVFP4 x NVFP4: the block16 MMA shows as UTCOMMA.4X on sm_100a and UTCOMMA.BLOCK16 on sm_103a;
# decode (32-token tiles) and prefill (128)
FUSED_NVFP4 = _register('sm100_fp4_fp4_mega_moe', 'nvfp4', {'sm_100a': (r'\bUTCOMMA\.4X\b',) + _COMMON_SASS,
                                                            'sm_103a': (r'\bUTCOMMA\.BLOCK16\b',) + _COMMON_SASS}, (32, 128))
# FP8 x MXFP4: kind::mxf8f6f4 shows as UTCQMMA
FUSED_MXFP4 = _register('sm100_fp8_fp4_mega_moe', 'mxfp4', (r'\bUTCQMMA\b',) + _COMMON_SASS, (64,))
# The kind::f16 recipes (UTCHMMA).  fp8_nvfp4_mega_moe's exact FP8 x NVFP4: the dequant warpgroup's
# tcgen05.st (STTM), the weights' scale atoms by bulk copy (UBLKCP), no tcgen05.cp
FUSED_EXACT = _register('sm100_fp8_nvfp4_mega_moe', 'nvfp4_exact', (r'\bUTCHMMA\b', r'\bSTTM\b', r'\bUBLKCP\b') + _CORE_SASS,
                        (64,))
# bf16_mega_moe: BF16 x BF16, both operands from shared memory
FUSED_BF16 = _register('sm100_bf16_mega_moe', 'bf16', (r'\bUTCHMMA\b',) + _CORE_SASS, (64,))

_SPECS = {'nvfp4': FUSED_NVFP4, 'mxfp4': FUSED_MXFP4, 'nvfp4_exact': FUSED_EXACT, 'bf16': FUSED_BF16}


# ------------------------------------------------------------------ the kernel's token rows
@dataclasses.dataclass(frozen=True)
class TokenLayout:
    """Where the kernel keeps one GEMM's token rows inside a BF16 region of ``rows x width``:
    ``padded_rows`` rows of ``row_bytes`` code bytes from byte 0 (token tile i at rows
    ``[i block_t, (i + 1) block_t)``), then the scales in the 512-byte atom layout from ``sf_offset``
    (``sf_bytes``)."""
    padded_rows: int
    row_bytes: int
    sf_offset: int
    sf_bytes: int
    region_bytes: int

    @property
    def fits(self) -> bool:
        return self.sf_offset + self.sf_bytes <= self.region_bytes


def token_layout(fmt: str, rows: int, width: int, block_t: int, num_experts: int) -> TokenLayout:
    """``rows``: the buffer's receive rows (``l1_x.shape[0]``); ``width``: channels (hidden or
    intermediate).  Token tiles: at most ceil(rows / block_t) + num_experts (one partial per expert)."""
    gran = 16 if fmt == 'nvfp4' else 32
    padded = (-(-rows // block_t) + num_experts) * block_t
    row_bytes = width // 2 if fmt == 'nvfp4' else width
    sf_offset = -(-padded * row_bytes // 1024) * 1024
    sf_bytes = -(-padded // 128) * (width // gran // 4) * 512
    return TokenLayout(padded, row_bytes, sf_offset, sf_bytes, rows * width * 2)


def _token_views(region: torch.Tensor, lay: TokenLayout):
    flat = region.view(torch.uint8).reshape(-1)
    return flat[:lay.padded_rows * lay.row_bytes].view(lay.padded_rows, lay.row_bytes), \
        flat[lay.sf_offset:lay.sf_offset + lay.sf_bytes]


# ------------------------------------------------------------------ argument checks
def _check(cond, exc, msg):
    if not cond:
        raise exc(msg)


def _recipe_fmt(buffer) -> str:
    fmt = RECIPES.get(getattr(buffer, 'mma_type', None))
    if fmt is None:
        raise NotImplementedError(f"buffer: the sm100 fused kernel's upstream entries run mma_type 'fp4xfp4' "
                                  f"(fp4_fp4_mega_moe), 'fp8xfp4' (fp8_fp4_mega_moe) or 'bf16xbf16' (bf16_mega_moe), "
                                  f"got {getattr(buffer, 'mma_type', None)!r}")
    return fmt


def _check_args(y, l1, l2, buffer, fmt: str):
    _check(buffer.num_ranks <= _MAX_RANKS, ValueError,
           f'buffer: {buffer.num_ranks} ranks > {_MAX_RANKS}, the most the fused kernel takes')
    _check(isinstance(y, torch.Tensor) and y.dtype == torch.bfloat16 and y.dim() == 2, TypeError,
           f'y: expected a bfloat16 [T, hidden] tensor, got {getattr(y, "dtype", type(y).__name__)}')
    _check(y.device == buffer.device and y.is_contiguous() and y.shape[1] == buffer.hidden, ValueError,
           f'y: expected contiguous [T, {buffer.hidden}] on {buffer.device}, got {tuple(y.shape)} on {y.device}')
    _check(y.shape[0] <= buffer.num_max_tokens_per_rank, ValueError,
           f'y: {y.shape[0]} tokens > the buffer\'s {buffer.num_max_tokens_per_rank}')
    e = buffer.num_experts_per_rank
    for name, w, kind, n, k in (('l1', l1, 'l1', 2 * buffer.intermediate_hidden, buffer.hidden),
                                ('l2', l2, 'l2', buffer.hidden, buffer.intermediate_hidden)):
        _check(isinstance(w, Sm100ExpertWeights), TypeError,
               f'{name}: expected deep_gemm.weights_sm100.Sm100ExpertWeights, got {type(w).__name__}')
        _check(w.fmt == fmt and w.kind == kind, ValueError,
               f'{name}: a {buffer.mma_type!r} buffer runs {fmt} {kind} weights, got {w.fmt} {w.kind}')
        _check((w.num_experts, w.n, w.k) == (e, n, k), ValueError,
               f'{name}: expected {e} experts of [{n}, {k}], got {w.num_experts} of [{w.n}, {w.k}]')
        _check(w.device == buffer.device, ValueError, f'{name}: on {w.device}, the buffer is on {buffer.device}')
    stage_k = max(128, SM100_STAGE_K[fmt])   # weight-row tiles of 128; K of a pipeline stage
    _check(buffer.hidden % stage_k == 0 and buffer.intermediate_hidden % stage_k == 0, ValueError,
           f'buffer: hidden {buffer.hidden} and intermediate {buffer.intermediate_hidden} must be multiples of '
           f'{stage_k} for the {fmt} kernel (128-row weight tiles, {SM100_STAGE_K[fmt]} K per stage)')
    # last, so that the checks above also run (and are tested) on a CPU buffer
    _check(buffer.device.type == 'cuda', ValueError,
           f'buffer: the sm100 backend needs a CUDA buffer (symmetric memory), got one on {buffer.device}')
    _check(buffer.peer_bases is not None, ValueError,
           'buffer: a multi-rank buffer without peer mappings; sm100 needs symmetric memory')


def _alphas(l1, l2, recipe):
    """(L1 alphas [E, 2], L2 alphas [E], 1 / L2-input global scale [E] or None), contiguous float32."""
    a1 = recipe.l1_alpha if recipe.l1_alpha is not None else l1.alpha
    a2 = recipe.l2_alpha if recipe.l2_alpha is not None else l2.alpha
    a1 = a1.to(torch.float32).contiguous()
    a2 = a2.to(torch.float32).reshape(-1).contiguous()
    inv = None if recipe.epi_scales is None else recipe.epi_scales.to(torch.float32).contiguous()
    return a1, a2, inv


def _config(buffer, fmt: str, expected_m: int, fast_math: bool):
    block_t = gemm_sm100._block_n(expected_m, None)
    # the registered instantiations hold 64 experts; more take a power of two (JIT on first use)
    max_experts = max(64, 1 << (buffer.num_experts_per_rank - 1).bit_length())
    num_stages = stages_for(fmt, block_t, max_experts)
    params = {'block_t': block_t, 'stages': num_stages, 'fast_math': bool(fast_math), 'max_experts': max_experts}
    kernel = registry.get_kernel(_SPECS[fmt].name, params, device=buffer.device.index)
    static = kernel.attribute('CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES')
    if static > _fused_shared_bytes(max_experts) + _HANDOVER_BYTES:
        raise RuntimeError(f'{_SPECS[fmt].name}: {static} B of static shared memory, more than its launcher budgets')
    smem = _smem_bytes(fmt, block_t, num_stages)
    kernel.ensure_dynamic_smem(smem)
    return kernel, block_t, smem


def prepare(buffer, l1, l2, num_tokens: int, fast_math: bool = True) -> None:
    """Compile and load the kernel a call with ``num_tokens`` tokens launches (before any barrier:
    ranks emulated on one GPU must do it for every rank first, as with sm90.prepare)."""
    _config(buffer, _recipe_fmt(buffer), _expected_m(buffer, num_tokens), fast_math)


def run_fused(y: torch.Tensor, l1, l2, buffer, stats: Optional[torch.Tensor] = None,
              activation_clamp: Optional[float] = None, fast_math: bool = True, l1_alphas=None, l2_alphas=None,
              a2_scales=None, routed_scaling_factor: float = 1.0) -> torch.Tensor:
    """Upstream's entry points (fp4_fp4 / fp8_fp4 / bf16_mega_moe) as one launch per wave (grid: every
    SM, one CTA each, all resident).  ``l1_alphas`` / ``l2_alphas`` / ``a2_scales``: fp4_fp4_mega_moe's
    (``sm90.upstream_recipe`` forms the alphas the same way: device arithmetic only)."""
    fmt = _recipe_fmt(buffer)
    if routed_scaling_factor != 1.0:
        raise NotImplementedError('routed_scaling_factor: the sm100 fused kernel takes 1.0 only for now')
    if buffer.num_shared_experts:
        raise NotImplementedError('buffer: shared experts are not in the sm100 fused kernel yet')
    _check_args(y, l1, l2, buffer, fmt)
    if y.shape[0] == 0 and buffer.num_ranks == 1:
        return y
    recipe = sm90.upstream_recipe(buffer.mma_type, buffer.num_experts_per_rank, buffer.device, l1_alphas, l2_alphas,
                                  a2_scales)
    return _launch(y, l1, l2, buffer, fmt, _alphas(l1, l2, recipe), stats, activation_clamp, fast_math)


def _bf16_rows(region: torch.Tensor, rows: int, width: int) -> torch.Tensor:
    """The f16 recipes' token rows: BF16 ``[rows, width]`` at the shared roles' (unpadded) rows."""
    return region.view(torch.uint8).reshape(-1)[:rows * width * 2].view(torch.bfloat16).view(rows, width)


def _launch(y, l1, l2, buffer, fmt: str, alphas, stats, activation_clamp, fast_math) -> torch.Tensor:
    a1, a2, inv_g = alphas
    t = y.shape[0]
    kernel, block_t, smem = _config(buffer, fmt, _expected_m(buffer, t), fast_math)
    grid = fused_grid(buffer, 1)
    l1_region, l2_region = buffer.region('l1_x'), buffer.region('l2_x')
    rows, e = l1_region.shape[0], buffer.num_experts_per_rank
    if fmt in _F16:   # BF16 rows, no scales; TMA boxes of 64 elements (128 bytes)
        x1, x2 = _bf16_rows(l1_region, rows, buffer.hidden), _bf16_rows(l2_region, rows, buffer.intermediate_hidden)
        sf1 = sf2 = None
        bf16 = 'CU_TENSOR_MAP_DATA_TYPE_BFLOAT16'
        x_map1 = gemm_sm100._tma(x1, rows, buffer.hidden, 2 * buffer.hidden, block_t, bf16, 64)
        x_map2 = gemm_sm100._tma(x2, rows, buffer.intermediate_hidden, 2 * buffer.intermediate_hidden, block_t, bf16, 64)
        row_bytes1, row_bytes2 = 2 * buffer.hidden, 2 * buffer.intermediate_hidden
        # the exact recipe's gather reads float32 scales per 32 (fp8xfp4's packed words staged there by the api)
        sf_name = 'x_sf' if fmt == 'nvfp4_exact' else None
    else:
        lay1 = token_layout(fmt, rows, buffer.hidden, block_t, e)
        lay2 = token_layout(fmt, rows, buffer.intermediate_hidden, block_t, e)
        for name, lay in (('l1_x', lay1), ('l2_x', lay2)):
            _check(lay.fits, ValueError, f'buffer: the {name} region ({lay.region_bytes} B) cannot hold the kernel\'s '
                                         f'{lay.padded_rows} padded token rows of {block_t}-token tiles '
                                         f'({lay.sf_offset + lay.sf_bytes} B); more receive rows per expert needed')
        x1, sf1 = _token_views(l1_region, lay1)
        x2, sf2 = _token_views(l2_region, lay2)
        u8 = 'CU_TENSOR_MAP_DATA_TYPE_UINT8'
        x_map1 = gemm_sm100._tma(x1, lay1.padded_rows, lay1.row_bytes, lay1.row_bytes, block_t, u8)
        x_map2 = gemm_sm100._tma(x2, lay2.padded_rows, lay2.row_bytes, lay2.row_bytes, block_t, u8)
        row_bytes1, row_bytes2 = lay1.row_bytes, lay2.row_bytes
        sf_name = {'fp4xfp4': 'x_sf_e4m3', 'fp8xfp4': 'x_sf_ue8m0'}[buffer.mma_type]   # packed bytes, one per block
    w_map1, w_map2 = gemm_sm100._weight_map(l1), gemm_sm100._weight_map(l2)
    clamp = math.inf if activation_clamp is None else float(activation_clamp)
    push = push_enabled(buffer)
    u64, i32 = runtime.u64, runtime.i32
    for t0, n in buffer.waves(t):
        runtime.launch(kernel, grid, _THREADS, smem, [
            w_map1, x_map1, w_map2, x_map2, l1.scales, a1, l2.scales, a2, inv_g,
            buffer.peer_bases, u64(buffer.offset('x', t0)), u64(buffer.offset(sf_name, t0) if sf_name else 0),
            u64(buffer.offset('topk_idx', t0)), u64(buffer.offset('topk_weights', t0)),
            u64(buffer.offset('pair_row', t0)), u64(buffer.offset('combine')), u64(buffer.offset('combine_in')),
            u64(buffer.offset('meta')), u64(buffer.offset('flags')),
            x1, sf1, buffer.region('l1_src'), buffer.region('l1_topk_weights'), x2, sf2, buffer.region('combine'),
            buffer.region('expert_offsets'), buffer.region('meta'), buffer.region('flags'), buffer.region('work'),
            buffer.topk_idx[t0:], buffer.region('pair_row')[t0:], y[t0:t0 + n], stats,
            i32(buffer.rank), i32(buffer.num_ranks), i32(n), i32(buffer.num_max_tokens_per_wave),
            i32(buffer.num_topk), i32(e), i32(rows), i32(buffer.hidden),
            i32(buffer.intermediate_hidden), runtime.f32(clamp), i32(_LOOKAHEAD_EXPERTS), i32(2 * grid),
            i32(gemm_sm100._token_group(block_t, row_bytes1)), i32(gemm_sm100._token_group(block_t, row_bytes2)),
            i32(int(push)), u64(int(buffer.timeout_s * 1e9)), u64(buffer.error_record_ptr)])
    return y


def unsupported(buffer, l1, l2) -> Optional[str]:
    """Why ``run`` (``deep_gemm.mega.api``'s backend entry, i.e. ``fp8_nvfp4_mega_moe``) cannot take
    this call, or None.  That entry's exact numerics run as the kind::f16 recipe ``NVFP4_EXACT`` (FP8
    tokens gathered as BF16, NVFP4 weights dequantized exactly): it needs sm100-layout exact weights
    (``weights_sm100.to_sm100_exact`` of ``transform_nvfp4_weights_for_sm100``'s).  With
    ``backend='auto'`` a reason makes the api run the reference (with a warning)."""
    kind = getattr(buffer, 'mma_type', None)
    if kind not in EXACT_KINDS:
        return f"mma_type {kind!r}: fp8_nvfp4_mega_moe's sm100 kernel takes an {' or '.join(map(repr, EXACT_KINDS))} buffer"
    for name, w in (('l1', l1), ('l2', l2)):
        if not isinstance(w, Sm100ExpertWeights):
            return (f'{name}: the sm100 kernel takes sm100-layout weights (deep_gemm.weights_sm100: to_sm100_exact of '
                    f'transform_nvfp4_weights_for_sm100), got {type(w).__name__}')
        if w.fmt != 'nvfp4_exact':
            return (f"{name}: fp8_nvfp4_mega_moe's exact numerics on sm100 take 'nvfp4_exact' weights "
                    f"(deep_gemm.weights_sm100.to_sm100_exact), got {w.fmt!r}")
    if getattr(buffer, 'num_shared_experts', 0):
        return 'buffer: shared experts are not in the sm100 fused kernel yet'
    return None


def run(y: torch.Tensor, l1, l2, buffer, cumulative_local_expert_recv_stats: Optional[torch.Tensor] = None,
        activation_clamp: Optional[float] = None, fast_math: bool = True) -> torch.Tensor:
    """``deep_gemm.mega.api``'s backend entry (``fp8_nvfp4_mega_moe``): the fused kernel's NVFP4_EXACT
    recipe (L1 weighted, ``h = bf16(swiglu(acc_g a_g, acc_u a_u) x w)``, L2 plain with the weights' alphas);
    NotImplementedError naming the reason where ``unsupported`` gives one."""
    why = unsupported(buffer, l1, l2)
    if why:
        raise NotImplementedError(f"backend='sm100': {why}; use backend='reference' or 'auto'")
    _check_args(y, l1, l2, buffer, 'nvfp4_exact')
    if y.shape[0] == 0 and buffer.num_ranks == 1:
        return y
    alphas = (l1.alpha.to(torch.float32).contiguous(), l2.alpha.to(torch.float32).reshape(-1).contiguous(), None)
    return _launch(y, l1, l2, buffer, 'nvfp4_exact', alphas, cumulative_local_expert_recv_stats, activation_clamp,
                   fast_math)
