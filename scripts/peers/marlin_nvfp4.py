"""Peer: vLLM's Marlin MoE GEMM on NVFP4 weights (W4A16: BF16 activations), from vllm 0.20.2's binary.

The op, ``torch.ops._moe_C.moe_wna16_marlin_gemm`` (``.whl/vllm_moe/_moe_C.abi3.so``, built for torch
2.11 + CUDA 13; its Marlin kernels ship SASS for sm_75/80/89/120 and PTX for compute_80, so on an H200
the driver JIT-compiles the module on the first call: warm up before timing), has the schema (read
from the binary)::

    moe_wna16_marlin_gemm(Tensor! a, Tensor? c_or_none, Tensor! b_q_weight, Tensor? b_bias_or_none,
        Tensor! b_scales, Tensor? a_scales, Tensor? global_scale, Tensor? b_zeros_or_none,
        Tensor? g_idx_or_none, Tensor? perm_or_none, Tensor! workspace, Tensor sorted_token_ids,
        Tensor! expert_ids, Tensor! num_tokens_past_padded, Tensor! topk_weights, int moe_block_size,
        int top_k, bool mul_topk_weights, int b_type_id, int size_m, int size_n, int size_k,
        bool is_full_k, bool use_atomic_add, bool use_fp32_reduce, bool is_zp_float,
        int thread_k, int thread_n, int blocks_per_sm) -> Tensor

and computes, for every block of ``moe_block_size`` entries of ``sorted_token_ids`` (flat slot ids
``token * top_k + j``, grouped by expert, each expert's run padded to a multiple of the block size with
the value ``size_m * top_k``; ``expert_ids`` one expert per block; ``num_tokens_past_padded`` the padded
total), ``c[slot] = a[slot // top_k] @ W[expert]^T`` (times ``topk_weights[slot]`` if
``mul_topk_weights``).  vLLM's fused MoE runs it twice: L1 with ``top_k`` = the router's (A = tokens),
SwiGLU in a separate kernel, L2 with ``top_k = 1`` over the ``size_m * top_k`` slots with the routing
weights applied there.  The block table comes from ``_moe_C.moe_align_block_size`` (in the same
binary; :func:`moe_align_block_size` is the same thing in torch).

NVFP4 in Marlin's layout (vllm's ``prepare_nvfp4_moe_layer_for_marlin``), per expert, for a weight
``[N, K]`` with E2M1 codes (ModelOpt bytes ``[N, K/2]``, low nibble = even k), E4M3 scales per 16
along K ``[N, K/16]`` and an FP32 global scale:

* ``b_q_weight`` int32 ``[K/16, 2N]``: the codes as ``[K, N]``, cut into 16x16 tiles (tile rows of
  ``N * 16`` values), each 1024-value chunk permuted (:func:`weight_perm`: the mma.sync fragment
  order), then 8 consecutive codes per int32 (code ``i`` at bits ``4i``) -- what ``gptq_marlin_repack``
  does from GPTQ packing (:func:`marlin_repack`);
* ``b_scales`` float8_e4m3fn-typed bytes ``[K/16, N]``: the scales transposed, each 64-chunk permuted
  (:func:`scale_perm`), groups of 4 reordered ``[0, 2, 1, 3]``, and re-encoded as "S0E5M3" (the top
  byte of ``half(s * f * 2^7) << 1``; zero where that is below 2), with a power-of-two ``f`` shared by
  all experts that lifts the largest scale to 448 (:func:`marlin_scales`);
* ``global_scale`` ``[E]``: ``g * 2^(126 - 7) / f`` for BF16 activations (``2^(14 - 7)`` for FP16).

Bytes per expert: ``N K / 2 + N K / 16 + 4``, the same as ModelOpt NVFP4 (ours: ``N K / 2 + N K / 16``).

    python scripts/peers/marlin_nvfp4.py [--check] [--tokens 1,4,16,...]   # check + times, bench shapes
"""
import argparse
import functools
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

