"""Arch-neutral Mega MoE kernels (dispatch layout, dispatch gather, combine) and their launchers.

The kernels are JIT-compiled for sm_90a and sm_100a; their semantics are the reference's
(``deep_gemm.reference``): rows of a local expert in any order, combine in increasing slot order
in FP32 with one BF16 rounding.  Launchers take device tensors only and never synchronise.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..jit import registry, runtime

LAYOUT_THREADS = 1024
GATHER_THREADS = 128
COMBINE_THREADS = 128
MAX_TOPK = 16

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
    kernel_expr_fn=lambda p: f'deep_gemm::smxx_moe_dispatch_gather<{p["gran_k"]}, {p["threads"]}>',
    required_sass=(r'\bSTG\.E\.128\b',),
    forbid_local_memory=True,
    default_params=({'gran_k': 32, 'threads': GATHER_THREADS},),
))

COMBINE = registry.register_kernel(registry.KernelSpec(
    name='smxx_moe_combine',
    header='smxx_moe_combine.cuh',
    kernel_expr_fn=lambda p: f'deep_gemm::smxx_moe_combine<{p["threads"]}, {p["max_topk"]}>',
    required_sass=(r'\bSTG\.E\.128\b',),
    forbid_local_memory=True,
    default_params=({'threads': COMBINE_THREADS, 'max_topk': MAX_TOPK},),
))


def dispatch_layout(topk_idx: torch.Tensor, topk_weights: torch.Tensor, expert_begin: int, num_local_experts: int,
                    expert_offsets: torch.Tensor, pair_row: torch.Tensor, row_src: torch.Tensor,
                    row_weight: torch.Tensor, stats: Optional[torch.Tensor]) -> None:
    """Route ``topk_idx`` ``[T, k]`` (int64) to local experts: offsets ``[E_l + 1]``, ``pair_row [T * k]``,
    ``row_src [R, 4]`` (rank, token, slot, local expert), ``row_weight [R]``; ``stats += counts``."""
    t, k = topk_idx.shape
    kernel = registry.get_kernel(DISPATCH_LAYOUT.name, {'threads': LAYOUT_THREADS}, device=topk_idx.device.index)
    runtime.launch(kernel, 1, LAYOUT_THREADS, 4 * (2 * num_local_experts + 1),
                   [topk_idx, topk_weights, runtime.i32(t * k), runtime.i32(k), runtime.i32(expert_begin),
                    runtime.i32(num_local_experts), runtime.i32(row_src.shape[0]), expert_offsets, pair_row,
                    row_src, row_weight, stats])


def dispatch_gather(x: torch.Tensor, x_sf: torch.Tensor, row_src: torch.Tensor, expert_offsets: torch.Tensor,
                    out: torch.Tensor) -> None:
    """``out[row] = bf16(x[token] * x_sf[token])`` for every dispatched row (grid: all ``R`` row slots)."""
    gran = x.shape[1] // x_sf.shape[1]
    kernel = registry.get_kernel(DISPATCH_GATHER.name, {'gran_k': gran, 'threads': GATHER_THREADS},
                                 device=x.device.index)
    runtime.launch(kernel, out.shape[0], GATHER_THREADS, 0,
                   [x.view(torch.uint8), x_sf, row_src, expert_offsets, runtime.i32(expert_offsets.shape[0] - 1),
                    runtime.i32(x.shape[1]), out])


def combine(o: torch.Tensor, pair_row: torch.Tensor, topk: int, y: torch.Tensor) -> None:
    """``y[t] = bf16(sum_j o[pair_row[t, j]])`` in increasing ``j`` (``-1`` rows skipped)."""
    if y.shape[0] == 0:
        return
    kernel = registry.get_kernel(COMBINE.name, {'threads': COMBINE_THREADS, 'max_topk': MAX_TOPK},
                                 device=y.device.index)
    runtime.launch(kernel, y.shape[0], COMBINE_THREADS, 0,
                   [o, pair_row, runtime.i32(topk), runtime.i32(y.shape[1]), y])
