"""The symmetric buffer of the Mega MoE layer: inputs written by the caller plus the kernels' regions.

Layout (:func:`get_symm_buffer_layout`), one byte buffer per rank, identical on every rank, every
region starting at a multiple of 128 bytes, in this order (``T = num_max_tokens_per_rank``,
``W = num_max_tokens_per_wave``, ``E_l = num_experts / num_ranks``,
``R_w = num_ranks * W * min(num_topk, E_l)``, the most (token, slot) pairs one rank can receive in
one wave when a token's top-k experts are distinct):

==================  ===================  ==================================================
region              dtype, shape         use
==================  ===================  ==================================================
``x``               fp8 e4m3 [T, H]      input tokens (written by the caller)
``x_sf``            float32 [T, H/32]    their per-32 scales
``topk_idx``        int64 [T, k]         global expert ids, -1 = masked
``topk_weights``    float32 [T, k]       routing weights
``l1_x``            bf16 [R_w, H]        dispatched rows (L1 input, FP8 x scale, exact), by local expert
``l1_src``          int32 [R_w, 4]       (source rank, token, slot, local expert) of each row
``l1_topk_weights`` float32 [R_w]        routing weight of each row
``l2_x``            bf16 [R_w, I]        L2 input ``h``
``combine``         bf16 [R_w, H]        L2 output rows (this rank's own pairs' are read in place)
``combine_in``      bf16 [P_w, H]        the other ranks' rows of this rank's pairs, pushed by their
                                         owners at row ``token x k + slot`` as tiles finish (fused
                                         kernel; ``P_w = W k`` with several ranks, else 0)
``pair_row``        int32 [T, k]         row of each of this rank's pairs in its expert owner's
                                         ``combine`` (written by the owner; -1 = overflow)
``expert_offsets``  int32 [E_l + 1]      first row of each local expert
``meta``            int32 [16]           published token count, per-phase call counters, abort
``flags``           int32 [2, ranks]     barrier signals received from each rank, per phase
``work``            int32 [8 + 4 E_l     the fused kernel's counters, zero between calls (header,
                    + 3 R_w]             per-expert counts, gathered rows, finished L1 and L2 units
                                         per token tile)
==================  ===================  ==================================================

Prefill waves: a call with more than ``W`` tokens per rank runs as waves of at most ``W`` tokens
(``deep_gemm.mega.sm90``); the rows, ``combine``, ``combine_in`` and the counters serve one wave at a time, so only
the token regions grow with ``T``.  Default ``W``: ``T`` if ``R_w`` for ``W = T`` is at most
``DEFAULT_MAX_RECV_ROWS`` (65536) rows, else ``ceil(T / n)`` with ``n`` the fewest waves whose rows
fit (``n = ceil(T / max(1, 65536 // (num_ranks * min(k, E_l))))``): evenly sized waves.
Limits: with several ranks every rank runs ``ceil(T / W)`` waves per call, even with fewer tokens
(ranks cannot see each other's token counts without a host sync, and their barriers pair up), and
an empty wave still costs its launches and barriers; on one rank a call runs ``ceil(tokens / W)``.

Size: ``get_symm_buffer_size_for_mega_moe`` is the end of the last region rounded up to 128 bytes,
``T x (9 H / 8 + 16 k) + R_w x (4 H + 2 I + 32) + P_w x 2 H`` bytes plus less than ``2176 + 20 E_l + 8 ranks``
(alignment and the small regions).  With H = 7168, I = 3072, k = 6, 8 local experts and T = 4096:
one rank, W = T (the default): 0.89 GB; 4 ranks, W = T: 3.81 GB per rank (R_w grows with the
ranks: every rank's tokens may all pick this rank's experts), with the default W = 2048 (2 waves):
1.92 GB, with W = 1024 (4 waves): 0.98 GB.  8 ranks, T = 8192: 14.47 GB with W = T, 2.13 GB with
the default W = 1171 (7 waves).

On CPU, or with a group of one, the buffer is ordinary memory; on CUDA with more than one rank it
is allocated with ``torch.distributed._symmetric_memory`` (``empty`` + ``rendezvous``) and
``peer_bases`` holds every rank's mapping of it.  :meth:`SymmBuffer.emulated_group` builds the
buffers of several ranks on one GPU (tests of the multi-rank kernels where only one GPU exists).

Timeouts: every cross-rank wait gives up after ``timeout_s`` (default ``$DG_MEGA_MOE_TIMEOUT_S``
or 300 s), records which rank it waited for in a host-mapped word, and the layer raises
:class:`MegaMoETimeoutError` naming that rank on this buffer's next call (or at once from
:meth:`SymmBuffer.check_comm`).  A buffer whose wait timed out stays failed.
"""
from __future__ import annotations

import ctypes
import math
import os
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from ..utils.validation import check_multiple, check_positive_int

__all__ = ['SymmBuffer', 'get_symm_buffer_for_mega_moe', 'get_symm_buffer_size_for_mega_moe',
           'get_symm_buffer_layout', 'default_num_max_tokens_per_wave', 'Region', 'ALIGNMENT',
           'DEFAULT_MAX_RECV_ROWS', 'MegaMoETimeoutError', 'MMA_TYPES', 'UPSTREAM_MMA_TYPES',
           'get_block_m_for_mega_moe']

