"""Shared helpers for the CPU tests (exposed as fixtures so that no test imports this module)."""
import os
import socket
import time
from types import SimpleNamespace

import pytest
import torch

from deep_gemm.utils import cast_to_nvfp4_experts, dequant_nvfp4, per_token_cast_to_fp8


def _make_problem(seed=0, t=16, hidden=256, inter=128, experts=8, topk=3, mask_frac=0.2, gran_k=32,
                  use_ue8m0=False):
    """A random Mega MoE problem with NVFP4 weights (gate and up with different global scales)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(t, hidden, generator=gen) * torch.exp(torch.randn(t, 1, generator=gen))
    x_fp8, x_sf = per_token_cast_to_fp8(x, use_ue8m0, gran_k)
    scores = torch.rand(t, experts, generator=gen)
    topk_idx = scores.topk(topk, dim=1).indices.to(torch.int64)
    topk_idx[torch.rand(t, topk, generator=gen) < mask_frac] = -1
    topk_weights = torch.rand(t, topk, generator=gen).to(torch.float32)
    # non-uniform weights: per-expert and per-row magnitudes
    row_mag = torch.exp(torch.randn(experts, 2 * inter, 1, generator=gen))
    w1 = torch.randn(experts, 2 * inter, hidden, generator=gen) * row_mag * 0.05
    w1[:, inter:] *= 3.0  # up rows: a different global scale than gate rows
    w2 = torch.randn(experts, hidden, inter, generator=gen) * 0.05
    g_packed, g_scale, g_gs = cast_to_nvfp4_experts(w1[:, :inter])
    u_packed, u_scale, u_gs = cast_to_nvfp4_experts(w1[:, inter:])
    d_packed, d_scale, d_gs = cast_to_nvfp4_experts(w2)
    l1 = {'weight': torch.cat([g_packed, u_packed], 1), 'weight_scale': torch.cat([g_scale, u_scale], 1),
          'weight_scale_2': torch.stack([g_gs, u_gs], 1).contiguous()}
    l2 = {'weight': d_packed, 'weight_scale': d_scale, 'weight_scale_2': d_gs}
    return SimpleNamespace(
        x=x_fp8, x_sf=x_sf, topk_idx=topk_idx, topk_weights=topk_weights, l1=l1, l2=l2,
        w1=dequant_nvfp4(l1['weight'], l1['weight_scale']), w1_alpha=l1['weight_scale_2'],
        w2=dequant_nvfp4(l2['weight'], l2['weight_scale']), w2_alpha=d_gs.reshape(-1, 1).contiguous(),
        t=t, hidden=hidden, inter=inter, experts=experts, topk=topk)


class FakeExpertWeights:
    """Duck-typed stand-in for ``deep_gemm.weights.ExpertWeights`` (float weights kept as is)."""

    def __init__(self, w: torch.Tensor, alpha: torch.Tensor, fmt: str = 'nvfp4'):
        self.w, self.alpha, self.fmt = w, alpha, fmt
        self.num_experts, self.n, self.k = w.shape

    def dequantize(self, experts=None):
        return self.w if experts is None else self.w[list(experts)]


@pytest.fixture
def make_problem():
    return _make_problem


@pytest.fixture
def fake_weights():
    return FakeExpertWeights


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _spawn_ranks(worker, world: int, args=(), timeout_s: float = 180):
    """Run ``worker(rank, world, port, *args)`` in ``world`` spawned processes (a free TCP port for the
    process group); fail the test if they do not all finish within ``timeout_s``."""
    import torch.multiprocessing as mp
    ctx = mp.start_processes(worker, args=(world, _free_port(), *args), nprocs=world, join=False,
                             start_method='spawn')
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f'{world}-process run did not finish in {timeout_s} s')
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join(5)


@pytest.fixture
def spawn_ranks():
    return _spawn_ranks


@pytest.fixture(autouse=True, scope='session')
def _cpu_threads():
    # two cores: keep torch from oversubscribing when tests spawn processes
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield
