"""The Hopper backend of the Mega MoE layer, as a sequence of kernels on one stream.

dispatch layout -> dispatch gather (FP8 -> BF16 rows grouped by local expert) -> L1 grouped GEMM
(SwiGLU, routing weight) -> L2 grouped GEMM -> combine.  No host synchronisation: every shape is
fixed by the buffer, expert counts stay on the device, so a call can be captured in a CUDA graph.

Ranks: one.  Expert parallelism over NVLink (dispatch pulling from peers' buffers, combine pushing
back) is not built yet; a multi-rank buffer raises NotImplementedError.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import gemm
from . import kernels

__all__ = ['run', 'MULTI_RANK']

MULTI_RANK = False   # backend='auto' uses the reference for multi-rank buffers until EP lands


class _Workspace:
    """Per-buffer scratch that is not part of the symmetric layout (BF16 L1 input, L2 output)."""

    def __init__(self, buffer):
        r = buffer.region('l1_src').shape[0]
        dev = buffer.device
        self.tokens = torch.empty(r, buffer.hidden, dtype=torch.bfloat16, device=dev)
        self.o = torch.empty(r, buffer.hidden, dtype=torch.bfloat16, device=dev)
        self.pair_row = torch.empty(buffer.num_max_tokens_per_rank * buffer.num_topk, dtype=torch.int32, device=dev)
        self.offsets = torch.empty(buffer.num_experts_per_rank + 1, dtype=torch.int32, device=dev)


def _workspace(buffer) -> _Workspace:
    ws = getattr(buffer, '_sm90_workspace', None)
    if ws is None:
        ws = buffer._sm90_workspace = _Workspace(buffer)
    return ws


def run(y: torch.Tensor, l1, l2, buffer, cumulative_local_expert_recv_stats: Optional[torch.Tensor] = None,
        activation_clamp: Optional[float] = None, fast_math: bool = True) -> torch.Tensor:
    if buffer.num_ranks > 1:
        raise NotImplementedError('backend=sm90: expert parallelism across ranks is not built yet '
                                  f'(buffer has {buffer.num_ranks} ranks); use backend="reference"')
    if buffer.num_topk > kernels.MAX_TOPK:
        raise ValueError(f'buffer: num_topk = {buffer.num_topk} > {kernels.MAX_TOPK}, the most the combine kernel takes')
    t, k = y.shape[0], buffer.num_topk
    if t == 0:
        return y
    ws = _workspace(buffer)
    row_src, row_weight, h = buffer.region('l1_src'), buffer.region('l1_topk_weights'), buffer.region('l2_x')
    e_l = buffer.num_experts_per_rank
    kernels.dispatch_layout(buffer.topk_idx[:t], buffer.topk_weights[:t], buffer.rank * e_l, e_l, ws.offsets,
                            ws.pair_row[:t * k], row_src, row_weight, cumulative_local_expert_recv_stats)
    kernels.dispatch_gather(buffer.x, buffer.x_sf, row_src, ws.offsets, ws.tokens)
    # Block-size hint only (the counts stay on the device): the mean rows per local expert.
    expected_m = max(1, (t * k + buffer.num_experts - 1) // buffer.num_experts)
    gemm.m_grouped_fp8_nvfp4_gemm_nt_contiguous(ws.tokens, l1, h, ws.offsets, epilogue='swiglu',
                                                route_weights=row_weight, activation_clamp=activation_clamp,
                                                fast_math=fast_math, expected_m=expected_m)
    gemm.m_grouped_fp8_nvfp4_gemm_nt_contiguous(h, l2, ws.o, ws.offsets, expected_m=expected_m)
    kernels.combine(ws.o, ws.pair_row[:t * k], k, y)
    return y
