"""MegaMoEWork::build_warp (the fused kernel's work order, built by one warp) against build() (one
thread; tests/test_mega_scheduler.py checks it on the host against a brute-force enumeration), field
by field, on random and edge cases: tests/cpp/mega_moe_work_build_warp.cu, compiled by the JIT."""
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')

SOURCE = Path(__file__).resolve().parents[1] / 'cpp' / 'mega_moe_work_build_warp.cu'
MAX_EXPERTS = 256
WORDS = 6 + MAX_EXPERTS + 3 * (MAX_EXPERTS + 1)     # sizeof(MegaMoEWork<256>) / 4
BIG = 1 << 30


def _cases(gen, n):
    choice = lambda xs: xs[int(torch.randint(len(xs), (1,), generator=gen))]  # noqa: E731
    params, counts = [], []
    for i in range(n):
        e = choice([0, 1, 7, 8, 31, 32, 33, 48, 63, 64, 65, 100, 192, 256])
        block_t = choice([8, 16, 32, 64, 128, 256])
        r1, r2 = choice([(48, 56), (1, 1), (7, 3), (24, 56)])
        la = choice([-1, 0, 1, 2, 5, 40, BIG])
        lu = choice([-5, 0, 1, 264, 528, 5000, BIG])
        g1, g2 = choice([(0x7fffffff, 0x7fffffff), (1, 1), (2, 5), (0, -3)])
        c = torch.zeros(MAX_EXPERTS, dtype=torch.int32)
        kind = i % 5
        if e:
            if kind == 0:      # decode-like: few rows, many experts without any
                c[:e] = torch.randint(0, 4, (e,), generator=gen) * torch.randint(0, 2, (e,), generator=gen)
            elif kind == 1:    # skewed
                c[:e] = torch.randint(0, 300, (e,), generator=gen) * torch.arange(1, e + 1) // e
            elif kind == 2:    # negative counts are taken as 0
                c[:e] = torch.randint(-5, 100, (e,), generator=gen)
            elif kind == 3:    # prefill-sized
                c[:e] = torch.randint(1000, 9000, (e,), generator=gen)
            else:              # rows or units past int: both must refuse
                c[:e] = torch.randint(BIG // 4, BIG, (e,), generator=gen)
        params.append([e, block_t, r1, r2, la, lu, g1, g2])
        counts.append(c)
    # shapes build() refuses
    for bad in ([MAX_EXPERTS + 1, 8, 48, 56, 2, 264, 1, 1], [8, 0, 48, 56, 2, 264, 1, 1], [8, 8, 0, 56, 2, 264, 1, 1],
                [8, 8, 48, -1, 2, 264, 1, 1], [-1, 8, 48, 56, 2, 264, 1, 1]):
        params.append(bad)
        counts.append(torch.randint(0, 50, (MAX_EXPERTS,), generator=gen, dtype=torch.int32))
    return torch.tensor(params, dtype=torch.int32), torch.stack(counts)


def test_build_warp_equals_build(tmp_path, monkeypatch):
    from deep_gemm.jit import compiler, runtime
    monkeypatch.setenv('DG_JIT_CACHE_DIR', str(tmp_path))
    kernel = runtime.load(compiler.build('mega_moe_work_build_warp', SOURCE.read_text()))
    params, counts = _cases(torch.Generator().manual_seed(7), 3000)
    cases = params.shape[0]
    out = torch.full((cases, 2, WORDS + 1), -7, dtype=torch.int32, device='cuda')
    runtime.launch(kernel, cases, 64, 0, [params.cuda(), counts.cuda(), out])
    torch.cuda.synchronize()
    out = out.cpu()
    warp, thread = out[:, 0], out[:, 1]
    E = MAX_EXPERTS
    for i in range(cases):
        w, t = warp[i], thread[i]
        assert w[WORDS] == t[WORDS] and torch.equal(w[:6], t[:6]), f'case {i}: params {params[i].tolist()}'
        a = int(t[0])   # the order's contents: what get() and wait_for() read (nothing when refused)
        if t[WORDS]:
            for name, off, n in (('expert', 6, a), ('tile_prefix', 6 + E, a + 1), ('row_prefix', 7 + 2 * E, a + 1),
                                 ('l2_before', 8 + 3 * E, a + 1)):
                assert torch.equal(w[off:off + n], t[off:off + n]), f'case {i} {name}: params {params[i].tolist()}'
    # the comparison saw real work orders, not only refusals or empty ones
    ok, active = thread[:, WORDS], thread[:, 0]
    assert ok[-5:].tolist() == [0] * 5
    assert int(ok.sum()) > 1500 and int((active > 32).sum()) > 300 and int((ok == 0).sum()) > 400
    assert int(((ok == 1) & (active == 0)).sum()) > 10
    assert (thread[:, :WORDS] != 0x7eadbeef).any(dim=1).all()      # every struct written
