"""From a checkpoint on disk to the layer: ``deep_gemm.checkpoint`` and ``deep_gemm.MegaMoE``.

The main fixture builds a tiny DeepSeek-V3-architecture model with transformers (random weights:
hidden 512, MoE intermediate 512, 4 routed experts, top-2, layer 0 dense and layer 1 MoE),
quantizes it with ModelOpt's NVFP4 recipe (``mtq.quantize(model, mtq.NVFP4_DEFAULT_CFG, loop)``)
and writes it with ModelOpt's own Hugging Face exporter (``export_hf_checkpoint``, sharded, with
``model.safetensors.index.json``), all on CPU.  Against that checkpoint:

* the loader returns exactly the exporter's tensors, sliced per rank;
* ``MegaMoE`` equals, bit for bit, a float64 computation of the layer from the checkpoint's tensors
  as read and decoded here with ``safe_open``, independently of the loader (``'fp8xnvfp4'``: the
  layer written out in this file; ``'fp4xfp4'``: ``reference_recipe_moe`` fed with those tensors and
  the alphas built here), on one process and on 2 gloo ranks;
* against ModelOpt's own quantized (fake-quant) forward of the MoE experts where it runs: on a
  GPU.  ModelOpt 0.47 cannot run it on CPU (its NVFP4 activation fake-quant, ``dynamic_block_quant``,
  asserts a CUDA ``amax``), so on CPU the test skips with that reason, and a CPU test instead
  emulates that forward with ModelOpt's own NVFP4 quantizer (``NVFP4QTensor``) on the activations;
* against the unquantized float model's experts (transformers' forward): the NVFP4 error only.

The malformed-checkpoint tests (and the gate / up global-scale and naming tests) write small
checkpoints in the exporter's naming themselves (``cast_to_nvfp4``, ModelOpt's quantizer bit for
bit) and need only ``safetensors``.

Tolerances (relative Frobenius error ``|a - b| / |b|``; measured on this fixture, 2026-12-02):

* ``'fp4xfp4'`` against ModelOpt's fake-quant W4A4 forward: 5e-2 (measured 2.7e-2 against the real
  one on an H200, 1.5e-2 against the CPU emulation).  The quantized operands are the same; the
  difference is upstream's fp4xfp4 numerics, which round gate and up to BF16 before the SwiGLU (and
  the L2 product and each slot's output after it), where ModelOpt keeps float32: a gate / up moved
  by a BF16 rounding (relative 2^-9) moves some NVFP4 codes of the L2 input across a rounding
  boundary, one E2M1 step (up to a third of the value) each.  With gate and up rounded to BF16 in
  the emulation too, the match is 1e-2 (measured 2.9e-3).
* ``'fp8xnvfp4'`` against ModelOpt's weight-only fake-quant forward (activations unquantized): 8e-2
  (measured 3.7e-2): its FP8 E4M3 activations (3 mantissa bits, relative error up to 2^-4 per
  element) against unquantized ones.
* Against the unquantized model (transformers' float forward): 0.35 (measured 0.16 W4A8, 0.22 W4A4:
  the NVFP4 quantization error of random weights; a gate / up mix-up or a lost global scale is of
  order 1 or more).
"""
import json
import math
import os
import subprocess
import sys
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import deep_gemm
from deep_gemm.checkpoint import CheckpointError, ExpertNaming, load_nvfp4_moe_layer
from deep_gemm.reference_recipes import reference_recipe_moe
from deep_gemm.utils import cast_to_nvfp4, per_token_cast_to_fp8, per_token_cast_to_nvfp4, round_to_bf16
from gloo_ranks import init_gloo


H, I, E, K = 512, 512, 4, 2          # hidden, MoE intermediate, routed experts, top-k
LAYER = 1                            # the MoE layer (layer 0 is dense)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                      -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=torch.float64)


def _need(module: str):
    """A test extra (the README's set-up installs transformers, ModelOpt, safetensors): skipped where
    missing, but in CI a failed import is an error, so these comparisons cannot silently vanish."""
    if os.environ.get('CI'):
        import importlib
        return importlib.import_module(module)
    return pytest.importorskip(module)


safetensors_torch = _need('safetensors.torch')
from safetensors import safe_open  # noqa: E402


def _moe(*args, **kwargs):
    """``MegaMoE.from_checkpoint`` on the CPU (the reference backend), whatever the machine has."""
    return deep_gemm.MegaMoE.from_checkpoint(*args, device='cpu', **kwargs)


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


