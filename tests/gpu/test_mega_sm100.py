"""The sm100 fused Mega MoE kernel (deep_gemm.mega.sm100.run_fused, one GPU) against the reference of
upstream's recipes (deep_gemm.reference_recipes.reference_recipe_moe) on the same quantized inputs.

Needs a CC 10.x GPU (B200 / GB200 / B300); skipped elsewhere.  NEVER RUN YET: no Blackwell GPU was
available when this was written (docs/sm100.md, "The fused kernel").  Every run: random
tokens and weights in the buffer's formats, masked slots, an expert without tokens, ``y`` poisoned
with NaN first; error = ||y - ref|| / ||ref||; then bitwise stability run to run, the receive
statistics, waves, one CUDA-graph replay.
"""
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 10,
                                reason='needs a CC 10.x (Blackwell) GPU')

import deep_gemm  # noqa: E402
from deep_gemm import weights_sm100 as w100  # noqa: E402
from deep_gemm.mega import api, sm100  # noqa: E402
from deep_gemm.reference_recipes import reference_recipe_moe  # noqa: E402
from deep_gemm.utils import relative_error  # noqa: E402

TOL = {'fp4xfp4': 3e-2, 'fp8xfp4': 2e-2}   # the recipes' L2-input quantization, FP32 tensor-core sums


class _Dequant:
    def __init__(self, w):
        self.w = w

    def __len__(self):
        return self.w.num_experts

    def __getitem__(self, e):
        return w100.dequantize_sm100(self.w, [e])[0]


