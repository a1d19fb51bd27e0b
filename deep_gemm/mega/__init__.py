"""Mega MoE: dispatch + L1 + SwiGLU + L2 + combine in one layer."""
from .buffer import (SymmBuffer, MegaMoETimeoutError, get_symm_buffer_for_mega_moe,
                     get_symm_buffer_size_for_mega_moe, get_symm_buffer_layout, get_block_m_for_mega_moe)
from .api import fp8_nvfp4_mega_moe, fp8_fp4_mega_moe, bf16_mega_moe, fp4_fp4_mega_moe, select_backend
from ..weights import transform_nvfp4_weights_for_mega_moe, transform_weights_for_mega_moe, ExpertWeights