# ------------------------------------------------------------------------- the ModelOpt checkpoint
def _tiny_deepseek_v3(transformers):
    cfg = transformers.DeepseekV3Config(
        vocab_size=256, hidden_size=H, intermediate_size=512, moe_intermediate_size=I, num_hidden_layers=2,
        first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=E,
        n_shared_experts=1, num_experts_per_tok=K, n_group=1, topk_group=1, q_lora_rank=64, kv_lora_rank=64,
        qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32, max_position_embeddings=64,
        routed_scaling_factor=1.0, norm_topk_prob=True, architectures=['DeepseekV3ForCausalLM'])
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(cfg).eval()
    experts = model.model.layers[LAYER].mlp.experts
    with torch.no_grad():   # uneven magnitudes per expert and per row: every scale level is exercised
        g = torch.Generator().manual_seed(1)
        experts.gate_up_proj.mul_(torch.exp(0.5 * torch.randn(E, 2 * I, 1, generator=g)) *
                                  torch.exp(0.5 * torch.randn(E, 1, 1, generator=g)))
        experts.down_proj.mul_(torch.exp(0.5 * torch.randn(E, H, 1, generator=g)))
    return model


@pytest.fixture(scope='module')
def modelopt_ckpt(tmp_path_factory):
    """A tiny DeepSeek-V3 quantized with ModelOpt's NVFP4 recipe and exported by ModelOpt, on CPU; and
    ModelOpt's quantized forward of the MoE experts on some tokens (run before the export, which
    replaces the fused expert parameters), or why it could not run."""
    transformers = _need('transformers')
    mtq = _need('modelopt.torch.quantization')
    mte = _need('modelopt.torch.export')
    model = _tiny_deepseek_v3(transformers)
    experts = model.model.layers[LAYER].mlp.experts
    float_w13 = experts.gate_up_proj.detach().clone()
    float_w2 = experts.down_proj.detach().clone()
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(2))

    def forward_loop(m):
        with torch.no_grad():
            m(calib)
    path = tmp_path_factory.mktemp('modelopt_nvfp4')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        model = mtq.quantize(model, mtq.NVFP4_DEFAULT_CFG, forward_loop)
        amax = float(experts.gate_up_proj_input_quantizer.amax)
        tokens = _tokens(16, seed=6, amax=amax, masked=0.0)
        modelopt_forward = _modelopt_quantized_forward(experts, tokens)
        mte.export_hf_checkpoint(model, export_dir=str(path), max_shard_size='1MB')
    return SimpleNamespace(path=str(path), float_w13=float_w13, float_w2=float_w2, tokens=tokens,
                           modelopt_forward=modelopt_forward)


def _modelopt_quantized_forward(experts, tokens):
    """ModelOpt's quantized (fake-quant) forward of the experts, float32, on a GPU if there is one;
    returns ``(device, y)`` or ``(device, the reason it cannot run)``."""
    device = torch.device('cuda') if torch.cuda.is_available() else torch.device('cpu')
    x, idx, w = tokens
    experts.to(device)
    try:
        with torch.no_grad():
            return device, experts(x.float().to(device), idx.to(device), w.to(device)).cpu()
    except AssertionError as exc:     # ModelOpt 0.47 on CPU: 'amax must be a CUDA tensor for dynamic block ...'
        if 'CUDA' not in str(exc):
            raise
        return device, f'{type(exc).__name__}: {exc}'
    finally:
        experts.to('cpu')


