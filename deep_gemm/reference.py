"""Pure PyTorch reference of the Mega MoE layer (the semantics of ``docs/design.md``).

Two layers:

* :func:`reference_moe_forward` -- the expert computation for the experts held locally, on
  float block-dequantized weights, returning one BF16 row per ``(token, slot)``;
* :func:`reference_mega_moe` -- the whole layer on one process or across the ranks of a
  ``torch.distributed`` group (gloo on CPU, NCCL on GPU): dispatch, expert computation,
  combine.  Across ranks the result equals the single-process result on the concatenated
  tokens bit for bit.

Arithmetic is float64 with the rounding points of the design: ``h`` (the L2 input) and ``o``
(the per-slot L2 output) are rounded to BF16 with one RNE rounding each; the combine sums
slots in increasing ``j`` in float32 and rounds to BF16.

Determinism.  Each row's result does not depend on which other rows are computed with it:

* L1 is computed as exact 16-element block partial sums (float64 batched matmul; FP8 E4M3
  times E2M1 x UE4M3 / UE8M0 products are multiples of ``2^-19`` times the shared block scale,
  and 16 of them sum exactly in 53 bits), then those partials are scaled by ``x_sf`` and
  accumulated in a fixed order, element-wise;
* L2 splits the BF16 input by binade bands of 8 (``frexp`` exponent // 8) so that each band's
  matmul is exact for NVFP4 weights (``I <= 32768``), and adds the bands in increasing order.

So a per-expert batch computed on another rank, with other rows and other thread counts, gives
the same bits.  (With arbitrary float weights the results are still float64-accurate but the
order-independence argument above no longer holds.)
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from .utils.quant import round_to_bf16
from .utils.validation import (check_activation_clamp, check_expert_ids, check_finite, check_scales,
                               check_tensor)

__all__ = ['reference_moe_forward', 'reference_mega_moe', 'combine_slots', 'gather_tokens', 'return_rows']

_SUB_BLOCK = 16
_L2_BAND = 8


def _check_inputs(x, x_sf, topk_idx, topk_weights, w1, w1_alpha, w2, w2_alpha, activation_clamp,
                  num_experts: Optional[int]) -> int:
    """The layer's checks, on the reference's arguments (TypeError for types and dtypes, ValueError
    for shapes and values; each message names the argument).  Returns ``E_local``."""
    check_tensor('x', x, dtype=torch.float8_e4m3fn, ndim=2, contiguous=False)
    t, hidden = x.shape
    check_tensor('x_sf', x_sf, dtype=torch.float32, ndim=2, shape=(t, None), device=x.device, contiguous=False)
    groups = x_sf.shape[1]
    if groups == 0 or hidden % groups or (hidden // groups) % _SUB_BLOCK and _SUB_BLOCK % (hidden // groups):
        raise ValueError(f'x_sf: {groups} scales per token do not divide hidden = {hidden} into blocks of '
                         f'a multiple or a divisor of {_SUB_BLOCK}')
    check_finite('x_sf', x_sf)
    check_tensor('topk_idx', topk_idx, ndim=2, shape=(t, None), device=x.device, contiguous=False)
    k = topk_idx.shape[1]
    check_tensor('topk_weights', topk_weights, dtype=torch.float32, shape=(t, k), device=x.device,
                 contiguous=False)
    check_finite('topk_weights', topk_weights)
    for name, w in (('w1', w1), ('w2', w2)):
        if not hasattr(w, '__len__') or not hasattr(w, '__getitem__'):
            raise TypeError(f'{name}: expected per-expert weights (a tensor [E_local, N, K] or a sequence), '
                            f'got {type(w).__name__}')
    e_local = len(w1)
    if len(w2) != e_local:
        raise ValueError(f'w2: {len(w2)} experts, w1 has {e_local}')
    check_tensor('w1_alpha', w1_alpha, dtype=torch.float32, shape=(e_local, 2), contiguous=False)
    check_tensor('w2_alpha', w2_alpha, dtype=torch.float32, shape=(e_local, 1), contiguous=False)
    check_scales('w1_alpha', w1_alpha)
    check_scales('w2_alpha', w2_alpha)
    check_expert_ids('topk_idx', topk_idx, num_experts if num_experts is not None else 1 << 62)
    check_activation_clamp(activation_clamp)
    return e_local


def _check_weight_shape(name: str, w: torch.Tensor, n: int, k: int, e: int) -> None:
    if tuple(w.shape) != (n, k):
        raise ValueError(f'{name}[{e}]: expected shape ({n}, {k}), got {tuple(w.shape)}')


def _l1_exact(xq: torch.Tensor, sf: torch.Tensor, w: torch.Tensor, gran: int) -> torch.Tensor:
    """``(xq * sf_expanded) @ w^T`` in float64 with block partials summed exactly.

    ``xq`` float64 ``[r, H]`` (FP8 values), ``sf`` float64 ``[r, H / gran]``, ``w`` float64 ``[N, H]``.
    """
    r, h = xq.shape
    n = w.shape[0]
    sb = math.gcd(gran, _SUB_BLOCK)
    nb = h // sb
    a = xq.reshape(r, nb, sb).transpose(0, 1)                 # [nb, r, sb]
    b = w.reshape(n, nb, sb).permute(1, 2, 0)                 # [nb, sb, n]
    partial = torch.bmm(a, b)                                 # [nb, r, n], exact per block
    per_sf = gran // sb
    acc = torch.zeros(r, n, dtype=torch.float64, device=xq.device)
    for i in range(nb):  # fixed order, element-wise: independent of the other rows
        acc = acc + partial[i] * sf[:, i // per_sf].unsqueeze(1)
    return acc


def _l2_banded(hv: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``hv @ w^T`` (float64) with ``hv`` split into exponent bands; bands added in increasing order."""
    _, ex = torch.frexp(hv)
    band = torch.div(ex, _L2_BAND, rounding_mode='floor')
    band = torch.where(hv == 0, torch.full_like(band, -(1 << 20)), band)
    acc = torch.zeros(hv.shape[0], w.shape[0], dtype=torch.float64, device=hv.device)
    wt = w.t()
    for b in torch.unique(band).tolist():  # sorted ascending
        if b == -(1 << 20):
            continue
        acc = acc + torch.where(band == b, hv, torch.zeros_like(hv)) @ wt
    return acc


