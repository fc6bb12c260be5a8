"""Shared fixtures: backend selection, marker handling."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import irpe_nn

HAS_OPS = importlib.util.find_spec("irpe_ops") is not None
if HAS_OPS:
    try:
        import irpe_ops  # noqa: F401
    except Exception:  # an installed but broken build counts as missing
        HAS_OPS = False

BACKENDS = [
    pytest.param("torch", id="torch"),
    pytest.param("irpe_ops", id="irpe_ops", marks=pytest.mark.needs_ops),
]


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    skip_ops = pytest.mark.skip(reason="irpe_ops is not importable")
    for item in items:
        if "needs_cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)
        if "needs_ops" in item.keywords and not HAS_OPS:
            item.add_marker(skip_ops)


@pytest.fixture(params=BACKENDS)
def backend_name(request, monkeypatch) -> str:
    """Runs the test once per backend, forcing it through ``IRPE_BACKEND``."""
    monkeypatch.setenv(irpe_nn.BACKEND_ENV, request.param)
    assert irpe_nn.backend() == request.param
    return request.param


def set_backend(monkeypatch, name: str) -> None:
    monkeypatch.setenv(irpe_nn.BACKEND_ENV, name)
