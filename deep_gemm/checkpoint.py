"""Read one MoE layer's NVFP4 experts from a Hugging Face checkpoint written by NVIDIA ModelOpt.

A ModelOpt NVFP4 export (``modelopt.torch.export.export_hf_checkpoint``, ``quant_algo: NVFP4``) is a
directory with ``config.json``, ``hf_quant_config.json`` and safetensors shards listed by
``model.safetensors.index.json`` (or a single ``model.safetensors``).  Each routed expert's
projections ``gate``, ``up`` and ``down`` are stored as four tensors under the projection's name:

==================  ================  ===========================  =========================================
tensor              dtype             shape (gate / up, down)      meaning
==================  ================  ===========================  =========================================
``weight``          uint8             ``[I, H/2]``, ``[H, I/2]``   two E2M1 codes per byte, low nibble = even k
``weight_scale``    float8_e4m3fn     ``[I, H/16]``, ``[H, I/16]`` UE4M3 block scale per 16 along k
``weight_scale_2``  float32           ``[]``                       the weight's global scale (``amax / 2688``)
``input_scale``     float32           ``[]``                       the activation's global scale (``amax / 2688``
                                                                   of the calibration inputs)
==================  ================  ===========================  =========================================

(``w = e2m1 * weight_scale * weight_scale_2``; a one-element ``[1]`` scale is accepted as well.)

:func:`load_nvfp4_moe_layer` reads the experts of one layer that belong to one rank (rank ``r`` of
``R`` owns global experts ``[r E / R, (r + 1) E / R)``, as the Mega MoE layer splits them), through
``safetensors.safe_open``: each shard is memory-mapped and only the tensors asked for are read, so
the rest of the model never enters memory.  Besides this rank's experts it reads only scalars: the
L1 ``input_scale`` of every expert of the layer, because a token is quantized once, on its own rank,
before it is dispatched to experts on any rank, so every rank must use the same input global scale
(the largest one, see :attr:`NVFP4MoELayer.l1_input_scale`).

Every tensor read is validated (dtype, shape, UE4M3 block scales non-negative and finite, global
scales finite and positive); a :class:`CheckpointError` (a ``ValueError``) names the tensor and the
file it came from (or the index that lists it).

Expert names.  ``expert_pattern`` selects where a layer's experts live: ``'auto'`` (default: the
first built-in naming under which expert 0 of the layer exists), a built-in name of
:data:`EXPERT_NAMINGS`, a template string with ``{layer}``, ``{expert}`` and ``{proj}`` (the
projection names ``gate_proj`` / ``up_proj`` / ``down_proj``), or an :class:`ExpertNaming`:

* ``'deepseek_v3'``, ``'qwen_moe'`` -- ``model.layers.{layer}.mlp.experts.{expert}.{gate,up,down}_proj``
  (DeepSeek-V3, Qwen2/Qwen3-MoE, and what ModelOpt 0.47 with transformers 5.14 writes for a
  DeepSeek-V4 model too, whose hub-name conversion it skips);
* ``'deepseek_v4'`` -- ``layers.{layer}.ffn.experts.{expert}.{w1,w3,w2}`` (DeepSeek-V4's own hub
  names: ``w1`` gate, ``w3`` up, ``w2`` down).

The result, :class:`NVFP4MoELayer`, hands each entry point what it takes:
:meth:`~NVFP4MoELayer.fp8_nvfp4_weights` the ModelOpt dicts of
:func:`deep_gemm.transform_nvfp4_weights_for_mega_moe` (gate and up keep their own
``weight_scale_2``: no folding, exact), :meth:`~NVFP4MoELayer.fp4_fp4_weights` upstream's weight
tuples with ``l1_alphas`` / ``l2_alphas`` / ``a2_scales`` for :func:`deep_gemm.fp4_fp4_mega_moe`.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch

from .utils.validation import bad_ue4m3_bytes

__all__ = ['CheckpointError', 'ExpertNaming', 'EXPERT_NAMINGS', 'NVFP4MoELayer', 'load_nvfp4_moe_layer',
           'read_checkpoint_config']

INDEX_FILE = 'model.safetensors.index.json'
SINGLE_FILE = 'model.safetensors'
NVFP4_BLOCK = 16
PROJECTIONS = ('gate', 'up', 'down')
TENSORS = ('weight', 'weight_scale', 'weight_scale_2', 'input_scale')


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: the message names the tensor and the file (or index)."""


