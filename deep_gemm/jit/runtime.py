"""Load cubins and launch their kernel through the CUDA driver API (`cuda.bindings.driver`).

No C++ extension: the driver is reached through cuda-bindings, imported lazily so that the
compiler half of `deep_gemm.jit` works on machines without a GPU or driver.
Launches do no allocation on the device and no synchronisation, so they can be captured in
CUDA graphs.
"""
import ctypes
import hashlib
import json
import threading
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch

_driver = None


def driver():
    global _driver
    if _driver is None:
        from cuda.bindings import driver as _d
        _driver = _d
    return _driver


def check(result):
    """Unwrap a cuda-bindings `(CUresult, *values)` tuple, raising on any error."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != driver().CUresult.CUDA_SUCCESS:
        _, msg = driver().cuGetErrorString(err)
        name = getattr(err, 'name', str(err))
        raise RuntimeError(f'CUDA driver error {name}: {msg.decode() if isinstance(msg, bytes) else msg}')
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


# Typed scalar arguments: kernel params have a C type, a bare Python int/float has none
def _ranged(ctype, lo, hi):
    def make(value) -> ctypes._SimpleCData:
        if not lo <= value <= hi:
            raise OverflowError(f'{value} does not fit {ctype.__name__}')
        return ctype(value)
    make.__name__ = ctype.__name__
    return make


u32 = _ranged(ctypes.c_uint32, 0, 2 ** 32 - 1)
i32 = _ranged(ctypes.c_int32, -2 ** 31, 2 ** 31 - 1)
u64 = _ranged(ctypes.c_uint64, 0, 2 ** 64 - 1)
i64 = _ranged(ctypes.c_int64, -2 ** 63, 2 ** 63 - 1)


def f32(value) -> ctypes.c_float:
    return ctypes.c_float(value)


class Kernel:
    """The single kernel of one cubin, loaded into one device's primary context."""

    def __init__(self, cubin_path: Path, device: int, module, function, name: str):
        self.cubin_path, self.device, self.module, self.function, self.name = \
            cubin_path, device, module, function, name
        self.max_dynamic_smem = 0
        self.non_portable_cluster = False
        self.configs = {}
        self._attr_lock = threading.Lock()

    def __repr__(self):
        return f'Kernel({self.name}, {self.cubin_path.name}, cuda:{self.device})'

    def attribute(self, attr_name: str) -> int:
        d = driver()
        return check(d.cuFuncGetAttribute(getattr(d.CUfunction_attribute, attr_name), self.function))

    def ensure_dynamic_smem(self, smem_bytes: int):
        # Above 48 KiB the kernel must opt in; once set it stays, so launches pay nothing later
        if smem_bytes > self.max_dynamic_smem:
            with self._attr_lock:
                if smem_bytes > self.max_dynamic_smem:
                    d = driver()
                    check(d.cuFuncSetAttribute(
                        self.function, d.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        smem_bytes))
                    self.max_dynamic_smem = smem_bytes


_kernels: Dict[Tuple[str, int], Kernel] = {}
_load_lock = threading.Lock()


def _ensure_context(device: int):
    # Share torch's primary context: the torch stream and pointers we launch with live there
    torch.cuda.init()
    with torch.cuda.device(device):
        torch.cuda.current_stream()  # makes torch's context current on this thread
        d = driver()
        ctx = check(d.cuCtxGetCurrent())
        if ctx is None or int(ctx) == 0:
            check(d.cuInit(0))
            dev = check(d.cuDeviceGet(device))
            ctx = check(d.cuDevicePrimaryCtxRetain(dev))
            check(d.cuCtxSetCurrent(ctx))


def load(cubin_path, device: Optional[int] = None) -> Kernel:
    """Load `cubin_path` on `device` (default: current) and return its only kernel (cached)."""
    cubin_path = Path(cubin_path).resolve()
    device = torch.cuda.current_device() if device is None else device
    key = (str(cubin_path), device)
    kernel = _kernels.get(key)
    if kernel is not None:
        return kernel
    with _load_lock:
        if key in _kernels:
            return _kernels[key]
        data = cubin_path.read_bytes()
        # Verify the very bytes we load against the cache metadata, when there is one (a cubin
        # copied out of the cache, e.g. by --compile-all, has none)
        meta_path = cubin_path.with_suffix('.json')
        if meta_path.exists():
            meta = json.loads(meta_path.read_text())
            if meta.get('size') != len(data) or meta.get('sha256') != hashlib.sha256(data).hexdigest():
                raise RuntimeError(f'{cubin_path} does not match its metadata (corrupt cache entry?)')
        d = driver()
        _ensure_context(device)
        with torch.cuda.device(device):
            module = check(d.cuModuleLoadData(data))
            count = check(d.cuModuleGetFunctionCount(module))
            if count != 1:
                check(d.cuModuleUnload(module))
                raise RuntimeError(f'{cubin_path} has {count} kernels, expected exactly one')
            function = check(d.cuModuleEnumerateFunctions(1, module))[0]
            # Load the code now, not at the first launch (CUDA's lazy loading): a lazy load may
            # synchronise the context, which deadlocks when a running kernel (a cross-rank barrier
            # of ranks emulated on one GPU) waits for work launched after it.
            check(d.cuFuncLoad(function))
            name = check(d.cuFuncGetName(function))
        name = name.decode() if isinstance(name, bytes) else str(name)
        kernel = Kernel(cubin_path, device, module, function, name)
        _kernels[key] = kernel
        return kernel