def _weights(fmt, e, n, k, kind, gen):
    g = 16 if fmt == 'nvfp4' else 32
    codes = torch.randint(0, 256, (e, n, k // 2), dtype=torch.uint8, generator=gen).cuda()
    if fmt == 'nvfp4':   # UE4M3 in [2^-4, 2^-1]: 0x08 .. 0x30
        s = torch.randint(0x08, 0x30, (e, n, k // g), dtype=torch.uint8, generator=gen).cuda().view(torch.float8_e4m3fn)
        alpha = torch.ones(e, 2) if kind == 'l1' else torch.ones(e)
        return w100.transform_nvfp4_weights_for_sm100(codes, s, alpha.cuda(), kind)
    s = torch.randint(120, 126, (e, n, k // g), dtype=torch.uint8, generator=gen).cuda()
    return w100.transform_mxfp4_weights_for_sm100(codes, s, kind)


def _problem(mma_type, t, e, topk, h, i, seed, max_tokens=None):
    gen = torch.Generator().manual_seed(seed)
    fmt = sm100.RECIPES[mma_type]
    buf = deep_gemm.get_symm_buffer_for_mega_moe(None, e, max_tokens or t, topk, h, i, mma_type=mma_type, device='cuda')
    if mma_type == 'fp4xfp4':
        x = torch.randint(0, 256, (t, h // 2), dtype=torch.uint8, generator=gen)
        x_sf = torch.randint(0x30, 0x40, (t, h // 16), dtype=torch.uint8, generator=gen).view(torch.int32)
    else:
        x = (torch.randn(t, h, generator=gen) * 2).to(torch.float8_e4m3fn)
        x_sf = torch.randint(124, 130, (t, h // 32), dtype=torch.uint8, generator=gen).view(torch.int32)
    idx = torch.randint(0, e, (t, topk), generator=gen)
    idx[torch.rand(t, topk, generator=gen) < 0.2] = -1
    idx[idx == 1] = -1                                   # an expert without tokens
    w = torch.rand(t, topk, generator=gen)
    buf.x[:t].copy_(x.cuda())
    buf.x_sf[:t].copy_(x_sf.cuda())
    buf.topk_idx[:t].copy_(idx.cuda())
    buf.topk_weights[:t].copy_(w.cuda())
    l1, l2 = _weights(fmt, e, 2 * i, h, 'l1', gen), _weights(fmt, e, h, i, 'l2', gen)
    return buf, l1, l2


def _reference(buf, l1, l2, t, clamp, **alphas):
    stats = torch.zeros(buf.num_experts_per_rank, dtype=torch.int32, device='cuda')
    y = reference_recipe_moe(api._KIND_RECIPE[buf.mma_type], api._activations(buf, t), buf.topk_idx[:t],
                             buf.topk_weights[:t], _Dequant(l1), _Dequant(l2), None, num_experts=buf.num_experts,
                             activation_clamp=clamp, cumulative_local_expert_recv_stats=stats, **alphas)
    return y.to(torch.bfloat16), stats


def _run(buf, l1, l2, t, clamp, **alphas):
    y = torch.full((t, buf.hidden), float('nan'), dtype=torch.bfloat16, device='cuda')
    stats = torch.zeros(buf.num_experts_per_rank, dtype=torch.int32, device='cuda')
    sm100.run_fused(y, l1, l2, buf, stats, clamp, True, **alphas)
    torch.cuda.synchronize()
    buf.check_comm()
    return y, stats


@pytest.mark.parametrize('mma_type', ['fp4xfp4', 'fp8xfp4'])
@pytest.mark.parametrize('shape', [dict(t=37, e=8, topk=3, h=512, i=256), dict(t=100, e=16, topk=6, h=1024, i=512),
                                   dict(t=24, e=8, topk=6, h=7168, i=2048)])
@pytest.mark.parametrize('clamp', [None, 3.0])
def test_matches_reference(mma_type, shape, clamp):
    buf, l1, l2 = _problem(mma_type, seed=shape['t'], **shape)
    t = shape['t']
    alphas = {}
    if mma_type == 'fp4xfp4':
        e = shape['e']
        alphas = dict(l1_alphas=torch.rand(e, 2, device='cuda') + 0.5, l2_alphas=torch.rand(e, device='cuda') + 0.5,
                      a2_scales=torch.rand(e, device='cuda') + 0.5)
    y, stats = _run(buf, l1, l2, t, clamp, **alphas)
    y_ref, stats_ref = _reference(buf, l1, l2, t, clamp, **alphas)
    assert not y.isnan().any()
    assert relative_error(y, y_ref) < TOL[mma_type]
    assert torch.equal(stats, stats_ref) and stats[1].item() == 0
    y2, _ = _run(buf, l1, l2, t, clamp, **alphas)
    assert torch.equal(y.view(torch.int16), y2.view(torch.int16)), 'not bitwise stable run to run'


@pytest.mark.parametrize('mma_type', ['fp4xfp4', 'fp8xfp4'])
def test_waves_and_graph(mma_type):
    """A call longer than one wave equals the reference; a captured call replays to the same bits."""
    buf, l1, l2 = _problem(mma_type, t=300, e=8, topk=4, h=512, i=256, seed=7)
    if len(buf.waves(300)) < 2:
        pytest.skip('this buffer runs 300 tokens as one wave')
    y, _ = _run(buf, l1, l2, 300, None)
    y_ref, _ = _reference(buf, l1, l2, 300, None)
    assert relative_error(y, y_ref) < TOL[mma_type]
    out = torch.empty_like(y)
    sm100.run_fused(out, l1, l2, buf)                     # warm-up: JIT and tensor maps outside the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        sm100.run_fused(out, l1, l2, buf)
    out.fill_(float('nan'))
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out.view(torch.int16), y.view(torch.int16))


def test_auto_declines_fp8_nvfp4_numerics():
    buf = deep_gemm.get_symm_buffer_for_mega_moe(None, 8, 16, 2, 512, 256, mma_type='fp8xnvfp4', device='cuda')
    assert api.select_backend('auto', buf.device) == 'sm100'
    assert sm100.unsupported(buf, None, None)


@pytest.mark.parametrize('entry', ['fp8_nvfp4_mega_moe', 'bf16_mega_moe'])
@pytest.mark.parametrize('shape', [dict(t=37, e=8, topk=3, h=512, i=256), dict(t=24, e=8, topk=6, h=7168, i=2048)])
def test_f16_recipes_match_reference(entry, shape):
    """The fused kernel's kind::f16 recipes through the public entries (backend='sm100') against the
    reference backend on the same buffer and weights (written for a CC 10.x GPU; not run here)."""
    t, e, topk, h, i = (shape[k] for k in ('t', 'e', 'topk', 'h', 'i'))
    gen = torch.Generator().manual_seed(t)
    kind = 'fp8xnvfp4' if entry == 'fp8_nvfp4_mega_moe' else 'bf16xbf16'
    buf = deep_gemm.get_symm_buffer_for_mega_moe(None, e, t, topk, h, i, mma_type=kind, device='cuda')
    if kind == 'fp8xnvfp4':
        buf.x[:t].copy_((torch.randn(t, h, generator=gen) * 2).to(torch.float8_e4m3fn).cuda())
        buf.x_sf[:t].copy_(torch.exp2(torch.randint(-3, 3, (t, h // 32), generator=gen).float()).cuda())
        l1, l2 = (w100.to_sm100_exact(_weights('nvfp4', e, n, k, kind_, gen))
                  for n, k, kind_ in ((2 * i, h, 'l1'), (h, i, 'l2')))
    else:
        buf.x[:t].copy_(torch.randn(t, h, generator=gen).to(torch.bfloat16).cuda())
        l1, l2 = (w100.transform_bf16_weights_for_sm100((torch.randn(e, n, k, generator=gen) / k ** 0.5)
                                                        .to(torch.bfloat16).cuda(), kind_)
                  for n, k, kind_ in ((2 * i, h, 'l1'), (h, i, 'l2')))
    buf.topk_idx[:t].copy_(torch.randint(0, e, (t, topk), generator=gen).cuda())
    buf.topk_weights[:t].copy_(torch.rand(t, topk, generator=gen).cuda())
    fn = getattr(deep_gemm, entry)
    y = torch.full((t, h), float('nan'), dtype=torch.bfloat16, device='cuda')
    fn(y, l1, l2, buf, backend='sm100')
    torch.cuda.synchronize()
    buf.check_comm()
    y_ref = torch.empty_like(y)
    fn(y_ref, l1, l2, buf, backend='reference')
    assert not y.isnan().any()
    assert relative_error(y, y_ref) < 1e-2
