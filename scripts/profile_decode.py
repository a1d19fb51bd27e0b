"""One decode-shaped L1 (SwiGLU) and L2 launch each, for ncu: python scripts/profile_decode.py [tokens_per_expert]."""
import sys

import torch

from deep_gemm.gemm import m_grouped_fp8_nvfp4_gemm_nt_masked
from scripts.bench_grouped_gemm import make_weights

tpe = int(sys.argv[1]) if len(sys.argv) > 1 else 4
e, hidden, inter = 32, 7168, 3072
gen = torch.Generator(device='cuda').manual_seed(0)
l1, l2 = make_weights(e, hidden, inter, gen)
h = torch.randn(e, tpe, hidden, device='cuda', generator=gen).to(torch.bfloat16)
mid = torch.empty(e, tpe, inter, dtype=torch.bfloat16, device='cuda')
y = torch.empty(e, tpe, hidden, dtype=torch.bfloat16, device='cuda')
counts = torch.full((e,), tpe, dtype=torch.int32, device='cuda')
for _ in range(3):
    m_grouped_fp8_nvfp4_gemm_nt_masked(h, l1, mid, counts, tpe, epilogue='swiglu')
    m_grouped_fp8_nvfp4_gemm_nt_masked(mid, l2, y, counts, tpe)
torch.cuda.synchronize()
s, t = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
for name, fn in (('L1', lambda: m_grouped_fp8_nvfp4_gemm_nt_masked(h, l1, mid, counts, tpe, epilogue='swiglu')),
                 ('L2', lambda: m_grouped_fp8_nvfp4_gemm_nt_masked(mid, l2, y, counts, tpe))):
    s.record()
    for _ in range(20):
        fn()
    t.record()
    torch.cuda.synchronize()
    b = sum(x.numel() for x in ((l1.codes, l1.scales) if name == 'L1' else (l2.codes, l2.scales)))
    us = s.elapsed_time(t) / 20 * 1e3
    print(f'{name}: {us:.1f} us, {b / us / 1e3:.0f} GB/s of FP4 weights')
