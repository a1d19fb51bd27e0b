"""deep_gemm/epilogue/moe_l2_input.cuh (the L2-input quantizations of the MoE epilogues) against
deep_gemm.reference_recipes, bit for bit.

tests/cpp/moe_l2_input_host.cpp is built with g++ (plain C++: the header's host path, the same integer
and float32 arithmetic the kernels run, with the software E4M3 rounding where the device uses the
hardware cvt) and fed raw float32 arrays:

* ``e4m3_rn_satfinite`` on every float32 whose low 12 mantissa bits are one of a few patterns (ties,
  just above / below them, zero), all signs and exponents, against ``round_to_e4m3`` (float64 RNE,
  saturating at 448); NaN, +-inf, +-0 and the 464 tie separately;
* the FP8 power-of-two requantization per 32 (``fp8xfp4`` L2 input) against
  ``quantize_fp8_pow2_rows``: scales, E4M3 codes, ``q x scale`` in float32 and BF16 (exact: the
  float32 value has no bits below BF16's), on random blocks over 2^-40 .. 2^120 and on edge blocks:
  all zero (+-0), amax exactly a power of two, 1.75 x 2^k and its float32 neighbours, around
  f32(1e-4) and 1.75 x 2^-14, float32 subnormal amax, E4M3 subnormal results and every E4M3 tie,
  amax at the top of the float32 range (where q x scale = 2^128 overflows, as in float32 torch);
* E2M1 and the NVFP4 requantization per 16 with a global scale (``fp4xfp4``) against
  ``float_to_e2m1`` / ``quantize_nvfp4_rows``;
* a deliberately broken variant (``fp8-fault``: the 1.75-mantissa comparison with >=) must differ.

On a GPU of compute capability >= 8.9 the same file built by nvcc as CUDA runs the device path: the
hardware E4M3 conversion against the software one on all 2^32 float32 bit patterns, and the FP8 block
quantization computed by a kernel equal to the host's output.
"""
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from deep_gemm.reference_recipes import quantize_fp8_pow2_rows, quantize_nvfp4_rows
from deep_gemm.utils.quant import float_to_e2m1, round_to_e4m3

ROOT = Path(__file__).resolve().parents[1]
INCLUDE = ROOT / 'deep_gemm' / 'include'
SRC = Path(__file__).resolve().parent / 'cpp' / 'moe_l2_input_host.cpp'


def _cxx() -> str:
    cxx = shutil.which('g++') or shutil.which('c++')
    if cxx is None:
        pytest.skip('no host C++ compiler (g++)')
    return cxx


