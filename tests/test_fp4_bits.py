"""CPU emulation of the Hopper E2M1 -> BF16 dequant (deep_gemm/include/deep_gemm/common/sm90_fp4.cuh).

Every integer operation of the device code is replayed on uint32 words, every bf16 multiply is
done exactly in float64 and rounded to bf16 (RNE, subnormals kept), and the tests assert that no
rounding ever happens: the kernel's A fragments are the checkpoint's values bit for bit (times the
power of two the epilogue removes).  The words come from the real weight transform, so a change
of the layout in weights.py that the device code does not follow fails here.
"""
import numpy as np
import pytest
import torch

from deep_gemm.weights import (CODE_BYTES, ExpertWeights, _CODE_WORD_PERM, _NVFP4_SCALE_WORD_PERM,
                                    _permute_word_bits, transform_mxfp4_weights_for_grouped_gemm,
                                    transform_nvfp4_weights_for_grouped_gemm)

M32 = 0xFFFFFFFF
E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
NVFP4_COMPENSATION = 128.0   # kNvfp4Compensation

# --- bit-exact models of the device helpers (numpy uint64 arrays holding 32-bit values) ---

T, T_E1 = 0x81C081C0, 0x01000100
T_MES = T & ~T_E1


def shl_wide(w, k):
    """mul.wide.u32 w, 2^k -> (lo, hi)."""
    p = w * (1 << k)
    return p & M32, p >> 32


def e2m1x8_to_bf16x8_bits(w):
    lo, hi = shl_wide(w, 10)
    return [w & T,
            ((w << 4) & M32) & T,
            (lo | hi) & T,
            (((w << 6) & M32) & T_MES) | ((w >> 2) & T_E1)]


def ue4m3x2_bits(w, odd):
    if odd:
        lo, hi = shl_wide(w, 25)
        w = lo | hi
    return w & 0x07F007F0


def ue8m0x2_bits(w, odd):
    b = ((w >> 1) & 0x7F807F80) if odd else (((w & 0x00FF00FF) << 7) & M32)
    # max.u16x2 with 0x0040 in both halves
    lo, hi = b & 0xFFFF, b >> 16
    return np.maximum(lo, 0x40) | (np.maximum(hi, 0x40) << 16)


def halves(x):
    return x & 0xFFFF, x >> 16


def bf16_value(h):
    return (np.asarray(h, dtype=np.uint64) << 16).astype(np.uint32).view(np.float32).astype(np.float64)


def bf16_mul(a, b, check_exact=True):
    """One bf16 lane multiply: exact product (<= 16 significant bits fit float64 and float32), RNE to bf16."""
    p = bf16_value(a) * bf16_value(b)
    with np.errstate(over='ignore'):
        f = p.astype(np.float32)
    u = f.view(np.uint32).astype(np.uint64)
    r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    r = np.where(np.isnan(f), 0x7FC0, r)
    if check_exact:
        finite = np.isfinite(bf16_value(r))
        assert np.array_equal(bf16_value(r)[finite], p[finite]), 'a bf16 multiply rounded'
    return r


def hmul2(x, y_lo, y_hi):
    """__hmul2 on a bf16x2 `x` by the pair (y_lo, y_hi) (each a 16-bit bf16)."""
    xl, xh = halves(x)
    return bf16_mul(xl, y_lo) | (bf16_mul(xh, y_hi) << 16)


BF16_TWO120, BF16_TWO119, BF16_TWO126 = 0x7B80, 0x7B00, 0x7E80


def ue4m3x2_to_bf16x2_biased(w, odd):
    lo, hi = halves(ue4m3x2_bits(w, odd))
    lo = bf16_mul(bf16_mul(lo, BF16_TWO120), BF16_TWO119)
    hi = bf16_mul(bf16_mul(hi, BF16_TWO120), BF16_TWO119)
    return lo, hi


