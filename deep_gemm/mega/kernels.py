"""Arch-neutral Mega MoE kernels (barrier, dispatch layout, dispatch gather, combine) and their launchers.

The kernels are JIT-compiled for sm_90a and sm_100a; their semantics are the reference's
(``deep_gemm.reference``): rows of a local expert in any order, combine in increasing slot order
in FP32 with one BF16 rounding.  Every kernel addresses the symmetric buffer through the peer
base table (``SymmBuffer.peer_bases``) and region offsets, so one code path serves one rank and
many.  Launchers take device tensors only and never synchronise.

Prefill waves: a launcher's ``t0`` makes it serve the tokens ``[t0, t0 + num_tokens)`` of every
rank (deep_gemm/mega/sm90.py): token indices in the kernels are relative to token 0 of the regions
they are given, so shifting the per-token region offsets and tensors by ``t0`` rows is all a wave
needs.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..jit import registry, runtime

BARRIER_THREADS = 32
LAYOUT_THREADS = 1024
GATHER_THREADS = 128
COMBINE_THREADS = 128
MAX_TOPK = 16

BARRIER = registry.register_kernel(registry.KernelSpec(
    name='smxx_moe_barrier',
    header='smxx_moe_barrier.cuh',
    kernel_expr_fn=lambda p: f'deep_gemm::smxx_moe_barrier<{p["threads"]}>',
    required_sass=(r'\bSTG\.E\.STRONG\.SYS\b', r'\bLDG\.E\.STRONG\.SYS\b', r'\bSR_GLOBALTIMER'),
    default_params=({'threads': BARRIER_THREADS},),
))

DISPATCH_LAYOUT = registry.register_kernel(registry.KernelSpec(
    name='smxx_moe_dispatch_layout',
    header='smxx_moe_dispatch_layout.cuh',
    kernel_expr_fn=lambda p: f'deep_gemm::smxx_moe_dispatch_layout<{p["threads"]}>',
    required_sass=(r'\bATOMS\.',),
    default_params=({'threads': LAYOUT_THREADS},),
))

DISPATCH_GATHER = registry.register_kernel(registry.KernelSpec(
    name='smxx_moe_dispatch_gather',
    header='smxx_moe_dispatch_gather.cuh',
    kernel_expr_fn=lambda p: f'deep_gemm::smxx_moe_dispatch_gather<{p["gran_k"]}, {p["threads"]}, {p.get("fmt", 0)}>',
    required_sass=(r'\bSTG\.E\.128\b',),
    forbid_local_memory=True,
    # fmt: the buffer's activation format (0 FP8 x float32 scales, 1 NVFP4, 2 BF16; _ACT_FORMAT)
    default_params=({'gran_k': 32, 'threads': GATHER_THREADS}, {'gran_k': 16, 'threads': GATHER_THREADS, 'fmt': 1},
                    {'gran_k': 1, 'threads': GATHER_THREADS, 'fmt': 2}),
))

COMBINE = registry.register_kernel(registry.KernelSpec(
    name='smxx_moe_combine',
    header='smxx_moe_combine.cuh',
    kernel_expr_fn=lambda p: f'deep_gemm::smxx_moe_combine<{p["threads"]}, {p["max_topk"]}>',
    required_sass=(r'\bSTG\.E\.128\b',),
    forbid_local_memory=True,
    default_params=({'threads': COMBINE_THREADS, 'max_topk': MAX_TOPK},),
))


def _kernel(spec, buffer, **params):
    return registry.get_kernel(spec.name, {**spec.default_params[0], **params}, device=buffer.device.index)


#: The dispatch gather's activation format per buffer kind (the FP8 kinds read the float32 ``x_sf``).
_ACT_FORMAT = {'fp4xfp4': 1, 'bf16xbf16': 2}


def _gran(buffer) -> int:
    """Channels per activation scale the kernels read (FP8: the float32 ``x_sf`` region)."""
    fmt = _ACT_FORMAT.get(buffer.mma_type, 0)
    if fmt:
        return (16, 1)[fmt - 1]
    return buffer.hidden // buffer.region('x_sf').shape[1]


def _gather_params(buffer) -> dict:
    fmt = _ACT_FORMAT.get(buffer.mma_type, 0)
    return {'gran_k': _gran(buffer), **({'fmt': fmt} if fmt else {})}


def _x_sf_offset(buffer, t0: int) -> int:
    """Byte offset of the scales the gather reads: the float32 ``x_sf`` (FP8 kinds), the UE4M3 bytes
    (NVFP4), none (BF16)."""
    fmt = _ACT_FORMAT.get(buffer.mma_type, 0)
    if fmt == 2:
        return 0
    return buffer.offset('x_sf_e4m3' if fmt == 1 else 'x_sf', t0)


def prepare(buffer) -> None:
    """Compile and load every kernel of this module that a call on ``buffer`` launches."""
    for spec in (BARRIER, DISPATCH_LAYOUT, COMBINE):
        _kernel(spec, buffer)
    _kernel(DISPATCH_GATHER, buffer, **_gather_params(buffer))


def _u64(v: int):
    return runtime.u64(v)


def barrier(buffer, phase: int, num_tokens: int) -> None:
    """Signal every rank and wait for every rank at barrier ``phase`` (0: inputs, 1: expert outputs)."""
    runtime.launch(_kernel(BARRIER, buffer), 1, BARRIER_THREADS, 0,
                   [buffer.peer_bases, _u64(buffer.offset('flags')), buffer.region('meta'), buffer.region('flags'),
                    runtime.i32(phase), runtime.i32(buffer.rank), runtime.i32(buffer.num_ranks),
                    runtime.i32(num_tokens), _u64(int(buffer.timeout_s * 1e9)), _u64(buffer.error_record_ptr)])


def dispatch_layout(buffer, num_tokens: int, row_src: torch.Tensor, row_weight: torch.Tensor,
                    stats: Optional[torch.Tensor], t0: int = 0) -> None:
    """Route every rank's pairs of tokens ``[t0, t0 + n)`` (``n``: ``num_tokens`` here, the published
    count at peers) to this rank's experts: ``expert_offsets`` ``[E_l + 1]``, ``row_src`` ``[R_w, 4]``
    (rank, token - t0, slot, local expert), ``row_weight`` ``[R_w]``, the sources' ``pair_row``;
    ``stats += counts``."""
    e_l = buffer.num_experts_per_rank
    runtime.launch(_kernel(DISPATCH_LAYOUT, buffer), 1, LAYOUT_THREADS, 4 * (2 * e_l + 1 + buffer.num_ranks + 1),
                   [buffer.peer_bases, _u64(buffer.offset('topk_idx', t0)),
                    _u64(buffer.offset('topk_weights', t0)), _u64(buffer.offset('pair_row', t0)),
                    _u64(buffer.offset('meta')), runtime.i32(buffer.rank),
                    runtime.i32(buffer.num_ranks), runtime.i32(num_tokens),
                    runtime.i32(buffer.num_max_tokens_per_wave), runtime.i32(buffer.num_topk), runtime.i32(e_l),
                    runtime.i32(row_src.shape[0]), buffer.region('expert_offsets'), row_src, row_weight, stats])


def dispatch_gather(buffer, row_src: torch.Tensor, out: torch.Tensor, t0: int = 0) -> None:
    """``out[row] = bf16(x[t0 + token] * x_sf[t0 + token])`` of each row's source rank (grid: all ``R_w``
    row slots); NVFP4 tokens as E2M1 x UE4M3, BF16 tokens copied."""
    runtime.launch(_kernel(DISPATCH_GATHER, buffer, **_gather_params(buffer)), out.shape[0], GATHER_THREADS, 0,
                   [buffer.peer_bases, _u64(buffer.offset('x', t0)), _u64(_x_sf_offset(buffer, t0)),
                    row_src, buffer.region('expert_offsets'), runtime.i32(buffer.num_experts_per_rank),
                    runtime.i32(buffer.hidden), out])


def combine(buffer, y: torch.Tensor, t0: int = 0, shared: Optional[torch.Tensor] = None,
            routed_scaling_factor: float = 1.0, nvfp4: bool = False) -> None:
    """``y[t] = bf16(sum_j combine_owner(j)[pair_row[t0 + t, j]])`` in increasing ``j`` (masked slots
    skipped).  ``shared``: BF16 ``[len(y), H]`` shared-expert rows of these tokens, added last;
    ``nvfp4``: fp4_fp4_mega_moe's order (BF16 routed sum, ``routed_scaling_factor``, then the shared
    row; impls/smxx_moe_combine.cuh)."""
    t = y.shape[0]
    if t == 0:
        return
    kernel = _kernel(COMBINE, buffer)
    # at least ~1024 CTAs while a row has chunks of COMBINE_THREADS uint4 left to split
    chunks = max(1, min(-(-buffer.hidden // (8 * COMBINE_THREADS)), -(-1024 // t)))
    runtime.launch(kernel, (t, chunks), COMBINE_THREADS, 0,
                   [buffer.peer_bases, _u64(buffer.offset('combine')), buffer.topk_idx[t0:],
                    buffer.region('pair_row')[t0:], buffer.region('meta'), runtime.i32(buffer.num_topk),
                    runtime.i32(buffer.num_experts_per_rank), runtime.i32(buffer.num_ranks),
                    runtime.i32(buffer.hidden), y, shared, runtime.f32(routed_scaling_factor), runtime.i32(int(nvfp4))])
