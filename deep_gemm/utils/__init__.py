"""Quantization utilities and argument validation shared by every entry point."""
from .quant import (E2M1_VALUES, round_to_format, round_to_e4m3, round_to_bf16,
                    e2m1_to_float, float_to_e2m1, pack_e2m1, unpack_e2m1,
                    cast_to_nvfp4, cast_to_nvfp4_experts, dequant_nvfp4,
                    cast_to_mxfp4, dequant_mxfp4,
                    per_token_cast_to_fp8, dequant_fp8, pack_ue8m0, unpack_ue8m0)
from .error import relative_error
from .math import (align, ceil_div, ceil_to_ue8m0, pack_ue8m0_to_int, unpack_ue8m0_from_int,
                   per_token_cast_to_fp4, per_token_cast_to_nvfp4, cast_back_from_fp4)
from .layout import (transform_sf_into_required_layout, get_mn_major_tma_aligned_packed_ue8m0_tensor,
                     get_mn_major_tma_aligned_tensor)
from .validation import check_tensor, check_expert_ids, check_multiple, check_positive_int

__all__ = [
    'E2M1_VALUES', 'round_to_format', 'round_to_e4m3', 'round_to_bf16',
    'e2m1_to_float', 'float_to_e2m1', 'pack_e2m1', 'unpack_e2m1',
    'cast_to_nvfp4', 'cast_to_nvfp4_experts', 'dequant_nvfp4',
    'cast_to_mxfp4', 'dequant_mxfp4',
    'per_token_cast_to_fp8', 'dequant_fp8', 'pack_ue8m0', 'unpack_ue8m0',
    'relative_error',
    'align', 'ceil_div', 'ceil_to_ue8m0', 'pack_ue8m0_to_int', 'unpack_ue8m0_from_int',
    'per_token_cast_to_fp4', 'per_token_cast_to_nvfp4', 'cast_back_from_fp4',
    'transform_sf_into_required_layout', 'get_mn_major_tma_aligned_packed_ue8m0_tensor',
    'get_mn_major_tma_aligned_tensor', 'check_tensor', 'check_expert_ids', 'check_multiple', 'check_positive_int',
]
