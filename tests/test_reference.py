"""The float64 reference against a hand-written naive loop, plus clamp, masking, stats and combine order."""
import pytest
import torch
import torch.nn.functional as F

from deep_gemm.reference import combine_slots, reference_mega_moe, reference_moe_forward
from deep_gemm.utils import dequant_fp8


def naive_moe(p, activation_clamp=None):
    """Straight from docs/design.md, one (token, slot) at a time, float64."""
    gran = p.hidden // p.x_sf.shape[1]
    xf = dequant_fp8(p.x, p.x_sf, gran, dtype=torch.float64)
    inter = p.inter
    y = torch.zeros(p.t, p.hidden, dtype=torch.float32)
    out = torch.zeros(p.t, p.topk, p.hidden, dtype=torch.bfloat16)
    for t in range(p.t):
        for j in range(p.topk):
            e = int(p.topk_idx[t, j])
            if e < 0:
                continue
            w1 = p.w1[e].double()
            gate = (xf[t] @ w1[:inter].T) * float(p.w1_alpha[e, 0])
            up = (xf[t] @ w1[inter:].T) * float(p.w1_alpha[e, 1])
            if activation_clamp is not None:
                up = up.clamp(-activation_clamp, activation_clamp)
                gate = gate.clamp(max=activation_clamp)
            h = (gate * torch.sigmoid(gate) * up * float(p.topk_weights[t, j]))
            h = h.float().to(torch.bfloat16).double()  # (double rounding is harmless at this scale)
            o = (h @ p.w2[e].double().T) * float(p.w2_alpha[e, 0])
            out[t, j] = o.float().to(torch.bfloat16)
            y[t] += out[t, j].float()
    return y.to(torch.bfloat16), out


def bf16_close(a, b, max_frac_diff=0.02):
    """Equal up to rare one-ulp differences (the naive loop sums in another order)."""
    a, b = a.float(), b.float()
    diff = (a - b).abs()
    ulp = torch.maximum(a.abs(), b.abs()) * 2 ** -7 + 1e-30
    assert (diff <= ulp * 1.01).all(), float((diff / ulp).max())
    assert (diff > 0).float().mean().item() <= max_frac_diff


@pytest.mark.parametrize('gran_k,use_ue8m0', [(32, False), (32, True), (128, False)])
def test_reference_vs_naive_loop(make_problem, gran_k, use_ue8m0):
    p = make_problem(seed=gran_k + use_ue8m0, t=12, gran_k=gran_k, use_ue8m0=use_ue8m0)
    y = reference_mega_moe(p.x, p.x_sf, p.topk_idx, p.topk_weights, p.w1, p.w1_alpha, p.w2, p.w2_alpha)
    y_naive, out_naive = naive_moe(p)
    assert y.dtype == torch.bfloat16 and y.shape == (p.t, p.hidden)
    out, _ = reference_moe_forward(p.x, p.x_sf, p.topk_idx, p.topk_weights, p.w1, p.w1_alpha, p.w2, p.w2_alpha)
    bf16_close(out, out_naive)
    bf16_close(y, y_naive, max_frac_diff=0.05)
    assert y.float().abs().max() > 0


def test_reference_clamp_semantics(make_problem):
    p = make_problem(seed=7, t=10)
    y0 = reference_mega_moe(p.x, p.x_sf, p.topk_idx, p.topk_weights, p.w1, p.w1_alpha, p.w2, p.w2_alpha)
    c = 0.05
    y1 = reference_mega_moe(p.x, p.x_sf, p.topk_idx, p.topk_weights, p.w1, p.w1_alpha, p.w2, p.w2_alpha,
                            activation_clamp=c)
    y_naive, _ = naive_moe(p, activation_clamp=c)
    bf16_close(y1, y_naive, max_frac_diff=0.05)
    assert not torch.equal(y0, y1)
    # huge clamp = no clamp
    y2 = reference_mega_moe(p.x, p.x_sf, p.topk_idx, p.topk_weights, p.w1, p.w1_alpha, p.w2, p.w2_alpha,
                            activation_clamp=1e30)
    assert torch.equal(y0, y2)


def test_clamp_is_one_sided_on_gate():
    """gate = min(gate, c) keeps large negative gates; up = clamp(up, -c, c)."""
    hidden, inter = 32, 2
    x = torch.zeros(1, hidden)
    x[0, 0] = 1.0
    x_fp8, x_sf = x.to(torch.float8_e4m3fn), torch.ones(1, 1)
    w1 = torch.zeros(1, 2 * inter, hidden)
    w1[0, :, 0] = torch.tensor([-8.0, 8.0, 8.0, -8.0])  # gate = [-8, 8], up = [8, -8]
    w2 = torch.zeros(1, hidden, inter)
    w2[0, 0, 0] = 1.0
    w2[0, 1, 1] = 1.0
    idx, tw = torch.zeros(1, 1, dtype=torch.int64), torch.ones(1, 1)
    a1, a2 = torch.ones(1, 2), torch.ones(1, 1)
    c = 2.0
    out, _ = reference_moe_forward(x_fp8, x_sf, idx, tw, w1, a1, w2, a2, activation_clamp=c)
    want0 = F.silu(torch.tensor(-8.0, dtype=torch.float64)) * 2.0  # gate untouched, up clamped to 2
    want1 = F.silu(torch.tensor(2.0, dtype=torch.float64)) * -2.0  # gate clamped to 2, up to -2
    assert out[0, 0, 0].item() == torch.tensor(want0.item()).to(torch.bfloat16).item()
    assert out[0, 0, 1].item() == torch.tensor(want1.item()).to(torch.bfloat16).item()


