#!/usr/bin/env python3
"""Single-thread time of each quantizer on one DeepSeek-V4 expert matrix (3072 x 7168, BF16 values of
non-uniform magnitude), next to NVIDIA ModelOpt's own NVFP4 quantizer (the peer) when it is installed.

    python scripts/bench_quant.py [--rows 3072 --cols 7168 --repeats 3]

Prints the best of ``--repeats`` runs per quantizer, and for ``cast_to_nvfp4`` whether its codes and
scales equal ModelOpt's bit for bit.  The budget (the new-user issue): at most 1 s per expert matrix.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

from deep_gemm.utils import (cast_to_mxfp4, cast_to_nvfp4, cast_to_nvfp4_experts,  # noqa: E402
                             per_token_cast_to_fp8, per_token_cast_to_fp4, per_token_cast_to_nvfp4)


def best_of(f, repeats):
    best, out = float('inf'), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = f()
        best = min(best, time.perf_counter() - t0)
    return best, out


def modelopt_peer():
    try:
        from modelopt.torch.quantization.qtensor import NVFP4QTensor
    except Exception as exc:  # noqa: BLE001 - any import failure means: no peer
        return None, f'{type(exc).__name__}: {exc}'.splitlines()[0]
    return NVFP4QTensor, None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--rows', type=int, default=3072)
    ap.add_argument('--cols', type=int, default=7168)
    ap.add_argument('--repeats', type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(args.rows, args.cols, generator=g) * torch.exp(torch.randn(args.rows, 1, generator=g))).bfloat16()
    print(f'one {args.rows} x {args.cols} BF16 matrix, 1 thread, best of {args.repeats}; budget 1.00 s')
    rows = [('cast_to_nvfp4', lambda: cast_to_nvfp4(w)),
            ('cast_to_nvfp4_experts (E=1)', lambda: cast_to_nvfp4_experts(w[None])),
            ('cast_to_mxfp4', lambda: cast_to_mxfp4(w)),
            ('per_token_cast_to_fp8 (gran 128)', lambda: per_token_cast_to_fp8(w, False, 128)),
            ('per_token_cast_to_fp8 (gran 32, ue8m0)', lambda: per_token_cast_to_fp8(w, True, 32)),
            ('per_token_cast_to_fp4 (gran 32, ue8m0)', lambda: per_token_cast_to_fp4(w, True, 32)),
            ('per_token_cast_to_nvfp4', lambda: per_token_cast_to_nvfp4(w))]
    ours = {}
    for name, f in rows:
        dt, out = best_of(f, args.repeats)
        ours[name] = out
        print(f'  {name:42s} {dt:7.3f} s')
    peer, why = modelopt_peer()
    if peer is None:
        print(f'  peer ModelOpt NVFP4QTensor.quantize: not available ({why})')
        return
    dt, (q, scale, gs) = best_of(lambda: peer.quantize(w, 16), args.repeats)
    packed, s, g2 = ours['cast_to_nvfp4']
    same = torch.equal(q._quantized_data.view(torch.uint8), packed) and \
        torch.equal(scale.view(torch.uint8), s.view(torch.uint8)) and float(gs) == float(g2)
    print(f'  {"peer ModelOpt NVFP4QTensor.quantize":42s} {dt:7.3f} s  (cast_to_nvfp4 / peer = '
          f'{best_of(lambda: cast_to_nvfp4(w), 1)[0] / dt:.2f}; bits equal: {same})')


if __name__ == '__main__':
    main()
