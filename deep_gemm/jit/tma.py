"""TMA descriptors (`CUtensorMap`) for 2-D row-major torch tensors."""
from typing import Dict, NamedTuple

import torch

from .runtime import check, driver

# Byte-sized formats (FP8, packed FP4, UE8M0 scales) travel as raw UINT8: TMA only moves bytes
_DTYPES: Dict[torch.dtype, str] = {
    torch.bfloat16: 'CU_TENSOR_MAP_DATA_TYPE_BFLOAT16',
    torch.float16: 'CU_TENSOR_MAP_DATA_TYPE_FLOAT16',
    torch.float32: 'CU_TENSOR_MAP_DATA_TYPE_FLOAT32',
    torch.int32: 'CU_TENSOR_MAP_DATA_TYPE_INT32',
    torch.uint8: 'CU_TENSOR_MAP_DATA_TYPE_UINT8',
    torch.int8: 'CU_TENSOR_MAP_DATA_TYPE_UINT8',
}
for _name in ('float8_e4m3fn', 'float8_e5m2', 'float8_e8m0fnu', 'float4_e2m1fn_x2'):
    if hasattr(torch, _name):
        _DTYPES[getattr(torch, _name)] = 'CU_TENSOR_MAP_DATA_TYPE_UINT8'

_SWIZZLES = {0: 'CU_TENSOR_MAP_SWIZZLE_NONE', 32: 'CU_TENSOR_MAP_SWIZZLE_32B',
             64: 'CU_TENSOR_MAP_SWIZZLE_64B', 128: 'CU_TENSOR_MAP_SWIZZLE_128B'}


class Tma2dParams(NamedTuple):
    dtype_name: str
    global_dim: tuple      # (cols, rows): innermost first, as the driver wants
    global_stride: tuple   # (row stride in bytes,)
    box_dim: tuple         # (box_cols, box_rows)
    swizzle_name: str


def tma_2d_params(tensor: torch.Tensor, box_rows: int, box_cols: int, swizzle_bytes: int = 128) -> Tma2dParams:
    """Validate and compute the encode arguments (pure: no driver, testable on CPU).

    The rules are cuTensorMapEncodeTiled's; checking them here turns the driver's bare
    CUDA_ERROR_INVALID_VALUE into a message that names the offending value.
    """
    if tensor.dim() != 2:
        raise ValueError(f'make_tma_2d needs a 2-D tensor, got shape {tuple(tensor.shape)}')
    if tensor.dtype not in _DTYPES:
        raise ValueError(f'unsupported TMA dtype {tensor.dtype} (supported: {sorted(map(str, _DTYPES))})')
    if swizzle_bytes not in _SWIZZLES:
        raise ValueError(f'swizzle_bytes must be one of {sorted(_SWIZZLES)}, got {swizzle_bytes}')
    rows, cols = tensor.shape
    elem = tensor.element_size()
    if tensor.stride(1) != 1:
        raise ValueError(f'the inner (column) dimension must be contiguous, strides are {tensor.stride()}')
    row_stride = tensor.stride(0) * elem
    if tensor.data_ptr() % 16 != 0:
        raise ValueError(f'TMA base address must be 16-byte aligned, got {tensor.data_ptr():#x}')
    if rows > 1 and (row_stride % 16 != 0 or row_stride >= 2 ** 40):
        raise ValueError(f'TMA row stride must be a multiple of 16 bytes (and < 2^40), got {row_stride} B '
                         f'({tensor.stride(0)} elements of {elem} B)')
    if not (1 <= box_rows <= 256 and 1 <= box_cols <= 256):
        raise ValueError(f'TMA box dims must be in [1, 256], got {box_rows} x {box_cols}')
    if (box_cols * elem) % 16 != 0:
        raise ValueError(f'TMA box inner size must be a multiple of 16 bytes, got {box_cols} x {elem} B')
    if swizzle_bytes and box_cols * elem > swizzle_bytes:
        raise ValueError(f'TMA box inner size {box_cols * elem} B exceeds the {swizzle_bytes} B swizzle span')
    if cols >= 2 ** 32 or rows >= 2 ** 32:
        raise ValueError(f'TMA dims must be < 2^32, got {rows} x {cols}')
    return Tma2dParams(_DTYPES[tensor.dtype], (cols, rows), (max(row_stride, 16),), (box_cols, box_rows),
                       _SWIZZLES[swizzle_bytes])


def make_tma_2d(tensor: torch.Tensor, box_rows: int, box_cols: int, swizzle_bytes: int = 128,
                oob_fill_zero: bool = True):
    """A `CUtensorMap` for loading `[box_rows, box_cols]` boxes of a row-major CUDA tensor.

    Coordinates in the kernel are `{col, row}` (inner dimension first). Out-of-bounds elements
    read as zero (`oob_fill_zero`) or as NaN (float types only). The descriptor holds the raw
    address: keep `tensor` alive while it is in use.
    """
    if not tensor.is_cuda:
        raise ValueError('make_tma_2d needs a CUDA tensor')
    p = tma_2d_params(tensor, box_rows, box_cols, swizzle_bytes)
    if not oob_fill_zero and p.dtype_name in ('CU_TENSOR_MAP_DATA_TYPE_UINT8', 'CU_TENSOR_MAP_DATA_TYPE_INT32'):
        raise ValueError('NaN out-of-bounds fill needs a floating-point TMA type')
    d = driver()
    oob = d.CUtensorMapFloatOOBfill.CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE if oob_fill_zero else \
        d.CUtensorMapFloatOOBfill.CU_TENSOR_MAP_FLOAT_OOB_FILL_NAN_REQUEST_ZERO_FMA
    u32, u64 = d.cuuint32_t, d.cuuint64_t
    return check(d.cuTensorMapEncodeTiled(
        getattr(d.CUtensorMapDataType, p.dtype_name), u32(2), tensor.data_ptr(),
        [u64(v) for v in p.global_dim], [u64(v) for v in p.global_stride], [u32(v) for v in p.box_dim],
        [u32(1), u32(1)],
        d.CUtensorMapInterleave.CU_TENSOR_MAP_INTERLEAVE_NONE,
        getattr(d.CUtensorMapSwizzle, p.swizzle_name),
        d.CUtensorMapL2promotion.CU_TENSOR_MAP_L2_PROMOTION_L2_256B, oob))