def test_masked_slots_and_stats(make_problem):
    p = make_problem(seed=11, t=9, mask_frac=0.3)
    p.topk_idx[0] = -1  # a token with every slot masked
    stats = torch.full((p.experts,), 5, dtype=torch.int32)
    y = reference_mega_moe(p.x, p.x_sf, p.topk_idx, p.topk_weights, p.w1, p.w1_alpha, p.w2, p.w2_alpha,
                           cumulative_local_expert_recv_stats=stats)
    assert torch.equal(y[0], torch.zeros(p.hidden, dtype=torch.bfloat16))
    want = torch.bincount(p.topk_idx[p.topk_idx >= 0], minlength=p.experts).to(torch.int32) + 5
    assert torch.equal(stats, want)
    # a masked slot contributes nothing, whatever its weight
    tw2 = p.topk_weights.clone()
    tw2[p.topk_idx < 0] = 1e6
    y2 = reference_mega_moe(p.x, p.x_sf, p.topk_idx, tw2, p.w1, p.w1_alpha, p.w2, p.w2_alpha)
    assert torch.equal(y, y2)
    out, st = reference_moe_forward(p.x, p.x_sf, p.topk_idx, p.topk_weights, p.w1, p.w1_alpha, p.w2, p.w2_alpha)
    assert (out[p.topk_idx < 0] == 0).all()
    assert torch.equal(st['local_mask'], p.topk_idx >= 0)


def test_expert_offset_splits_the_work(make_problem):
    """Two halves of the experts computed separately give the same per-slot rows."""
    p = make_problem(seed=13, t=11)
    full, _ = reference_moe_forward(p.x, p.x_sf, p.topk_idx, p.topk_weights, p.w1, p.w1_alpha, p.w2, p.w2_alpha)
    half = p.experts // 2
    parts = []
    for r in range(2):
        s = slice(r * half, (r + 1) * half)
        o, st = reference_moe_forward(p.x, p.x_sf, p.topk_idx, p.topk_weights, p.w1[s], p.w1_alpha[s], p.w2[s],
                                      p.w2_alpha[s], expert_offset=r * half)
        parts.append(o)
        ids = p.topk_idx[(p.topk_idx >= r * half) & (p.topk_idx < (r + 1) * half)] - r * half
        assert torch.equal(st['recv_count'], torch.bincount(ids, minlength=half))
    assert torch.equal(parts[0].float() + parts[1].float(), full.float())


def test_combine_order_is_increasing_j_in_float32():
    o = torch.tensor([[[2.0 ** 24], [1.0], [-(2.0 ** 24)]]], dtype=torch.bfloat16)  # [1, 3, 1]
    idx = torch.zeros(1, 3, dtype=torch.int64)
    # (2^24 + 1) rounds to 2^24 in float32, then - 2^24 = 0; any other order gives 1
    assert combine_slots(o, idx).item() == 0.0
    idx[0, 0] = -1
    assert combine_slots(o, idx).item() == torch.tensor(1.0 - 2.0 ** 24).to(torch.bfloat16).item()


def test_zero_tokens(make_problem):
    p = make_problem(seed=1, t=4)
    y = reference_mega_moe(p.x[:0], p.x_sf[:0], p.topk_idx[:0], p.topk_weights[:0], p.w1, p.w1_alpha, p.w2,
                           p.w2_alpha)
    assert y.shape == (0, p.hidden)


def test_rows_do_not_depend_on_batch(make_problem):
    """The per-row computation does not depend on the other rows (basis of multi-rank bit-exactness)."""
    p = make_problem(seed=17, t=16, mask_frac=0.0)
    full, _ = reference_moe_forward(p.x, p.x_sf, p.topk_idx, p.topk_weights, p.w1, p.w1_alpha, p.w2, p.w2_alpha)
    for lo, hi in [(0, 1), (3, 9), (9, 16)]:
        part, _ = reference_moe_forward(p.x[lo:hi], p.x_sf[lo:hi], p.topk_idx[lo:hi], p.topk_weights[lo:hi],
                                        p.w1, p.w1_alpha, p.w2, p.w2_alpha)
        assert torch.equal(part, full[lo:hi])
