"""The Hopper backend of the Mega MoE layer, as a sequence of kernels on one stream.

barrier (inputs ready on every rank) -> dispatch layout (every rank's routing -> local rows) ->
dispatch gather (pull FP8 tokens from their source ranks, -> BF16 rows grouped by local expert) ->
L1 grouped GEMM (SwiGLU, routing weight) -> L2 grouped GEMM (rows into ``combine``) -> barrier
(expert outputs ready) -> combine (each rank pulls its pairs' rows from their experts' owners and
reduces them in slot order).  Peers are reached through NVLink mappings of the symmetric buffer; a
group of one runs the same kernels on its own buffer, without the barriers.  No host
synchronisation: every shape is fixed by the buffer, counts stay on the device, so a call can be
captured in a CUDA graph (the barriers count calls on the device).
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import gemm
from . import kernels

__all__ = ['run', 'prepare', 'MULTI_RANK']

MULTI_RANK = True


def _expected_m(buffer, t: int) -> int:
    # Block-size hint only (the counts stay on the device): the mean rows per local expert if every
    # rank has t tokens.
    return max(1, -(-t * buffer.num_topk * buffer.num_ranks // buffer.num_experts))


def prepare(buffer, l1, l2, num_tokens: int, fast_math: bool = True) -> None:
    """Compile and load every kernel a call with ``num_tokens`` tokens launches.  ``run`` does this
    itself before its first barrier; ranks emulated on one GPU must do it for every rank before the
    first rank launches (a module load while a barrier kernel runs may wait for that kernel)."""
    expected_m = _expected_m(buffer, num_tokens)
    kernels.prepare(buffer)
    gemm.prepare_grouped_contiguous(l1, expected_m, 'swiglu', fast_math)
    gemm.prepare_grouped_contiguous(l2, expected_m)


def run(y: torch.Tensor, l1, l2, buffer, cumulative_local_expert_recv_stats: Optional[torch.Tensor] = None,
        activation_clamp: Optional[float] = None, fast_math: bool = True) -> torch.Tensor:
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
    if multi:
        # JIT work (a cold compile takes tens of seconds) happens before this rank signals, never
        # while it holds peers at a barrier.
        prepare(buffer, l1, l2, t, fast_math)
        kernels.barrier(buffer, 0, t)
    kernels.dispatch_layout(buffer, t, row_src, row_weight, cumulative_local_expert_recv_stats)
    kernels.dispatch_gather(buffer, row_src, tokens)
    gemm.m_grouped_fp8_nvfp4_gemm_nt_contiguous(tokens, l1, h, offsets, epilogue='swiglu',
                                                route_weights=row_weight, activation_clamp=activation_clamp,
                                                fast_math=fast_math, expected_m=expected_m)
    gemm.m_grouped_fp8_nvfp4_gemm_nt_contiguous(h, l2, o, offsets, expected_m=expected_m)
    if multi:
        kernels.barrier(buffer, 1, t)
    kernels.combine(buffer, y)
    return y
