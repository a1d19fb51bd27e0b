"""Peer kernels measured beside ours in the benchmark scripts (optional: absent binaries or wheels
print one line and the benchmark goes on).

* :mod:`scripts.peers.marlin_nvfp4`: vLLM's Marlin MoE GEMM (``torch.ops._moe_C.moe_wna16_marlin_gemm``,
  NVFP4 weights, BF16 activations), from ``.whl/vllm_moe/_moe_C.abi3.so`` (vllm 0.20.2's binary);
* :mod:`scripts.peers.sgl_mega_moe`: SGLang's DeepGEMM fork, SM90 FP8 Mega MoE (``deep_gemm.fp8_mega_moe``),
  from the wheels in ``.whl/sgl/``, run in its own process (its package is also named ``deep_gemm``).

Only the standard library is imported here, so that the SGLang worker (which runs with another
``deep_gemm`` on its path) can import this package too.
"""
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WHL_DIR = Path(os.environ.get('DG_PEER_WHL_DIR') or REPO / '.whl')


def unavailable(name: str, reason: str) -> str:
    """The one line a benchmark prints for a peer it cannot run."""
    reason = ' '.join(str(reason).split()) or 'unknown reason'
    if len(reason) > 300:
        reason = reason[:297] + '...'
    return f'peer {name}: not available ({reason})'


def ratio(a: float, b: float) -> float:
    """``a / b``, NaN where either is missing or ``b`` is 0."""
    try:
        return a / b if b else float('nan')
    except TypeError:
        return float('nan')