@dataclass(frozen=True)
class ExpertNaming:
    """Where the experts of a layer live: ``template.format(layer=L, expert=e, proj=P) + '.' + tensor``
    with ``P`` one of ``gate`` / ``up`` / ``down`` (the checkpoint's names of the three projections)."""
    template: str
    gate: str = 'gate_proj'
    up: str = 'up_proj'
    down: str = 'down_proj'

    def __post_init__(self):
        for key in ('{layer}', '{expert}', '{proj}'):
            if key not in self.template:
                raise ValueError(f'expert_pattern: template {self.template!r} lacks {key}')

    def proj_name(self, proj: str) -> str:
        return {'gate': self.gate, 'up': self.up, 'down': self.down}[proj]

    def name(self, layer: int, expert: int, proj: str, tensor: str) -> str:
        return f'{self.template.format(layer=layer, expert=expert, proj=self.proj_name(proj))}.{tensor}'

    def expert_ids(self, names: Iterable[str], layer: int) -> List[int]:
        """The expert ids of ``layer`` for which a gate ``weight`` is among ``names``."""
        pattern = re.escape(self.template).replace(re.escape('{layer}'), str(layer)) \
            .replace(re.escape('{expert}'), r'(\d+)').replace(re.escape('{proj}'), re.escape(self.gate))
        rx = re.compile(pattern + r'\.weight')
        return sorted({int(m.group(1)) for m in map(rx.fullmatch, names) if m})


_HF_NAMING = ExpertNaming('model.layers.{layer}.mlp.experts.{expert}.{proj}')
#: Built-in expert namings (``expert_pattern`` values); ``'auto'`` tries them in this order.
EXPERT_NAMINGS: Dict[str, ExpertNaming] = {
    'deepseek_v3': _HF_NAMING,
    'qwen_moe': _HF_NAMING,
    'deepseek_v4': ExpertNaming('layers.{layer}.ffn.experts.{expert}.{proj}', gate='w1', up='w3', down='w2'),
}

#: config.json keys holding the number of routed experts (DeepSeek, Qwen-MoE, Mixtral-style).
_EXPERT_COUNT_KEYS = ('n_routed_experts', 'num_experts', 'num_local_experts')


def _text_config(config: Mapping) -> Mapping:
    """The language model's part of a (possibly multimodal) config.json."""
    for key in ('text_config', 'language_config', 'llm_config'):
        sub = config.get(key)
        if isinstance(sub, Mapping):
            return sub
    return config


def read_checkpoint_config(path: Union[str, os.PathLike]) -> dict:
    """``config.json`` of a checkpoint directory (the language model's part of a multimodal one), or
    ``{}`` when there is none."""
    path = os.fspath(path)
    cfg_file = os.path.join(path if os.path.isdir(path) else os.path.dirname(path), 'config.json')
    if not os.path.isfile(cfg_file):
        return {}
    try:
        with open(cfg_file) as f:
            return dict(_text_config(json.load(f)))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f'{cfg_file}: cannot be read as JSON ({exc})') from None


def _quant_algo(path: str) -> Optional[str]:
    """``quant_algo`` from hf_quant_config.json, or config.json's ``quantization_config``."""
    for name, key in (('hf_quant_config.json', 'quantization'), ('config.json', 'quantization_config')):
        f = os.path.join(path, name)
        if os.path.isfile(f):
            try:
                with open(f) as fh:
                    q = json.load(fh).get(key) or {}
            except (OSError, ValueError):
                continue
            if isinstance(q, Mapping) and q.get('quant_algo'):
                return str(q['quant_algo'])
    return None


