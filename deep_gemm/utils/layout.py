"""Upstream DeepGEMM's scale-factor layout helper, with upstream's signature.

``transform_sf_into_required_layout`` is what upstream's callers run on weight scales before
``transform_weights_for_mega_moe``: float32 power-of-two scales per 32 (or 128) channels become
UE8M0 bytes packed four per int32 word, MN-major, the MN stride padded to a multiple of 4 words
(16 bytes, a TMA alignment); int32 scales already in that form are checked and returned.  Our weight
transform reads the scales by value, so any strides are accepted there.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .math import align, ceil_div, pack_ue8m0_to_int

__all__ = ['transform_sf_into_required_layout', 'get_mn_major_tma_aligned_packed_ue8m0_tensor',
           'get_mn_major_tma_aligned_tensor']


def _mn_major(t: torch.Tensor) -> torch.Tensor:
    """``[G, mn, k]`` -> the same values with strides ``(align(mn, 4) k, 1, align(mn, 4))``."""
    g, mn, k = t.shape
    pad = align(mn, 4)
    storage = torch.zeros(g, k, pad, dtype=t.dtype, device=t.device)
    storage[:, :, :mn] = t.transpose(1, 2)
    return storage.transpose(1, 2)[:, :mn, :]


def get_mn_major_tma_aligned_tensor(sf: torch.Tensor) -> torch.Tensor:
    """float32 ``[(G,) mn, k]`` -> MN-major with the MN stride padded to a multiple of 4."""
    two_d = sf.dim() == 2
    out = _mn_major(sf[None] if two_d else sf)
    return out[0] if two_d else out


def get_mn_major_tma_aligned_packed_ue8m0_tensor(sf: torch.Tensor) -> torch.Tensor:
    """Power-of-two float32 scales ``[(G,) mn, K_g]`` -> int32 ``[(G,) mn, ceil(K_g / 4)]``, MN-major,
    TMA-aligned; missing groups of the last word are byte 0."""
    two_d = sf.dim() == 2
    s = sf[None] if two_d else sf
    g, mn, kg = s.shape
    words = ceil_div(kg, 4)
    if words * 4 != kg:
        s = torch.cat([s, torch.zeros(g, mn, words * 4 - kg, dtype=s.dtype, device=s.device)], dim=-1)
    packed = pack_ue8m0_to_int(s.contiguous())
    out = _mn_major(packed)
    return out[0] if two_d else out


def transform_sf_into_required_layout(sf: torch.Tensor, mn: int, k: int, recipe: Sequence[int],
                                      num_groups: Optional[int] = None, is_sfa: Optional[bool] = None,
                                      disable_ue8m0_cast: bool = False, psum_layout=None) -> torch.Tensor:
    """Upstream's call: ``sf`` float32 ``[(num_groups,) ceil(mn / gran_mn), ceil(k / gran_k)]`` or int32
    ``[..., ceil(k / (4 gran_k))]``; ``recipe`` ``(gran_mn, gran_k)``, or a 3-tuple with ``is_sfa``
    choosing ``recipe[0]`` (A) or ``recipe[1]`` (B) as ``gran_mn`` and ``recipe[2]`` as ``gran_k``.

    float32 with ``gran_k`` 32 or 128 -> packed UE8M0 int32, MN-major, TMA-aligned (rows broadcast
    when ``gran_mn > 1``); with ``disable_ue8m0_cast`` -> float32 MN-major, TMA-aligned; int32 ->
    checked and returned unchanged.  ``psum_layout`` is accepted and ignored (a grouped-GEMM option).
    Anything else raises ValueError.
    """
    if not isinstance(sf, torch.Tensor):
        raise TypeError(f'sf: expected a tensor, got {type(sf).__name__}')
    recipe = tuple(recipe)
    if len(recipe) == 3:
        if is_sfa is None:
            raise ValueError('is_sfa: required with a 3-element recipe')
        gran_mn, gran_k = (recipe[0] if is_sfa else recipe[1]), recipe[2]
    elif len(recipe) == 2:
        if is_sfa is not None:
            raise ValueError('is_sfa: must be None with a 2-element recipe')
        gran_mn, gran_k = recipe
    else:
        raise ValueError(f'recipe: expected (gran_mn, gran_k) or a 3-tuple, got {recipe!r}')
    want_dim = 2 + (num_groups is not None)
    if sf.dim() != want_dim:
        raise ValueError(f'sf: expected {want_dim} dimensions, got shape {tuple(sf.shape)}')
    if num_groups is not None and sf.shape[0] != num_groups:
        raise ValueError(f'sf: {sf.shape[0]} groups, num_groups = {num_groups}')
    per_word = 4 if sf.dtype == torch.int32 else 1
    want = (ceil_div(mn, gran_mn), ceil_div(k, gran_k * per_word))
    if tuple(sf.shape[-2:]) != want:
        raise ValueError(f'sf: expected [..., {want[0]}, {want[1]}] for mn = {mn}, k = {k}, recipe {recipe}, '
                         f'got {tuple(sf.shape)}')
    if sf.dtype == torch.int32:
        if gran_k not in (32, 128) or gran_mn != 1:
            raise ValueError(f'sf: int32 scales need gran (1, 32) or (1, 128), got ({gran_mn}, {gran_k})')
        return sf
    if sf.dtype != torch.float32:
        raise TypeError(f'sf: expected float32 or int32, got {sf.dtype}')
    if gran_mn > 1:
        sf = sf.repeat_interleave(gran_mn, dim=-2)[..., :mn, :]
    if disable_ue8m0_cast:
        return get_mn_major_tma_aligned_tensor(sf)
    if gran_k not in (32, 128):
        raise ValueError(f'recipe: unknown SF transformation for gran_k = {gran_k} (32 or 128)')
    return get_mn_major_tma_aligned_packed_ue8m0_tensor(sf)