ALIGNMENT = 128
X_SF_GRAN = 32
META_INTS = 16          # comm/symm.cuh: Meta
NUM_PHASES = 2          # barrier phases per call (impls/smxx_moe_barrier.cuh)
WORK_HEADER_INTS = 8    # include/deep_gemm/mega/state.cuh: WorkRegion::kHeader
DEFAULT_TIMEOUT_S = 300.0   # generous: a peer's first call may include its JIT compiles
# Receive rows per rank above which the default splits a call into waves: 65536 rows are 2.3 GB at
# the DeepSeek-V4 shape (hidden 7168, intermediate 3072), one rank's 4096-token prefill needs 24576.
DEFAULT_MAX_RECV_ROWS = 65536
_PHASE_NAMES = ('dispatch (inputs ready)', 'combine (expert outputs ready)')
PHASE_INTERNAL = 2      # a wait between the CTAs of one rank's fused kernel


#: ``mma_type`` of a buffer -> (activation format of ``x``, weight format) of the entry point that takes it.
#: Upstream DeepGEMM's four kinds, and ours: ``'fp8xnvfp4'`` for :func:`fp8_nvfp4_mega_moe` with float32
#: per-32 activation scales (any value, not only powers of two).
MMA_TYPES = ('fp8xfp4', 'fp8xfp8', 'bf16xbf16', 'fp4xfp4', 'fp8xnvfp4')
UPSTREAM_MMA_TYPES = ('fp8xfp4', 'fp8xfp8', 'bf16xbf16', 'fp4xfp4')
#: Receive rows of the upstream kinds are a multiple of this: the LCM of upstream's candidate token
#: blocks (8, 16, 32, 64, 96, 128, 192, 240), so ``l1_acts.shape[0] % get_block_m_for_mega_moe(...) == 0``
#: holds as upstream's callers assume.
UPSTREAM_ROW_ALIGN = 1920


class MegaMoETimeoutError(RuntimeError):
    """A rank waited longer than the buffer's timeout for another rank."""


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


def _check_args(num_ranks, num_experts, num_max_tokens_per_rank, num_topk, hidden, intermediate_hidden,
                mma_type='fp8xfp4', num_shared_experts=0):
    if mma_type not in MMA_TYPES:
        raise ValueError(f'mma_type: expected one of {MMA_TYPES}, got {mma_type!r}')
    check_positive_int('num_ranks', num_ranks)
    check_positive_int('num_experts', num_experts)
    check_positive_int('num_max_tokens_per_rank', num_max_tokens_per_rank)
    check_positive_int('num_topk', num_topk)
    check_positive_int('num_shared_experts', num_shared_experts, allow_zero=True)
    align = 512 if mma_type == 'fp4xfp4' else 128   # upstream: NVFP4 activations come in blocks of 512
    check_multiple('hidden', hidden, align)
    check_multiple('intermediate_hidden', intermediate_hidden, align)
    if num_shared_experts and mma_type == 'fp8xnvfp4':
        raise ValueError("num_shared_experts: shared experts are an upstream entry points' feature; "
                         "mma_type='fp8xnvfp4' (fp8_nvfp4_mega_moe) takes none")
    if num_topk + (1 if num_shared_experts else 0) > 32:
        raise ValueError(f'num_topk: {num_topk} routed slots (+1 for the shared experts) exceed 32')
    if num_experts % num_ranks:
        raise ValueError(f'num_experts: {num_experts} must be a multiple of the number of ranks ({num_ranks})')
    if num_topk > num_experts:
        raise ValueError(f'num_topk: {num_topk} > num_experts {num_experts}')