def _tokens(n: int, seed: int, amax: float, masked: float = 0.25):
    """BF16 hidden states (absolute maximum about the calibrated ``amax``) and a routing; with
    ``masked``, that fraction of masked slots and a first token with every slot masked."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, H, generator=g)
    x = (x * (0.9 * amax / x.abs().max())).bfloat16()
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(n)]).to(torch.int64)
    if masked:
        idx[torch.rand(n, K, generator=g) < masked] = -1
        idx[0] = -1
    w = torch.softmax(torch.randn(n, K, generator=g), -1)
    return x, idx, w


def _read(path: str, names):
    """Tensors by name straight from the shards (the test's own reader, not the loader's)."""
    with open(os.path.join(path, 'model.safetensors.index.json')) as f:
        wm = json.load(f)['weight_map']
    out = {}
    for name in names:
        with safe_open(os.path.join(path, wm[name]), 'pt') as f:
            out[name] = f.get_tensor(name)
    return out


def _ckpt_experts(path: str, naming=deep_gemm.checkpoint.EXPERT_NAMINGS['deepseek_v3'], layer=LAYER, experts=E):
    """Per expert and projection: (block-dequantized float64 weights WITHOUT the global scale,
    weight_scale_2, input_scale), decoded here from the raw bytes."""
    names = [naming.name(layer, e, p, t) for e in range(experts) for p in ('gate', 'up', 'down')
             for t in ('weight', 'weight_scale', 'weight_scale_2', 'input_scale')]
    raw = _read(path, names)
    out = {}
    for e in range(experts):
        for p in ('gate', 'up', 'down'):
            get = (lambda t: raw[naming.name(layer, e, p, t)])
            w, s = get('weight'), get('weight_scale')
            codes = torch.stack([w & 0xF, w >> 4], -1).reshape(w.shape[0], -1).long()
            vals = _E2M1[codes] * s.double().repeat_interleave(16, 1)
            out[e, p] = (vals, float(get('weight_scale_2')), float(get('input_scale')))
    return out


def _float64_fp8xnvfp4(x, idx, w, ck, clamp=None):
    """The fp8xnvfp4 layer (docs/design.md) in float64 from the checkpoint's tensors: FP8 tokens with
    float32 per-32 scales, gate / up with their own weight_scale_2, h and each slot's output rounded to
    BF16, slots summed in order in float32."""
    xq, sf = per_token_cast_to_fp8(x, False, 32)
    xf = xq.double() * sf.double().repeat_interleave(32, 1)
    y = torch.zeros(x.shape, dtype=torch.float32)
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            if e < 0:
                continue
            (wg, ag, _), (wu, au, _), (wd, ad, _) = ck[e, 'gate'], ck[e, 'up'], ck[e, 'down']
            gate, up = (wg @ xf[t]) * ag, (wu @ xf[t]) * au
            if clamp is not None:
                gate, up = gate.clamp(max=clamp), up.clamp(-clamp, clamp)
            h = round_to_bf16(F.silu(gate) * up * float(w[t, j])).double()   # one RNE rounding each
            o = round_to_bf16((wd @ h) * ad)
            y[t] += o.float()
    return y.to(torch.bfloat16)


def _fp4xfp4_reference(x, idx, w, ck, experts=E):
    """The fp4xfp4 layer in float64 (``reference_recipe_moe``) fed with the checkpoint's tensors decoded
    here, the alphas built from them: l1 = f32(s_in * weight_scale_2), s_in = the largest gate / up
    input_scale; l2 = down's weight_scale_2; a2 = down's input_scale."""
    s_in = max(ck[e, p][2] for e in range(experts) for p in ('gate', 'up'))
    c, s = per_token_cast_to_nvfp4(x, global_scale=s_in, use_packed_sf=False)
    xv = _E2M1[torch.stack([c.view(torch.uint8) & 0xF, c.view(torch.uint8) >> 4], -1).reshape(x.shape[0], -1).long()]
    xv = (xv * s.double().repeat_interleave(16, 1)).float()
    w1 = torch.stack([torch.cat([ck[e, 'gate'][0], ck[e, 'up'][0]]) for e in range(experts)]).float()
    w2 = torch.stack([ck[e, 'down'][0] for e in range(experts)]).float()
    ws2 = torch.tensor([[ck[e, 'gate'][1], ck[e, 'up'][1]] for e in range(experts)], dtype=torch.float32)
    l1_alphas = torch.tensor(s_in, dtype=torch.float32) * ws2
    l2_alphas = torch.tensor([ck[e, 'down'][1] for e in range(experts)], dtype=torch.float32)
    a2 = torch.tensor([ck[e, 'down'][2] for e in range(experts)], dtype=torch.float32)
    return reference_recipe_moe('fp4xfp4', xv, idx, w, w1, w2, None, num_experts=experts, l1_alphas=l1_alphas,
                                l2_alphas=l2_alphas, a2_scales=a2)


def _l1_amax(path):
    return deep_gemm.load_nvfp4_moe_layer(path, LAYER).l1_input_scale * 2688.0


# ------------------------------------------------------------------------------------------ tests
def test_modelopt_export_is_read_exactly(modelopt_ckpt):
    path = modelopt_ckpt.path
    files = os.listdir(path)
    assert 'model.safetensors.index.json' in files and sum(f.endswith('.safetensors') for f in files) > 1
    naming = deep_gemm.checkpoint.EXPERT_NAMINGS['deepseek_v3']
    for rank in range(2):
        layer = load_nvfp4_moe_layer(path, LAYER, rank=rank, num_ranks=2)
        assert layer.naming == naming and (layer.hidden, layer.intermediate, layer.num_experts) == (H, I, E)
        assert list(layer.experts) == [2 * rank, 2 * rank + 1]
        for n, e in enumerate(layer.experts):
            raw = _read(path, [naming.name(LAYER, e, p, t) for p in ('gate', 'up', 'down')
                               for t in ('weight', 'weight_scale', 'weight_scale_2', 'input_scale')])
            get = lambda p, t: raw[naming.name(LAYER, e, p, t)]  # noqa: E731
            assert torch.equal(layer.l1['weight'][n], torch.cat([get('gate', 'weight'), get('up', 'weight')]))
            assert torch.equal(layer.l1['weight_scale'][n].view(torch.uint8),
                               torch.cat([get('gate', 'weight_scale'), get('up', 'weight_scale')]).view(torch.uint8))
            assert layer.l1['weight_scale_2'][n].tolist() == [get('gate', 'weight_scale_2').item(),
                                                              get('up', 'weight_scale_2').item()]
            assert torch.equal(layer.l2['weight'][n], get('down', 'weight'))
            assert layer.l2['input_scale'][n].item() == get('down', 'input_scale').item()
        # the exporter's fused experts share one input quantizer: one L1 input scale for the layer
        assert bool((layer.l1['input_scale'] == layer.l1_input_scale).all())
        fp4 = layer.fp4_fp4_weights()
        assert torch.equal(fp4['l1_alphas'], torch.tensor(layer.l1_input_scale) * layer.l1['weight_scale_2'])
        assert fp4['l1_weights'][1].dtype == torch.int32 and fp4['l1_weights'][1].shape == (2, 2 * I, H // 64)
    with pytest.raises(CheckpointError, match='layer 0: no routed experts'):
        load_nvfp4_moe_layer(path, 0)          # the dense layer


def test_megamoe_matches_float64_layer_from_checkpoint(modelopt_ckpt):
    path = modelopt_ckpt.path
    ck = _ckpt_experts(path)
    x, idx, w = _tokens(13, seed=3, amax=_l1_amax(path))
    for recipe in ('fp8xnvfp4', 'fp4xfp4'):
        moe = _moe(path, LAYER, None, recipe=recipe, num_max_tokens_per_rank=16)
        assert moe.num_topk == K and moe.experts == range(E)
        stats = torch.zeros(E, dtype=torch.int32)
        y = moe(x, idx, w, cumulative_local_expert_recv_stats=stats)
        assert y.dtype == torch.bfloat16 and y.shape == (13, H) and bool(torch.isfinite(y.float()).all())
        assert torch.equal(y[0], torch.zeros(H, dtype=torch.bfloat16))          # every slot masked
        assert stats.tolist() == [int((idx == e).sum()) for e in range(E)]
        want = _float64_fp8xnvfp4(x, idx, w, ck) if recipe == 'fp8xnvfp4' else _fp4xfp4_reference(x, idx, w, ck)
        assert torch.equal(y, want), (recipe, rel(y, want))
        moe.destroy()


def test_megamoe_close_to_unquantized_model(modelopt_ckpt):
    """Against transformers' own forward of the experts with the float weights (before quantization)."""
    path = modelopt_ckpt.path
    x, idx, w = _tokens(16, seed=4, amax=_l1_amax(path), masked=0.0)
    w13, w2 = modelopt_ckpt.float_w13.double(), modelopt_ckpt.float_w2.double()
    y_float = torch.zeros(16, H, dtype=torch.float64)
    for t in range(16):
        for j in range(K):
            e = int(idx[t, j])
            if e < 0:
                continue
            gate, up = (w13[e] @ x[t].double()).chunk(2)
            y_float[t] += w[t, j].double() * (w2[e] @ (F.silu(gate) * up))
    for recipe, tol in (('fp8xnvfp4', 0.35), ('fp4xfp4', 0.35)):
        y = _moe(path, LAYER, recipe=recipe, num_max_tokens_per_rank=16)(x, idx, w)
        print(recipe, 'vs unquantized', rel(y, y_float))
        assert rel(y, y_float) < tol, (recipe, rel(y, y_float))


