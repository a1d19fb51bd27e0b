"""DeepGEMM with NVFP4 Mega MoE: FP8 activations x NVFP4 / MXFP4 expert weights.

Number formats and MoE semantics: ``docs/design.md``.
"""
__version__ = '0.1.0'

from .utils import (cast_to_nvfp4, cast_to_nvfp4_experts, dequant_nvfp4, cast_to_mxfp4, dequant_mxfp4,
                    per_token_cast_to_fp8, dequant_fp8, pack_ue8m0, unpack_ue8m0,
                    e2m1_to_float, float_to_e2m1, pack_e2m1, unpack_e2m1)
from .reference import reference_moe_forward, reference_mega_moe
from .mega import (SymmBuffer, get_symm_buffer_for_mega_moe, get_symm_buffer_size_for_mega_moe,
                   get_symm_buffer_layout, fp8_nvfp4_mega_moe, fp8_fp4_mega_moe)

__all__ = [
    '__version__',
    'cast_to_nvfp4', 'cast_to_nvfp4_experts', 'dequant_nvfp4', 'cast_to_mxfp4', 'dequant_mxfp4',
    'per_token_cast_to_fp8', 'dequant_fp8', 'pack_ue8m0', 'unpack_ue8m0',
    'e2m1_to_float', 'float_to_e2m1', 'pack_e2m1', 'unpack_e2m1',
    'reference_moe_forward', 'reference_mega_moe',
    'SymmBuffer', 'get_symm_buffer_for_mega_moe', 'get_symm_buffer_size_for_mega_moe', 'get_symm_buffer_layout',
    'fp8_nvfp4_mega_moe', 'fp8_fp4_mega_moe',
]


def _missing(exc: ModuleNotFoundError, module: str) -> bool:
    """True when ``module`` itself does not exist (other import errors propagate)."""
    return exc.name == module


# Modules owned by others, which may not exist yet in a given checkout.
try:
    from .mega.weights import transform_nvfp4_weights_for_mega_moe, transform_weights_for_mega_moe, ExpertWeights
    __all__ += ['transform_nvfp4_weights_for_mega_moe', 'transform_weights_for_mega_moe', 'ExpertWeights']
except ModuleNotFoundError as _exc:
    if not _missing(_exc, f'{__name__}.mega.weights'):
        raise

try:
    from . import jit
    __all__ += ['jit']
except ModuleNotFoundError as _exc:
    if not _missing(_exc, f'{__name__}.jit'):
        raise

try:
    from . import gemm
    for _name in getattr(gemm, '__all__', ()):
        globals()[_name] = getattr(gemm, _name)
        __all__.append(_name)
    __all__.append('gemm')
except ModuleNotFoundError as _exc:
    if not _missing(_exc, f'{__name__}.gemm'):
        raise