if __package__ in (None, ''):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from scripts.peers import WHL_DIR, unavailable  # noqa: E402

NAME = 'marlin (vllm 0.20.2 moe_wna16_marlin_gemm, NVFP4 W4A16)'
SO_PATH = Path(os.environ.get('DG_PEER_MARLIN_SO') or WHL_DIR / 'vllm_moe' / '_moe_C.abi3.so')
GROUP = 16          # NVFP4 block along K
TILE = 16           # Marlin tile
PACK = 8            # 4-bit codes per int32
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def scalar_type_id(exponent: int, mantissa: int, signed: bool, bias: int = 0, finite_values_only: bool = False,
                   nan_repr: int = 1) -> int:
    """vLLM's ``ScalarType.id``: the fields packed low to high in 8, 8, 1, 32, 1, 8 bits."""
    val, off = 0, 0
    for member, width in ((exponent, 8), (mantissa, 8), (int(signed), 1), (bias, 32),
                          (int(finite_values_only), 1), (nan_repr, 8)):
        val |= (int(member) & ((1 << width) - 1)) << off
        off += width
    return val


# scalar_types.float4_e2m1f = float_(2, 1, finite_values_only=True, NanRepr.NONE)
FLOAT4_E2M1F_ID = scalar_type_id(2, 1, True, 0, True, 0)


# ------------------------------------------------------------------------------------ block table
def moe_block_size(m: int, top_k: int, num_experts: int) -> int:
    """vLLM's choice for ``fused_marlin_moe``: the first of 8, 16, 32, 48, 64 with fewer than 0.9
    blocks' worth of slots per expert, else 64."""
    for bs in (8, 16, 32, 48, 64):
        if m * top_k / num_experts / bs < 0.9:
            break
    return bs


def max_num_tokens_padded(numel: int, num_experts: int, block_size: int) -> int:
    """Length of ``sorted_token_ids`` as vLLM allocates it."""
    n = numel + num_experts * (block_size - 1)
    if numel < num_experts:
        n = min(numel * block_size, n)
    return n


@dataclass
class Alignment:
    sorted_token_ids: torch.Tensor      # int32 [max_num_tokens_padded]
    expert_ids: torch.Tensor            # int32 [ceil(max / block_size)]
    num_tokens_post_padded: torch.Tensor  # int32 [1]
    block_size: int