def default_num_max_tokens_per_wave(num_ranks: int, num_experts: int, num_max_tokens_per_rank: int,
                                    num_topk: int) -> int:
    """``num_max_tokens_per_rank`` if its receive rows fit in ``DEFAULT_MAX_RECV_ROWS``, else the
    fewest waves whose rows do, evenly sized (a smaller buffer than the largest wave that fits, and
    no near-empty last wave)."""
    pairs_per_token = num_ranks * min(num_topk, num_experts // num_ranks)
    t = num_max_tokens_per_rank
    if t * pairs_per_token <= DEFAULT_MAX_RECV_ROWS:
        return t
    largest = max(1, DEFAULT_MAX_RECV_ROWS // pairs_per_token)
    return -(-t // -(-t // largest))


def _tokens_per_wave(num_ranks, num_experts, num_max_tokens_per_rank, num_topk, num_max_tokens_per_wave) -> int:
    if num_max_tokens_per_wave is None:
        return default_num_max_tokens_per_wave(num_ranks, num_experts, num_max_tokens_per_rank, num_topk)
    check_positive_int('num_max_tokens_per_wave', num_max_tokens_per_wave)
    if num_max_tokens_per_wave > num_max_tokens_per_rank:
        raise ValueError(f'num_max_tokens_per_wave: {num_max_tokens_per_wave} > num_max_tokens_per_rank = '
                         f'{num_max_tokens_per_rank} (a wave is a slice of one call\'s tokens)')
    return num_max_tokens_per_wave


def _token_specs(mma_type: str, t: int, h: int, num_shared_experts: int):
    """The caller's token regions of each kind (upstream's dtypes and shapes), plus ``x_sf``, the kernels'
    float32 per-32 scales, which the FP8 kinds' packed UE8M0 words are unpacked into before a GPU call."""
    if mma_type == 'fp8xnvfp4':
        return [('x', torch.float8_e4m3fn, (t, h)), ('x_sf', torch.float32, (t, h // X_SF_GRAN))]
    if mma_type in ('fp8xfp4', 'fp8xfp8'):
        specs = [('x', torch.float8_e4m3fn, (t, h)), ('x_sf_ue8m0', torch.int32, (t, h // 128)),
                 ('x_sf', torch.float32, (t, h // X_SF_GRAN))]
        if num_shared_experts:  # upstream's MN-major shared-expert scales, stored [H/128, rows]
            specs.append(('shared_l1_acts_sf', torch.int32, (h // 128, -(-t // 8) * 128)))
        return specs
    if mma_type == 'bf16xbf16':
        return [('x', torch.bfloat16, (t, h))]
    return [('x', torch.uint8, (t, h // 2)), ('x_sf_e4m3', torch.int32, (t, h // 64))]   # fp4xfp4


def get_symm_buffer_layout(num_ranks: int, num_experts: int, num_max_tokens_per_rank: int, num_topk: int,
                           hidden: int, intermediate_hidden: int, *,
                           num_max_tokens_per_wave: Optional[int] = None, mma_type: str = 'fp8xfp4',
                           num_shared_experts: int = 0) -> 'OrderedDict[str, Region]':
    """Offset, dtype and shape of every region (see the module docstring).  Token regions are sized
    by ``num_max_tokens_per_rank``, the receive rows by ``num_max_tokens_per_wave`` (default:
    :func:`default_num_max_tokens_per_wave`); ``mma_type`` sets the token regions' formats."""
    _check_args(num_ranks, num_experts, num_max_tokens_per_rank, num_topk, hidden, intermediate_hidden, mma_type,
                num_shared_experts)
    w = _tokens_per_wave(num_ranks, num_experts, num_max_tokens_per_rank, num_topk, num_max_tokens_per_wave)
    t, k, h, i = num_max_tokens_per_rank, num_topk, hidden, intermediate_hidden
    e_l = num_experts // num_ranks
    r = num_ranks * w * min(k, e_l)
    if mma_type in UPSTREAM_MMA_TYPES:
        r = -(-r // UPSTREAM_ROW_ALIGN) * UPSTREAM_ROW_ALIGN
    specs = _token_specs(mma_type, t, h, num_shared_experts) + [
        ('topk_idx', torch.int64, (t, k)),
        ('topk_weights', torch.float32, (t, k)),
        ('l1_x', torch.bfloat16, (r, h)),
        ('l1_src', torch.int32, (r, 4)),
        ('l1_topk_weights', torch.float32, (r,)),
        ('l2_x', torch.bfloat16, (r, i)),
        ('combine', torch.bfloat16, (r, h)),
        ('combine_in', torch.bfloat16, (w * k if num_ranks > 1 else 0, h)),
        ('pair_row', torch.int32, (t, k)),
        ('expert_offsets', torch.int32, (e_l + 1,)),
        ('meta', torch.int32, (META_INTS,)),
        ('flags', torch.int32, (NUM_PHASES, num_ranks)),
        ('work', torch.int32, (WORK_HEADER_INTS + 4 * e_l + 3 * r,)),
    ]
    layout: 'OrderedDict[str, Region]' = OrderedDict()
    off = 0
    for name, dtype, shape in specs:
        reg = Region(off, dtype, shape)
        layout[name] = reg
        off = _align(off + reg.nbytes)
    return layout


def get_symm_buffer_size_for_mega_moe(num_ranks: int, num_experts: int, num_max_tokens_per_rank: int,
                                      num_topk: int, hidden: int, intermediate_hidden: int, *,
                                      num_max_tokens_per_wave: Optional[int] = None, mma_type: str = 'fp8xfp4',
                                      num_shared_experts: int = 0) -> int:
    """Bytes of the symmetric buffer per rank: the sum of the regions of
    :func:`get_symm_buffer_layout`, each rounded up to 128 bytes."""
    return _end(get_symm_buffer_layout(num_ranks, num_experts, num_max_tokens_per_rank, num_topk, hidden,
                                       intermediate_hidden, num_max_tokens_per_wave=num_max_tokens_per_wave,
                                       mma_type=mma_type, num_shared_experts=num_shared_experts))


def _end(layout: 'OrderedDict[str, Region]') -> int:
    last = next(reversed(layout.values()))
    return _align(last.offset + last.nbytes)


class SymmBuffer:
    """Per-rank Mega MoE buffer (from :func:`get_symm_buffer_for_mega_moe`).

    Before each layer call, write this rank's ``T`` tokens into the input views (``M`` =
    ``num_max_tokens_per_rank``, ``H`` = ``hidden``); their formats follow ``mma_type`` (upstream's):

    ===============  ===========================  ===============================================
    ``mma_type``     ``x``                        ``x_sf``
    ===============  ===========================  ===============================================
    ``'fp8xfp4'``,   float8_e4m3fn ``[M, H]``     int32 ``[M, H / 128]``: four UE8M0 exponents per
    ``'fp8xfp8'``                                 word, one per 32 channels, byte j = group 4p + j
                                                  (``per_token_cast_to_fp8(x, use_ue8m0=True,
                                                  gran_k=32, use_packed_ue8m0=True)``)
    ``'bf16xbf16'``  bfloat16 ``[M, H]``          None
    ``'fp4xfp4'``    uint8 ``[M, H / 2]`` (E2M1,  int32 ``[M, H / 64]``: four UE4M3 scales per word,
                     low nibble = even channel)   one per 16 channels (``per_token_cast_to_nvfp4``)
    ``'fp8xnvfp4'``  float8_e4m3fn ``[M, H]``     float32 ``[M, H / 32]``: any scale per 32 channels
    (ours)                                        (``per_token_cast_to_fp8(x, False, gran_k=32)``)
    ===============  ===========================  ===============================================

    * ``topk_idx``: int64 ``[M, num_topk]``, global expert ids, -1 = masked (the buffer starts with
      every slot masked);
    * ``topk_weights``: float32 ``[M, num_topk]``.

    :meth:`copy_inputs` writes all four after checking them against this format (the obvious way;
    it also takes the float32 scales a cast returns unpacked, and per-128 scales for ``'fp8xnvfp4'``).

    Upstream's other views exist for its callers: ``shared_l1_acts`` (= ``x``), ``shared_l1_acts_sf``
    (FP8 kinds with shared experts: int32 ``[ceil(M / 8) * 128, H / 128]``, MN-major; our kernels
    read the shared experts' scales from ``x_sf``, so what a caller copies there is not used),
    ``l1_acts`` / ``l2_acts`` (the kernels' BF16 receive rows) and None for the rest.

    Attributes: ``rank``, ``num_ranks``, ``group``, ``device``, ``mma_type``, ``activation``,
    ``num_experts``, ``num_experts_per_rank``, ``num_max_tokens_per_rank``,
    ``num_max_tokens_per_wave``, ``num_topk``, ``num_shared_experts``, ``hidden``,
    ``intermediate_hidden``, ``timeout_s``, ``num_bytes``, ``buffer`` (the raw bytes), ``layout``
    (every region's offset, dtype and shape: :func:`get_symm_buffer_layout`).  :meth:`destroy`
    releases the memory.

    Errors: :meth:`check_comm` raises :class:`MegaMoETimeoutError` once a cross-rank wait on this
    buffer timed out (the layer raises it on the next call); the layer raises ``ValueError`` for a
    call whose arguments do not fit this buffer (another ``mma_type``, too many tokens, ...).
    """

    _VIEW_NAMES = ('x', 'x_sf', 'topk_idx', 'topk_weights', 'shared_l1_acts', 'shared_l1_acts_sf', 'shared_l2_acts',
                   'shared_l2_acts_sf', 'l1_acts', 'l1_acts_sf', 'l2_acts', 'l2_acts_sf')

    def __init__(self, group, num_experts: int, num_max_tokens_per_rank: int, num_topk: int, hidden: int,
                 intermediate_hidden: int, num_shared_experts: int = 0, mma_type: str = 'fp8xfp4',
                 activation: str = 'swiglu', *, device=None, timeout_s: Optional[float] = None,
                 num_max_tokens_per_wave: Optional[int] = None, _emulated=None):
        import torch.distributed as dist
        if _emulated is not None:
            self.rank, self.num_ranks = _emulated
        else:
            if group is not None and not (dist.is_available() and dist.is_initialized()):
                raise ValueError('group: torch.distributed is not initialized')
            self.num_ranks = 1 if group is None else dist.get_world_size(group)
            self.rank = 0 if group is None else dist.get_rank(group)
        self.group = group
        if group is not None and self.num_ranks > 1 and _emulated is None:
            _check_same_on_every_rank(group, num_experts=num_experts, num_max_tokens_per_rank=num_max_tokens_per_rank,
                                      num_topk=num_topk, hidden=hidden, intermediate_hidden=intermediate_hidden,
                                      num_max_tokens_per_wave=num_max_tokens_per_wave,
                                      num_shared_experts=num_shared_experts,
                                      mma_type=MMA_TYPES.index(mma_type) if mma_type in MMA_TYPES else None)
        if activation != 'swiglu':
            raise ValueError(f"activation: only 'swiglu' is supported, got {activation!r}")
        self.layout = get_symm_buffer_layout(self.num_ranks, num_experts, num_max_tokens_per_rank, num_topk,
                                             hidden, intermediate_hidden,
                                             num_max_tokens_per_wave=num_max_tokens_per_wave, mma_type=mma_type,
                                             num_shared_experts=num_shared_experts)
        self.num_bytes = _end(self.layout)
        # after the layout, which checks the arguments the default depends on
        self.num_max_tokens_per_wave = _tokens_per_wave(self.num_ranks, num_experts, num_max_tokens_per_rank,
                                                        num_topk, num_max_tokens_per_wave)
        self.mma_type = mma_type
        self.activation = activation
        self.num_shared_experts = num_shared_experts
        self.num_experts = num_experts
        self.num_experts_per_rank = num_experts // self.num_ranks
        self.num_max_tokens_per_rank = num_max_tokens_per_rank
        self.num_topk = num_topk
        self.hidden = hidden
        self.x_sf_gran_k = {'fp8xnvfp4': 32, 'fp8xfp4': 32, 'fp8xfp8': 32, 'fp4xfp4': 16}.get(mma_type)
        self.intermediate_hidden = intermediate_hidden
        self.timeout_s = _check_timeout(timeout_s)
        if device is None:
            device = torch.device('cuda', torch.cuda.current_device()) if torch.cuda.is_available() else torch.device('cpu')
        device = torch.device(device)
        if device.type == 'cuda' and device.index is None:
            device = torch.device('cuda', torch.cuda.current_device())
        self.device = device
        self.handle = None
        self._peers = None           # emulated group: every rank's SymmBuffer
        if device.type == 'cuda' and self.num_ranks > 1 and _emulated is None:
            self.raw, self.handle = self._alloc_symmetric(group, self.num_bytes, device)
            ptrs = list(self.handle.buffer_ptrs)
        else:
            self.raw = torch.zeros(self.num_bytes, dtype=torch.uint8, device=device)
            ptrs = [self.raw.data_ptr()] if self.num_ranks == 1 else None
        self.peer_bases = None if ptrs is None else self._bases_tensor(ptrs)
        self.views: Dict[str, torch.Tensor] = {name: self._view(self.raw, reg) for name, reg in self.layout.items()}
        self._set_public_views()
        self.topk_idx.fill_(-1)
        self._error = _HostErrorRecord(device) if device.type == 'cuda' else None

    def _set_public_views(self) -> None:
        v = self.views
        self.x = v['x']
        self.x_sf = v.get({'fp8xfp4': 'x_sf_ue8m0', 'fp8xfp8': 'x_sf_ue8m0', 'fp4xfp4': 'x_sf_e4m3'}.get(
            self.mma_type, 'x_sf'))
        self.topk_idx = v['topk_idx']
        self.topk_weights = v['topk_weights']
        self.shared_l1_acts = self.x if self.num_shared_experts and self.mma_type != 'fp4xfp4' else None
        sf = v.get('shared_l1_acts_sf')
        self.shared_l1_acts_sf = None if sf is None else sf.t()     # [rows, H/128], strides (1, rows)
        self.shared_l2_acts = self.shared_l2_acts_sf = None
        self.l1_acts, self.l2_acts = v['l1_x'], v['l2_x']
        self.l1_acts_sf = self.l2_acts_sf = None

    def copy_inputs(self, x: torch.Tensor, x_sf: Optional[torch.Tensor], topk_idx: torch.Tensor,
                    topk_weights: torch.Tensor) -> int:
        """Write ``T`` tokens into ``x[:T]``, ``x_sf[:T]``, ``topk_idx[:T]``, ``topk_weights[:T]`` after
        checking each against this buffer's format (a ``TypeError`` / ``ValueError`` naming it, instead
        of a bare broadcast error or a silent cast).  Returns ``T``.

        ``x_sf`` may come in this buffer's own format (see the class docstring) or as the float32 scales
        a cast returns without packing: ``'fp8xnvfp4'`` per 32 or per 128 channels (repeated to per 32:
        exact), ``'fp8xfp4'`` / ``'fp8xfp8'`` powers of two per 32 (packed), ``'fp4xfp4'`` UE4M3 values
        per 16 (packed).  ``None`` for ``'bf16xbf16'``.
        """
        from ..utils.validation import check_tensor
        if self.destroyed:
            raise ValueError('buffer: destroyed')
        check_tensor('x', x, dtype=self.x.dtype, ndim=2, shape=(None, self.x.shape[1]), device=self.device)
        t = x.shape[0]
        if t > self.num_max_tokens_per_rank:
            raise ValueError(f'x: {t} tokens > num_max_tokens_per_rank = {self.num_max_tokens_per_rank}')
        k = self.num_topk
        check_tensor('topk_idx', topk_idx, dtype=torch.int64, shape=(t, k), device=self.device)
        check_tensor('topk_weights', topk_weights, dtype=torch.float32, shape=(t, k), device=self.device)
        if self.x_sf is None:
            if x_sf is not None:
                raise ValueError(f'x_sf: a {self.mma_type!r} buffer takes no activation scales')
        else:
            self.x_sf[:t].copy_(self._scales_as_view(x_sf, t))
        self.x[:t].copy_(x)
        self.topk_idx[:t].copy_(topk_idx)
        self.topk_weights[:t].copy_(topk_weights)
        return t

    def _scales_as_view(self, sf, t: int) -> torch.Tensor:
        from ..utils.math import pack_ue8m0_to_int
        from ..utils.validation import check_tensor
        view = self.x_sf
        check_tensor('x_sf', sf, dtype=(view.dtype, torch.float32), ndim=2, device=self.device, contiguous=False)
        if sf.shape[0] != t:
            raise ValueError(f'x_sf: {sf.shape[0]} rows for {t} tokens')
        if sf.dtype == view.dtype and sf.shape[1] == view.shape[1]:
            return sf
        groups = self.hidden // self.x_sf_gran_k
        if self.mma_type == 'fp8xnvfp4' and sf.shape[1] * 4 == groups:
            return sf.repeat_interleave(4, dim=1)      # per-128 scales are per-32 scales, repeated
        if sf.dtype == torch.float32 and sf.shape[1] == groups and view.dtype == torch.int32:
            if self.mma_type == 'fp4xfp4':
                return sf.to(torch.float8_e4m3fn).view(torch.uint8).view(torch.int32)
            return pack_ue8m0_to_int(sf.contiguous())
        raise ValueError(f'x_sf: {sf.dtype} {tuple(sf.shape)} fits neither this {self.mma_type!r} buffer\'s '
                         f'{view.dtype} {tuple(view.shape[1:])} per token nor float32 scales per '
                         f'{self.x_sf_gran_k} channels')

    @property
    def buffer(self) -> Optional[torch.Tensor]:
        """The raw bytes of this rank's buffer (upstream's name)."""
        return self.raw

    @property
    def destroyed(self) -> bool:
        return self.raw is None

    def destroy(self) -> None:
        """Release this rank's memory (upstream's call at the end of a run); the buffer is unusable after."""
        self.handle = self.raw = self.group = None
        self.views = {}
        self.peer_bases = None
        for name in self._VIEW_NAMES:
            setattr(self, name, None)

    @classmethod
    def emulated_group(cls, num_ranks: int, num_experts: int, num_max_tokens_per_rank: int, num_topk: int,
                       hidden: int, intermediate_hidden: int, device=None, timeout_s: Optional[float] = None, *,
                       num_max_tokens_per_wave: Optional[int] = None, mma_type: str = 'fp8xfp4',
                       num_shared_experts: int = 0) -> List['SymmBuffer']:
        """The buffers of ``num_ranks`` ranks emulated on one device, each rank's kernels reading and
        signalling the others' buffers through plain device pointers (what NVLink peer mappings are on
        several GPUs).  Run each rank's call on its own CUDA stream, all launched before any is
        waited for: the ranks' barriers wait for each other, and nothing that synchronises the device
        or allocates device memory or loads a kernel may run between the first rank's launch and the
        last's: the layer skips its value checks on these buffers, and the caller runs
        ``deep_gemm.mega.sm90.prepare`` for every rank before launching any.  The ranks' fused kernels
        must all be resident at once, so their calls should pick the same token tile
        (``deep_gemm.mega.sm90.block_t_for``): one-CTA-per-SM and two-CTA-per-SM grids side by side may
        not fit, and the first rank then times out at barrier 0.  For tests on one GPU."""
        check_positive_int('num_ranks', num_ranks)
        bufs = [cls(None, num_experts, num_max_tokens_per_rank, num_topk, hidden, intermediate_hidden,
                    num_shared_experts, mma_type, device=device, timeout_s=timeout_s,
                    num_max_tokens_per_wave=num_max_tokens_per_wave, _emulated=(r, num_ranks))
                for r in range(num_ranks)]
        ptrs = [b.raw.data_ptr() for b in bufs]
        for b in bufs:
            b.peer_bases = b._bases_tensor(ptrs)
            b._peers = bufs
        return bufs

    @property
    def emulated(self) -> bool:
        """True for the buffers of :meth:`emulated_group`."""
        return self._peers is not None

    def num_waves(self, num_tokens: int) -> int:
        """Waves of at most ``num_max_tokens_per_wave`` tokens that a call with ``num_tokens`` tokens on
        this rank runs: ``ceil(num_tokens / W)`` on one rank; with several ranks ``ceil(T / W)`` whatever
        ``num_tokens`` is, since every rank must run as many waves as the others (their barriers pair
        up) and no rank knows the others' token counts without a host sync."""
        check_positive_int('num_tokens', num_tokens, allow_zero=True)
        if num_tokens > self.num_max_tokens_per_rank:
            raise ValueError(f'num_tokens: {num_tokens} > num_max_tokens_per_rank = {self.num_max_tokens_per_rank}')
        limit = num_tokens if self.num_ranks == 1 else self.num_max_tokens_per_rank
        return -(-limit // self.num_max_tokens_per_wave)

    def waves(self, num_tokens: int) -> List[Tuple[int, int]]:
        """``(first token, tokens)`` of each of the :meth:`num_waves` waves; with several ranks the
        last waves may hold 0 tokens of this rank."""
        w = self.num_max_tokens_per_wave
        return [(i * w, min(max(num_tokens - i * w, 0), w)) for i in range(self.num_waves(num_tokens))]

    def _bases_tensor(self, ptrs) -> torch.Tensor:
        return torch.tensor([p - (1 << 64) if p >= (1 << 63) else p for p in ptrs], dtype=torch.int64,
                            device=self.device)

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
        # every rank's zeroed flags before any rank's first signal
        handle.barrier()
        return raw, handle

    @staticmethod
    def _view(raw: torch.Tensor, reg: Region) -> torch.Tensor:
        return raw[reg.offset:reg.offset + reg.nbytes].view(reg.dtype).view(reg.shape)

    def region(self, name: str) -> torch.Tensor:
        """The named region on this rank (see :func:`get_symm_buffer_layout`)."""
        return self.views[name]

    def offset(self, name: str, row: int = 0) -> int:
        """Byte offset of the named region, or of its row ``row`` (the same on every rank)."""
        reg = self.layout[name]
        return reg.offset if row == 0 else reg.offset + row * (reg.nbytes // reg.shape[0])

    def peer_region(self, name: str, rank: int) -> torch.Tensor:
        """The named region of another rank's buffer (CUDA symmetric memory or an emulated group)."""
        if rank == self.rank:
            return self.views[name]
        if self._peers is not None:
            return self._peers[rank].views[name]
        if self.handle is None:
            raise RuntimeError('peer_region: this buffer is not symmetric memory (CPU or a single rank)')
        reg = self.layout[name]
        peer = self.handle.get_buffer(rank, (self.num_bytes,), torch.uint8)
        return self._view(peer, reg)

    @property
    def error_record_ptr(self) -> int:
        """Device address of the host-mapped record of the first timed-out wait (CUDA only)."""
        return self._error.device_ptr

    def comm_error(self) -> Optional[str]:
        """The first timed-out cross-rank wait as a message, or None.  Reads host memory only: it sees
        what the kernels finished so far (synchronise the stream first to see the last call)."""
        if self._error is None:
            return None
        code, phase, rank, peer, epoch = self._error.read()
        if code != 1:
            return None
        if phase == PHASE_INTERNAL:
            return (f'rank {rank} timed out after {self.timeout_s:g} s inside the fused Mega MoE kernel of call '
                    f'{epoch} (its CTAs were not all resident: another kernel occupied SMs, or deep_gemm.set_num_sms '
                    f'exceeds the GPU); this buffer stays failed, and y of that call was set to NaN')
        phase_name = _PHASE_NAMES[phase] if 0 <= phase < len(_PHASE_NAMES) else f'phase {phase}'
        return (f'rank {rank} timed out after {self.timeout_s:g} s waiting for rank {peer} at the {phase_name} '
                f'barrier of call {epoch} of this buffer (rank {peer} never arrived: it crashed, hung, or skipped '
                f'the layer); this buffer stays failed, and y of that call was set to NaN')

    def check_comm(self, synchronize: bool = True) -> None:
        """Raise :class:`MegaMoETimeoutError` if a cross-rank wait of this buffer timed out
        (after synchronising the device, by default)."""
        if synchronize and self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)
        msg = self.comm_error()
        if msg is not None:
            raise MegaMoETimeoutError(msg)

    def __repr__(self) -> str:
        if self.destroyed:
            return f'SymmBuffer(destroyed, mma_type={self.mma_type!r})'
        return (f'SymmBuffer(rank={self.rank}/{self.num_ranks}, mma_type={self.mma_type!r}, experts={self.num_experts}, '
                f'max_tokens={self.num_max_tokens_per_rank}, tokens_per_wave={self.num_max_tokens_per_wave}, '
                f'topk={self.num_topk}, hidden={self.hidden}, '
                f'intermediate={self.intermediate_hidden}, bytes={self.num_bytes}, device={self.device})')


def _encode(value) -> int:
    """An argument as one int64 for the cross-rank comparison: ints as themselves, None as -1, anything
    else (rejected later by the local checks, identically on every rank) as -2."""
    if value is None:
        return -1
    if isinstance(value, int) and not isinstance(value, bool) and -(1 << 62) < value < (1 << 62):
        return value
    return -2


def _check_same_on_every_rank(group, **args) -> None:
    """Buffer creation is collective: every rank must pass the same sizes, or the kernels would read
    each other's regions at the wrong offsets.  One all_gather, before any other collective; on a
    mismatch every rank raises the same ValueError (so no rank is left waiting for the others)."""
    import torch.distributed as dist
    names = list(args)
    dev = torch.device('cuda', torch.cuda.current_device()) if dist.get_backend(group) == 'nccl' else torch.device('cpu')
    mine = torch.tensor([_encode(args[n]) for n in names], dtype=torch.int64, device=dev)
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, mine, group=group)
    table = torch.stack(parts).cpu().tolist()
    bad = [i for i, n in enumerate(names) if len({row[i] for row in table}) > 1]
    if bad:
        show = lambda v: 'None' if v == -1 else ('(not an int)' if v == -2 else str(v))  # noqa: E731
        detail = '; '.join(f'{names[i]}: ' + ', '.join(f'rank {r} passed {show(row[i])}' for r, row in enumerate(table))
                           for i in bad)
        raise ValueError(f'get_symm_buffer_for_mega_moe: the ranks of the group passed different sizes, and every rank '
                         f'must pass the same ({detail})')


def _check_timeout(timeout_s) -> float:
    if timeout_s is None:
        env = os.environ.get('DG_MEGA_MOE_TIMEOUT_S')
        if env is None:
            return DEFAULT_TIMEOUT_S
        try:
            timeout_s = float(env)
        except ValueError:
            raise ValueError(f'DG_MEGA_MOE_TIMEOUT_S: expected seconds, got {env!r}') from None
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)):
        raise TypeError(f'timeout_s: expected seconds as a float, got {type(timeout_s).__name__}')
    if not math.isfinite(timeout_s) or timeout_s <= 0:
        raise ValueError(f'timeout_s: expected a finite positive number of seconds, got {timeout_s}')
    return float(timeout_s)


class _HostErrorRecord:
    """int32 [8] in pinned, device-mapped host memory (comm/symm.cuh: CommError): kernels write it,
    Python reads it without synchronising.  Records are slots of 4 KiB pages that are never freed:
    freeing pinned memory synchronises the device, which must not happen from a destructor (the
    garbage collector may run one while another rank's barrier kernel waits)."""

    _SLOTS_PER_PAGE = 128
    _pages = []          # (host address, device address, slots used)
    _lock = threading.Lock()

    def __init__(self, device: torch.device):
        from ..jit import runtime
        d = runtime.driver()
        with self._lock:
            if not self._pages or self._pages[-1][2] == self._SLOTS_PER_PAGE:
                runtime._ensure_context(device.index)
                flags = int(d.CU_MEMHOSTALLOC_PORTABLE) | int(d.CU_MEMHOSTALLOC_DEVICEMAP)
                with torch.cuda.device(device):
                    host = int(runtime.check(d.cuMemHostAlloc(32 * self._SLOTS_PER_PAGE, flags)))
                    dev = int(runtime.check(d.cuMemHostGetDevicePointer(host, 0)))
                self._pages.append([host, dev, 0])
            page = self._pages[-1]
            slot, page[2] = page[2], page[2] + 1
        self._ints = (ctypes.c_int32 * 8).from_address(page[0] + 32 * slot)
        ctypes.memset(ctypes.addressof(self._ints), 0, 32)
        self.device_ptr = page[1] + 32 * slot

    def read(self):
        return tuple(self._ints[:5])


def get_symm_buffer_for_mega_moe(group, num_experts: int, num_max_tokens_per_rank: int, num_topk: int,
                                 hidden: int, intermediate_hidden: int, num_shared_experts: int = 0,
                                 use_fp8_dispatch: Optional[bool] = None, mma_type: str = 'fp8xfp4',
                                 activation: str = 'swiglu', *, device=None, timeout_s: Optional[float] = None,
                                 num_max_tokens_per_wave: Optional[int] = None) -> SymmBuffer:
    """Allocate the Mega MoE buffer for ``group`` (``None`` = one process); collective over ``group``.

    Upstream DeepGEMM's signature.  ``mma_type`` picks the entry point and the token views' formats
    (see :class:`SymmBuffer`): ``'fp8xfp4'`` / ``'fp8xfp8'`` for ``fp8_fp4_mega_moe`` (and
    ``fp8_nvfp4_mega_moe``), ``'bf16xbf16'`` for ``bf16_mega_moe``, ``'fp4xfp4'`` for
    ``fp4_fp4_mega_moe``, ``'fp8xnvfp4'`` for ``fp8_nvfp4_mega_moe`` with float32 activation scales.
    ``num_shared_experts`` (upstream recipes) adds the shared experts every token visits.
    ``use_fp8_dispatch`` is upstream's deprecated spelling of the activation format: when given it must
    agree with ``mma_type``.  ``activation``: ``'swiglu'``.

    ``hidden`` and ``intermediate_hidden`` must be multiples of 128 (512 for ``'fp4xfp4'``),
    ``num_experts`` a multiple of the group size; every rank must pass the same sizes (checked: every
    rank raises the same ``ValueError`` otherwise).  Ours, keyword-only: ``device`` (default: the
    current CUDA device, else CPU); ``timeout_s`` bounds every cross-rank wait of the layer (default
    ``$DG_MEGA_MOE_TIMEOUT_S`` or 300 s); ``num_max_tokens_per_wave`` (at most
    ``num_max_tokens_per_rank``; default: see the module docstring) bounds the receive rows: a call
    runs as waves of at most that many tokens per rank.
    """
    if use_fp8_dispatch is not None:
        warnings.warn('`use_fp8_dispatch` will be deprecated in the future, please use `mma_type`',
                      DeprecationWarning, stacklevel=2)
        if bool(use_fp8_dispatch) != (str(mma_type).split('x')[0] == 'fp8'):
            raise ValueError(f'use_fp8_dispatch: {use_fp8_dispatch} contradicts mma_type={mma_type!r}')
    return SymmBuffer(group, num_experts, num_max_tokens_per_rank, num_topk, hidden, intermediate_hidden,
                      num_shared_experts, mma_type, activation, device=device, timeout_s=timeout_s,
                      num_max_tokens_per_wave=num_max_tokens_per_wave)


def get_block_m_for_mega_moe(num_ranks: int, num_experts: int, num_max_tokens_per_rank: int, num_tokens: int,
                             num_topk: int, mma_type: str = 'fp8xfp4') -> int:
    """Upstream's token-block heuristic (its callers lay out the shared experts' scales by it, and check
    their receive rows against it).  Our kernels pick their own token tiles (``sm90.block_t_for``); the
    receive rows of an upstream-kind buffer are a multiple of every value this returns."""
    if mma_type not in MMA_TYPES:
        raise ValueError(f'mma_type: expected one of {MMA_TYPES}, got {mma_type!r}')
    check_positive_int('num_ranks', num_ranks)
    check_positive_int('num_experts', num_experts)
    check_positive_int('num_tokens', num_tokens, allow_zero=True)
    check_positive_int('num_topk', num_topk)
    e = num_tokens * num_ranks * num_topk / num_experts       # expected rows per expert
    c = e + math.sqrt(e)
    block_m = 16 if e <= 10 else 32
    if e > 24:
        nb = math.ceil(c / 240)
        if nb == 1 and c > 192 and num_experts // num_ranks < 14:
            nb = 2
        block_m = next((b for b in (64, 128, 192, 240) if nb * b >= c), 240)
    return block_m