def _nvfp4_fake_quant(qtensor, v, global_scale):
    """ModelOpt's NVFP4 quantize -> dequantize of ``v`` (float32) with the given global scale."""
    gs = torch.tensor(global_scale, dtype=torch.float32)
    q, s, gs = qtensor.NVFP4QTensor.quantize(v.float().clone(), 16, weights_scaling_factor_2=gs)
    return q.dequantize(dtype=torch.float32, scale=s, double_scale=gs, block_sizes={-1: 16})


def test_matches_modelopt_fake_quant_emulated_on_cpu(modelopt_ckpt):
    """ModelOpt's fake-quant forward of the experts, emulated with ModelOpt's own NVFP4 quantizer on CPU
    (its activation fake-quant kernel is CUDA-only): weights from the checkpoint, the tokens and the L2
    input quantized with the exported input scales, float32 elsewhere, as the HF forward computes.
    ``bf16_gate_up``: gate and up rounded to BF16 before the SwiGLU, as the fp4xfp4 recipe does."""
    qtensor = _need('modelopt.torch.quantization.qtensor')
    path = modelopt_ckpt.path
    ck = _ckpt_experts(path)
    x, idx, w = _tokens(16, seed=5, amax=_l1_amax(path), masked=0.0)
    cases = (('fp4xfp4', True, False, 5e-2), ('fp4xfp4', True, True, 1e-2), ('fp8xnvfp4', False, False, 8e-2))
    ys = {r: _moe(path, LAYER, recipe=r, num_max_tokens_per_rank=16)(x, idx, w)
          for r in ('fp4xfp4', 'fp8xnvfp4')}
    for recipe, quant_acts, bf16_gate_up, tol in cases:
        y_mo = torch.zeros(16, H)
        for t in range(16):
            for j in range(K):
                e = int(idx[t, j])
                (wg, ag, s_in), (wu, au, _), (wd, ad, a2) = ck[e, 'gate'], ck[e, 'up'], ck[e, 'down']
                xt = x[t:t + 1].float()
                xt = _nvfp4_fake_quant(qtensor, xt, s_in) if quant_acts else xt
                gate, up = xt @ (wg * ag).float().T, xt @ (wu * au).float().T
                if bf16_gate_up:
                    gate, up = gate.bfloat16().float(), up.bfloat16().float()
                h = F.silu(gate) * up
                h = _nvfp4_fake_quant(qtensor, h, a2) if quant_acts else h
                y_mo[t] += (h @ (wd * ad).float().T)[0] * w[t, j]
        err = rel(ys[recipe], y_mo)
        print(f'{recipe} vs ModelOpt emulation (BF16 gate/up: {bf16_gate_up}): {err:.2e}')
        assert err < tol, (recipe, bf16_gate_up, err)


