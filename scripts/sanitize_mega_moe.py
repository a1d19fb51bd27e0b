"""Small fused Mega MoE calls for compute-sanitizer: one rank (8 SMs, 12 tokens in two waves of at
most 8), or ``--ranks N`` ranks emulated on one GPU (8 SMs each; dispatch pulls, combine pushes
and the cross-rank barriers run as on N GPUs).

    compute-sanitizer --tool memcheck --report-api-errors no python scripts/sanitize_mega_moe.py [--ranks 2]
    compute-sanitizer --tool racecheck python scripts/sanitize_mega_moe.py [--ranks 2]
    compute-sanitizer --tool synccheck python scripts/sanitize_mega_moe.py [--ranks 2]

Prints the relative error against the float64 reference.  memcheck and synccheck must be clean.
racecheck reports the pipeline's TMA writes and stage tags against the consumers' reads, a number
that depends on timing: this compute-sanitizer does not order accesses by mbarriers, and reports a
race-free TMA + mbarrier pipeline just as it reports a racy one (scripts/racecheck_probe.py,
docs/perf-notes.md, v15).  DG_GROUPED_GEMM_BLOCK_T picks another tile.  (--report-api-errors no: cuda-bindings
probes driver entry points that do not exist, which memcheck reports as API errors.)
"""
import argparse
import gc
import os
import sys
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)
sys.path.insert(0, os.path.join(_ROOT, 'tests'))
import torch
import deep_gemm
from conftest import _make_problem  # noqa: E402
from deep_gemm.mega import sm90
from deep_gemm.mega.buffer import SymmBuffer
from deep_gemm.reference import reference_mega_moe
from deep_gemm.utils import relative_error

ap = argparse.ArgumentParser()
ap.add_argument('--ranks', type=int, default=1, help='ranks emulated on one GPU (1: a plain buffer)')
args = ap.parse_args()
os.environ['DG_MEGA_MOE_FUSED'] = '1'
world = args.ranks
deep_gemm.set_num_sms(8 * world)
p = _make_problem(seed=3, t=12 * world, hidden=256, inter=128, experts=8 * world, topk=3)
if world == 1:
    bufs = [deep_gemm.get_symm_buffer_for_mega_moe(None, p.experts, 16, p.topk, p.hidden, p.inter,
                                                   num_max_tokens_per_wave=8, mma_type='fp8xnvfp4')]
else:
    bufs = SymmBuffer.emulated_group(world, p.experts, 16, p.topk, p.hidden, p.inter, device='cuda',
                                     num_max_tokens_per_wave=8, timeout_s=60.0, mma_type='fp8xnvfp4')
assert bufs[0].num_waves(12) == 2
e_l = p.experts // world
ls = [deep_gemm.transform_nvfp4_weights_for_mega_moe({k: v[r * e_l:(r + 1) * e_l].cuda() for k, v in p.l1.items()},
                                                     {k: v[r * e_l:(r + 1) * e_l].cuda() for k, v in p.l2.items()})
      for r in range(world)]
for r, buf in enumerate(bufs):
    for n in ('x', 'x_sf', 'topk_idx', 'topk_weights'):
        getattr(buf, n)[:12].copy_(getattr(p, n)[12 * r:12 * (r + 1)])
    sm90.prepare(buf, *ls[r], 12)
ys = [torch.full((12, p.hidden), float('nan'), dtype=torch.bfloat16, device='cuda') for _ in range(world)]
streams = [torch.cuda.Stream() for _ in range(world)]
torch.cuda.synchronize()
gc.disable()   # nothing may synchronise the device between the ranks' launches (SymmBuffer.emulated_group)
for _ in range(2):
    for r in range(world):
        with torch.cuda.stream(streams[r]):
            deep_gemm.fp8_nvfp4_mega_moe(ys[r], *ls[r], bufs[r], backend='sm90')
torch.cuda.synchronize()
gc.enable()
ref = reference_mega_moe(p.x, p.x_sf, p.topk_idx, p.topk_weights, p.w1, p.w1_alpha, p.w2, p.w2_alpha)
print('ranks', world, 'rel err', relative_error(torch.cat(ys).cpu(), ref))
