"""CPU tests of the sm100 weight transform (deep_gemm.weights_sm100): bit-exact inverse, the scale-atom
layout against its formula and against the kernel header's own sf_global_offset (compiled by g++), the
gate/up interleave per 128-row tile, and agreement with the sm90 transform's dequantization."""
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from deep_gemm import weights as w90
from deep_gemm import weights_sm100 as w100
from deep_gemm.utils.quant import cast_to_mxfp4, cast_to_nvfp4_experts

INCLUDE = Path(w100.__file__).resolve().parent / 'include'


def _nvfp4(e, n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return cast_to_nvfp4_experts(torch.randn(e, n, k, generator=g))


def _random_bytes(e, n, k, fmt, seed=0):
    """Every byte value, not just quantizer outputs (the transform must move any byte)."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, (e, n, k // 2), generator=g, dtype=torch.uint8)
    gran = w100.SCALE_GRAN[fmt]
    s = torch.randint(0, 127 if fmt == 'nvfp4' else 255, (e, n, k // gran), generator=g, dtype=torch.uint8)
    return codes, (s.view(torch.float8_e4m3fn) if fmt == 'nvfp4' else s)


@pytest.mark.parametrize('kind', ['l1', 'l2'])
@pytest.mark.parametrize('fmt', ['nvfp4', 'mxfp4'])
def test_roundtrip_bit_exact(fmt, kind):
    e, n, k = 3, 256, 512
    codes, s = _random_bytes(e, n, k, fmt)
    if fmt == 'nvfp4':
        gs = torch.rand(e, 2 if kind == 'l1' else 1) + 0.5
        t = w100.transform_nvfp4_weights_for_sm100(codes, s, gs, kind=kind)
    else:
        t = w100.transform_mxfp4_weights_for_sm100(codes, s, kind=kind)
    assert t.codes.shape == (e, n, k // 2) and t.codes.dtype == torch.uint8
    assert t.scales.shape == (e, n // 128, k // t.gran // 4, 512)
    back_codes, back_s, alpha = w100.untransform_sm100(t)
    assert torch.equal(back_codes, codes)
    assert back_s.dtype == s.dtype and torch.equal(back_s.view(torch.uint8), s.view(torch.uint8))
    assert alpha.shape == (e, 2 if kind == 'l1' else 1)
    # bytes are only moved: the multisets agree
    assert torch.equal(torch.sort(t.codes.flatten())[0], torch.sort(codes.flatten())[0])


def test_scale_atom_formula():
    rows, blocks = 256, 24
    sf = torch.randint(0, 256, (rows, blocks), dtype=torch.uint8)
    atoms = w100.to_sm100_sf_layout(sf).flatten()
    for m in range(rows):
        for kb in range(blocks):
            off = ((m // 128) * (blocks // 4) + kb // 4) * 512 + 16 * (m % 32) + 4 * ((m // 32) % 4) + kb % 4
            assert atoms[off] == sf[m, kb]
    # padding: rows to 128, blocks to 4, with zeros; and back
    odd = torch.randint(1, 256, (130, 6), dtype=torch.uint8)
    a = w100.to_sm100_sf_layout(odd)
    assert a.shape == (2, 2, 512) and int((a != 0).sum()) == 130 * 6
    assert torch.equal(w100.from_sm100_sf_layout(a, 130, 6), odd)


@pytest.mark.skipif(shutil.which('g++') is None, reason='needs g++')
def test_scale_layout_matches_kernel_header(tmp_path):
    # the kernel's own DG_HOST_DEVICE sf_global_offset (common/sm100_umma.cuh) against the transform
    src = tmp_path / 'sf.cpp'
    src.write_text('#include <cstdio>\n#include <deep_gemm/common/sm100_umma.cuh>\n'
                   'int main() { for (int m = 0; m < 256; ++m) for (int kb = 0; kb < 16; ++kb)\n'
                   '  std::printf("%llu\\n", (unsigned long long)deep_gemm::sm100::sf_global_offset(m, kb, 16)); }\n')
    exe = tmp_path / 'sf'
    subprocess.run(['g++', '-std=c++17', '-I', str(INCLUDE), str(src), '-o', str(exe)], check=True)
    offsets = [int(x) for x in subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.split()]
    sf = torch.arange(256 * 16, dtype=torch.int32)
    lo = w100.to_sm100_sf_layout((sf & 0xFF).to(torch.uint8).reshape(256, 16)).flatten()
    hi = w100.to_sm100_sf_layout((sf >> 8).to(torch.uint8).reshape(256, 16)).flatten()
    got = (hi.long() << 8) | lo.long()
    assert [int(got[o]) for o in offsets] == list(range(256 * 16))


def test_l1_tiles_hold_gate_and_up_of_the_same_channels():
    e, inter, k = 1, 192, 256
    codes = torch.arange(2 * inter, dtype=torch.int64).remainder(256).to(torch.uint8)[None, :, None].expand(e, 2 * inter, k // 2).contiguous()
    s = torch.full((e, 2 * inter, k // 16), 0x38, dtype=torch.uint8).view(torch.float8_e4m3fn)
    t = w100.transform_nvfp4_weights_for_sm100(codes, s, torch.ones(e, 2), kind='l1')
    order = t.row_order()
    for rt in range(2 * inter // 128):
        rows = order[rt * 128:(rt + 1) * 128]
        gate, up = rows[rows < inter], rows[rows >= inter] - inter
        assert torch.equal(torch.sort(gate)[0], torch.sort(up)[0])
        assert torch.equal(torch.sort(gate)[0], torch.arange(rt * 64, rt * 64 + 64))
    # kernel row 16 G + r: gate channel 8 G + r (r < 8), its up row 8 rows later (TMEM lanes l, l + 8)
    for kr in range(2 * inter):
        g, r = divmod(kr, 16)
        assert int(order[kr]) == (8 * g + r if r < 8 else inter + 8 * g + r - 8)
        assert int(t.codes[0, kr, 0]) == int(order[kr]) % 256


@pytest.mark.parametrize('fmt', ['nvfp4', 'mxfp4'])
def test_dequantize_matches_sm90_transform(fmt):
    e, n, k = 2, 256, 512
    x = torch.randn(e, n, k, generator=torch.Generator().manual_seed(1))
    if fmt == 'nvfp4':
        codes, s, gs = cast_to_nvfp4_experts(x)
        t100 = w100.transform_nvfp4_weights_for_sm100(codes, s, gs, kind='l1')
        t90 = w90._transform_one({'weight': codes, 'weight_scale': s, 'weight_scale_2': gs}, 'w', 'l1', 'nvfp4')
    else:
        codes, s = cast_to_mxfp4(x)
        t100 = w100.transform_mxfp4_weights_for_sm100(codes, s, kind='l1')
        t90 = w90._transform_one((codes, s), 'w', 'l1', 'mxfp4')
    assert torch.equal(w100.dequantize_sm100(t100), t90.dequantize())
    assert torch.equal(t100.alpha, t90.alpha)


def test_mega_moe_pair_and_checks():
    e, hidden, inter = 2, 256, 256
    l1 = dict(zip(('weight', 'weight_scale', 'weight_scale_2'), _nvfp4(e, 2 * inter, hidden)))
    l2 = dict(zip(('weight', 'weight_scale', 'weight_scale_2'), _nvfp4(e, hidden, inter, seed=1)))
    a, b = w100.transform_nvfp4_weights_for_sm100_mega_moe(l1, l2)
    assert a.kind == 'l1' and b.kind == 'l2' and a.n == 2 * inter and b.k == inter
    # K must fill whole 256-element stages for NVFP4 (128 for MXFP4)
    c, s, g = _nvfp4(1, 128, 384)
    with pytest.raises(ValueError, match='multiple of 256'):
        w100.transform_nvfp4_weights_for_sm100(c, s, g)
    cm, sm = cast_to_mxfp4(torch.randn(1, 128, 384))
    assert w100.transform_mxfp4_weights_for_sm100(cm, sm).k == 384
    with pytest.raises(TypeError):
        w100.transform_nvfp4_weights_for_sm100(c, s.view(torch.uint8), g)   # scale dtype checked by the shared parser
    with pytest.raises(ValueError):
        w100.transform_nvfp4_weights_for_sm100_mega_moe(l1, {**l2, 'weight': l2['weight'][:, :128]})
