"""Kernel-side weight layout: dequant(transform(w)) == dequant(w) bit for bit, and bad inputs."""
import pytest
import torch

from deep_gemm.weights import (BLOCK_K, CODE_BYTES, transform_nvfp4_weights_for_mega_moe,
                                    transform_weights_for_mega_moe, _code_index, _scale_index,
                                    _CODE_WORD_PERM, _NVFP4_SCALE_WORD_PERM, _WORD_BIT_CELL, _permute_word_bits)

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def direct_dequant(weight, scale, gran, fmt):
    """Straight from the ModelOpt bytes: low nibble = even k."""
    codes = torch.stack([weight & 0xF, weight >> 4], dim=-1).flatten(-2).long()
    vals = E2M1[codes].double()
    if fmt == 'nvfp4':
        s = scale.float().double()
    else:
        s = torch.exp2(scale.double() - 127)
    return vals * s.repeat_interleave(gran, dim=-1)


def random_nvfp4(e, n, k, gen):
    weight = torch.randint(0, 256, (e, n, k // 2), dtype=torch.uint8, generator=gen)
    # every UE4M3 code except NaN (0x7F): subnormals (0x01..0x07), max 448 (0x7E) included
    scale = torch.randint(0, 0x7F, (e, n, k // 16), dtype=torch.uint8, generator=gen).view(torch.float8_e4m3fn)
    g2 = torch.rand(e, 2, generator=gen) * 1e-3 + 1e-4
    return weight, scale, g2


def test_index_maps_are_permutations():
    assert sorted(_code_index().tolist()) == list(range(128 * 128))
    assert sorted(_scale_index('nvfp4').tolist()) == list(range(128 * 8))
    assert sorted(_scale_index('mxfp4').tolist()) == list(range(128 * 4))
    assert sorted(_CODE_WORD_PERM) == list(range(32))
    assert sorted(_NVFP4_SCALE_WORD_PERM) == list(range(32))


def test_word_bit_permutation_roundtrip():
    gen = torch.Generator().manual_seed(4)
    data = torch.randint(0, 256, (3, 64), dtype=torch.uint8, generator=gen)
    for perm in (_CODE_WORD_PERM, _NVFP4_SCALE_WORD_PERM):
        moved = _permute_word_bits(data, perm)
        assert torch.equal(_permute_word_bits(moved, perm, inverse=True), data)
        # a single set bit lands where the table says, in every byte position of the word
        for i in range(32):
            one = torch.zeros(4, dtype=torch.uint8)
            one[i // 8] = 1 << (i % 8)
            w = int.from_bytes(bytes(_permute_word_bits(one, perm).tolist()), 'little')
            assert w == 1 << perm[i]


def test_word_cells_feed_the_kernel_shifts():
    """Each cell is where the kernel's shift for that fragment register picks the bit up."""
    for o in range(4):
        for h in range(2):
            for c in range(4):
                p = 16 * h + (6, 7, 8, 15)[c]
                cell = _WORD_BIT_CELL[o][h][c]
                shift = {0: 0, 1: 4, 2: 10, 3: -2 if c == 2 else 6}[o]
                assert (cell + shift) % 32 == p


@pytest.mark.parametrize('n,k', [(256, 256), (512, 384)])
def test_nvfp4_roundtrip_bit_exact(n, k):
    gen = torch.Generator().manual_seed(n + k)
    e, inter = 3, n // 2
    w1, s1, g1 = random_nvfp4(e, n, k, gen)
    w2, s2, g2 = random_nvfp4(e, k, inter, gen)
    l1, l2 = transform_nvfp4_weights_for_mega_moe(
        {'weight': w1, 'weight_scale': s1, 'weight_scale_2': g1, 'input_scale': torch.ones(e)},
        {'weight': w2, 'weight_scale': s2, 'weight_scale_2': g2[:, 0].contiguous()})
    assert l1.codes.shape == (e, n // 128, k // 128, CODE_BYTES)
    assert torch.equal(l1.dequantize().double(), direct_dequant(w1, s1, 16, 'nvfp4'))
    assert torch.equal(l2.dequantize().double(), direct_dequant(w2, s2, 16, 'nvfp4'))
    assert torch.equal(l1.alpha, g1) and torch.equal(l2.alpha[:, 0], g2[:, 0])
    # the transform only permutes: with the in-word bit permutation undone, the multiset of
    # nibbles is unchanged per expert
    for i in range(e):
        a = torch.cat([w1[i] & 0xF, w1[i] >> 4]).flatten().sort().values
        c = _permute_word_bits(l1.codes[i].reshape(-1, CODE_BYTES), _CODE_WORD_PERM, inverse=True)
        b = torch.cat([c & 0xF, c >> 4]).flatten().sort().values
        assert torch.equal(a, b)


def test_l1_interleave_puts_gate_and_up_in_one_thread():
    """Kernel row 16G + r (r < 8) is gate channel 8G + r, and 16G + r + 8 is the up row of the same channel."""
    gen = torch.Generator().manual_seed(0)
    e, n, k = 1, 256, 128
    w1, s1, g1 = random_nvfp4(e, n, k, gen)
    l1, _ = transform_nvfp4_weights_for_mega_moe((w1, s1, g1), (w1[:, :128].contiguous(), s1[:, :128].contiguous(), g1[:, 0].contiguous()))
    order = l1.row_order()
    assert order[:8].tolist() == list(range(8)) and order[8:16].tolist() == list(range(128, 136))


def test_mxfp4_roundtrip_bit_exact():
    gen = torch.Generator().manual_seed(1)
    e, n, k = 2, 256, 256
    w1 = torch.randint(0, 256, (e, n, k // 2), dtype=torch.uint8, generator=gen)
    s1 = torch.randint(100, 140, (e, n, k // 32), dtype=torch.uint8, generator=gen)
    w2 = torch.randint(0, 256, (e, k, n // 4), dtype=torch.uint8, generator=gen)
    s2 = torch.randint(100, 140, (e, k, n // 2 // 32), dtype=torch.uint8, generator=gen)
    l1, l2 = transform_weights_for_mega_moe((w1, s1), (w2, s2))
    assert torch.equal(l1.dequantize().double(), direct_dequant(w1, s1, 32, 'mxfp4'))
    assert torch.equal(l2.dequantize().double(), direct_dequant(w2, s2, 32, 'mxfp4'))
    assert torch.equal(l1.alpha, torch.ones(e, 2))


@pytest.mark.parametrize('mutate,exc,needle', [
    (lambda d: d.update(weight=d['weight'].float()), TypeError, 'l1.weight'),
    (lambda d: d.update(weight=d['weight'][:, :, :-1]), ValueError, 'l1.weight_scale'),
    (lambda d: d.update(weight_scale=d['weight_scale'].view(torch.uint8)), TypeError, 'l1.weight_scale'),
    (lambda d: d.update(weight_scale_2=d['weight_scale_2'].double()), TypeError, 'l1.weight_scale_2'),
    (lambda d: d.pop('weight_scale_2'), ValueError, 'weight_scale_2'),
    (lambda d: d.update(weight=d['weight'][:, :100]), ValueError, 'l1.weight'),
])
def test_bad_inputs_name_the_argument(mutate, exc, needle):
    gen = torch.Generator().manual_seed(2)
    w1, s1, g1 = random_nvfp4(2, 256, 256, gen)
    w2, s2, g2 = random_nvfp4(2, 256, 128, gen)
    d1 = {'weight': w1, 'weight_scale': s1, 'weight_scale_2': g1}
    mutate(d1)
    with pytest.raises(exc, match=needle):
        transform_nvfp4_weights_for_mega_moe(d1, (w2, s2, g2[:, 0].contiguous()))


def test_negative_or_nan_scale_rejected():
    gen = torch.Generator().manual_seed(3)
    w1, s1, g1 = random_nvfp4(1, 128, 128, gen)
    s_bad = s1.view(torch.uint8).clone()
    s_bad[0, 0, 0] = 0x7F  # NaN
    with pytest.raises(ValueError, match='weight_scale'):
        transform_nvfp4_weights_for_mega_moe((w1, s_bad.view(torch.float8_e4m3fn), g1), (w1, s1, g1[:, 0].contiguous()))


def test_bf16_blocks_hold_the_fp4_fragments():
    """A BF16 block element and an FP4 code of the same (warpgroup, thread, k16 step, register, half)
    are the same tile (row, k): the BF16 kernel loads exactly the A fragments the FP4 kernel dequantizes."""
    from deep_gemm.weights import _bf16_index, _code_index
    # _code_index: [wg, half, tid, jj, o, h] (step j = 4 half + jj); _bf16_index: [j, wg, tid, o, h]
    fp4 = _code_index().reshape(2, 2, 128, 4, 4, 2).permute(1, 3, 0, 2, 4, 5).reshape(8, 2, 128, 4, 2)
    assert torch.equal(_bf16_index().reshape(8, 2, 128, 4, 2), fp4)
    assert torch.equal(torch.sort(_bf16_index()).values, torch.arange(128 * 128))     # a permutation


@pytest.mark.parametrize('kind_shape', [((4, 256, 384), (4, 384, 128)), ((256, 512), (512, 128))])
def test_bf16_weights_round_trip_and_row_order(kind_shape):
    """BF16 weights (bf16_mega_moe, shared experts): values kept, L1 rows interleaved by 8 like FP4's."""
    from deep_gemm.weights import _l1_kernel_row_order
    g = torch.Generator().manual_seed(3)
    w1, w2 = (torch.randn(*s, generator=g).bfloat16() for s in kind_shape)
    l1, l2 = transform_weights_for_mega_moe(w1, w2)
    assert (l1.fmt, l1.kind, l2.kind) == ('bf16', 'l1', 'l2') and l1.codes.dtype == torch.bfloat16
    flat1 = w1.reshape(-1, *w1.shape[-2:])
    assert torch.equal(l1.dequantize(), flat1.float()) and torch.equal(l2.dequantize(), w2.reshape(l2.dequantize().shape).float())
    assert torch.equal(l1.row_order(), _l1_kernel_row_order(l1.n))
    # kernel row 0..7 of block (0, 0) are gate rows 0..7, rows 8..15 up rows 0..7 (element 0 of each
    # thread's a0 / a1 for k = 2q); a wrong interleave or fragment order shows here
    blk = l1.codes[0, 0, 0]
    for tid in (0, 5, 37):
        g_, q = (tid % 32) // 4, tid % 4
        r0 = 16 * (tid // 32) + g_
        base = tid * 8
        gate_row, up_row = (r0 // 16) * 8 + r0 % 16, l1.n // 2 + (r0 // 16) * 8 + r0 % 16
        assert blk[base].item() == flat1[0, gate_row, 2 * q].item()
        assert blk[base + 2].item() == flat1[0, up_row, 2 * q].item()
    with pytest.raises(ValueError, match='multiples of 128'):
        transform_weights_for_mega_moe(torch.zeros(2, 64, 128, dtype=torch.bfloat16),
                                                 torch.zeros(2, 128, 32, dtype=torch.bfloat16))
