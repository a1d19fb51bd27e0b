"""Deliberately broken plans, as mutations of a recorded op stream (each returns a new list).

Every mutation models one plausible kernel bug; tests/test_sm100_model.py asserts that the model then
fails (a ModelError from the interpreter or a mismatch with the reference), and that the one
mutation the ISA says is harmless (LBO of a K-major SW128 operand) changes nothing."""
from __future__ import annotations

import copy
from typing import Callable, Dict, List

T_SFA = 1


def _copy(ops):
    return [dict(o) for o in ops]


def swap_sf_atoms_across_k(ops: List[dict]) -> List[dict]:
    """The weight-scale atoms of k blocks 2i and 2i + 1 exchanged (atom order K vs. wrong)."""
    out = _copy(ops)
    idx = [i for i, o in enumerate(out) if o['op'] == 'bulk_copy' and o['tensor'] == T_SFA]
    for a, b in zip(idx[0::2], idx[1::2]):
        out[a]['gofs'], out[b]['gofs'] = out[b]['gofs'], out[a]['gofs']
    return out


def swap_sf_atoms_in_stage(ops: List[dict]) -> List[dict]:
    """Inside one stage's copy of several 512-byte atoms, atoms 2i and 2i + 1 exchanged (split into
    one copy per atom; same bytes, same barrier)."""
    out = []
    for o in ops:
        if o['op'] == 'bulk_copy' and o['tensor'] == T_SFA and o['bytes'] >= 1024:
            n = o['bytes'] // 512
            for i in range(n):
                j = i ^ 1 if (i ^ 1) < n else i
                p = dict(o, gofs=o['gofs'] + 512 * j, bytes=512, smem=o['smem'] + 512 * i, tx=512)
                out.append(p)
        else:
            out.append(dict(o))
    return out


def wrong_sf_id(ops: List[dict]) -> List[dict]:
    """Every MMA's sfa_id off by one (bits 29-30 of the instruction descriptor)."""
    out = _copy(ops)
    for o in out:
        if o['op'] == 'mma':
            sid = (o['idesc'] >> 29) & 3
            o['idesc'] = (o['idesc'] & ~(3 << 29)) | (((sid + 1) & 3) << 29)
    return out


def wrong_swizzle_tma(ops: List[dict]) -> List[dict]:
    """The weight tiles loaded without swizzle while the MMA descriptors say SWIZZLE_128B."""
    out = _copy(ops)
    for o in out:
        if o['op'] == 'tma_load' and o['tensor'] == 0:
            o['swizzle'] = 0
    return out


def wrong_swizzle_desc(ops: List[dict]) -> List[dict]:
    """The A descriptors say SWIZZLE_64B (layout type 4) over SW128 data."""
    out = _copy(ops)
    for o in out:
        if o['op'] == 'mma':
            o['adesc'] = (o['adesc'] & ~(7 << 61)) | (4 << 61)
    return out


def gate_up_mixed(ops: List[dict]) -> List[dict]:
    """The SwiGLU epilogue's gate and up registers exchanged."""
    out = _copy(ops)
    for o in out:
        if o['op'] == 'store' and o['tensor'] in (10, 11):
            o['tensor'] = 21 - o['tensor']
    return out


def drop_commits(ops: List[dict]) -> List[dict]:
    """No tcgen05.commit (and so no arrival on the barriers it signals)."""
    return [dict(o) for o in ops if o['op'] != 'commit']


def sfb_column_offset_dropped(ops: List[dict]) -> List[dict]:
    """Token tiles that start inside a 128-row scale group read the group's first columns."""
    out = _copy(ops)
    for o in out:
        if o['op'] == 'mma':
            o['sfb'] = o['sfb'] - (o['sfb'] & 3) if (o['sfb'] & 3) else o['sfb']
    return out


def wrong_lane_quarter(ops: List[dict]) -> List[dict]:
    """Epilogue warp 4's loads issued as if by warp 5 (TMEM lanes 0-31 from the second lane quarter)."""
    out = _copy(ops)
    for o in out:
        if o['op'] in ('tmem_ld', 'store', 'tmem_ld_wait') and o.get('warp') == 4:
            o['warp'] = 5
    return out


def lbo_zero(ops: List[dict]) -> List[dict]:
    """LBO = 0 in every MMA operand descriptor (upstream DeepGEMM's value): harmless for K-major SW128."""
    out = _copy(ops)
    for o in out:
        if o['op'] == 'mma':
            for key in ('adesc', 'bdesc'):
                o[key] = o[key] & ~(0x3FFF << 16)
    return out


BROKEN: Dict[str, Callable] = {
    'swap_sf_atoms_across_k': swap_sf_atoms_across_k,
    'swap_sf_atoms_in_stage': swap_sf_atoms_in_stage,
    'wrong_sf_id': wrong_sf_id,
    'wrong_swizzle_tma': wrong_swizzle_tma,
    'wrong_swizzle_desc': wrong_swizzle_desc,
    'gate_up_mixed': gate_up_mixed,
    'drop_commits': drop_commits,
    'sfb_column_offset_dropped': sfb_column_offset_dropped,
    'wrong_lane_quarter': wrong_lane_quarter,
}