def dequant_step(fmt, w, s_lo, s_hi):
    """a[0..3] of a k16 step (dequant_step_nvfp4 / dequant_step_mxfp4)."""
    x = e2m1x8_to_bf16x8_bits(w)
    out = []
    for o in range(4):
        s = s_hi if o & 1 else s_lo
        if fmt == 'nvfp4':
            out.append(hmul2(x[o], s, s))
        else:
            xl, xh = halves(x[o])
            xl, xh = bf16_mul(xl, BF16_TWO126), bf16_mul(xh, BF16_TWO126)
            out.append(bf16_mul(xl, s) | (bf16_mul(xh, s) << 16))
    return out


def words(data: torch.Tensor) -> np.ndarray:
    return data.contiguous().view(torch.int32).numpy().view(np.uint32).astype(np.uint64).reshape(-1)


def canonical_code_words(codes):
    """codes[..., 8] (nibble n = fragment register n // 2, half n % 2) -> permuted words."""
    nib = torch.as_tensor(codes, dtype=torch.uint8)
    packed = nib[..., 0::2] | (nib[..., 1::2] << 4)
    return words(_permute_word_bits(packed.reshape(-1, 4), _CODE_WORD_PERM))


# --- tests ---

def test_every_code_in_every_slot():
    """Each of the 16 codes in each of the 8 positions of a word, with random neighbours, comes out
    as value * 2^-126 in its fragment register half, and the neighbours are untouched."""
    rng = np.random.default_rng(0)
    for slot in range(8):
        codes = rng.integers(0, 16, size=(16 * 64, 8))
        codes[:, slot] = np.repeat(np.arange(16), 64)
        x = e2m1x8_to_bf16x8_bits(canonical_code_words(codes))
        for n in range(8):
            got = bf16_value(halves(x[n // 2])[n % 2])
            want = E2M1[codes[:, n]] * 2.0 ** -126
            assert np.array_equal(got, want)
            assert np.array_equal(np.signbit(got), codes[:, n] >= 8)   # -0 stays -0


def test_nvfp4_all_codes_times_all_scales_exact():
    """16 E2M1 codes x 127 non-NaN UE4M3 scales (subnormals and 448 included), even and odd steps of
    a scale word, both rows: every bf16 multiply is exact and the result is value * scale * 2^-7."""
    scale_codes = np.arange(0x7F, dtype=np.uint8)
    scale_vals = torch.from_numpy(scale_codes.copy()).view(torch.float8_e4m3fn).double().numpy()
    rng = np.random.default_rng(1)
    for odd in (False, True):
        for row in (0, 1):
            # scale word bytes [s(r0, even), s(r0, odd), s(r1, even), s(r1, odd)] with the tested
            # scale in the tested place and random neighbours, then the transform's bit permutation
            sw = rng.integers(0, 0x7F, size=(len(scale_codes), 4)).astype(np.uint8)
            sw[:, 2 * row + int(odd)] = scale_codes
            w = words(_permute_word_bits(torch.from_numpy(sw), _NVFP4_SCALE_WORD_PERM))
            s = ue4m3x2_to_bf16x2_biased(w, odd)[row]
            assert np.array_equal(bf16_value(s), scale_vals * 2.0 ** 119)
            for code in range(16):
                a = dequant_step('nvfp4', canonical_code_words(np.full((len(scale_codes), 8), code)), s, s)
                for o in range(4):
                    for h in range(2):
                        got = bf16_value(halves(a[o])[h]) * NVFP4_COMPENSATION
                        assert np.array_equal(got, E2M1[code] * scale_vals), (odd, row, code, o, h)


def test_mxfp4_all_codes_times_all_ue8m0_scales_exact():
    """16 E2M1 codes x UE8M0 0..254 (255 is NaN): exact, 2^-127 included; a product only leaves
    bf16 where it also leaves float32 (|value| * 2^(b - 127) >= 2^128 -> inf, like dequantize())."""
    b = np.arange(255, dtype=np.uint64)
    want_scale = 2.0 ** (b.astype(np.float64) - 127)
    for odd in (False, True):
        w = (b << (8 if odd else 0)) | (b << (24 if odd else 16))
        s_lo, s_hi = halves(ue8m0x2_bits(w, odd))
        assert np.array_equal(bf16_value(s_lo), want_scale) and np.array_equal(bf16_value(s_hi), want_scale)
        for code in range(16):
            a = dequant_step('mxfp4', canonical_code_words(np.full((len(b), 8), code)), s_lo, s_hi)
            want = E2M1[code] * want_scale
            with np.errstate(over='ignore'):
                want32 = want.astype(np.float32).astype(np.float64)
            for o in range(4):
                for h in range(2):
                    got = bf16_value(halves(a[o])[h])
                    assert np.array_equal(got, want32), (odd, code, o, h)


def kernel_fragments(ew: ExpertWeights, e: int) -> np.ndarray:
    """What the kernel feeds wgmma: float64 [N, K] in kernel row order (before the epilogue's
    compensation), replaying load_block + FP4Block::dequant for every thread, step and chunk."""
    tn, tk = ew.n // 128, ew.k // 128
    out = np.zeros((ew.n, ew.k))
    tid = np.arange(128, dtype=np.int64)
    warp, g, q = tid // 32, (tid % 32) // 4, tid % 4
    for rt in range(tn):
        for kb in range(tk):
            cw_words = words(ew.codes[e, rt, kb].cpu()).reshape(2, 2, 128, 4)    # [cw, half, tid, jj]
            sc = words(ew.scales[e, rt, kb].cpu())
            per_pair = 4 if ew.fmt == 'nvfp4' else 2
            for cw in range(2):
                row_pair = cw * 32 + warp * 8 + g
                r0 = rt * 128 + cw * 64 + 16 * warp + g
                if ew.fmt == 'nvfp4':
                    # load_block's warp exchange: lane l = 4 g + q expands scale word l of its warp's
                    # 8 row pairs (steps 2q and 2q + 1 of row pair g) into the warp's scratch ...
                    scratch = {}
                    for odd in (False, True):
                        lo, hi = ue4m3x2_to_bf16x2_biased(sc[(cw * 32 + warp * 8) * per_pair + tid % 32], odd)
                        for t in range(128):
                            scratch[warp[t], g[t], 2 * q[t] + odd] = (lo[t], hi[t])
                for j in range(8):
                    w = cw_words[cw, j // 4, :, j % 4]
                    if ew.fmt == 'nvfp4':
                        # ... and every thread reads its row pair's 8 steps back
                        pairs = [scratch[warp[t], g[t], j] for t in range(128)]
                        s_lo, s_hi = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
                    else:
                        s_lo, s_hi = halves(ue8m0x2_bits(sc[row_pair * per_pair + j // 4], bool((j // 2) & 1)))
                    a = dequant_step(ew.fmt, w, s_lo, s_hi)
                    for o in range(4):
                        row = r0 + (8 if o & 1 else 0)
                        for h in range(2):
                            k = kb * 128 + 16 * j + 2 * q + (8 if o >= 2 else 0) + h
                            out[row, k] = bf16_value(halves(a[o])[h])
    return out


@pytest.mark.parametrize('fmt', ['nvfp4', 'mxfp4'])
def test_kernel_fragments_equal_dequantize(fmt):
    """Transform -> the kernel's loads and bit operations -> exactly dequantize() (and so the checkpoint)."""
    gen = torch.Generator().manual_seed(5)
    e, n, k = 2, 256, 256
    weight = torch.randint(0, 256, (e, n, k // 2), dtype=torch.uint8, generator=gen)
    if fmt == 'nvfp4':
        scale = torch.randint(0, 0x7F, (e, n, k // 16), dtype=torch.uint8, generator=gen).view(torch.float8_e4m3fn)
        ew = transform_nvfp4_weights_for_grouped_gemm(weight, scale, torch.ones(e))
        comp = NVFP4_COMPENSATION
    else:
        scale = torch.randint(90, 160, (e, n, k // 32), dtype=torch.uint8, generator=gen)
        scale[0, 0, :2] = torch.tensor([0, 254], dtype=torch.uint8)   # the extremes of UE8M0
        ew = transform_mxfp4_weights_for_grouped_gemm(weight, scale)
        comp = 1.0
    assert ew.codes.shape[-1] == CODE_BYTES
    ref = ew.dequantize().double().numpy()
    for i in range(e):
        got = kernel_fragments(ew, i) * comp
        want = ref[i][ew.row_order().numpy()]
        assert np.array_equal(got, want)
        assert np.array_equal(np.signbit(got), np.signbit(want))