def _param(arg) -> tuple:
    """One kernel parameter as cuda-bindings' `(value, ctype)` pair (packed in Cython, not here)."""
    if isinstance(arg, torch.Tensor):
        return arg.data_ptr(), ctypes.c_void_p
    if isinstance(arg, ctypes._SimpleCData):
        return arg, type(arg)
    if isinstance(arg, tuple) and len(arg) == 2 and isinstance(arg[1], type):
        return arg
    if arg is None:
        return 0, ctypes.c_void_p
    if callable(getattr(arg, 'getPtr', None)):
        # CUtensorMap (and other cuda-bindings structs) go by value: the type `None` tells the
        # bindings to copy the bytes at `getPtr()`
        return arg, None
    raise TypeError(f'unsupported kernel argument {type(arg).__name__}: wrap scalars as '
                    'u32/i32/u64/i64/f32 or (value, ctypes type)')


def pack_args(args: Sequence) -> tuple:
    """`args` as the `((values...), (ctypes...))` form of `kernelParams`."""
    pairs = [_param(arg) for arg in args]
    return tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)


def _current_raw_stream(device: int) -> int:
    # torch's private raw-stream getter skips building a torch.cuda.Stream object (~1 us)
    getter = getattr(torch._C, '_cuda_getCurrentRawStream', None)
    return getter(device) if getter is not None else torch.cuda.current_stream(device).cuda_stream


def _triple(dims) -> Tuple[int, int, int]:
    if type(dims) is int and dims >= 1:
        return dims, 1, 1
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    if not 1 <= len(dims) <= 3 or min(dims) < 1:
        raise ValueError(f'bad launch dimensions {dims}')
    return tuple(dims) + (1,) * (3 - len(dims))


def _make_config(kernel: Kernel, grid, block, smem_bytes: int, cluster, raw_stream: int):
    d = driver()
    config = d.CUlaunchConfig()
    config.gridDimX, config.gridDimY, config.gridDimZ = grid
    config.blockDimX, config.blockDimY, config.blockDimZ = block
    config.sharedMemBytes = smem_bytes
    config.hStream = d.CUstream(raw_stream)
    if cluster != (1, 1, 1):
        if cluster[0] * cluster[1] * cluster[2] > 8 and not kernel.non_portable_cluster:
            check(d.cuFuncSetAttribute(
                kernel.function, d.CUfunction_attribute.CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED, 1))
            kernel.non_portable_cluster = True
        attr = d.CUlaunchAttribute()
        attr.id = d.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION
        attr.value.clusterDim.x, attr.value.clusterDim.y, attr.value.clusterDim.z = cluster
        config.attrs = [attr]
        config.numAttrs = 1
    else:
        config.numAttrs = 0
    return config


def launch(kernel: Kernel, grid, block, smem_bytes: int, args: Sequence, cluster=(1, 1, 1), stream=None):
    """Launch `kernel` asynchronously on `stream` (default: torch's current stream).

    `args` match the kernel's parameters in order: torch tensors (device pointer), ctypes scalars
    (see u32/i32/u64/i64/f32) or `(value, ctypes_type)` tuples, `None` (null pointer), and TMA
    descriptors (`CUtensorMap`, passed by value).
    """
    d = driver()
    grid, block, cluster = _triple(grid), _triple(block), _triple(cluster)
    if smem_bytes > kernel.max_dynamic_smem and smem_bytes > 48 * 1024:
        kernel.ensure_dynamic_smem(smem_bytes)
    if stream is None:
        raw_stream = _current_raw_stream(kernel.device)
    else:
        raw_stream = stream.cuda_stream if hasattr(stream, 'cuda_stream') else int(stream)

    # Launch configs are immutable once built: reuse them (building one costs ~10 binding calls)
    config_key = (grid, block, smem_bytes, cluster, raw_stream)
    config = kernel.configs.get(config_key)
    if config is None:
        config = _make_config(kernel, grid, block, smem_bytes, cluster, raw_stream)
        if len(kernel.configs) > 4096:
            kernel.configs.clear()
        kernel.configs[config_key] = config
    check(d.cuLaunchKernelEx(config, kernel.function, pack_args(args), 0))
