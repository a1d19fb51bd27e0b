"""Registers the JIT smoke kernels (`impls/smxx_jit_smoke.cuh`) and offers Python wrappers."""
import torch

from . import registry, runtime

_CTYPES = {torch.float32: 'float', torch.bfloat16: '__nv_bfloat16'}

AXPB = registry.register_kernel(registry.KernelSpec(
    name='smxx_jit_smoke_axpb',
    header='smxx_jit_smoke.cuh',
    kernel_expr_fn=lambda p: f'deep_gemm::smxx_jit_smoke_axpb<{p["T"]}, {p["num_threads"]}>',
    required_sass=(r'\bSTG\b',),
    forbid_local_memory=True,
    default_params=({'T': 'float', 'num_threads': 256}, {'T': '__nv_bfloat16', 'num_threads': 256}),
))

TMA = registry.register_kernel(registry.KernelSpec(
    name='smxx_jit_smoke_tma',
    header='smxx_jit_smoke.cuh',
    kernel_expr_fn=lambda p: (f'deep_gemm::smxx_jit_smoke_tma<{p["T"]}, {p["box_rows"]}, {p["box_cols"]}, '
                              f'{p["swizzle"]}, {p["num_threads"]}>'),
    # The bulk tensor copy must really be a TMA load, and the wait a real mbarrier try-wait
    required_sass=(r'\bUTMALDG\b', r'\bSYNCS\b'),
    forbid_local_memory=True,
    default_params=({'T': '__nv_bfloat16', 'box_rows': 32, 'box_cols': 64, 'swizzle': 128, 'num_threads': 128},),
))


def axpb(x: torch.Tensor, a: float, b: float, out: torch.Tensor = None, num_threads: int = 256) -> torch.Tensor:
    """`a * x + b` elementwise, for contiguous float32/bfloat16 CUDA tensors."""
    assert x.is_contiguous() and x.dtype in _CTYPES
    out = torch.empty_like(x) if out is None else out
    kernel = registry.get_kernel(AXPB.name, {'T': _CTYPES[x.dtype], 'num_threads': num_threads})
    n = x.numel()
    runtime.launch(kernel, (n + num_threads - 1) // num_threads, num_threads, 0,
                   [out, x, runtime.f32(a), runtime.f32(b), runtime.u32(n)])
    return out


def axpb_tma(x: torch.Tensor, a: float, b: float, out: torch.Tensor = None,
             box_rows: int = 32, box_cols: int = 64, swizzle: int = 128, num_threads: int = 128) -> torch.Tensor:
    """Same as `axpb` for a 2-D bfloat16/float32 matrix, with `x` read through a TMA descriptor."""
    from .tma import make_tma_2d
    assert x.dim() == 2 and x.dtype in _CTYPES
    out = torch.empty_like(x) if out is None else out
    params = {'T': _CTYPES[x.dtype], 'box_rows': box_rows, 'box_cols': box_cols, 'swizzle': swizzle,
              'num_threads': num_threads}
    kernel = registry.get_kernel(TMA.name, params)
    rows, cols = x.shape
    desc = make_tma_2d(x, box_rows, box_cols, swizzle)
    grid = ((cols + box_cols - 1) // box_cols, (rows + box_rows - 1) // box_rows)
    # The 1024 B slack lets the kernel's swizzle-aligned buffer start on a 1 KiB boundary
    smem = box_rows * box_cols * x.element_size() + 1024
    runtime.launch(kernel, grid, num_threads, smem,
                   [out, desc, runtime.f32(a), runtime.f32(b), runtime.u32(rows), runtime.u32(cols)])
    return out
