"""Quantization utilities and argument validation shared by every entry point."""
from .quant import (E2M1_VALUES, round_to_format, round_to_e4m3, round_to_bf16,
                    e2m1_to_float, float_to_e2m1, pack_e2m1, unpack_e2m1,
                    cast_to_nvfp4, cast_to_nvfp4_experts, dequant_nvfp4,
                    cast_to_mxfp4, dequant_mxfp4,
                    per_token_cast_to_fp8, dequant_fp8, pack_ue8m0, unpack_ue8m0)
from .error import relative_error
from .validation import check_tensor, check_expert_ids, check_multiple, check_positive_int

__all__ = [
    'E2M1_VALUES', 'round_to_format', 'round_to_e4m3', 'round_to_bf16',
    'e2m1_to_float', 'float_to_e2m1', 'pack_e2m1', 'unpack_e2m1',
    'cast_to_nvfp4', 'cast_to_nvfp4_experts', 'dequant_nvfp4',
    'cast_to_mxfp4', 'dequant_mxfp4',
    'per_token_cast_to_fp8', 'dequant_fp8', 'pack_ue8m0', 'unpack_ue8m0',
    'relative_error', 'check_tensor', 'check_expert_ids', 'check_multiple', 'check_positive_int',
]
