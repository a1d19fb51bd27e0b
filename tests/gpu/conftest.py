"""GPU test helpers: the Mega MoE tests run both sm90 paths (fused kernel and kernel sequence)."""
import pytest


@pytest.fixture(params=['fused', 'unfused'])
def mega_path(request, monkeypatch):
    monkeypatch.setenv('DG_MEGA_MOE_FUSED', '1' if request.param == 'fused' else '0')
    return request.param