@pytest.fixture(scope='module')
def prog(tmp_path_factory):
    exe = tmp_path_factory.mktemp('l2_input') / 'moe_l2_input_host'
    proc = subprocess.run([_cxx(), '-std=c++17', '-O2', '-Wall', '-Wextra', '-Werror', '-ffp-contract=off',
                           f'-I{INCLUDE}', str(SRC), '-o', str(exe)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f'g++ failed:\n{proc.stdout}\n{proc.stderr}'
    return exe


def _run(exe, *args):
    proc = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _f32(bits) -> np.ndarray:
    return np.asarray(bits, dtype=np.uint32).view(np.float32)


def _write(path, arr):
    np.ascontiguousarray(arr, dtype=np.float32).tofile(path)
    return path


def _e4m3_bits(values_f64: torch.Tensor) -> np.ndarray:
    return values_f64.to(torch.float8_e4m3fn).view(torch.uint8).numpy()


def _sample_floats() -> np.ndarray:
    """Every sign and exponent x the high 11 mantissa bits x a few low-bit patterns (E4M3 keeps 3
    mantissa bits, so the ties and their neighbours of every binade and of the subnormal grid are in)."""
    hi = np.arange(1 << 20, dtype=np.uint32) << 12          # sign, exponent, mantissa bits 22..12
    low = np.array([0, 1, 0x7FF, 0x800, 0x801, 0xFFF], dtype=np.uint32)
    bits = (hi[:, None] | low[None, :]).ravel()
    x = bits.view(np.float32)
    return x[np.isfinite(x)]


def test_e4m3_rn_satfinite(prog, tmp_path):
    x = _sample_floats()
    special = np.array([0.0, -0.0, np.inf, -np.inf, 448.0, -448.0, 464.0, -464.0, np.nextafter(np.float32(464), np.float32(0)),
                        np.nextafter(np.float32(464), np.float32(1e9)), 480.0, 2.0 ** -9, 2.0 ** -10, -(2.0 ** -10),
                        1.5 * 2.0 ** -10, 2.0 ** -6, 2.0 ** -6 - 2.0 ** -10, 1e-45, -1e-45], dtype=np.float32)
    x = np.concatenate([x, special])
    _run(prog, 'e4m3', _write(tmp_path / 'x', x), tmp_path / 'c')
    got = np.fromfile(tmp_path / 'c', dtype=np.uint8)
    want = _e4m3_bits(round_to_e4m3(torch.from_numpy(x.astype(np.float64))))
    bad = np.nonzero(got != want)[0]
    assert bad.size == 0, [(float(x[i]), hex(got[i]), hex(want[i])) for i in bad[:10]]
    assert len(x) > 6 * 10 ** 6
    # saturation and the codes at the edges, spelled out
    assert got[-len(special):][:4].tolist() == [0x00, 0x80, 0x7E, 0xFE]      # +-0, +-inf (satfinite)
    nan = np.array([np.nan, -np.nan, _f32([0x7F800001])[0], _f32([0xFFFFFFFF])[0]], dtype=np.float32)
    _run(prog, 'e4m3', _write(tmp_path / 'n', nan), tmp_path / 'nc')
    assert np.fromfile(tmp_path / 'nc', dtype=np.uint8).tolist() == [0x7F] * 4


def _fp8_edge_rows(k: int = 64) -> np.ndarray:
    """Blocks of 32 (two per row) that put amax and the elements on the formula's edges."""
    rng = np.random.default_rng(7)
    blocks = []

    def block(amax, fill=None):
        b = (rng.standard_normal(32) * 0.3 * amax if fill is None else fill).astype(np.float32)
        b = np.clip(b, -amax, amax).astype(np.float32)
        b[rng.integers(32)] = amax if rng.random() < 0.5 else -amax
        return b

    blocks.append(np.zeros(32, np.float32))
    blocks.append(-np.zeros(32, np.float32))
    blocks.append(np.where(np.arange(32) % 2 == 0, 0.0, -0.0).astype(np.float32))
    for e in range(-140, 128):                      # exact powers of two (float32 subnormals included)
        blocks.append(block(np.float32(2.0 ** e)))
    for e in range(-30, 127):                       # mantissa 1.75 and its neighbours
        m = np.float32(1.75 * 2.0 ** e)
        for v in (np.nextafter(m, np.float32(0)), m, np.nextafter(m, np.float32(np.inf))):
            blocks.append(block(np.float32(v)))
    f1e4 = np.float32(1e-4)
    for v in (f1e4, np.nextafter(f1e4, np.float32(0)), np.nextafter(f1e4, np.float32(1)), np.float32(1.75 * 2 ** -14),
              np.float32(2.0 ** -14), np.float32(5e-5), np.float32(1e-30), np.float32(1e-40), np.float32(3e-45)):
        blocks.append(block(v))
    # E4M3 subnormal results and every tie: amax = 448 x 2^s fixes the scale 2^s; elements on the grid
    # midpoints (m + 1/2) 2^-9 (subnormal) and (8 + r + 1/2) 2^(e - 3) (normal), times 2^s
    for s in (-20, -3, 0, 5, 40):
        sc = np.float32(2.0 ** s)
        mids = [(m + 0.5) * 2.0 ** -9 for m in range(8)] + [(8 + r + 0.5) * 2.0 ** (e - 3) for e in range(-6, 9) for r in range(8)]
        mids = [v for v in mids if v < 448]
        for i in range(0, len(mids), 31):
            chunk = np.array(mids[i:i + 31], np.float32) * sc
            chunk = np.concatenate([chunk, np.zeros(31 - len(chunk), np.float32)])
            signs = np.where(rng.random(31) < 0.5, -1, 1).astype(np.float32)
            blocks.append(np.concatenate([[np.float32(448) * sc], chunk * signs]).astype(np.float32))
        # just below / above half the smallest subnormal, and below the E4M3 range altogether
        tiny = np.array([2.0 ** -10, np.nextafter(np.float32(2.0 ** -10), np.float32(0)),
                         np.nextafter(np.float32(2.0 ** -10), np.float32(1)), 2.0 ** -11, 2.0 ** -30], np.float32)
        blocks.append(np.concatenate([[np.float32(448) * sc], tiny * sc, -tiny * sc,
                                      np.zeros(21, np.float32)]).astype(np.float32))
    # the top of the float32 range: amax >= 1.75 x 2^127 gives scale 2^120, q up to 256 -> 2^128 = inf
    top = np.finfo(np.float32).max
    for v in (top, np.float32(1.75 * 2.0 ** 127), np.float32(1.7 * 2.0 ** 127), np.float32(2.0 ** 127)):
        blocks.append(block(v))
    a = np.concatenate(blocks)
    pad = (-len(a)) % k
    return np.concatenate([a, np.zeros(pad, np.float32)]).reshape(-1, k)


def _fp8_random_rows(rows: int = 512, k: int = 256) -> np.ndarray:
    rng = np.random.default_rng(11)
    scale = 2.0 ** rng.uniform(-40, 120, size=(rows, k // 32, 1))
    a = rng.standard_normal((rows, k // 32, 32)) * scale * rng.choice([1.0, 1e-3, 1e3], size=(rows, k // 32, 32))
    a[rng.random(a.shape) < 0.05] = 0.0
    return np.clip(a, -3e38, 3e38).astype(np.float32).reshape(rows, k)


def _read_fp8(path, rows, k):
    raw = np.fromfile(path, dtype=np.uint8)
    n, nb = rows * k, rows * k // 32
    o = 0
    scale = raw[o:o + 4 * nb].view(np.float32).reshape(rows, k // 32); o += 4 * nb
    code = raw[o:o + n].reshape(rows, k); o += n
    value = raw[o:o + 4 * n].view(np.float32).reshape(rows, k); o += 4 * n
    bf16 = raw[o:o + 2 * n].view(np.uint16).reshape(rows, k); o += 2 * n
    assert o == raw.size
    return scale, code, value, bf16


def _fp8_check(a: np.ndarray, out):
    scale, code, value, bf16 = out
    with np.errstate(over='ignore'):
        q, sf = quantize_fp8_pow2_rows(torch.from_numpy(a))
    assert np.array_equal(scale.view(np.uint32), sf.numpy().view(np.uint32)), 'block scales differ'
    want_code = q.view(torch.uint8).numpy()
    bad = np.argwhere(code != want_code)
    assert bad.size == 0, [(float(a[r, c]), hex(code[r, c]), hex(want_code[r, c])) for r, c in bad[:10]]
    want_value = (q.float() * sf.repeat_interleave(32, 1)).numpy()      # float32, as the header's q x scale
    assert np.array_equal(value.view(np.uint32), want_value.view(np.uint32)), 'q x scale differs'
    finite = np.isfinite(value)
    assert not np.any(value.view(np.uint32)[finite] & 0xFFFF), 'q x scale is not exact in BF16'
    want_bf16 = torch.from_numpy(value).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(bf16, want_bf16)


def test_fp8_pow2_edges(prog, tmp_path):
    a = _fp8_edge_rows()
    _run(prog, 'fp8', a.shape[1], _write(tmp_path / 'a', a), tmp_path / 'o')
    out = _read_fp8(tmp_path / 'o', *a.shape)
    _fp8_check(a, out)
    scale, code, value, _ = out
    assert scale[0, 0] == 2.0 ** -22 and np.all(code[0, :32] == 0) and np.all(code[0, 32:64] == 0x80)
    assert (code & 0x7F).min() == 0 and np.any((code & 0x78) == 0) and np.any(((code & 0x7F) > 0) & ((code & 0x78) == 0))
    assert np.any(np.isinf(value)), 'the float32 top-of-range case did not overflow as documented'
    assert np.any((code & 0x7F) == 0x7E)                     # amax = 1.75 x 2^k: q = 448 exactly


def test_fp8_pow2_random(prog, tmp_path):
    a = _fp8_random_rows()
    _run(prog, 'fp8', a.shape[1], _write(tmp_path / 'a', a), tmp_path / 'o')
    _fp8_check(a, _read_fp8(tmp_path / 'o', *a.shape))


def test_fp8_fault_is_detected(prog, tmp_path):
    a = _fp8_edge_rows()
    _run(prog, 'fp8-fault', a.shape[1], _write(tmp_path / 'a', a), tmp_path / 'o')
    scale, _, _, _ = _read_fp8(tmp_path / 'o', *a.shape)
    _, sf = quantize_fp8_pow2_rows(torch.from_numpy(a))
    assert not np.array_equal(scale, sf.numpy())


def test_e2m1(prog, tmp_path):
    x = _sample_floats()[::7]
    ties = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 7.0, 1e30, 0.0], np.float32)
    near = np.concatenate([np.nextafter(ties, np.float32(0)), np.nextafter(ties, np.float32(np.inf))])
    x = np.concatenate([x, ties, -ties, near, -near, [np.inf, -np.inf]]).astype(np.float32)
    _run(prog, 'e2m1', _write(tmp_path / 'x', x), tmp_path / 'c')
    got = np.fromfile(tmp_path / 'c', dtype=np.uint8)
    want = float_to_e2m1(torch.from_numpy(x)).numpy()
    bad = np.nonzero(got != want)[0]
    assert bad.size == 0, [(float(x[i]), int(got[i]), int(want[i])) for i in bad[:10]]


def test_nvfp4(prog, tmp_path):
    rng = np.random.default_rng(5)
    rows, k = 256, 128
    a = (rng.standard_normal((rows, k)) * 2.0 ** rng.uniform(-12, 14, size=(rows, k // 16)).repeat(16, 1))
    a[rng.random(a.shape) < 0.05] = 0.0
    a[:4, :16] = 0.0                                           # zero blocks: sf8 = 2^-9
    a = a.astype(np.float32)
    gs = (0.5 + rng.random(rows)).astype(np.float32)
    gs[:8] = [1.0, 2.0 ** -20, 2.0 ** 20, 0.5, 3.0, 1e-3, 1e3, 1.0]   # tiny and saturating block scales
    _run(prog, 'nvfp4', k, _write(tmp_path / 'a', a), _write(tmp_path / 'g', gs), tmp_path / 'o')
    raw = np.fromfile(tmp_path / 'o', dtype=np.uint8)
    sf8, code = raw[:rows * k // 16].reshape(rows, k // 16), raw[rows * k // 16:].reshape(rows, k)
    want_code, want_sf8 = quantize_nvfp4_rows(torch.from_numpy(a), torch.from_numpy(gs))
    assert np.array_equal(sf8, want_sf8.view(torch.uint8).numpy())
    assert np.array_equal(code, want_code.numpy())
    assert (want_sf8.view(torch.uint8).numpy() == 0x7E).any() and (want_sf8.view(torch.uint8).numpy() == 0x01).any()


# ---------------------------------------------------------------------------------- device path
def _device_cc():
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return major * 10 + minor if major * 10 + minor >= 89 else None


@pytest.fixture(scope='module')
def device_prog(tmp_path_factory):
    cc = _device_cc()
    if cc is None:
        pytest.skip('needs a GPU of compute capability >= 8.9 (hardware E4M3 conversion)')
    from deep_gemm.jit import compiler
    try:
        nvcc = compiler.nvcc_path()
    except RuntimeError as e:
        pytest.skip(str(e))
    exe = tmp_path_factory.mktemp('l2_input_dev') / 'moe_l2_input_device'
    proc = subprocess.run([nvcc, '-std=c++17', '-O2', '-x', 'cu', '-DDG_L2_INPUT_DEVICE',
                           '-gencode', f'arch=compute_{cc},code=sm_{cc}', f'-I{INCLUDE}', str(SRC), '-o', str(exe)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f'nvcc failed:\n{proc.stdout}\n{proc.stderr}'
    return exe


def test_device_e4m3_matches_software_exhaustively(device_prog):
    out = _run(device_prog, 'device-e4m3-exhaustive')
    s = dict(kv.split('=') for kv in out.split()[1:])
    assert int(s['checked']) == 1 << 32 and int(s['mismatches']) == 0, out


def test_device_fp8_matches_host(prog, device_prog, tmp_path):
    a = np.concatenate([_fp8_edge_rows(256), _fp8_random_rows(k=256)])
    _run(prog, 'fp8', 256, _write(tmp_path / 'a', a), tmp_path / 'h')
    _run(device_prog, 'device-fp8', 256, tmp_path / 'a', tmp_path / 'd')
    assert (tmp_path / 'h').read_bytes() == (tmp_path / 'd').read_bytes()
    _fp8_check(a, _read_fp8(tmp_path / 'd', *a.shape))
