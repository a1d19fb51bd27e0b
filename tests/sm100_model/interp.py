"""A functional model of the sm100 (Blackwell) operations the Mega MoE kernels issue.

Written from the documented semantics (PTX ISA tcgen05 chapter, CUDA driver API tensor maps),
independently of the kernel's headers: every descriptor is decoded from its bits here, every
address is computed here.  The functions that define a layout (``sw128_phys``, ``kmajor_sw_addr``,
``sf_tmem_location``, ``tmem_ld_map``, ``utccp_rows``, ``sf_global_offset``) are checked against
CuTe on the host by tests/test_sm100_conformance.py (tests/cpp/sm100_cute_oracle.cpp), so a
misunderstanding shared by the kernel and this model is caught there.

The machine executes an op stream (one dict per op, the JSON lines of tests/sm100_model/stream.py)
sequentially:

* ``tma_load``   tiled tensor copy global -> shared (box, OOB zero fill, SWIZZLE_NONE/32/64/128B,
                 data types u8 / e4m3 / packed 4-bit (16U4_ALIGN8B) / unpacked 4-bit (16U4_ALIGN16B:
                 "8 byte gaps between every 8 byte chunk of packed values", cuda.h));
* ``bulk_copy``  linear global -> shared copy (16-byte granules);
* ``utccp``      tcgen05.cp.cta_group::1.32x128b.warpx4: 32 rows x 16 bytes of shared memory described
                 by a SWIZZLE_NONE matrix descriptor, row i -> TMEM lanes i, i+32, i+64, i+96,
                 columns taddr.col .. +3;
* ``mma``        tcgen05.mma.cta_group::1.kind::mxf4nvf4.block_scale.block16 (E2M1 x E2M1, UE4M3 or
                 UE8M0 per 16, K = 64) and kind::mxf8f6f4.block_scale.block32 (E4M3 / E2M1 operands,
                 UE8M0 per 32, K = 32), K-major SWIZZLE_128B operands, M = 128, D in FP32 TMEM;
* ``commit``     tcgen05.commit (completion of every earlier MMA: only then may TMEM D be read and
                 the shared memory the MMAs read be overwritten);
* ``tmem_ld``    tcgen05.ld 32x32b / 16x256b .x{num}, with the lane-quarter restriction, and the
                 epilogue's (thread, register) -> output (row, col) placement.

Everything not modelled is an error (``ModelError``), never a silent guess: MN-major operands,
M != 128, sparse, swizzled UTCCP sources, descriptor base offsets, reading bytes that nothing wrote,
reading an accumulator before its MMA was committed, overwriting shared memory that an uncommitted
MMA reads.  Accumulation is exact (float64 shadow of each FP32 TMEM accumulator, rounded to float32
when read): the tensor cores' FP32 summation order is unspecified, so the model does not pretend
to reproduce it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

SMEM_BYTES = 232448          # 227 KiB of dynamic shared memory per CTA on sm100
TMEM_LANES = 128
TMEM_COLS = 512


class ModelError(Exception):
    """The stream does something the documented semantics forbid, or that the model does not cover."""


# ----------------------------------------------------------------------------------- numbers
E2M1_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                        -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=np.float64)


def _e4m3_table() -> np.ndarray:
    out = np.empty(256, dtype=np.float64)
    for b in range(256):
        s, e, m = b >> 7, (b >> 3) & 0xF, b & 7
        if e == 0xF and m == 7:
            v = np.nan
        elif e == 0:
            v = m / 8.0 * 2.0 ** -6
        else:
            v = (1 + m / 8.0) * 2.0 ** (e - 7)
        out[b] = -v if s else v
    return out


E4M3_VALUES = _e4m3_table()


def ue4m3_value(b: np.ndarray) -> np.ndarray:
    b = np.asarray(b, dtype=np.int64)
    if np.any(b & 0x80) or np.any(b == 0x7F):
        raise ModelError('UE4M3 scale byte with the sign bit set or NaN (0x7F)')
    return E4M3_VALUES[b]


def ue8m0_value(b: np.ndarray) -> np.ndarray:
    b = np.asarray(b, dtype=np.int64)
    if np.any(b == 0xFF):
        raise ModelError('UE8M0 scale byte 0xFF (NaN)')
    return np.ldexp(1.0, b - 127)


# ----------------------------------------------------------------------------------- layouts
def swizzle(lin, span: int):
    """Physical shared-memory byte address of linear byte address ``lin`` under the TMA / UMMA
    swizzle of ``span`` bytes (0 = none): the 16-byte chunk index (bits 4..) is XOR-ed with the
    128-byte row index bits 7.. (Swizzle<3,4,3> for 128 B, <2,4,3> for 64 B, <1,4,3> for 32 B),
    on absolute addresses."""
    lin = np.asarray(lin, dtype=np.int64)
    if span == 0:
        return lin
    bits = {32: 1, 64: 2, 128: 3}[span]
    mask = (1 << bits) - 1
    return lin ^ (((lin >> 7) & mask) << 4)


def sw128_phys(lin):
    return swizzle(lin, 128)


def kmajor_sw_addr(start: int, sbo: int, row, kbyte, span: int = 128):
    """Physical byte address of (row, byte kbyte of the row's K run) of a K-major swizzled canonical
    layout: 8-row core-matrix groups ``sbo`` bytes apart, rows of a group ``span`` bytes apart, the
    K run of an MMA inside one swizzle row (so LBO plays no part)."""
    row = np.asarray(row, dtype=np.int64)
    kbyte = np.asarray(kbyte, dtype=np.int64)
    if np.any(kbyte >= span) or np.any(kbyte < 0):
        raise ModelError(f'K byte offset outside the {span}-byte swizzle row')
    return swizzle(start + (row // 8) * sbo + (row % 8) * span + kbyte, span)


def sf_global_offset(mn, kb, num_kb: int):
    """Byte offset of scale (row ``mn``, scale block ``kb``) in CUTLASS's Sm1xxBlockScaledConfig
    layout of an (MN, K / vec) scale matrix: 512-byte atoms of 128 rows x 4 blocks, byte
    ``16 (mn % 32) + 4 ((mn / 32) % 4) + kb % 4`` inside an atom, atoms K-first then MN."""
    mn = np.asarray(mn, dtype=np.int64)
    kb = np.asarray(kb, dtype=np.int64)
    katoms = -(-num_kb // 4)
    atom = (mn // 128) * katoms + kb // 4
    return atom * 512 + 16 * (mn % 32) + 4 * ((mn // 32) % 4) + kb % 4


def sf_tmem_location(mn, j):
    """Where an MMA reads the scale of operand row ``mn``, scale slot ``j`` (byte inside the 32-bit
    column): (lane within a quarter, column offset from the scale address, byte).  Lane ``mn % 32``
    of every quarter (the warpx4 replicas), column ``mn / 32``."""
    mn = np.asarray(mn, dtype=np.int64)
    return mn % 32, mn // 32, np.asarray(j, dtype=np.int64)


def tmem_ld_map(shape: str, num: int) -> Tuple[np.ndarray, np.ndarray]:
    """(lane offset, column offset) of register r of thread t for tcgen05.ld.<shape>.x<num>,
    arrays [32, regs]."""
    t = np.arange(32)[:, None]
    if shape == '32x32b':
        r = np.arange(num)[None, :]
        return np.broadcast_to(t, (32, num)).copy(), np.broadcast_to(r, (32, num)).copy()
    if shape == '16x256b':
        r = np.arange(4 * num)[None, :]
        rep, q = r // 4, r % 4
        lane = t // 4 + 8 * (q // 2)
        col = 8 * rep + 2 * (t % 4) + q % 2
        return np.broadcast_to(lane, (32, 4 * num)).copy(), np.broadcast_to(col, (32, 4 * num)).copy()
    raise ModelError(f'tcgen05.ld shape {shape!r} is not modelled')


def utccp_rows(start: int, sbo: int) -> np.ndarray:
    """Shared-memory byte address of each of the 32 16-byte rows of a 32x128b tcgen05.cp source
    (SWIZZLE_NONE K-major canonical layout: 8-row core matrices of 16-byte rows, ``sbo`` apart)."""
    i = np.arange(32)
    return start + (i // 8) * sbo + (i % 8) * 16


# ----------------------------------------------------------------------------------- descriptors
MXF8F6F4_FORMATS = {0: 'e4m3', 1: 'e5m2', 3: 'e2m3', 4: 'e3m2', 5: 'e2m1'}
MXF4_FORMATS = {1: 'e2m1'}


def _bits(v: int, lo: int, n: int) -> int:
    return (v >> lo) & ((1 << n) - 1)


def decode_idesc(d: int) -> Dict[str, int]:
    """Fields of a block-scaled tcgen05.mma instruction descriptor (32 bits)."""
    d = int(d)
    if d >> 32:
        raise ModelError('instruction descriptor wider than 32 bits')
    return dict(sparse_id2=_bits(d, 0, 2), sparse=_bits(d, 2, 1), bit3=_bits(d, 3, 1), sfb_id=_bits(d, 4, 2),
                bit6=_bits(d, 6, 1), a_fmt=_bits(d, 7, 3), b_fmt=_bits(d, 10, 3), a_neg=_bits(d, 13, 1),
                b_neg=_bits(d, 14, 1), a_major=_bits(d, 15, 1), b_major=_bits(d, 16, 1), n=_bits(d, 17, 6) << 3,
                scale_fmt=_bits(d, 23, 1), m=_bits(d, 24, 5) << 4, sfa_id=_bits(d, 29, 2), k_size=_bits(d, 31, 1))


def decode_smem_desc(d: int) -> Dict[str, int]:
    """Fields of a tcgen05 shared-memory matrix descriptor (64 bits), byte quantities in bytes."""
    d = int(d)
    return dict(start=_bits(d, 0, 14) << 4, lbo=_bits(d, 16, 14) << 4, sbo=_bits(d, 32, 14) << 4,
                version=_bits(d, 46, 2), base_offset=_bits(d, 49, 3), lbo_mode=_bits(d, 52, 1),
                layout=_bits(d, 61, 3), reserved=(_bits(d, 14, 2) | _bits(d, 30, 2) << 2 | _bits(d, 48, 1) << 4
                                                  | _bits(d, 53, 8) << 5))


LAYOUT_SPAN = {0: 0, 2: 128, 4: 64, 6: 32}   # layout type -> swizzle span (1 = 128B_BASE32B: not modelled)

# kind -> (element formats table, K per MMA, scale vector size, legal scale formats, scale_vec)
KINDS = {
    'mxf4nvf4.block16': (MXF4_FORMATS, 64, 16, {0: 'ue4m3', 1: 'ue8m0'}, 4),
    'mxf4nvf4.block32': (MXF4_FORMATS, 64, 32, {1: 'ue8m0'}, 2),
    'mxf4.block32': (MXF4_FORMATS, 64, 32, {1: 'ue8m0'}, 2),
    'mxf8f6f4.block32': (MXF8F6F4_FORMATS, 32, 32, {1: 'ue8m0'}, 1),
}
MODELLED_FORMATS = {'e4m3', 'e2m1'}


PTX_ELEMS = {'mxf8f6f4.block32': {'e4m3', 'e5m2', 'e2m3', 'e3m2', 'e2m1'}, 'mxf4nvf4.block16': {'e2m1'},
             'mxf4nvf4.block32': {'e2m1'}, 'mxf4.block32': {'e2m1'}}
PTX_SCALES = {'mxf8f6f4.block32': {'ue8m0'}, 'mxf4nvf4.block16': {'ue4m3', 'ue8m0'}, 'mxf4nvf4.block32': {'ue8m0'},
              'mxf4.block32': {'ue8m0'}}


def ptx_legal_combo(kind: str, a: str, b: str, scale: str) -> bool:
    """The PTX ISA's element / scale combinations of a block-scaled kind (by format name)."""
    return a in PTX_ELEMS[kind] and b in PTX_ELEMS[kind] and scale in PTX_SCALES[kind]


def ptx_legal_sf_id(kind: str, sf_id: int) -> bool:
    svec = KINDS[kind][4]
    return sf_id in ((0, 1, 2, 3) if svec == 1 else (0, 2) if svec == 2 else (0,))


def ptx_legal_shape(m: int, n: int) -> bool:
    """cta_group::1, M = 128: N a multiple of 16 in [16, 256]."""
    return m == 128 and n % 16 == 0 and 16 <= n <= 256


def check_mma_legal(kind: str, idesc: Dict[str, int]) -> Tuple[str, str, str]:
    """The PTX ISA's rules for a block-scaled MMA: element types of the kind, scale format of the
    scale vector size, K-major, dense, M = 128 (the modelled shape), N a multiple of 16 up to 256.
    Returns (a format, b format, scale format)."""
    if kind not in KINDS:
        raise ModelError(f'MMA kind {kind!r} is not modelled')
    fmts, _, _, scale_fmts, _ = KINDS[kind]
    if idesc['sparse'] or idesc['sparse_id2']:
        raise ModelError('sparse MMA is not modelled')
    if idesc['bit3'] or idesc['bit6']:
        raise ModelError('reserved instruction-descriptor bit set')
    if idesc['a_fmt'] not in fmts or idesc['b_fmt'] not in fmts:
        raise ModelError(f'{kind}: illegal element formats a={idesc["a_fmt"]} b={idesc["b_fmt"]}')
    fa, fb = fmts[idesc['a_fmt']], fmts[idesc['b_fmt']]
    if idesc['scale_fmt'] not in scale_fmts or not ptx_legal_combo(kind, fa, fb, scale_fmts[idesc['scale_fmt']]):
        raise ModelError(f'{kind}: scale format {idesc["scale_fmt"]} is illegal for {fa} x {fb}')
    if fa not in MODELLED_FORMATS or fb not in MODELLED_FORMATS:
        raise ModelError(f'{kind}: formats {fa} x {fb} are not modelled')
    if idesc['scale_fmt'] not in scale_fmts:
        raise ModelError(f'{kind}: scale format {idesc["scale_fmt"]} is illegal for this scale vector size')
    if idesc['a_major'] or idesc['b_major']:
        raise ModelError('MN-major operands are not modelled (sub-byte types must be K-major)')
    if idesc['k_size']:
        raise ModelError('K = 96 (k_size = 1) is not modelled')
    if idesc['m'] != 128:
        raise ModelError(f'M = {idesc["m"]} is not modelled (M = 128 only)')
    if not ptx_legal_shape(idesc['m'], idesc['n']):
        raise ModelError(f'N = {idesc["n"]} is illegal for M = 128 (16..256, step 16)')
    for name in ('sfa_id', 'sfb_id'):
        if not ptx_legal_sf_id(kind, idesc[name]):
            raise ModelError(f'{name} = {idesc[name]} is illegal for scale_vec::{KINDS[kind][4]}X')
    return fa, fb, scale_fmts[idesc['scale_fmt']]


# ----------------------------------------------------------------------------------- global tensors
ELEM_TYPES = {   # name -> (bits in global memory, smem bytes per 16 elements)
    'u8': (8, 16), 'e4m3': (8, 16), 'u16': (16, 32), 'f32': (32, 64),
    'u4': (4, 8),                 # 16U4_ALIGN8B: packed, low nibble = even element
    'u4_align16b': (4, 16),       # 16U4_ALIGN16B: 8 packed bytes then an 8-byte gap
}


@dataclass
class GTensor:
    """A global tensor as a tensor map sees it: ``dims`` in elements innermost first, ``strides`` in
    bytes of dims 1.., raw little-endian bytes."""
    data: np.ndarray
    dims: Sequence[int]
    strides: Sequence[int]
    dtype: str = 'u8'

    def __post_init__(self):
        self.data = np.ascontiguousarray(self.data).reshape(-1).view(np.uint8)
        if self.dtype not in ELEM_TYPES:
            raise ModelError(f'tensor type {self.dtype!r} is not modelled')
        if len(self.strides) != len(self.dims) - 1:
            raise ModelError('strides: one per dimension above the innermost')


# ----------------------------------------------------------------------------------- the machine
@dataclass
class Machine:
    tensors: Dict[int, GTensor]
    outputs: Dict[int, np.ndarray] = field(default_factory=dict)   # tensor id -> float64 [rows, cols] (NaN = unwritten)
    strict_gaps: bool = True

    def __post_init__(self):
        self.smem = np.zeros(SMEM_BYTES, dtype=np.uint8)
        self.smem_ok = np.zeros(SMEM_BYTES, dtype=bool)          # written by a copy with data
        self.smem_busy = np.zeros(SMEM_BYTES, dtype=bool)        # read by an MMA not yet committed
        self.tmem = np.zeros((TMEM_LANES, TMEM_COLS), dtype=np.uint32)
        self.tmem_ok = np.zeros((TMEM_LANES, TMEM_COLS), dtype=bool)
        self.acc = np.zeros((TMEM_LANES, TMEM_COLS), dtype=np.float64)
        self.acc_ok = np.zeros((TMEM_LANES, TMEM_COLS), dtype=bool)       # holds an MMA result
        self.acc_pending = np.zeros((TMEM_LANES, TMEM_COLS), dtype=bool)  # written by an uncommitted MMA
        self.counts: Dict[str, int] = {}
        self.out_written: Dict[int, np.ndarray] = {}
        self.bars: Dict[int, List[int]] = {}         # id -> [count, pending, tx, completed phases]
        self.regs: Dict[Tuple[int, int], np.ndarray] = {}       # (warp, lane) -> last tcgen05.ld registers
        self.ld_seq: Dict[Tuple[int, int], list] = {}           # (warp, lane) -> tcgen05.ld issued

    # -------------------------------------------------------------------------------- driver
    def run(self, ops: Iterable[dict]) -> 'Machine':
        for i, op in enumerate(ops):
            self.step(i, op)
        return self

    def step(self, i: int, op: dict, where: str = '') -> None:
        """Execute op ``i`` of a stream (its ``_op_<name>`` method) and count it; errors name the op
        (and ``where``, e.g. ', cta 1')."""
        name = op.get('op')
        fn = getattr(self, f'_op_{name}', None)
        if fn is None:
            raise ModelError(f'op {i}: unknown op {name!r}')
        try:
            fn(op)
        except ModelError as e:
            raise ModelError(f'op {i} ({name}{where}): {e}') from None
        self.counts[name] = self.counts.get(name, 0) + 1

    def declare_output(self, tid: int, rows: int, cols: int):
        self.outputs[tid] = np.full((rows, cols), np.nan)
        self.out_written[tid] = np.zeros((rows, cols), dtype=bool)

    # -------------------------------------------------------------------------------- helpers
    def _smem_write(self, addr: np.ndarray, val: np.ndarray, ok: np.ndarray):
        addr = np.asarray(addr, dtype=np.int64).reshape(-1)
        if addr.size and (addr.min() < 0 or addr.max() >= SMEM_BYTES):
            raise ModelError('shared-memory write out of range')
        if np.any(self.smem_busy[addr]):
            raise ModelError('shared memory overwritten while an uncommitted MMA reads it')
        if np.unique(addr).size != addr.size:
            raise ModelError('one copy writes a shared-memory byte twice')
        self.smem[addr] = np.asarray(val, dtype=np.uint8).reshape(-1)
        self.smem_ok[addr] = np.asarray(ok, dtype=bool).reshape(-1)

    def _smem_read(self, addr: np.ndarray, what: str) -> np.ndarray:
        addr = np.asarray(addr, dtype=np.int64)
        if addr.size and (addr.min() < 0 or addr.max() >= SMEM_BYTES):
            raise ModelError(f'{what}: shared-memory read out of range')
        if not np.all(self.smem_ok[addr]):
            n = int((~self.smem_ok[addr]).sum())
            raise ModelError(f'{what}: reads {n} shared-memory bytes that no copy wrote')
        return self.smem[addr]

    @staticmethod
    def _taddr(t: int) -> Tuple[int, int]:
        t = int(t)
        return (t >> 16) & 0xFFFF, t & 0xFFFF

    # -------------------------------------------------------------------------------- copies
    def _op_tma_load(self, op):
        t = self.tensors.get(op['tensor'])
        if t is None:
            raise ModelError(f'unknown tensor {op["tensor"]}')
        coords, box = [int(c) for c in op['coords']], [int(b) for b in op['box']]
        span, smem = int(op.get('swizzle', 0)), int(op['smem'])
        rank = len(t.dims)
        if len(coords) != rank or len(box) != rank:
            raise ModelError(f'coords/box rank {len(coords)}/{len(box)} != tensor rank {rank}')
        if any(not 1 <= b <= 256 for b in box):
            raise ModelError(f'box {box}: every extent must be 1..256')
        bits, per16 = ELEM_TYPES[t.dtype]
        if t.dtype == 'u4_align16b' and box[0] != 128:
            raise ModelError('16U4_ALIGN16B needs boxDim[0] = 128')
        if (box[0] * bits) % 128:
            raise ModelError('inner box extent must be a multiple of 16 bytes')
        row_bytes = box[0] * per16 // 16
        if span:
            if span not in (32, 64, 128):
                raise ModelError(f'swizzle {span} is not a TMA swizzle mode')
            if row_bytes > span:
                raise ModelError(f'inner box {row_bytes} B exceeds the {span} B swizzle span')
            if row_bytes != span:
                raise ModelError(f'inner box {row_bytes} B != swizzle span {span} B is not modelled')
            if smem % 1024:
                raise ModelError(f'swizzled TMA destination {smem:#x} is not 1024-byte aligned')
        elif smem % 128:
            raise ModelError(f'TMA destination {smem:#x} is not 128-byte aligned')
        # global element indices of the box, outer dims first
        grids = np.meshgrid(*[np.arange(b) + c for b, c in zip(reversed(box), reversed(coords))], indexing='ij')
        gidx = [g.reshape(-1) for g in reversed(grids)]           # innermost first, each [n]
        inb = np.ones(gidx[0].shape, dtype=bool)
        for d, g in enumerate(gidx):
            inb &= (g >= 0) & (g < t.dims[d])
        byte_off = np.zeros(gidx[0].shape, dtype=np.int64)
        for d in range(1, rank):
            byte_off += np.where(inb, gidx[d], 0) * int(t.strides[d - 1])
        g0 = np.where(inb, gidx[0], 0)
        n = gidx[0].size
        if bits >= 8:
            eb = bits // 8
            src = byte_off[:, None] + g0[:, None] * eb + np.arange(eb)[None, :]
            if src.size and src.max() >= t.data.size:
                raise ModelError('tensor map reaches past its data')
            vals = np.where(inb[:, None], t.data[src], 0).astype(np.uint8)   # [n, eb]
            lin = smem + np.arange(n * eb, dtype=np.int64).reshape(n, eb)
            ok = np.ones_like(vals, dtype=bool)
        else:
            src = byte_off + g0 // 2
            if src.size and src.max() >= t.data.size:
                raise ModelError('tensor map reaches past its data')
            nib = np.where(inb, (t.data[src] >> (4 * (g0 % 2))) & 0xF, 0).astype(np.uint8)
            nib = nib.reshape(-1, 2)
            packed = (nib[:, 0] | (nib[:, 1] << 4)).astype(np.uint8)    # [n / 2]
            if t.dtype == 'u4':
                vals = packed
                lin = smem + np.arange(packed.size, dtype=np.int64)
                ok = np.ones(packed.size, dtype=bool)
            else:   # 8 packed bytes, then 8 gap bytes, per 16 elements
                p = packed.reshape(-1, 8)
                vals = np.concatenate([p, np.zeros_like(p)], axis=1)
                ok = np.concatenate([np.ones_like(p, dtype=bool), np.zeros_like(p, dtype=bool)], axis=1)
                lin = smem + np.arange(vals.size, dtype=np.int64).reshape(vals.shape)
        self._smem_write(swizzle(lin, span), vals, ok)
        self._complete_tx(op, int(np.asarray(vals).size))

    def _op_bulk_copy(self, op):
        t = self.tensors.get(op['tensor'])
        if t is None:
            raise ModelError(f'unknown tensor {op["tensor"]}')
        g, n, smem = int(op['gofs']), int(op['bytes']), int(op['smem'])
        if g % 16 or n % 16 or smem % 16 or n <= 0:
            raise ModelError('bulk copy: address, size and destination must be multiples of 16 bytes')
        if g + n > t.data.size:
            raise ModelError('bulk copy reaches past the tensor')
        self._smem_write(smem + np.arange(n), t.data[g:g + n], np.ones(n, dtype=bool))
        self._complete_tx(op, n)

    # -------------------------------------------------------------------------------- mbarriers
    # count / pending arrivals / transaction bytes / completed phases.  A phase completes when no
    # arrival and no byte is outstanding; try_wait.parity(P) succeeds once the phase of parity P has
    # completed, i.e. while the current phase's parity differs from P.  The model checks each wait of
    # the stream at its place: a wait the stream shows as passed must be satisfiable there.
    def _bar(self, i) -> List[int]:
        b = self.bars.get(int(i))
        if b is None:
            raise ModelError(f'mbarrier {i} used before init')
        return b

    @staticmethod
    def _settle(b):
        if b[1] < 0:
            raise ModelError('mbarrier: more arrivals than its count in one phase')
        if b[1] == 0 and b[2] == 0:
            b[3] += 1
            b[1] = b[0]

    def _complete_tx(self, op, nbytes: int):
        if 'tx' in op and int(op['tx']) != nbytes:
            raise ModelError(f'the recorder counted {op["tx"]} transaction bytes, the copy writes {nbytes}')
        if 'mbar' in op and self.bars:
            b = self._bar(op['mbar'])
            b[2] -= nbytes
            self._settle(b)

    def _op_init_barrier(self, op):
        if int(op['mbar']) in self.bars:
            raise ModelError(f'mbarrier {op["mbar"]} initialised twice')
        c = int(op['count'])
        self.bars[int(op['mbar'])] = [c, c, 0, 0]

    def _op_wait(self, op):
        b = self._bar(op['mbar'])
        if (b[3] & 1) == (int(op['parity']) & 1):
            raise ModelError(f'wait on mbarrier {op["mbar"]} parity {op["parity"]} cannot have completed here '
                             f'(phases completed {b[3]}, pending arrivals {b[1]}, bytes {b[2]})')

    def _op_arrive(self, op):
        b = self._bar(op['mbar'])
        b[1] -= 1
        self._settle(b)

    def _op_arrive_expect_tx(self, op):
        b = self._bar(op['mbar'])
        b[2] += int(op['bytes'])
        b[1] -= 1
        self._settle(b)

    def _op_fence_after(self, op):
        pass

    def _op_fence_before(self, op):
        pass

    def _op_tmem_ld_wait(self, op):
        pass

    # -------------------------------------------------------------------------------- tcgen05
    def _op_utccp(self, op):
        if op.get('shape', '32x128b.warpx4') != '32x128b.warpx4':
            raise ModelError(f'tcgen05.cp shape {op.get("shape")} is not modelled')
        d = decode_smem_desc(int(op['desc'], 0) if isinstance(op['desc'], str) else op['desc'])
        if d['layout'] != 0:
            raise ModelError('swizzled tcgen05.cp source is not modelled')
        if d['version'] != 1 or d['base_offset'] or d['lbo_mode'] or d['reserved']:
            raise ModelError(f'tcgen05.cp source descriptor fields {d}')
        lane, col = self._taddr(op['taddr'])
        if lane != 0:
            raise ModelError(f'32x128b.warpx4 destination lane {lane} (must be 0: it fills all four quarters)')
        if col + 4 > TMEM_COLS:
            raise ModelError('tcgen05.cp past the last TMEM column')
        rows = utccp_rows(d['start'], d['sbo'])
        src = self._smem_read(rows[:, None] + np.arange(16)[None, :], 'tcgen05.cp source')   # [32, 16]
        words = src.reshape(32, 4, 4).astype(np.uint32)
        words = words[..., 0] | words[..., 1] << 8 | words[..., 2] << 16 | words[..., 3] << 24   # [32, 4]
        for q in range(4):
            lanes = slice(32 * q, 32 * q + 32)
            if np.any(self.acc_pending[lanes, col:col + 4]):
                raise ModelError('tcgen05.cp overwrites an accumulator of an uncommitted MMA')
            self.tmem[lanes, col:col + 4] = words
            self.tmem_ok[lanes, col:col + 4] = True
            self.acc_ok[lanes, col:col + 4] = False

    def _operand(self, desc_word, rows: int, fmt: str, kind: str, kmma: int, what: str) -> np.ndarray:
        d = decode_smem_desc(int(desc_word, 0) if isinstance(desc_word, str) else desc_word)
        if d['version'] != 1:
            raise ModelError(f'{what} descriptor version {d["version"]} (sm100 needs 1)')
        if d['reserved']:
            raise ModelError(f'{what} descriptor has reserved bits set')
        if d['lbo_mode']:
            raise ModelError(f'{what}: LBO mode 1 is not modelled')
        if d['layout'] not in LAYOUT_SPAN or d['layout'] == 0:
            raise ModelError(f'{what}: layout type {d["layout"]} is not modelled (K-major swizzled only)')
        span = LAYOUT_SPAN[d['layout']]
        if d['base_offset']:
            raise ModelError(f'{what}: base offset {d["base_offset"]} is not modelled')
        if (d['start'] >> 7) & ((span // 16) - 1):
            raise ModelError(f'{what}: start {d["start"]:#x} is not in the first row of a swizzle atom '
                             '(needs a base offset)')
        if d['sbo'] != 8 * span:
            # legal in the ISA, but every kernel layout here packs the 8-row groups densely
            pass
        packed4 = (fmt == 'e2m1' and kind.startswith('mxf4'))
        kbytes = kmma // 2 if packed4 else kmma
        if (d['start'] % span) + kbytes > span:
            raise ModelError(f'{what}: the K run of one MMA crosses the {span}-byte swizzle row')
        r = np.arange(rows)[:, None]
        if fmt == 'e4m3':
            k = np.arange(kmma)[None, :]
            b = self._smem_read(kmajor_sw_addr(d['start'], d['sbo'], r, k, span), what)
            vals = E4M3_VALUES[b.astype(np.int64)]
            if np.isnan(vals).any():
                raise ModelError(f'{what}: E4M3 NaN operand')
            return vals
        k = np.arange(kmma)[None, :]
        if packed4:
            byte = k // 2
        else:   # one 16-byte chunk per 16 elements, the packed bytes first (16U4_ALIGN16B)
            byte = 16 * (k // 16) + (k % 16) // 2
        b = self._smem_read(kmajor_sw_addr(d['start'], d['sbo'], r, byte, span), what)
        nib = (b >> (4 * (k % 2))) & 0xF
        return E2M1_VALUES[nib.astype(np.int64)]

    def _scales(self, taddr: int, rows: int, nsf: int, sf_id: int, svec: int, sfmt: str, what: str) -> np.ndarray:
        t = int(taddr)
        top = (t >> 30) & 3
        if top and top != sf_id:
            raise ModelError(f'{what}: address bits 30-31 ({top}) disagree with the descriptor sf_id ({sf_id})')
        t &= 0x3FFFFFFF
        lane, col = self._taddr(t)
        if lane != 0:
            raise ModelError(f'{what}: scale address lane {lane} (must be 0)')
        ml, mc, _ = sf_tmem_location(np.arange(rows), 0)
        if col + int(mc.max()) >= TMEM_COLS:
            raise ModelError(f'{what}: scale columns past the end of TMEM')
        words = []
        for q in range(4):
            ln, cl = 32 * q + ml, col + mc
            if not np.all(self.tmem_ok[ln, cl]):
                raise ModelError(f'{what}: scale columns not written (lane quarter {q})')
            if np.any(self.acc_ok[ln, cl]):
                raise ModelError(f'{what}: scale columns hold an MMA accumulator')
            words.append(self.tmem[ln, cl])
        for q in range(1, 4):
            if not np.array_equal(words[q], words[0]):
                raise ModelError(f'{what}: the four lane quarters of the scales differ (warpx4 replicas)')
        w = words[0].astype(np.int64)
        if svec == 4:
            bsel = np.arange(4)
        elif svec == 2:
            bsel = np.array([sf_id, sf_id + 1])
        else:
            bsel = np.array([sf_id])
        assert bsel.size == nsf
        by = (w[:, None] >> (8 * bsel[None, :])) & 0xFF
        return ue4m3_value(by) if sfmt == 'ue4m3' else ue8m0_value(by)

    def _op_mma(self, op):
        kind = op['kind']
        idesc = decode_idesc(int(op['idesc'], 0) if isinstance(op['idesc'], str) else op['idesc'])
        fa, fb, sfmt = check_mma_legal(kind, idesc)
        _, kmma, vec, _, svec = KINDS[kind]
        m, n = idesc['m'], idesc['n']
        nsf = kmma // vec
        a = self._operand(op['adesc'], m, fa, kind, kmma, 'A')
        b = self._operand(op['bdesc'], n, fb, kind, kmma, 'B')
        sa = self._scales(op['sfa'], m, nsf, idesc['sfa_id'], svec, sfmt, 'SFA')
        sb = self._scales(op['sfb'], n, nsf, idesc['sfb_id'], svec, sfmt, 'SFB')
        a = a * np.repeat(sa, vec, axis=1)
        b = b * np.repeat(sb, vec, axis=1)
        if idesc['a_neg']:
            a = -a
        if idesc['b_neg']:
            b = -b
        prod = a @ b.T                                       # [m, n], float64 (exact for these formats)
        lane, col = self._taddr(op['d'])
        if lane != 0:
            raise ModelError(f'D address lane {lane} (M = 128 needs lane 0)')
        if col + n > TMEM_COLS:
            raise ModelError('D columns past the end of TMEM')
        cols = slice(col, col + n)
        if op['acc']:
            if not np.all(self.acc_ok[:m, cols]):
                raise ModelError('accumulate into TMEM columns that hold no accumulator')
            self.acc[:m, cols] += prod
        else:
            self.acc[:m, cols] = prod
        self.acc_ok[:m, cols] = True
        self.acc_pending[:m, cols] = True
        self.tmem_ok[:m, cols] = True
        self.tmem[:m, cols] = self.acc[:m, cols].astype(np.float32).view(np.uint32)
        # the operands' shared memory stays busy until a commit
        for dw, rows, fmt in ((op['adesc'], m, fa), (op['bdesc'], n, fb)):
            d = decode_smem_desc(int(dw, 0) if isinstance(dw, str) else dw)
            span = LAYOUT_SPAN[d['layout']]
            kbytes = kmma // 2 if (fmt == 'e2m1' and kind.startswith('mxf4')) else kmma
            addr = kmajor_sw_addr(d['start'], d['sbo'], np.arange(rows)[:, None], np.arange(kbytes)[None, :], span)
            self.smem_busy[addr] = True

    def _op_commit(self, op):
        self.acc_pending[:] = False
        self.smem_busy[:] = False
        if 'mbar' in op and self.bars:
            self._op_arrive(op)

    def _op_tmem_ld(self, op):
        warp, shape, num = int(op['warp']), op['shape'], int(op['num'])
        lane0, col0 = self._taddr(op['taddr'])
        quarter = warp % 4
        lane, col = tmem_ld_map(shape, num)
        one = op.get('lane')
        if one is not None:             # one thread's part of the warp-collective load
            lane, col = lane[int(one):int(one) + 1], col[int(one):int(one) + 1]
            self.ld_seq.setdefault((warp, int(one)), []).append((shape, num, int(op['taddr'])))
        lanes = lane0 + lane
        if lanes.min() < 32 * quarter or lanes.max() >= 32 * quarter + 32:
            raise ModelError(f'warp {warp} reads lanes {lanes.min()}..{lanes.max()} outside its quarter {quarter}')
        cols = col0 + col
        if cols.max() >= TMEM_COLS:
            raise ModelError('tcgen05.ld past the last TMEM column')
        if np.any(self.acc_pending[lanes, cols]):
            raise ModelError('tcgen05.ld of an accumulator whose MMAs were not committed')
        if not np.all(self.acc_ok[lanes, cols]):
            raise ModelError('tcgen05.ld of TMEM that holds no accumulator')
        vals = self.tmem[lanes, cols].view(np.float32).astype(np.float64)
        if one is not None:
            self.regs[(warp, int(one))] = vals[0]
        out = op.get('out')
        if out is None:
            return
        tid = int(out['tensor'])
        if tid not in self.outputs:
            raise ModelError(f'output tensor {tid} not declared')
        rows = np.asarray(out['row'], dtype=np.int64).reshape(vals.shape)
        cc = np.asarray(out['col'], dtype=np.int64).reshape(vals.shape)
        keep = np.asarray(out.get('mask', np.ones(vals.shape, dtype=bool)), dtype=bool).reshape(vals.shape)
        o, w = self.outputs[tid], self.out_written[tid]
        r_, c_ = rows[keep], cc[keep]
        if r_.size and (r_.min() < 0 or c_.min() < 0 or r_.max() >= o.shape[0] or c_.max() >= o.shape[1]):
            raise ModelError('epilogue writes outside the output tensor')
        flat = r_ * o.shape[1] + c_
        if np.unique(flat).size != flat.size or np.any(w[r_, c_]):
            raise ModelError('epilogue writes an output element twice')
        o[r_, c_] = vals[keep]
        w[r_, c_] = True

    def _op_store(self, op):
        key = (int(op['warp']), int(op['lane']))
        regs = self.regs.get(key)
        if regs is None:
            raise ModelError(f'store by warp {key[0]} lane {key[1]} before any tcgen05.ld')
        reg = np.asarray(op['reg'], dtype=np.int64)
        if reg.size and (reg.min() < 0 or reg.max() >= regs.size):
            raise ModelError('store of a register the tcgen05.ld did not write')
        self._place(int(op['tensor']), regs[reg], np.asarray(op['row']), np.asarray(op['col']))

    def _place(self, tid, vals, rows, cols):
        if tid not in self.outputs:
            raise ModelError(f'output tensor {tid} not declared')
        o, w = self.outputs[tid], self.out_written[tid]
        r_, c_ = np.asarray(rows, dtype=np.int64).reshape(-1), np.asarray(cols, dtype=np.int64).reshape(-1)
        if r_.size != np.asarray(vals).size:
            raise ModelError('store: register and coordinate counts differ')
        if r_.size and (r_.min() < 0 or c_.min() < 0 or r_.max() >= o.shape[0] or c_.max() >= o.shape[1]):
            raise ModelError('epilogue writes outside the output tensor')
        flat = r_ * o.shape[1] + c_
        if np.unique(flat).size != flat.size or np.any(w[r_, c_]):
            raise ModelError('epilogue writes an output element twice')
        o[r_, c_] = vals
        w[r_, c_] = True

    def finish(self):
        """End-of-stream checks: warp-collective loads issued identically by the 32 lanes of a warp,
        nothing in flight, no transaction bytes outstanding."""
        warps = {}
        for (w, l), seq in self.ld_seq.items():
            warps.setdefault(w, {})[l] = seq
        for w, lanes in warps.items():
            if len(lanes) != 32:
                raise ModelError(f'warp {w}: only {len(lanes)} lanes issued tcgen05.ld')
            first = lanes[0]
            for l, seq in lanes.items():
                if seq != first:
                    raise ModelError(f'warp {w} lane {l}: tcgen05.ld sequence differs from lane 0 (not warp-uniform)')
        if np.any(self.acc_pending):
            raise ModelError('MMAs never committed')
        for i, b in self.bars.items():
            if b[2] != 0:
                raise ModelError(f'mbarrier {i} ends with {b[2]} transaction bytes outstanding')
        return self


def run_stream(ops: Iterable[dict], tensors: Dict[int, GTensor], outputs: Dict[int, Tuple[int, int]],
               machine_cls: type = Machine):
    """Execute a recorded stream: one ``machine_cls`` (Machine or a subclass) per CTA (own shared memory,
    TMEM and barriers), the global tensors and the outputs shared.  Returns (outputs {id: float64 array,
    NaN = unwritten}, written masks, machines)."""
    machines: Dict[int, Machine] = {}
    outs = {tid: np.full(shape, np.nan) for tid, shape in outputs.items()}
    written = {tid: np.zeros(shape, dtype=bool) for tid, shape in outputs.items()}
    for i, op in enumerate(ops):
        if op.get('op') == 'problem':
            continue
        cta = int(op.get('cta', 0))
        m = machines.get(cta)
        if m is None:
            m = machines[cta] = machine_cls(tensors)
            m.outputs, m.out_written = outs, written
        m.step(i, op, f', cta {cta}')
    for m in machines.values():
        m.finish()
    return outs, written, machines