class _Checkpoint:
    """The tensor names of a checkpoint and the file each lives in, and lazily opened shards."""

    def __init__(self, path: Union[str, os.PathLike]):
        from safetensors import safe_open  # noqa: F401  (fail early with a clear ImportError)
        path = os.fspath(path)
        if os.path.isfile(path):
            self.dir, files = os.path.dirname(path) or '.', [os.path.basename(path)]
            self.index = None
        elif os.path.isdir(path):
            self.dir = path
            idx = os.path.join(path, INDEX_FILE)
            if os.path.isfile(idx):
                self.index = idx
                files = None
            else:
                self.index = None
                files = sorted(f for f in os.listdir(path) if f.endswith('.safetensors'))
                if not files:
                    raise CheckpointError(f'{path}: neither {INDEX_FILE} nor any .safetensors file')
        else:
            raise CheckpointError(f'{path}: no such checkpoint directory or file')
        self.path = path
        self._open: Dict[str, object] = {}
        self._stack = contextlib.ExitStack()
        if files is None:
            try:
                with open(self.index) as f:
                    wm = json.load(f)['weight_map']
                if not isinstance(wm, Mapping):
                    raise TypeError('weight_map is not an object')
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise CheckpointError(f'{self.index}: not a safetensors index ({type(exc).__name__}: {exc})') from None
            self.weight_map: Dict[str, str] = dict(wm)
        else:
            self.weight_map = {}
            for fname in files:
                for key in self._file(fname, '(listing)').keys():
                    self.weight_map[key] = fname

    def where(self, name: str) -> str:
        """The file (or the index) a tensor is listed in, for messages."""
        f = self.weight_map.get(name)
        return os.path.join(self.dir, f) if f is not None else (self.index or self.dir)

    def _file(self, fname: str, name: str):
        h = self._open.get(fname)
        if h is None:
            from safetensors import safe_open
            full = os.path.join(self.dir, fname)
            if not os.path.isfile(full):
                raise CheckpointError(f'{name}: {full} does not exist (listed in {self.index or self.dir})')
            try:
                h = self._stack.enter_context(safe_open(full, framework='pt', device='cpu'))
            except Exception as exc:  # safetensors raises its own error types for a bad header
                raise CheckpointError(f'{name}: {full} is not a readable safetensors file ({exc})') from None
            self._open[fname] = h
        return h

    def read(self, name: str) -> Tuple[torch.Tensor, str]:
        """The tensor (a memory-mapped read of that tensor only) and its file."""
        fname = self.weight_map.get(name)
        if fname is None:
            raise CheckpointError(f'{name}: missing from {self.index or self.dir}')
        h = self._file(fname, name)
        full = os.path.join(self.dir, fname)
        if name not in h.keys():
            raise CheckpointError(f'{name}: missing from {full} (the index lists it there)')
        try:
            return h.get_tensor(name), full
        except Exception as exc:
            raise CheckpointError(f'{name} in {full}: cannot be read ({exc})') from None

    def close(self) -> None:
        self._stack.close()
        self._open.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _resolve_naming(expert_pattern, ckpt: _Checkpoint, layer: int) -> ExpertNaming:
    if isinstance(expert_pattern, ExpertNaming):
        return expert_pattern
    if not isinstance(expert_pattern, str):
        raise TypeError(f'expert_pattern: expected a str or ExpertNaming, got {type(expert_pattern).__name__}')
    if expert_pattern == 'auto':
        for naming in dict.fromkeys(EXPERT_NAMINGS.values()):
            if naming.name(layer, 0, 'gate', 'weight') in ckpt.weight_map:
                return naming
        tried = ', '.join(repr(n.name(layer, 0, 'gate', 'weight')) for n in dict.fromkeys(EXPERT_NAMINGS.values()))
        raise CheckpointError(f'layer {layer}: no routed experts found in {ckpt.index or ckpt.path} (looked for '
                              f'{tried}; is layer {layer} a MoE layer? pass expert_pattern= for other names)')
    if expert_pattern in EXPERT_NAMINGS:
        return EXPERT_NAMINGS[expert_pattern]
    if '{' in expert_pattern:
        return ExpertNaming(expert_pattern)
    raise ValueError(f'expert_pattern: expected \'auto\', one of {sorted(EXPERT_NAMINGS)}, a template with '
                     f'{{layer}}, {{expert}} and {{proj}}, or an ExpertNaming; got {expert_pattern!r}')