def moe_align_block_size(topk_ids: torch.Tensor, num_experts: int, block_size: int) -> Alignment:
    """``_moe_C.moe_align_block_size`` in torch: slots (flat index into ``topk_ids``) grouped by expert
    in increasing slot order, each expert's run padded to a multiple of ``block_size`` with the value
    ``numel``; one expert id per block (blocks past the padded total: 0); ids outside
    ``[0, num_experts)`` are left out.  Syncs with the host (not for timed regions)."""
    flat = topk_ids.reshape(-1).to(torch.int64)
    numel, dev = flat.numel(), flat.device
    total = max_num_tokens_padded(numel, num_experts, block_size)
    valid = (flat >= 0) & (flat < num_experts)
    key = torch.where(valid, flat, torch.full_like(flat, num_experts))
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=num_experts + 1)[:num_experts]
    padded = (counts + block_size - 1) // block_size * block_size
    run_start = torch.cumsum(padded, 0) - padded            # padded start of each expert's run
    slot_start = torch.cumsum(counts, 0) - counts           # start of each expert in `order`
    n_valid = int(counts.sum())
    order = order[:n_valid]
    e_sorted = key[order]
    dest = run_start[e_sorted] + torch.arange(n_valid, device=dev) - slot_start[e_sorted]
    sorted_ids = torch.full((total,), numel, dtype=torch.int32, device=dev)
    sorted_ids[dest] = order.to(torch.int32)
    expert_ids = torch.zeros(-(-total // block_size), dtype=torch.int32, device=dev)
    per_block = torch.repeat_interleave(torch.arange(num_experts, device=dev), padded // block_size)
    expert_ids[:per_block.numel()] = per_block.to(torch.int32)
    post = padded.sum().to(torch.int32).reshape(1)
    return Alignment(sorted_ids, expert_ids, post, block_size)


# ------------------------------------------------------------------------------------ weight layout
@functools.lru_cache(maxsize=None)
def weight_perm() -> Tuple[int, ...]:
    """Marlin's permutation of each 1024-value chunk (four consecutive 16x16 tiles of one tile row) for
    4-bit weights and 16-bit activations: per lane ``i`` of a warp, the 8 values its two m16n8k16 B
    fragments need, for each of the 4 tiles, then the 8 codes of one int32 interleaved
    ``0 2 4 6 1 3 5 7`` (the dequant extracts even and odd nibbles in pairs)."""
    perm: List[int] = []
    for i in range(32):
        col, r = i // 4, i % 4
        lane = [16 * row + col + 8 * block for block in (0, 1) for row in (2 * r, 2 * r + 1, 2 * r + 8, 2 * r + 9)]
        for j in range(4):
            perm.extend(p + 256 * j for p in lane)
    inter = (0, 2, 4, 6, 1, 3, 5, 7)
    return tuple(perm[g + inter[t]] for g in range(0, len(perm), 8) for t in range(8))


@functools.lru_cache(maxsize=None)
def scale_perm() -> Tuple[int, ...]:
    """Marlin's permutation of each 64-scale chunk for grouped scales (group < K)."""
    return tuple(i + 8 * j for i in range(8) for j in range(8))


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """ModelOpt FP4 bytes ``[..., K/2]`` -> codes ``[..., K]`` (low nibble = even element)."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2)


def _check_nk(n: int, k: int):
    if n % 64 or k % TILE:
        raise ValueError(f'Marlin needs N % 64 == 0 and K % 16 == 0, got N = {n}, K = {k}')


def marlin_repack(packed: torch.Tensor) -> torch.Tensor:
    """ModelOpt FP4 bytes ``[..., N, K/2]`` -> Marlin int32 ``[..., K/16, 2N]`` (``gptq_marlin_repack`` of
    the GPTQ-packed codes, per expert)."""
    *lead, n, half_k = packed.shape
    k = 2 * half_k
    _check_nk(n, k)
    q = unpack_codes(packed).transpose(-1, -2)                           # [..., K, N]
    q = q.reshape(*lead, k // TILE, TILE, n // TILE, TILE).transpose(-3, -2).reshape(*lead, k // TILE, n * TILE)
    perm = torch.tensor(weight_perm(), device=packed.device)
    q = q.reshape(*lead, -1, perm.numel())[..., perm].reshape(*lead, k // TILE, n * TILE // PACK, PACK)
    shifts = torch.arange(0, 4 * PACK, 4, device=packed.device, dtype=torch.int64)
    word = (q.to(torch.int64) << shifts).sum(-1)
    word = torch.where(word >= 1 << 31, word - (1 << 32), word)
    return word.to(torch.int32).contiguous()


def marlin_unpack(words: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`marlin_repack`: Marlin int32 ``[..., K/16, 2N]`` -> ModelOpt bytes ``[..., N, K/2]``."""
    *lead, kt, two_n = words.shape
    n, k = two_n // 2, kt * TILE
    shifts = torch.arange(0, 4 * PACK, 4, device=words.device, dtype=torch.int64)
    q = ((words.to(torch.int64)[..., None] >> shifts) & 0xF).reshape(*lead, -1, len(weight_perm()))
    perm = torch.tensor(weight_perm(), device=words.device)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=words.device)
    q = q[..., inv].reshape(*lead, kt, n // TILE, TILE, TILE).transpose(-3, -2).reshape(*lead, k, n)
    codes = q.transpose(-1, -2).to(torch.uint8)                           # [..., N, K]
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).contiguous()


def nvfp4_scale_factor(scales: torch.Tensor) -> float:
    """The power of two ``f >= 1`` that lifts the largest nonzero E4M3 scale to at most 448 (vLLM's
    ``_nvfp4_compute_scale_factor`` for BF16 activations), over all experts at once."""
    s = scales.to(torch.float32)
    nz = s[s > 0]
    if nz.numel() == 0:
        return 1.0
    mx = float(nz.max())
    return float(2.0 ** math.floor(math.log2(448.0 / mx))) if mx < 448.0 else 1.0


def marlin_scales(scales: torch.Tensor, factor: float) -> torch.Tensor:
    """E4M3 scales ``[..., N, K/16]`` -> Marlin's S0E5M3 bytes ``[..., K/16, N]`` (float8_e4m3fn-typed).
    Negative scales are not representable (vLLM warns; ours are never negative)."""
    *lead, n, g = scales.shape
    s = scales.to(torch.float32).transpose(-1, -2).contiguous()           # [..., K/16, N]
    sp = torch.tensor(scale_perm(), device=scales.device)
    s = s.reshape(*lead, -1, sp.numel())[..., sp].reshape(*lead, g, n)
    s = s.to(torch.half).reshape(*lead, -1, 4)[..., [0, 2, 1, 3]].reshape(*lead, g, n)
    if factor > 1.0:
        s = (s.float() * factor).to(torch.half)
    s = s * 128
    s[s < 2] = 0
    b = (s.contiguous().view(torch.int16) << 1).view(torch.uint8)         # little endian: odd bytes = high
    return b[..., 1::2].contiguous().view(torch.float8_e4m3fn)


def decode_marlin_scales(b: torch.Tensor, factor: float) -> torch.Tensor:
    """Inverse of :func:`marlin_scales` (for checks): S0E5M3 bytes ``[..., K/16, N]`` -> float32 scales
    ``[..., N, K/16]``."""
    *lead, g, n = b.shape
    u = b.view(torch.uint8).to(torch.int32)
    e, m = u >> 3, u & 7
    val = torch.where(u == 0, torch.zeros_like(u, dtype=torch.float32),
                      torch.exp2(e.float() - 15) * (1 + m.float() / 8)) / 128 / factor   # the half's value / 2^7 / f
    val = val.reshape(*lead, -1, 4)[..., [0, 2, 1, 3]].reshape(*lead, g, n)          # [0 2 1 3] is an involution
    sp = torch.tensor(scale_perm(), device=b.device)
    inv = torch.empty_like(sp)
    inv[sp] = torch.arange(sp.numel(), device=b.device)
    val = val.reshape(*lead, -1, sp.numel())[..., inv].reshape(*lead, g, n)
    return val.transpose(-1, -2).contiguous()


def marlin_global_scale(g: torch.Tensor, factor: float, act_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """vLLM's ``nvfp4_marlin_process_global_scale`` divided by the shared scale factor (float32)."""
    target = {torch.bfloat16: 8, torch.half: 5}[act_dtype]
    bias = 2 ** (target - 1) - 2 ** (2 - 1)
    return (g.to(torch.float32) * 2.0 ** (bias - 7) / factor).contiguous()


@dataclass
class MarlinWeights:
    qweight: torch.Tensor        # int32 [E, K/16, 2N]
    scales: torch.Tensor         # float8_e4m3fn [E, K/16, N] (S0E5M3 bytes)
    global_scale: torch.Tensor   # float32 [E] (or the activation dtype, where the op wants that)
    n: int
    k: int
    factor: float

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.global_scale))


def prepare_nvfp4(codes: torch.Tensor, scales: torch.Tensor, global_scale: torch.Tensor,
                  act_dtype: torch.dtype = torch.bfloat16) -> MarlinWeights:
    """ModelOpt NVFP4 ``(uint8 [E, N, K/2], float8_e4m3fn [E, N, K/16], float32 [E])`` -> Marlin layout
    (one expert at a time to bound the temporaries)."""
    e, n, half_k = codes.shape
    factor = nvfp4_scale_factor(scales)
    qw = torch.stack([marlin_repack(codes[i]) for i in range(e)])
    sc = torch.stack([marlin_scales(scales[i], factor) for i in range(e)])
    return MarlinWeights(qw, sc, marlin_global_scale(global_scale.reshape(e), factor, act_dtype), n, 2 * half_k,
                         factor)


def random_marlin_weights(e: int, n: int, k: int, device, gen: Optional[torch.Generator] = None) -> MarlinWeights:
    """Random bytes in Marlin's layout (codes are any nibbles; scales positive normal E4M3), for timing."""
    _check_nk(n, k)
    qw = torch.randint(-2 ** 31, 2 ** 31 - 1, (e, k // TILE, 2 * n), dtype=torch.int32, device=device, generator=gen)
    raw = torch.randint(0x28, 0x48, (1, n, k // GROUP), dtype=torch.uint8, device=device, generator=gen)
    factor = nvfp4_scale_factor(raw.view(torch.float8_e4m3fn))
    sc = marlin_scales(raw.view(torch.float8_e4m3fn)[0], factor).expand(e, -1, -1).contiguous()
    g = torch.full((e,), 5e-3, device=device)
    return MarlinWeights(qw, sc, marlin_global_scale(g, factor), n, k, factor)


def dequant_reference(codes: torch.Tensor, scales: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """ModelOpt NVFP4 -> float32 ``[E, N, K]``: ``e2m1 * scale * g``."""
    lut = torch.tensor(E2M1, dtype=torch.float32, device=codes.device)
    vals = lut[unpack_codes(codes).long()]
    s = scales.to(torch.float32).repeat_interleave(GROUP, dim=-1)
    return vals * s * global_scale.to(torch.float32).reshape(-1, 1, 1)


# ------------------------------------------------------------------------------------ the op
def parse_schema_arg_names(schema: str) -> List[str]:
    """Argument names of a schema string ``name(Type a, Type? b, ...) -> Ret``."""
    inner = schema[schema.index('(') + 1:schema.rindex(')', 0, schema.index('->') if '->' in schema else None)]
    return [part.split()[-1].split('=')[0] for part in inner.split(',') if part.strip()]


def build_args(names: Sequence[str], values: Dict[str, object]) -> list:
    """Positional arguments in schema order; a name without a value raises (a schema we do not know)."""
    missing = [nm for nm in names if nm not in values]
    if missing:
        raise KeyError(f'moe_wna16_marlin_gemm: no value for argument(s) {missing}')
    return [values[nm] for nm in names]


def gemm_values(a, c, w: MarlinWeights, al: Alignment, topk_weights, top_k: int, mul_topk_weights: bool,
                workspace) -> Dict[str, object]:
    """Every argument of ``moe_wna16_marlin_gemm`` by schema name (plus names other vLLM versions use:
    ``is_ep``, ``is_k_full``), as ``fused_marlin_moe`` passes them for NVFP4 with 16-bit activations:
    no bias, zeros, act-order or activation scales; full K; FP32 global reduce; automatic tile config."""
    return dict(a=a, c_or_none=c, b_q_weight=w.qweight, b_bias_or_none=None, b_scales=w.scales, a_scales=None,
                global_scale=w.global_scale, b_zeros_or_none=None, g_idx_or_none=None, perm_or_none=None,
                workspace=workspace, sorted_token_ids=al.sorted_token_ids, expert_ids=al.expert_ids,
                num_tokens_past_padded=al.num_tokens_post_padded, topk_weights=topk_weights,
                moe_block_size=al.block_size, top_k=top_k, mul_topk_weights=mul_topk_weights, is_ep=False,
                b_type_id=FLOAT4_E2M1F_ID, size_m=a.shape[0], size_n=w.n, size_k=w.k, is_full_k=True,
                is_k_full=True, use_atomic_add=False, use_fp32_reduce=True, is_zp_float=False,
                thread_k=-1, thread_n=-1, blocks_per_sm=-1)


class MarlinOps:
    """The loaded ``_moe_C`` ops.  ``load()`` returns ``(ops, None)`` or ``(None, reason)``."""

    def __init__(self, so_path: Path):
        torch.ops.load_library(str(so_path))
        ns = torch.ops._moe_C
        self.gemm_op = ns.moe_wna16_marlin_gemm
        self.arg_names = [a.name for a in self.gemm_op.default._schema.arguments]
        self.schema = str(self.gemm_op.default._schema)
        try:
            self.align_op = ns.moe_align_block_size
        except (AttributeError, RuntimeError):
            self.align_op = None
        self.path = so_path

    @classmethod
    def load(cls, so_path: Optional[Path] = None):
        so_path = Path(so_path or SO_PATH)
        if not so_path.exists():
            return None, f'{so_path} not found (carry .whl/vllm_moe/_moe_C.abi3.so)'
        if not torch.cuda.is_available():
            return None, 'no CUDA device'
        try:
            return cls(so_path), None
        except Exception as ex:  # wrong torch/CUDA ABI, missing symbols, ...
            return None, f'{so_path.name} failed to load: {type(ex).__name__}: {ex}'

    def align(self, topk_ids: torch.Tensor, num_experts: int, block_size: int) -> Alignment:
        """The block table from the binary's own op (what vLLM uses), else from torch."""
        if self.align_op is None:
            return moe_align_block_size(topk_ids, num_experts, block_size)
        numel = topk_ids.numel()
        total = max_num_tokens_padded(numel, num_experts, block_size)
        dev = topk_ids.device
        sorted_ids = torch.empty(total, dtype=torch.int32, device=dev)
        expert_ids = torch.empty(-(-total // block_size), dtype=torch.int32, device=dev)
        post = torch.empty(1, dtype=torch.int32, device=dev)
        self.align_op(topk_ids, num_experts, block_size, sorted_ids, expert_ids, post, None)
        return Alignment(sorted_ids, expert_ids, post, block_size)

    def gemm(self, a: torch.Tensor, c: Optional[torch.Tensor], w: MarlinWeights, al: Alignment,
             topk_weights: torch.Tensor, top_k: int, mul_topk_weights: bool, workspace: torch.Tensor) -> torch.Tensor:
        values = gemm_values(a, c, w, al, topk_weights, top_k, mul_topk_weights, workspace)
        try:
            return self.gemm_op(*build_args(self.arg_names, values))
        except RuntimeError as ex:
            # older binaries want the global scale in the activation dtype ("same with c")
            if 'global_scale' not in str(ex) or w.global_scale.dtype == a.dtype:
                raise
            w.global_scale = w.global_scale.to(a.dtype)
            values['global_scale'] = w.global_scale
            return self.gemm_op(*build_args(self.arg_names, values))


def make_workspace(device) -> torch.Tensor:
    """vLLM's ``marlin_make_workspace_new(device, 4)``: one lock per thread block, zeroed."""
    device = torch.device(device)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == 'cuda' else 1
    return torch.zeros(sms * 4, dtype=torch.int32, device=device)


def swiglu_into(c1: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``h = silu(gate) * up`` with gate = the first half of ``c1``'s columns (vLLM's ``silu_and_mul``)."""
    inter = h.shape[1]
    return torch.mul(torch.nn.functional.silu(c1[:, :inter]), c1[:, inter:], out=h)


class MarlinMoE:
    """L1 (gate+up) -> SwiGLU -> L2 (down, routing weights applied) over a fixed routing, with every
    buffer allocated up front, as ``fused_marlin_moe`` runs it."""

    def __init__(self, ops: MarlinOps, w1: MarlinWeights, w2: MarlinWeights, topk_ids: torch.Tensor,
                 topk_weights: torch.Tensor, act_dtype=torch.bfloat16, block_size: Optional[int] = None):
        self.ops, self.w1, self.w2 = ops, w1, w2
        m, self.top_k = topk_ids.shape
        e = w1.qweight.shape[0]
        self.block_size = block_size or moe_block_size(m, self.top_k, e)
        dev = topk_ids.device
        self.al = ops.align(topk_ids.to(torch.int32).contiguous(), e, self.block_size)
        self.topk_weights = topk_weights.to(torch.float32).contiguous()
        self.ws = make_workspace(dev)
        slots = m * self.top_k
        self.c1 = torch.empty(slots, w1.n, dtype=act_dtype, device=dev)
        self.h = torch.zeros(slots, w1.n // 2, dtype=act_dtype, device=dev)
        self.c2 = torch.empty(slots, w2.n, dtype=act_dtype, device=dev)

    def l1(self, x: torch.Tensor):
        return self.ops.gemm(x, self.c1, self.w1, self.al, self.topk_weights, self.top_k, False, self.ws)

    def l2(self):
        return self.ops.gemm(self.h, self.c2, self.w2, self.al, self.topk_weights, 1, True, self.ws)

    def gemms(self, x: torch.Tensor):
        """L1 and L2 only (L2 reads whatever SwiGLU last wrote): the GEMM time."""
        self.l1(x)
        return self.l2()

    def __call__(self, x: torch.Tensor):
        """The whole chain; returns the per-slot L2 rows ``[M * top_k, hidden]`` (vLLM then sums over top_k)."""
        self.l1(x)
        swiglu_into(self.c1, self.h)
        return self.l2()


# ------------------------------------------------------------------------------------ correctness
def check(ops: MarlinOps, device='cuda', seed: int = 0, experts: int = 4, hidden: int = 512, inter: int = 256,
          tokens: int = 16, top_k: int = 2) -> Dict[str, float]:
    """One small MoE through Marlin against torch on the same dequantized NVFP4 weights: relative
    errors of L1 (per slot, before SwiGLU) and of the summed output."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def rand(n, k):
        codes = torch.randint(0, 256, (experts, n, k // 2), dtype=torch.uint8, device=device, generator=gen)
        sc = torch.randint(0x30, 0x40, (experts, n, k // GROUP), dtype=torch.uint8, device=device, generator=gen)
        g = torch.rand(experts, device=device, generator=gen) * 1e-2 + 1e-2
        return codes, sc.view(torch.float8_e4m3fn), g

    raw1, raw2 = rand(2 * inter, hidden), rand(hidden, inter)
    w1, w2 = prepare_nvfp4(*raw1), prepare_nvfp4(*raw2)
    ref1, ref2 = dequant_reference(*raw1), dequant_reference(*raw2)
    x = torch.randn(tokens, hidden, device=device, generator=gen).to(torch.bfloat16)
    scores = torch.rand(tokens, experts, device=device, generator=gen)
    ids = scores.topk(top_k, dim=1).indices.to(torch.int32)
    wts = torch.softmax(torch.randn(tokens, top_k, device=device, generator=gen), 1)
    moe = MarlinMoE(ops, w1, w2, ids, wts)
    out = moe(x).float()
    c1 = moe.c1.float()
    if torch.device(device).type == 'cuda':
        torch.cuda.synchronize()
    xf = x.float()
    r1 = torch.einsum('tk,tjnk->tjn', xf, ref1[ids.long()]).reshape(tokens * top_k, -1)
    h = (torch.nn.functional.silu(r1[:, :inter]) * r1[:, inter:]).to(torch.bfloat16).float()
    r2 = torch.einsum('sk,snk->sn', h, ref2[ids.reshape(-1).long()]) * wts.reshape(-1, 1)
    y, y_ref = out.view(tokens, top_k, -1).sum(1), r2.view(tokens, top_k, -1).sum(1)
    err = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    return {'l1': err(c1, r1), 'moe': err(y, y_ref), 'block_size': moe.block_size,
            'global_scale_dtype': str(w1.global_scale.dtype).replace('torch.', ''),
            'align': same_blocks(moe.al, moe_align_block_size(ids, experts, moe.block_size))
            if getattr(ops, 'align_op', None) is not None else 'no binary op'}


def same_blocks(a: Alignment, b: Alignment) -> str:
    """'same' where two block tables hold the same padded total, the same expert per used block and
    the same slots per block (order within a block free: the binary's op places slots with atomics),
    else what differs."""
    post = int(a.num_tokens_post_padded)
    if post != int(b.num_tokens_post_padded):
        return f'padded totals {post} vs {int(b.num_tokens_post_padded)}'
    nb = post // a.block_size
    if not torch.equal(a.expert_ids[:nb].cpu(), b.expert_ids[:nb].cpu()):
        return 'expert ids differ'
    sa = a.sorted_token_ids[:post].view(nb, -1).sort(1).values.cpu()
    sb = b.sorted_token_ids[:post].view(nb, -1).sort(1).values.cpu()
    return 'same' if torch.equal(sa, sb) else 'slots differ'


def check_line(res: Dict[str, float], tol: float = 2e-2) -> str:
    ok = res['l1'] < tol and res['moe'] < tol
    return (f'peer marlin: check vs torch on dequantized NVFP4 (4 experts, 512/256, 16 tokens, top-2, block '
            f'{res["block_size"]}): L1 rel err {res["l1"]:.2e}, MoE rel err {res["moe"]:.2e} '
            f'({"ok" if ok else "FAIL"}; global scale {res["global_scale_dtype"]}; block table binary vs torch: '
            f'{res.get("align", "?")})')


def bench_fn(fn, reps: int = 30) -> float:
    from triton.testing import do_bench
    return do_bench(fn, warmup=25, rep=reps * 10, return_mode='median') * 1e3


def main(argv=None):
    ap = argparse.ArgumentParser(description='Marlin NVFP4 MoE GEMM peer (bench_grouped_gemm shapes)')
    ap.add_argument('--experts', type=int, default=32)
    ap.add_argument('--hidden', type=int, default=7168)
    ap.add_argument('--inter', type=int, default=3072)
    ap.add_argument('--tokens', default='1,4,16,64,256,1024,4096', help='tokens per expert')
    ap.add_argument('--no-check', action='store_true')
    args = ap.parse_args(argv)
    ops, why = MarlinOps.load()
    if ops is None:
        print(unavailable('marlin', why))
        return 1
    if not args.no_check:
        print(check_line(check(ops)))
    e, hidden, inter = args.experts, args.hidden, args.inter
    gen = torch.Generator(device='cuda').manual_seed(0)
    w1 = random_marlin_weights(e, 2 * inter, hidden, 'cuda', gen)
    w2 = random_marlin_weights(e, hidden, inter, 'cuda', gen)
    mb = (w1.nbytes + w2.nbytes) / 1e6
    print(f'{NAME}: {e} experts, {hidden}/{inter}, weights {mb:.0f} MB')
    print(f'{"tok/exp":>7} {"block":>5} {"gemms us":>9} {"+act us":>8} {"wt GB/s":>8}')
    for tpe in [int(t) for t in args.tokens.split(',')]:
        rows = e * tpe
        x = torch.randn(rows, hidden, device='cuda', generator=gen).to(torch.bfloat16)
        ids = torch.arange(e, device='cuda', dtype=torch.int32).repeat_interleave(tpe)[:, None]
        rw = torch.rand(rows, 1, device='cuda', generator=gen)
        moe = MarlinMoE(ops, w1, w2, ids, rw)
        moe(x)
        torch.cuda.synchronize()
        tg, tf = bench_fn(lambda: moe.gemms(x)), bench_fn(lambda: moe(x))
        print(f'{tpe:>7} {moe.block_size:>5} {tg:>9.1f} {tf:>8.1f} {mb * 1e6 / tg / 1e3:>8.0f}')
        del moe, x
    return 0


if __name__ == '__main__':
    sys.exit(main())
