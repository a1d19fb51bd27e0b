"""The symmetric buffer of the Mega MoE layer: inputs written by the caller plus the kernels' regions.

Layout (:func:`get_symm_buffer_layout`), one byte buffer per rank, identical on every rank, every
region starting at a multiple of 128 bytes, in this order (``T = num_max_tokens_per_rank``,
``E_l = num_experts / num_ranks``, ``R = num_ranks * T * min(num_topk, E_l)``, the most
(token, slot) pairs one rank can receive):

==================  ===================  ==================================================
region              dtype, shape         use
==================  ===================  ==================================================
``x``               fp8 e4m3 [T, H]      input tokens (written by the caller)
``x_sf``            float32 [T, H/32]    their per-32 scales
``topk_idx``        int64 [T, k]         global expert ids, -1 = masked
``topk_weights``    float32 [T, k]       routing weights
``l1_x``            fp8 e4m3 [R, H]      dispatched rows (L1 input), grouped by local expert
``l1_x_sf``         float32 [R, H/32]    their scales
``l1_src``          int32 [R, 4]         (source rank, token, slot, expert) of each row
``l1_topk_weights`` float32 [R]          routing weight of each row
``l2_x``            bf16 [R, I]          L2 input ``h``
``combine``         bf16 [T, k, H]       per-slot outputs sent back to this (source) rank
``recv_count``      int32 [ranks, E_l]   rows received per (source rank, local expert)
``flags``           int32 [4 * ranks]    dispatch / combine signals
==================  ===================  ==================================================

``get_symm_buffer_size_for_mega_moe`` is the end of the last region rounded up to 128 bytes.
On CPU, or with a group of one, the buffer is ordinary memory; on CUDA with more than one rank it
is allocated with ``torch.distributed._symmetric_memory`` (``empty`` + ``rendezvous``).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from ..utils.validation import check_multiple, check_positive_int

__all__ = ['SymmBuffer', 'get_symm_buffer_for_mega_moe', 'get_symm_buffer_size_for_mega_moe',
           'get_symm_buffer_layout', 'Region', 'ALIGNMENT']

ALIGNMENT = 128
X_SF_GRAN = 32


@dataclass(frozen=True)
class Region:
    offset: int
    dtype: torch.dtype
    shape: Tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


def _align(v: int, a: int = ALIGNMENT) -> int:
    return (v + a - 1) // a * a


def _check_args(num_ranks, num_experts, num_max_tokens_per_rank, num_topk, hidden, intermediate_hidden):
    check_positive_int('num_ranks', num_ranks)
    check_positive_int('num_experts', num_experts)
    check_positive_int('num_max_tokens_per_rank', num_max_tokens_per_rank)
    check_positive_int('num_topk', num_topk)
    check_multiple('hidden', hidden, 128)
    check_multiple('intermediate_hidden', intermediate_hidden, 128)
    if num_experts % num_ranks:
        raise ValueError(f'num_experts: {num_experts} must be a multiple of the number of ranks ({num_ranks})')
    if num_topk > num_experts:
        raise ValueError(f'num_topk: {num_topk} > num_experts {num_experts}')


def get_symm_buffer_layout(num_ranks: int, num_experts: int, num_max_tokens_per_rank: int, num_topk: int,
                           hidden: int, intermediate_hidden: int) -> 'OrderedDict[str, Region]':
    """Offset, dtype and shape of every region (see the module docstring)."""
    _check_args(num_ranks, num_experts, num_max_tokens_per_rank, num_topk, hidden, intermediate_hidden)
    t, k, h, i = num_max_tokens_per_rank, num_topk, hidden, intermediate_hidden
    e_l = num_experts // num_ranks
    r = num_ranks * t * min(k, e_l)
    specs = [
        ('x', torch.float8_e4m3fn, (t, h)),
        ('x_sf', torch.float32, (t, h // X_SF_GRAN)),
        ('topk_idx', torch.int64, (t, k)),
        ('topk_weights', torch.float32, (t, k)),
        ('l1_x', torch.float8_e4m3fn, (r, h)),
        ('l1_x_sf', torch.float32, (r, h // X_SF_GRAN)),
        ('l1_src', torch.int32, (r, 4)),
        ('l1_topk_weights', torch.float32, (r,)),
        ('l2_x', torch.bfloat16, (r, i)),
        ('combine', torch.bfloat16, (t, k, h)),
        ('recv_count', torch.int32, (num_ranks, e_l)),
        ('flags', torch.int32, (4 * num_ranks,)),
    ]
    layout: 'OrderedDict[str, Region]' = OrderedDict()
    off = 0
    for name, dtype, shape in specs:
        reg = Region(off, dtype, shape)
        layout[name] = reg
        off = _align(off + reg.nbytes)
    return layout


def get_symm_buffer_size_for_mega_moe(num_ranks: int, num_experts: int, num_max_tokens_per_rank: int,
                                      num_topk: int, hidden: int, intermediate_hidden: int) -> int:
    """Bytes of the symmetric buffer per rank: the sum of the regions of
    :func:`get_symm_buffer_layout`, each rounded up to 128 bytes."""
    layout = get_symm_buffer_layout(num_ranks, num_experts, num_max_tokens_per_rank, num_topk,
                                    hidden, intermediate_hidden)
    last = next(reversed(layout.values()))
    return _align(last.offset + last.nbytes)


class SymmBuffer:
    """Per-rank Mega MoE buffer.  Write this rank's tokens into ``x[:T]``, ``x_sf[:T]``,
    ``topk_idx[:T]``, ``topk_weights[:T]`` before calling the layer."""

    def __init__(self, group, num_experts: int, num_max_tokens_per_rank: int, num_topk: int, hidden: int,
                 intermediate_hidden: int, device=None):
        import torch.distributed as dist
        if group is not None and not (dist.is_available() and dist.is_initialized()):
            raise ValueError('group: torch.distributed is not initialized')
        self.group = group
        self.num_ranks = 1 if group is None else dist.get_world_size(group)
        self.rank = 0 if group is None else dist.get_rank(group)
        self.layout = get_symm_buffer_layout(self.num_ranks, num_experts, num_max_tokens_per_rank, num_topk,
                                             hidden, intermediate_hidden)
        self.num_bytes = get_symm_buffer_size_for_mega_moe(self.num_ranks, num_experts, num_max_tokens_per_rank,
                                                           num_topk, hidden, intermediate_hidden)
        self.num_experts = num_experts
        self.num_experts_per_rank = num_experts // self.num_ranks
        self.num_max_tokens_per_rank = num_max_tokens_per_rank
        self.num_topk = num_topk
        self.hidden = hidden
        self.intermediate_hidden = intermediate_hidden
        if device is None:
            device = torch.device('cuda', torch.cuda.current_device()) if torch.cuda.is_available() else torch.device('cpu')
        device = torch.device(device)
        if device.type == 'cuda' and device.index is None:
            device = torch.device('cuda', torch.cuda.current_device())
        self.device = device
        self.handle = None
        if device.type == 'cuda' and self.num_ranks > 1:
            self.raw, self.handle = self._alloc_symmetric(group, self.num_bytes, device)
        else:
            self.raw = torch.zeros(self.num_bytes, dtype=torch.uint8, device=device)
        self.views: Dict[str, torch.Tensor] = {name: self._view(self.raw, reg) for name, reg in self.layout.items()}
        self.x = self.views['x']
        self.x_sf = self.views['x_sf']
        self.topk_idx = self.views['topk_idx']
        self.topk_weights = self.views['topk_weights']
        self.topk_idx.fill_(-1)

    @staticmethod
    def _alloc_symmetric(group, nbytes: int, device: torch.device):
        try:
            import torch.distributed._symmetric_memory as symm_mem
        except ImportError as exc:  # pragma: no cover - GPU only
            raise RuntimeError('group: torch.distributed._symmetric_memory is unavailable; '
                               'multi-GPU Mega MoE needs it') from exc
        raw = symm_mem.empty(nbytes, dtype=torch.uint8, device=device)
        handle = symm_mem.rendezvous(raw, group)
        raw.zero_()
        return raw, handle

    @staticmethod
    def _view(raw: torch.Tensor, reg: Region) -> torch.Tensor:
        return raw[reg.offset:reg.offset + reg.nbytes].view(reg.dtype).view(reg.shape)

    def region(self, name: str) -> torch.Tensor:
        """The named region on this rank (see :func:`get_symm_buffer_layout`)."""
        return self.views[name]

    def peer_region(self, name: str, rank: int) -> torch.Tensor:
        """The named region of another rank's buffer (CUDA symmetric memory only)."""
        if rank == self.rank:
            return self.views[name]
        if self.handle is None:
            raise RuntimeError('peer_region: this buffer is not symmetric memory (CPU or a single rank)')
        reg = self.layout[name]
        peer = self.handle.get_buffer(rank, (self.num_bytes,), torch.uint8)
        return self._view(peer, reg)

    def __repr__(self) -> str:
        return (f'SymmBuffer(ranks={self.num_ranks}, experts={self.num_experts}, '
                f'max_tokens={self.num_max_tokens_per_rank}, topk={self.num_topk}, hidden={self.hidden}, '
                f'intermediate={self.intermediate_hidden}, bytes={self.num_bytes}, device={self.device})')


def get_symm_buffer_for_mega_moe(group, num_experts: int, num_max_tokens_per_rank: int, num_topk: int,
                                 hidden: int, intermediate_hidden: int, device=None) -> SymmBuffer:
    """Allocate the Mega MoE buffer for ``group`` (``None`` = one process).

    ``hidden`` and ``intermediate_hidden`` must be multiples of 128, ``num_experts`` a multiple of the
    group size; ``device`` defaults to the current CUDA device, else CPU.
    """
    return SymmBuffer(group, num_experts, num_max_tokens_per_rank, num_topk, hidden, intermediate_hidden, device)