@dataclass
class NVFP4MoELayer:
    """This rank's routed experts of one layer, as read from the checkpoint (ModelOpt's tensors, stacked).

    ``l1`` (gate rows ``[0, I)`` then up rows ``[I, 2I)``, vLLM's w13 order):
    ``weight`` uint8 ``[E_l, 2I, H/2]``, ``weight_scale`` float8_e4m3fn ``[E_l, 2I, H/16]``,
    ``weight_scale_2`` float32 ``[E_l, 2]`` (gate, up), ``input_scale`` float32 ``[E_l, 2]`` (gate, up).
    ``l2`` (down): ``weight`` ``[E_l, H, I/2]``, ``weight_scale`` ``[E_l, H, I/16]``,
    ``weight_scale_2`` ``[E_l]``, ``input_scale`` ``[E_l]``.

    ``l1_input_scale``: the one global scale of the layer's input tokens, the largest gate / up
    ``input_scale`` over **all** experts of the layer (ModelOpt's fused-experts export writes one
    value for all of them; vLLM takes the maximum likewise): the tokens are quantized once before
    dispatch, and no block scale of a calibrated activation then exceeds 448.
    """
    path: str
    layer: int
    naming: ExpertNaming
    num_experts: int
    rank: int
    num_ranks: int
    hidden: int
    intermediate: int
    l1: Dict[str, torch.Tensor]
    l2: Dict[str, torch.Tensor]
    l1_input_scale: float
    files: Tuple[str, ...] = ()
    config: dict = field(default_factory=dict)

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.num_ranks

    @property
    def experts(self) -> range:
        """The global expert ids held here."""
        e_l = self.num_local_experts
        return range(self.rank * e_l, (self.rank + 1) * e_l)

    @property
    def device(self) -> torch.device:
        return self.l1['weight'].device

    def to(self, device) -> 'NVFP4MoELayer':
        """A copy with every tensor on ``device``."""
        mv = lambda d: {k: v.to(device) for k, v in d.items()}  # noqa: E731
        return NVFP4MoELayer(self.path, self.layer, self.naming, self.num_experts, self.rank, self.num_ranks,
                             self.hidden, self.intermediate, mv(self.l1), mv(self.l2), self.l1_input_scale,
                             self.files, self.config)

    def fp8_nvfp4_weights(self) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
        """``(l1, l2)`` ModelOpt dicts for :func:`deep_gemm.transform_nvfp4_weights_for_mega_moe`
        (``weight``, ``weight_scale``, ``weight_scale_2``; L1's ``[E_l, 2]`` keeps gate and up apart).
        ``fp8_nvfp4_mega_moe`` takes FP8 activations with their own block scales: the input scales
        are not used."""
        keys = ('weight', 'weight_scale', 'weight_scale_2')
        return {k: self.l1[k] for k in keys}, {k: self.l2[k] for k in keys}

    def fp4_fp4_weights(self) -> Dict[str, object]:
        """Keyword arguments for :func:`deep_gemm.fp4_fp4_mega_moe`'s weights, in upstream's forms:

        * ``l1_weights`` / ``l2_weights``: ``(int8 codes [E_l, N, K/2], int32 [E_l, N, K/64])`` (four
          UE4M3 block scales per word, byte ``j`` = group ``4p + j``), for
          :func:`deep_gemm.transform_weights_for_mega_moe`;
        * ``l1_alphas`` float32 ``[E_l, 2]`` = ``f32(l1_input_scale * weight_scale_2)`` of gate, up:
          the tokens carry only their UE4M3 block scales (``per_token_cast_to_nvfp4(x,
          global_scale=l1_input_scale)``), so both global scales of the product come back here;
        * ``l2_alphas`` float32 ``[E_l]`` = down's ``weight_scale_2``;
        * ``a2_scales`` float32 ``[E_l]`` = down's ``input_scale``: the L2 input's global scale
          (the kernel multiplies it back into the L2 product: ``acc2 * l2_alpha * a2``).
        """
        def upstream(d):
            return d['weight'].view(torch.int8), d['weight_scale'].contiguous().view(torch.uint8).view(torch.int32)
        gs = torch.tensor(self.l1_input_scale, dtype=torch.float32, device=self.device)
        return dict(l1_weights=upstream(self.l1), l2_weights=upstream(self.l2),
                    l1_alphas=(gs * self.l1['weight_scale_2']).contiguous(),
                    l2_alphas=self.l2['weight_scale_2'].clone(), a2_scales=self.l2['input_scale'].clone())

    def __repr__(self) -> str:
        return (f'NVFP4MoELayer(path={self.path!r}, layer={self.layer}, experts={self.experts.start}..'
                f'{self.experts.stop - 1} of {self.num_experts} (rank {self.rank}/{self.num_ranks}), '
                f'hidden={self.hidden}, intermediate={self.intermediate}, l1_input_scale={self.l1_input_scale:.6g})')


