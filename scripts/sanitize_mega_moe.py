"""Two small fused Mega MoE calls (one rank, 8 SMs, 12 tokens in two waves of at most 8), for
compute-sanitizer.

    compute-sanitizer --tool memcheck --report-api-errors no python scripts/sanitize_mega_moe.py
    compute-sanitizer --tool racecheck python scripts/sanitize_mega_moe.py
    compute-sanitizer --tool synccheck python scripts/sanitize_mega_moe.py

Prints the relative error against the float64 reference.  (--report-api-errors no: cuda-bindings
probes driver entry points that do not exist, which memcheck reports as API errors.)
"""
import os, sys
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)
sys.path.insert(0, os.path.join(_ROOT, 'tests'))
import torch
import deep_gemm
from conftest import _make_problem  # noqa: E402
from deep_gemm.reference import reference_mega_moe
from deep_gemm.utils import relative_error
os.environ['DG_MEGA_MOE_FUSED'] = '1'
deep_gemm.set_num_sms(8)
p = _make_problem(seed=3, t=12, hidden=256, inter=128, experts=8, topk=3)
buf = deep_gemm.get_symm_buffer_for_mega_moe(None, p.experts, 16, p.topk, p.hidden, p.inter, num_max_tokens_per_wave=8)
assert buf.num_waves(p.t) == 2
l1, l2 = deep_gemm.transform_nvfp4_weights_for_mega_moe({k: v.cuda() for k, v in p.l1.items()},
                                                        {k: v.cuda() for k, v in p.l2.items()})
for n in ('x', 'x_sf', 'topk_idx', 'topk_weights'):
    getattr(buf, n)[:p.t].copy_(getattr(p, n))
y = torch.full((p.t, p.hidden), float('nan'), dtype=torch.bfloat16, device='cuda')
for _ in range(2):
    deep_gemm.fp8_nvfp4_mega_moe(y, l1, l2, buf, backend='sm90')
torch.cuda.synchronize()
ref = reference_mega_moe(p.x, p.x_sf, p.topk_idx, p.topk_weights, p.w1, p.w1_alpha, p.w2, p.w2_alpha)
print('rel err', relative_error(y.cpu(), ref))