def reference_moe_forward(x: torch.Tensor, x_sf: torch.Tensor, topk_idx: torch.Tensor,
                          topk_weights: torch.Tensor, w1, w1_alpha: torch.Tensor, w2, w2_alpha: torch.Tensor,
                          activation_clamp: Optional[float] = None, num_experts: Optional[int] = None,
                          expert_offset: int = 0) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Expert computation for the local experts ``[expert_offset, expert_offset + E_local)``.

    Args:
        x: float8_e4m3fn ``[T, H]``; ``x_sf``: float32 ``[T, H / gran_k]`` (``gran_k`` inferred, a
            multiple of 16 or a divisor of it).
        topk_idx: int ``[T, k]`` global expert ids, -1 = masked; ``topk_weights``: float32 ``[T, k]``.
        w1: float ``[E_local, 2I, H]`` block-dequantized weights WITHOUT the global scale, gate rows
            ``[0, I)`` then up rows (anything with ``len()`` and ``w1[e]``, so weights can be
            dequantized lazily per expert); ``w1_alpha``: float32 ``[E_local, 2]`` (gate, up).
        w2: float ``[E_local, H, I]``; ``w2_alpha``: float32 ``[E_local, 1]``.
        activation_clamp: ``c`` or None: ``up = clamp(up, -c, c)``, ``gate = min(gate, c)``.
        num_experts: global number of experts (only checked against ids when given).

    Returns:
        ``(out, stats)``: ``out`` bf16 ``[T, k, H]`` -- ``o`` for every slot routed to a local
        expert, zero elsewhere; ``stats`` with ``'recv_count'`` int64 ``[E_local]`` (number of
        (token, slot) pairs per local expert) and ``'local_mask'`` bool ``[T, k]``.
    """
    e_local = _check_inputs(x, x_sf, topk_idx, topk_weights, w1, w1_alpha, w2, w2_alpha, activation_clamp,
                            num_experts)
    t, hidden = x.shape
    k = topk_idx.shape[1]
    device = x.device
    gran = hidden // x_sf.shape[1]
    xq = x.to(torch.float64)
    sf = x_sf.to(torch.float64)
    tw = topk_weights.to(torch.float64)
    a1 = w1_alpha.to(torch.float64)
    a2 = w2_alpha.to(torch.float64)
    out = torch.zeros(t, k, hidden, dtype=torch.bfloat16, device=device)
    recv = torch.zeros(e_local, dtype=torch.int64, device=device)
    local = (topk_idx >= expert_offset) & (topk_idx < expert_offset + e_local)
    ids = topk_idx.to(torch.int64) - expert_offset
    for e in range(e_local):
        rows = ((ids == e) & local).nonzero()  # (t, j) in row-major order
        cnt = rows.shape[0]
        recv[e] = cnt
        if cnt == 0:
            continue
        ti, ji = rows[:, 0], rows[:, 1]
        we1 = torch.as_tensor(w1[e]).to(device=device, dtype=torch.float64)
        inter = we1.shape[0] // 2
        _check_weight_shape('w1', we1, 2 * inter, hidden, e)
        acc = _l1_exact(xq[ti], sf[ti], we1, gran)
        gate = acc[:, :inter] * a1[e, 0]
        up = acc[:, inter:] * a1[e, 1]
        if activation_clamp is not None:
            c = float(activation_clamp)
            up = up.clamp(-c, c)
            gate = gate.clamp(max=c)
        h = F.silu(gate) * up * tw[ti, ji].unsqueeze(1)
        h = round_to_bf16(h).to(torch.float64)
        we2 = torch.as_tensor(w2[e]).to(device=device, dtype=torch.float64)
        _check_weight_shape('w2', we2, hidden, inter, e)
        o = _l2_banded(h, we2) * a2[e, 0]
        out[ti, ji] = round_to_bf16(o)
    return out, {'recv_count': recv, 'local_mask': local}


def combine_slots(out: torch.Tensor, topk_idx: torch.Tensor) -> torch.Tensor:
    """``y[t] = sum_j o[t, j]`` in increasing ``j`` in float32 (masked slots skipped), rounded to BF16."""
    t, k, hidden = out.shape
    y = torch.zeros(t, hidden, dtype=torch.float32, device=out.device)
    for j in range(k):
        valid = (topk_idx[:, j] >= 0).unsqueeze(1)
        y = torch.where(valid, y + out[:, j].float(), y)
    return y.to(torch.bfloat16)


def _group_size(group) -> int:
    if group is None:
        return 1
    import torch.distributed as dist
    return dist.get_world_size(group)


def gather_tokens(group, tensors):
    """Every rank's tokens, concatenated in rank order (``T`` may differ per rank, 0 included): returns
    ``(counts, gathered)`` for the list ``tensors`` of this rank's ``[T, ...]`` tensors.  Tensors move
    as bytes where their dtype is float8 (every backend moves uint8)."""
    import torch.distributed as dist
    world = dist.get_world_size(group)
    dev = tensors[0].device
    t = tensors[0].shape[0]
    counts_t = [torch.zeros(1, dtype=torch.int64, device=dev) for _ in range(world)]
    dist.all_gather(counts_t, torch.tensor([t], dtype=torch.int64, device=dev), group=group)
    counts = [int(c.item()) for c in counts_t]
    t_max = max(counts)

    def gather(v: torch.Tensor) -> torch.Tensor:
        as_bytes = v.dtype == torch.float8_e4m3fn
        v = v.contiguous().view(torch.uint8) if as_bytes else v.contiguous()
        pad = torch.zeros(t_max, *v.shape[1:], dtype=v.dtype, device=dev)
        pad[:v.shape[0]] = v
        parts = [torch.empty_like(pad) for _ in range(world)]
        dist.all_gather(parts, pad, group=group)
        out = torch.cat([p[:c] for p, c in zip(parts, counts)])
        return out.view(torch.float8_e4m3fn) if as_bytes else out

    return counts, [gather(v) for v in tensors]


def return_rows(group, out: torch.Tensor, counts, topk_idx: torch.Tensor, e_local: int) -> torch.Tensor:
    """Send each gathered token's slot rows ``out`` bf16 ``[sum(counts), k, H]`` back to its source rank
    (``all_to_all_single`` of bytes) and pick, for each of this rank's ``(token, slot)``, the row from
    the rank that owns its expert: bf16 ``[T, k, H]``."""
    import torch.distributed as dist
    world = dist.get_world_size(group)
    t, k = topk_idx.shape
    hidden, dev = out.shape[2], out.device
    send = out.view(torch.uint8).reshape(sum(counts), k * hidden * 2).contiguous()
    recv = torch.empty(world * t, k * hidden * 2, dtype=torch.uint8, device=dev)
    dist.all_to_all_single(recv, send, output_split_sizes=[t] * world, input_split_sizes=counts, group=group)
    recv = recv.view(torch.bfloat16).reshape(world, t, k, hidden)
    owner = torch.div(topk_idx.to(torch.int64).clamp(min=0), e_local, rounding_mode='floor')
    return recv[owner, torch.arange(t, device=dev).unsqueeze(1), torch.arange(k, device=dev).unsqueeze(0)]


def reference_mega_moe(x: torch.Tensor, x_sf: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                       w1, w1_alpha: torch.Tensor, w2, w2_alpha: torch.Tensor, group=None,
                       activation_clamp: Optional[float] = None, num_experts: Optional[int] = None,
                       cumulative_local_expert_recv_stats: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The Mega MoE layer on this rank's tokens; returns ``y`` bf16 ``[T, H]``.

    ``x``/``x_sf``/``topk_idx``/``topk_weights`` are this rank's tokens (``T`` may differ per rank,
    including 0).  ``w1``/``w1_alpha``/``w2``/``w2_alpha`` are this rank's local experts
    (``E_local = num_experts / world_size``; rank ``r`` owns ``[r E_local, (r+1) E_local)``).
    ``group=None`` (or a group of one) runs on one process.  Across ranks, every rank gathers all
    tokens, computes its local experts' outputs, and sends each source rank its rows back
    (``all_to_all_single``); the source rank sums its slots in increasing ``j`` in float32.
    ``cumulative_local_expert_recv_stats`` (int32 ``[E_local]``) is incremented in place by the
    number of (token, slot) pairs each local expert received from all ranks.
    """
    world = _group_size(group)
    if not hasattr(w1, '__len__'):
        raise TypeError(f'w1: expected per-expert weights (a tensor [E_local, 2I, H] or a sequence), '
                        f'got {type(w1).__name__}')
    e_local = len(w1)
    num_experts = e_local * world if num_experts is None else num_experts
    if num_experts != e_local * world:
        raise ValueError(f'num_experts: {num_experts} != {e_local} local experts x {world} ranks')
    _check_inputs(x, x_sf, topk_idx, topk_weights, w1, w1_alpha, w2, w2_alpha, activation_clamp, num_experts)
    if cumulative_local_expert_recv_stats is not None:
        check_tensor('cumulative_local_expert_recv_stats', cumulative_local_expert_recv_stats, dtype=torch.int32,
                     shape=(e_local,), device=x.device)
    t, hidden = x.shape
    k = topk_idx.shape[1]
    if world == 1:
        out, stats = reference_moe_forward(x, x_sf, topk_idx, topk_weights, w1, w1_alpha, w2, w2_alpha,
                                           activation_clamp=activation_clamp, num_experts=num_experts)
        o = out
    else:
        import torch.distributed as dist
        counts, (gx, gsf, gidx, gw) = gather_tokens(group, [x, x_sf, topk_idx.to(torch.int64), topk_weights])
        out, stats = reference_moe_forward(gx, gsf, gidx, gw, w1, w1_alpha, w2, w2_alpha,
                                           activation_clamp=activation_clamp, num_experts=num_experts,
                                           expert_offset=dist.get_rank(group) * e_local)
        o = return_rows(group, out, counts, topk_idx, e_local)
    y = combine_slots(o, topk_idx)
    if cumulative_local_expert_recv_stats is not None:
        cumulative_local_expert_recv_stats += stats['recv_count'].to(cumulative_local_expert_recv_stats.dtype)
    return y