def _rank_and_size(group, rank, num_ranks) -> Tuple[int, int]:
    if group is not None:
        import torch.distributed as dist
        g_rank, g_size = dist.get_rank(group), dist.get_world_size(group)
        if (rank is not None and rank != g_rank) or (num_ranks is not None and num_ranks != g_size):
            raise ValueError(f'rank / num_ranks: ({rank}, {num_ranks}) contradict the group ({g_rank}, {g_size})')
        return g_rank, g_size
    num_ranks = 1 if num_ranks is None else num_ranks
    rank = 0 if rank is None else rank
    for name, v in (('num_ranks', num_ranks), ('rank', rank)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f'{name}: expected an int, got {type(v).__name__}')
    if num_ranks < 1 or not 0 <= rank < num_ranks:
        raise ValueError(f'rank: expected 0 <= rank < num_ranks, got rank={rank}, num_ranks={num_ranks}')
    return rank, num_ranks


class _LayerReader:
    """Reads and checks one layer's expert tensors (shapes fixed by the first expert read)."""

    def __init__(self, ckpt: _Checkpoint, naming: ExpertNaming, layer: int, hidden: Optional[int],
                 intermediate: Optional[int]):
        self.ckpt, self.naming, self.layer = ckpt, naming, layer
        self.hidden, self.intermediate = hidden, intermediate
        self.files = set()

    def _shape_of(self, proj: str) -> Tuple[int, int]:
        return (self.intermediate, self.hidden) if proj != 'down' else (self.hidden, self.intermediate)

    def _infer_shapes(self, e: int) -> None:
        """Hidden and intermediate from expert ``e``'s gate and down weights (when not in config.json)."""
        if self.hidden is not None and self.intermediate is not None:
            return
        for proj in ('gate', 'down'):
            name = self.naming.name(self.layer, e, proj, 'weight')
            t, f = self.ckpt.read(name)
            if t.dim() != 2:
                raise CheckpointError(f'{name} in {f}: expected a 2-D [N, K/2] weight, got shape {tuple(t.shape)}')
            n, k = t.shape[0], 2 * t.shape[1]
            if proj == 'gate':
                self.intermediate, self.hidden = n, k
            elif (n, k) != (self.hidden, self.intermediate):
                raise CheckpointError(f'{name} in {f}: shape {tuple(t.shape)}, expected [hidden, intermediate / 2] = '
                                      f'[{self.hidden}, {self.intermediate // 2}] from the gate projection')

    def tensor(self, e: int, proj: str, tensor: str) -> torch.Tensor:
        name = self.naming.name(self.layer, e, proj, tensor)
        t, f = self.ckpt.read(name)
        self.files.add(f)
        if tensor in ('weight_scale_2', 'input_scale'):
            if t.dtype != torch.float32:
                raise CheckpointError(f'{name} in {f}: dtype {t.dtype}, expected torch.float32 (a global scale)')
            if t.numel() != 1 or t.dim() > 1:
                raise CheckpointError(f'{name} in {f}: shape {tuple(t.shape)}, expected a scalar [] (or [1])')
            v = float(t.reshape(()))
            if not (math.isfinite(v) and v > 0):
                raise CheckpointError(f'{name} in {f}: global scale {v!r}, expected a finite positive number')
            return t.reshape(())
        n, k = self._shape_of(proj)
        if tensor == 'weight':
            want_dtype, want_shape = torch.uint8, (n, k // 2)
        else:
            want_dtype, want_shape = torch.float8_e4m3fn, (n, k // NVFP4_BLOCK)
        if t.dtype != want_dtype:
            raise CheckpointError(f'{name} in {f}: dtype {t.dtype}, expected {want_dtype}'
                                  + (' (two E2M1 codes per byte)' if tensor == 'weight' else ' (UE4M3 block scales)'))
        if tuple(t.shape) != want_shape:
            raise CheckpointError(f'{name} in {f}: shape {tuple(t.shape)}, expected {list(want_shape)} '
                                  f'(hidden {self.hidden}, intermediate {self.intermediate})')
        if tensor == 'weight_scale' and bool(bad_ue4m3_bytes(t.contiguous().view(torch.uint8)).any()):
            raise CheckpointError(f'{name} in {f}: UE4M3 block scales must be non-negative and finite '
                                  f'(found a sign bit or NaN)')
        return t


def load_nvfp4_moe_layer(path: Union[str, os.PathLike], layer: int, *, group=None, rank: Optional[int] = None,
                         num_ranks: Optional[int] = None, expert_pattern: Union[str, ExpertNaming] = 'auto',
                         num_experts: Optional[int] = None, device=None) -> NVFP4MoELayer:
    """Read this rank's routed experts of MoE layer ``layer`` from a ModelOpt NVFP4 checkpoint.

    Args:
        path: the checkpoint directory (``model.safetensors.index.json`` and its shards, or one or more
            ``*.safetensors`` files), or a single safetensors file.
        layer: the decoder layer index (as in the tensor names).
        group: a ``torch.distributed`` group; its rank / size pick the experts (rank ``r`` of ``R``
            reads ``[r E / R, (r + 1) E / R)``).  Or give ``rank`` / ``num_ranks`` directly (default
            one rank: every expert).
        expert_pattern: ``'auto'``, a name in :data:`EXPERT_NAMINGS`, a template string or an
            :class:`ExpertNaming` (module docstring).
        num_experts: the layer's number of routed experts; default ``config.json``'s
            ``n_routed_experts`` / ``num_experts`` / ``num_local_experts``, else the highest expert id
            found + 1.  Experts the checkpoint lacks are reported as missing tensors.
        device: where the returned tensors go (default CPU; they are read on the CPU).

    Returns an :class:`NVFP4MoELayer`.  Raises :class:`CheckpointError` (a ``ValueError``) for a
    missing file or tensor, a wrong dtype or shape, a non-finite or non-positive global scale, a
    negative or NaN block scale, a non-NVFP4 checkpoint, or an expert count not divisible by the ranks;
    the message names the tensor and its file.
    """
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise TypeError(f'layer: expected a non-negative int, got {layer!r}')
    rank, num_ranks = _rank_and_size(group, rank, num_ranks)
    path = os.fspath(path)
    with _Checkpoint(path) as ckpt:
        algo = _quant_algo(ckpt.dir)
        if algo is not None and algo.upper() not in ('NVFP4', 'MIXED_PRECISION'):
            raise CheckpointError(f'{ckpt.dir}: quant_algo is {algo!r}, expected an NVFP4 checkpoint (ModelOpt '
                                  f'quant_algo NVFP4)')
        config = read_checkpoint_config(ckpt.dir)
        naming = _resolve_naming(expert_pattern, ckpt, layer)
        found = naming.expert_ids(ckpt.weight_map, layer)
        if num_experts is None:
            num_experts = next((int(config[k]) for k in _EXPERT_COUNT_KEYS if isinstance(config.get(k), int)), None)
        if num_experts is None:
            if not found:
                raise CheckpointError(f'{naming.name(layer, 0, "gate", "weight")}: missing from '
                                      f'{ckpt.index or ckpt.path} (no routed experts of layer {layer})')
            num_experts = found[-1] + 1
        if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f'num_experts: expected a positive int, got {num_experts!r}')
        if found and found[-1] >= num_experts:
            name = naming.name(layer, found[-1], 'gate', 'weight')
            raise CheckpointError(f'{name} in {ckpt.where(name)}: expert {found[-1]} beyond the layer\'s '
                                  f'{num_experts} experts (config.json or num_experts)')
        if num_experts % num_ranks:
            raise ValueError(f'num_experts: layer {layer} of {path} has {num_experts} experts, which {num_ranks} '
                             f'ranks cannot split evenly (each rank holds num_experts / num_ranks)')
        hidden = config.get('hidden_size') if isinstance(config.get('hidden_size'), int) else None
        inter = next((config[k] for k in ('moe_intermediate_size',) if isinstance(config.get(k), int)), None)
        reader = _LayerReader(ckpt, naming, layer, hidden, inter)
        e_l = num_experts // num_ranks
        mine = range(rank * e_l, (rank + 1) * e_l)
        reader._infer_shapes(mine.start)
        h, i = reader.hidden, reader.intermediate
        if h % 32 or i % 32:
            raise CheckpointError(f'{naming.name(layer, mine.start, "gate", "weight")}: hidden {h} and intermediate '
                                  f'{i} must be multiples of 32 (NVFP4 blocks of 16, two codes per byte)')

        # the layer's one L1 input scale: every expert's gate / up input_scale (scalars only)
        in_scales = {(e, p): reader.tensor(e, p, 'input_scale') for e in range(num_experts) for p in ('gate', 'up')}
        l1_input_scale = max(float(v) for v in in_scales.values())

        l1 = dict(weight=torch.empty(e_l, 2 * i, h // 2, dtype=torch.uint8),
                  weight_scale=torch.empty(e_l, 2 * i, h // NVFP4_BLOCK, dtype=torch.float8_e4m3fn),
                  weight_scale_2=torch.empty(e_l, 2, dtype=torch.float32),
                  input_scale=torch.empty(e_l, 2, dtype=torch.float32))
        l2 = dict(weight=torch.empty(e_l, h, i // 2, dtype=torch.uint8),
                  weight_scale=torch.empty(e_l, h, i // NVFP4_BLOCK, dtype=torch.float8_e4m3fn),
                  weight_scale_2=torch.empty(e_l, dtype=torch.float32),
                  input_scale=torch.empty(e_l, dtype=torch.float32))
        for n, e in enumerate(mine):
            for j, proj in enumerate(('gate', 'up')):
                rows = slice(j * i, (j + 1) * i)
                l1['weight'][n, rows] = reader.tensor(e, proj, 'weight')
                l1['weight_scale'][n, rows] = reader.tensor(e, proj, 'weight_scale')
                l1['weight_scale_2'][n, j] = reader.tensor(e, proj, 'weight_scale_2')
                l1['input_scale'][n, j] = in_scales[e, proj]
            l2['weight'][n] = reader.tensor(e, 'down', 'weight')
            l2['weight_scale'][n] = reader.tensor(e, 'down', 'weight_scale')
            l2['weight_scale_2'][n] = reader.tensor(e, 'down', 'weight_scale_2')
            l2['input_scale'][n] = reader.tensor(e, 'down', 'input_scale')
        files = tuple(sorted(reader.files))
    out = NVFP4MoELayer(path=path, layer=layer, naming=naming, num_experts=num_experts, rank=rank,
                        num_ranks=num_ranks, hidden=h, intermediate=i, l1=l1, l2=l2,
                        l1_input_scale=l1_input_scale, files=files, config=config)
    return out.to(device) if device is not None and torch.device(device).type != 'cpu' else out
