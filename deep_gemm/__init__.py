"""DeepGEMM with NVFP4 Mega MoE: FP8 activations x NVFP4 / MXFP4 expert weights.

Number formats and MoE semantics: ``docs/design.md``.
"""
__version__ = '0.1.0'

from .utils import (cast_to_nvfp4, cast_to_nvfp4_experts, dequant_nvfp4, cast_to_mxfp4, dequant_mxfp4,
                    per_token_cast_to_fp8, dequant_fp8, pack_ue8m0, unpack_ue8m0,
                    e2m1_to_float, float_to_e2m1, pack_e2m1, unpack_e2m1,
                    per_token_cast_to_fp4, per_token_cast_to_nvfp4, transform_sf_into_required_layout)
from .reference import reference_moe_forward, reference_mega_moe
from .mega import (SymmBuffer, MegaMoETimeoutError, get_symm_buffer_for_mega_moe,
                   get_symm_buffer_size_for_mega_moe, get_symm_buffer_layout, fp8_nvfp4_mega_moe, fp8_fp4_mega_moe,
                   bf16_mega_moe, fp4_fp4_mega_moe, get_block_m_for_mega_moe,
                   transform_nvfp4_weights_for_mega_moe, transform_weights_for_mega_moe, ExpertWeights)
from . import jit, testing, utils
from . import gemm
from .gemm import *  # noqa: F401,F403  (the grouped GEMM entry points, listed in gemm.__all__)

__all__ = [
    '__version__',
    'cast_to_nvfp4', 'cast_to_nvfp4_experts', 'dequant_nvfp4', 'cast_to_mxfp4', 'dequant_mxfp4',
    'per_token_cast_to_fp8', 'dequant_fp8', 'pack_ue8m0', 'unpack_ue8m0',
    'e2m1_to_float', 'float_to_e2m1', 'pack_e2m1', 'unpack_e2m1',
    'per_token_cast_to_fp4', 'per_token_cast_to_nvfp4', 'transform_sf_into_required_layout',
    'get_block_m_for_mega_moe', 'testing', 'utils',
    'reference_moe_forward', 'reference_mega_moe',
    'SymmBuffer', 'MegaMoETimeoutError', 'get_symm_buffer_for_mega_moe', 'get_symm_buffer_size_for_mega_moe',
    'get_symm_buffer_layout', 'fp8_nvfp4_mega_moe', 'fp8_fp4_mega_moe', 'bf16_mega_moe', 'fp4_fp4_mega_moe',
    'transform_nvfp4_weights_for_mega_moe', 'transform_weights_for_mega_moe', 'ExpertWeights',
    'jit', 'gemm', *gemm.__all__,
]

# From a ModelOpt NVFP4 checkpoint on disk to the layer (safetensors is imported when a checkpoint is read)
from . import checkpoint  # noqa: E402
from .checkpoint import CheckpointError, ExpertNaming, NVFP4MoELayer, load_nvfp4_moe_layer  # noqa: E402
from .module import MegaMoE  # noqa: E402

__all__ += ['checkpoint', 'CheckpointError', 'ExpertNaming', 'NVFP4MoELayer', 'load_nvfp4_moe_layer', 'MegaMoE']