def test_matches_modelopt_quantized_forward(modelopt_ckpt):
    """ModelOpt's own quantized forward of the MoE experts (fake quant), where it runs (a GPU)."""
    device, y_mo = modelopt_ckpt.modelopt_forward
    if isinstance(y_mo, str):
        pytest.skip(f'ModelOpt cannot run its NVFP4 quantized forward on {device}: {y_mo}')
    x, idx, w = modelopt_ckpt.tokens
    moe = deep_gemm.MegaMoE.from_checkpoint(modelopt_ckpt.path, LAYER, recipe='fp4xfp4', num_max_tokens_per_rank=16,
                                            device=device)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')       # fp4xfp4 runs the reference backend on a GPU, with a warning
        y = moe(x.to(device), idx.to(device), w.to(device)).cpu()
    print('fp4xfp4 vs modelopt quantized forward', rel(y, y_mo))
    assert rel(y, y_mo) < 5e-2, rel(y, y_mo)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a GPU')
def test_cuda_module_and_graph_capture(modelopt_ckpt):
    """On a GPU: both recipes match their CPU results, and ``forward`` is captured into a CUDA graph (no
    host sync) whose replays follow new inputs.  fp8xnvfp4 runs the sm90 kernels on a Hopper GPU: they
    accumulate in FP32 on the tensor cores with a fast-math SiLU where the reference is exact, so BF16
    roundings differ (H200, 2026-12-02: 4.6e-3, about one BF16 ulp on half the elements), within the
    GPU tests' 1e-2; fp4xfp4 runs the reference on the GPU (measured equal)."""
    path = modelopt_ckpt.path
    x, idx, w = _tokens(13, seed=8, amax=_l1_amax(path))
    x2, idx2, w2 = _tokens(13, seed=9, amax=_l1_amax(path))
    dev = torch.device('cuda')
    for recipe in ('fp8xnvfp4', 'fp4xfp4'):
        y_cpu = _moe(path, LAYER, recipe=recipe, num_max_tokens_per_rank=16)(x, idx, w)
        moe = deep_gemm.MegaMoE.from_checkpoint(path, LAYER, recipe=recipe, num_max_tokens_per_rank=16, device=dev)
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')   # fp4xfp4: the reference backend on the GPU, with a warning
            y = moe(x.to(dev), idx.to(dev), w.to(dev)).cpu()
        print(f'{recipe} cuda vs cpu: {rel(y, y_cpu):.2e}, {(y != y_cpu).sum().item()} of {y.numel()} differ')
        assert rel(y, y_cpu) < 1e-2, (recipe, rel(y, y_cpu))
        if recipe != 'fp8xnvfp4' or deep_gemm.mega.select_backend('auto', dev) != 'sm90':
            continue
        sx, sidx, sw = x.to(dev), idx.to(dev), w.to(dev)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            sy = moe(sx, sidx, sw)
        for xs, ids, ws in ((x2, idx2, w2), (x, idx, w)):
            sx.copy_(xs.to(dev))
            sidx.copy_(ids.to(dev))
            sw.copy_(ws.to(dev))
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(sy.cpu(), moe(xs.to(dev), ids.to(dev), ws.to(dev)).cpu())
        moe.destroy()


# ---------------------------------------------------------------------------------------- 2 ranks
def _rank_worker(rank, world, port, path, counts, out_dir):
    init_gloo(rank, world, port, timeout_s=90)
    try:
        data = torch.load(os.path.join(out_dir, 'tokens.pt'))
        lo, n = sum(counts[:rank]), counts[rank]
        res = {}
        for recipe in ('fp8xnvfp4', 'fp4xfp4'):
            moe = _moe(path, LAYER, dist.group.WORLD, recipe=recipe,
                       num_max_tokens_per_rank=max(counts))
            assert moe.experts == range(rank * E // world, (rank + 1) * E // world)
            assert moe.l1.num_experts == E // world
            res[recipe] = moe(*(v[lo:lo + n] for v in data))
            moe.destroy()
        torch.save(res, os.path.join(out_dir, f'rank{rank}.pt'))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_match_single_process(modelopt_ckpt, spawn_ranks, tmp_path):
    path = modelopt_ckpt.path
    counts = [9, 6]
    x, idx, w = _tokens(sum(counts), seed=7, amax=_l1_amax(path))
    torch.save((x, idx, w), tmp_path / 'tokens.pt')
    spawn_ranks(_rank_worker, 2, args=(path, counts, str(tmp_path)), timeout_s=240)
    parts = [torch.load(tmp_path / f'rank{r}.pt') for r in range(2)]
    ck = _ckpt_experts(path)
    for recipe in ('fp8xnvfp4', 'fp4xfp4'):
        y = torch.cat([p[recipe] for p in parts])
        want = _float64_fp8xnvfp4(x, idx, w, ck) if recipe == 'fp8xnvfp4' else _fp4xfp4_reference(x, idx, w, ck)
        assert torch.equal(y, want), recipe


# ------------------------------------------------------------------ checkpoints written here
def _write_checkpoint(path, naming=deep_gemm.checkpoint.EXPERT_NAMINGS['deepseek_v3'], layer=3, experts=4, hidden=256,
                      inter=256, shards=3, seed=0, index=True, config=True):
    """A ModelOpt-style NVFP4 checkpoint of one MoE layer in the exporter's naming, quantized with
    ``cast_to_nvfp4`` (ModelOpt's ``NVFP4QTensor.quantize`` bit for bit), gate and up each with its
    own global scale, per-expert input scales.  Returns ``{name: file}``."""
    os.makedirs(path, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for e in range(experts):
        for p, (n, k) in (('gate', (inter, hidden)), ('up', (inter, hidden)), ('down', (hidden, inter))):
            mag = {'gate': 0.02, 'up': 0.07, 'down': 0.03}[p] * math.exp(0.3 * e)
            wt = (torch.randn(n, k, generator=g) * mag * torch.exp(0.5 * torch.randn(n, 1, generator=g))).bfloat16()
            packed, scale, gs = cast_to_nvfp4(wt)
            tensors[naming.name(layer, e, p, 'weight')] = packed
            tensors[naming.name(layer, e, p, 'weight_scale')] = scale
            tensors[naming.name(layer, e, p, 'weight_scale_2')] = gs.reshape(())
            amax = {'gate': 3.0, 'up': 3.0, 'down': 0.5}[p] * (1 + 0.1 * e)
            tensors[naming.name(layer, e, p, 'input_scale')] = torch.tensor(amax / 2688.0, dtype=torch.float32)
    tensors['model.embed_tokens.weight'] = torch.zeros(8, hidden, dtype=torch.bfloat16)
    names = sorted(tensors)
    files = {}
    for s in range(shards if index else 1):
        part = names[s::shards] if index else names
        fname = f'model-{s + 1:05d}-of-{shards:05d}.safetensors' if index else 'model.safetensors'
        safetensors_torch.save_file({n: tensors[n].contiguous() for n in part}, os.path.join(path, fname))
        files.update({n: fname for n in part})
    if index:
        with open(os.path.join(path, 'model.safetensors.index.json'), 'w') as f:
            json.dump({'metadata': {}, 'weight_map': files}, f)
    with open(os.path.join(path, 'hf_quant_config.json'), 'w') as f:
        json.dump({'producer': {'name': 'modelopt'}, 'quantization': {'quant_algo': 'NVFP4', 'group_size': 16}}, f)
    if config:
        with open(os.path.join(path, 'config.json'), 'w') as f:
            json.dump({'hidden_size': hidden, 'moe_intermediate_size': inter, 'n_routed_experts': experts,
                       'num_experts_per_tok': 2}, f)
    return files


def _rewrite(path, files, name, value=None):
    """Replace (or, with ``value=None``, delete) one tensor in its shard."""
    fname = os.path.join(path, files[name])
    with safe_open(fname, 'pt') as f:
        d = {k: f.get_tensor(k) for k in f.keys()}
    if value is None:
        del d[name]
    else:
        d[name] = value
    safetensors_torch.save_file(d, fname)


def test_gate_and_up_keep_their_own_global_scales(tmp_path):
    files = _write_checkpoint(tmp_path)
    naming = deep_gemm.checkpoint.EXPERT_NAMINGS['deepseek_v3']
    layer = load_nvfp4_moe_layer(tmp_path, 3)
    ws2 = layer.l1['weight_scale_2']
    assert bool((ws2[:, 0] != ws2[:, 1]).all())        # up has 3.5x the magnitude: another global scale
    assert layer.l1_input_scale == max(float(v) for v in layer.l1['input_scale'].flatten())
    l1, l2 = layer.fp8_nvfp4_weights()
    L1, L2 = deep_gemm.transform_nvfp4_weights_for_mega_moe(l1, l2)
    assert torch.equal(L1.alpha, ws2)                    # the alphas are the two scales, unfolded
    ck = _ckpt_experts(str(tmp_path), naming, layer=3, experts=4)
    gx = torch.Generator().manual_seed(9)
    x = (torch.randn(7, 256, generator=gx) * 2).bfloat16()
    idx = torch.stack([torch.randperm(4, generator=gx)[:2] for _ in range(7)])
    w = torch.rand(7, 2, generator=gx)
    moe = _moe(tmp_path, 3, num_max_tokens_per_rank=8, activation_clamp=0.3)
    assert moe.activation_clamp == 0.3
    assert torch.equal(moe(x, idx, w), _float64_fp8xnvfp4(x, idx, w, ck, clamp=0.3))
    fp4 = layer.fp4_fp4_weights()
    assert torch.equal(fp4['l1_alphas'], (torch.tensor(layer.l1_input_scale) * ws2))
    assert torch.equal(fp4['a2_scales'], layer.l2['input_scale']) and torch.equal(fp4['l2_alphas'],
                                                                                     layer.l2['weight_scale_2'])
    assert files


@pytest.mark.parametrize('pattern', ['auto', 'deepseek_v4', 'layers.{layer}.ffn.experts.{expert}.{proj}'])
def test_expert_namings(tmp_path, pattern):
    v4 = deep_gemm.checkpoint.EXPERT_NAMINGS['deepseek_v4']
    _write_checkpoint(tmp_path, naming=v4, layer=0, index=False, config=False)
    if pattern.startswith('layers.'):
        pattern = ExpertNaming(pattern, gate='w1', up='w3', down='w2')
    layer = load_nvfp4_moe_layer(tmp_path / 'model.safetensors' if pattern == 'auto' else tmp_path, 0,
                                 expert_pattern=pattern, rank=1, num_ranks=2)
    assert layer.naming.gate == 'w1' and layer.num_experts == 4 and list(layer.experts) == [2, 3]
    assert (layer.hidden, layer.intermediate) == (256, 256)        # from the tensors (no config.json)
    with pytest.raises(CheckpointError, match=r'model\.layers\.0\.mlp\.experts\.0\.gate_proj\.weight: missing'):
        load_nvfp4_moe_layer(tmp_path, 0, expert_pattern='qwen_moe')
    with pytest.raises(ValueError, match='lacks {expert}'):
        load_nvfp4_moe_layer(tmp_path, 0, expert_pattern='layers.{layer}.{proj}')


_N = 'model.layers.3.mlp.experts.{e}.{p}.{t}'


def _bad(name, value):
    return lambda path, files: _rewrite(path, files, name, value)


def _drop_from_index(name):
    def mutate(path, files):
        _rewrite(path, files, name)
        idx = os.path.join(path, 'model.safetensors.index.json')
        with open(idx) as f:
            d = json.load(f)
        del d['weight_map'][name]
        with open(idx, 'w') as f:
            json.dump(d, f)
    return mutate


def _remove_shard(name):
    return lambda path, files: os.remove(os.path.join(path, files[name]))


def _set_quant_algo(path, files):
    with open(os.path.join(path, 'hf_quant_config.json'), 'w') as f:
        json.dump({'quantization': {'quant_algo': 'FP8'}}, f)


_DOWN_W = _N.format(e=2, p='down_proj', t='weight')
_UP_S = _N.format(e=1, p='up_proj', t='weight_scale')
_GATE_S2 = _N.format(e=3, p='gate_proj', t='weight_scale_2')
_DOWN_IN = _N.format(e=0, p='down_proj', t='input_scale')
_UP_IN = _N.format(e=1, p='up_proj', t='input_scale')      # read by every rank (the layer's input scale)

MALFORMED = {
    'missing tensor': (_drop_from_index(_DOWN_W), _DOWN_W, 'missing from .*model.safetensors.index.json'),
    'missing from its shard': (_bad(_DOWN_W, None), _DOWN_W,
                               r'missing from .*safetensors \(the index lists it there\)'),
    'missing shard': (_remove_shard(_GATE_S2), _GATE_S2, 'does not exist'),
    'weight dtype': (_bad(_DOWN_W, torch.zeros(256, 128, dtype=torch.int8)), _DOWN_W,
                     'dtype torch.int8, expected torch.uint8'),
    'block scale dtype': (_bad(_UP_S, torch.ones(256, 16)), _UP_S, 'dtype torch.float32, expected torch.float8_e4m3fn'),
    'global scale dtype': (_bad(_GATE_S2, torch.tensor(1e-3, dtype=torch.bfloat16)), _GATE_S2,
                           'dtype torch.bfloat16, expected torch.float32'),
    'weight shape': (_bad(_DOWN_W, torch.zeros(256, 64, dtype=torch.uint8)), _DOWN_W,
                     r'shape \(256, 64\), expected \[256, 128\]'),
    'block scale shape': (_bad(_UP_S, torch.ones(256, 8).to(torch.float8_e4m3fn)), _UP_S,
                          r'shape \(256, 8\), expected \[256, 16\]'),
    'global scale shape': (_bad(_GATE_S2, torch.ones(2) * 1e-3), _GATE_S2, r'shape \(2,\), expected a scalar'),
    'inf global scale': (_bad(_GATE_S2, torch.tensor(float('inf'))), _GATE_S2, 'global scale inf'),
    'nan input scale': (_bad(_UP_IN, torch.tensor(float('nan'))), _UP_IN, 'global scale nan'),
    'zero global scale': (_bad(_GATE_S2, torch.tensor(0.0)), _GATE_S2, 'global scale 0.0, expected a finite positive'),
    'negative input scale': (_bad(_DOWN_IN, torch.tensor(-1e-3)), _DOWN_IN, 'global scale -0.001'),
    'negative block scale': (_bad(_UP_S, (-torch.ones(256, 16)).to(torch.float8_e4m3fn)), _UP_S,
                             'non-negative and finite'),
    'nan block scale': (_bad(_UP_S, torch.full((256, 16), float('nan')).to(torch.float8_e4m3fn)), _UP_S,
                        'non-negative and finite'),
}


@pytest.mark.parametrize('case', sorted(MALFORMED))
def test_malformed_checkpoint_is_rejected(tmp_path, case):
    files = _write_checkpoint(tmp_path)
    mutate, name, msg = MALFORMED[case]
    fname = files[name]
    mutate(str(tmp_path), files)
    # the rank of 2 that reads the tensor (expert e // 2; the L1 input scales are read by every rank)
    rank = {_DOWN_W: 1, _UP_S: 0, _GATE_S2: 1, _DOWN_IN: 0, _UP_IN: 1}[name]
    with pytest.raises(CheckpointError, match=msg) as info:
        load_nvfp4_moe_layer(tmp_path, 3, rank=rank, num_ranks=2)
    text = str(info.value)
    if case != 'missing shard':   # there: the first tensor read from the lost shard, and the shard
        assert name in text, text
    assert (fname if case != 'missing tensor' else 'model.safetensors.index.json') in text, text
    with pytest.raises(CheckpointError):             # and through the module
        _moe(tmp_path, 3, num_max_tokens_per_rank=4)


def test_other_rejections(tmp_path):
    files = _write_checkpoint(tmp_path)
    with pytest.raises(ValueError, match='has 4 experts, which 3 ranks cannot split evenly'):
        load_nvfp4_moe_layer(tmp_path, 3, rank=0, num_ranks=3)
    with pytest.raises(CheckpointError, match='layer 5: no routed experts'):
        load_nvfp4_moe_layer(tmp_path, 5)
    with pytest.raises(CheckpointError, match='no such checkpoint'):
        load_nvfp4_moe_layer(tmp_path / 'nope', 3)
    with pytest.raises(CheckpointError, match=r'experts\.4\.gate_proj\.\w+: missing'):
        load_nvfp4_moe_layer(tmp_path, 3, num_experts=6)     # more experts than the checkpoint has
    _set_quant_algo(str(tmp_path), files)
    with pytest.raises(CheckpointError, match="quant_algo is 'FP8'"):
        load_nvfp4_moe_layer(tmp_path, 3)


def test_module_arguments(tmp_path):
    _write_checkpoint(tmp_path)
    moe = _moe(tmp_path, 3, num_max_tokens_per_rank=4)
    x = torch.zeros(5, 256, dtype=torch.bfloat16)
    idx = torch.zeros(5, 2, dtype=torch.int64)
    w = torch.ones(5, 2)
    with pytest.raises(ValueError, match='5 tokens > num_max_tokens_per_rank = 4'):
        moe(x, idx, w)
    with pytest.raises(ValueError, match='hidden_states: expected shape'):
        moe(torch.zeros(2, 128, dtype=torch.bfloat16), idx[:2], w[:2])
    with pytest.raises(ValueError, match='hidden_states: contains NaN or Inf'):
        moe(torch.full((2, 256), float('nan'), dtype=torch.bfloat16), idx[:2], w[:2])
    with pytest.raises(ValueError, match='topk_idx: expert id 9 out of range'):
        moe(x[:2], torch.full((2, 2), 9), w[:2])
    y = moe(x[:0], idx[:0], w[:0])
    assert y.shape == (0, 256)
    with pytest.raises(ValueError, match='recipe'):
        _moe(tmp_path, 3, recipe='fp8xfp4')
    with pytest.raises(ValueError, match='hidden: 256 must be a multiple of 512'):
        _moe(tmp_path, 3, recipe='fp4xfp4')


def test_casts_without_value_checks_for_capture():
    """``check_finite=False`` (what the module passes while a CUDA graph is captured: no host sync)
    skips the NaN / Inf check; the default keeps it."""
    x = torch.full((2, 64), float('nan'))
    q, sf = deep_gemm.utils.per_token_cast_to_fp8(x, False, 32, check_finite=False)
    assert bool(torch.isnan(sf).all())
    c, s = deep_gemm.utils.per_token_cast_to_nvfp4(x, global_scale=1.0, check_finite=False)
    assert c.shape == (2, 32)
    with pytest.raises(ValueError, match='^x: '):
        deep_gemm.utils.per_token_cast_to_fp8(x, False, 32)
    with pytest.raises(ValueError, match='^x: '):
        deep_gemm.utils.per_token_cast_to_nvfp4(x)


def test_run_moe_layer_script_from_checkpoint(tmp_path):
    _write_checkpoint(tmp_path)
    out = subprocess.run([sys.executable, os.path.join(REPO, 'scripts', 'run_moe_layer.py'), '--checkpoint',
                          str(tmp_path), '--layer', '3', '--tokens', '8'], capture_output=True, text=True,
                         timeout=120, env={**os.environ, 'WORLD_SIZE': '1'})
    assert out.returncode == 0, out.stdout + out.stderr
    assert 'layer 3 of' in out.stdout and 'rel. error vs reference' in out.stdout, out.stdout
