"""Backend selection (IRPE_BACKEND) and what each backend is fed."""

from __future__ import annotations

import importlib
import logging

import pytest
import torch
from conftest import HAS_OPS

import irpe_nn
from irpe_nn import rpe as rpe_module

backend_module = importlib.import_module("irpe_nn.backend")


def test_default_backend(monkeypatch):
    monkeypatch.delenv(irpe_nn.BACKEND_ENV, raising=False)
    assert irpe_nn.backend() == ("irpe_ops" if HAS_OPS else "torch")
    monkeypatch.setenv(irpe_nn.BACKEND_ENV, "auto")
    assert irpe_nn.backend() == ("irpe_ops" if HAS_OPS else "torch")


def test_env_forces_torch(monkeypatch):
    monkeypatch.setenv(irpe_nn.BACKEND_ENV, "torch")
    assert irpe_nn.backend() == "torch"
    assert irpe_nn.backend("cuda") == "torch"


def test_env_rejects_unknown_values(monkeypatch):
    monkeypatch.setenv(irpe_nn.BACKEND_ENV, "fast")
    with pytest.raises(ValueError, match="IRPE_BACKEND='fast'"):
        irpe_nn.backend()


def test_forcing_missing_ops_is_an_error(monkeypatch):
    monkeypatch.setenv(irpe_nn.BACKEND_ENV, "irpe_ops")
    monkeypatch.setattr(backend_module, "_ops_module", lambda: None)
    with pytest.raises(RuntimeError, match="not installed"):
        irpe_nn.backend()
    monkeypatch.delenv(irpe_nn.BACKEND_ENV)
    assert irpe_nn.backend() == "torch"


def test_cuda_needs_cuda_kernels(monkeypatch):
    monkeypatch.delenv(irpe_nn.BACKEND_ENV, raising=False)
    monkeypatch.setattr(backend_module, "_ops_module", lambda: object())
    monkeypatch.setattr(backend_module, "_ops_cuda_built", lambda: False)
    assert irpe_nn.backend("cpu") == "irpe_ops"
    assert irpe_nn.backend("cuda") == "torch"
    monkeypatch.setattr(backend_module, "_ops_cuda_built", lambda: True)
    assert irpe_nn.backend(torch.device("cuda", 0)) == "irpe_ops"


def test_index_dtype_per_backend(backend_name, monkeypatch):
    """int32 ids for irpe_ops, int64 for the fallback."""
    seen = []
    original = rpe_module.rpe_index

    def spy(input, index, name):
        seen.append((name, index.dtype))
        return original(input, index, name)

    monkeypatch.setattr(rpe_module, "rpe_index", spy)
    layer = irpe_nn.RPEMultiheadAttention(
        8, 2, rpe_config=irpe_nn.parse_rpe_spec("rpe-2.0-product-ctx-1-k")
    )
    x = torch.randn(6, 1, 8)
    layer(x, x, x, hw=(2, 3))
    expected = torch.int32 if backend_name == "irpe_ops" else torch.int64
    assert seen == [(backend_name, expected)]


def test_fallback_ops_match_definitions():
    """The fallback gather and bucket sum against their definitions, by loops."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 5, generator=gen, dtype=torch.float64).transpose(0, 1)  # strided
    index = torch.randint(0, 5, (4, 6), generator=gen)
    out = backend_module.rpe_index(x, index, "torch")
    weights = torch.randn(3, 2, 4, 6, generator=gen, dtype=torch.float64)
    sums = backend_module.bucket_sum(weights, index, 5, "torch")
    for b in range(3):
        for h in range(2):
            for i in range(4):
                for j in range(6):
                    assert out[b, h, i, j] == x[b, h, i, index[i, j]]
                for k in range(5):
                    want = sum(weights[b, h, i, j] for j in range(6) if index[i, j] == k)
                    torch.testing.assert_close(
                        sums[b, h, i, k], torch.as_tensor(want, dtype=torch.float64)
                    )


def _records(caplog) -> list[tuple[int, str]]:
    name = backend_module.__name__
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == name]


def test_missing_ops_are_logged_at_debug_only(monkeypatch, caplog):
    def missing(name):
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    monkeypatch.setattr(backend_module, "_warned_broken_ops", False)
    with caplog.at_level(logging.DEBUG, logger=backend_module.__name__):
        assert backend_module._import_ops(missing) is None
    records = _records(caplog)
    assert records and all(level == logging.DEBUG for level, _ in records)
    assert "not installed" in records[0][1]


@pytest.mark.parametrize(
    "error",
    [
        ImportError("irpe_ops: ... built against torch 2.13.0, running torch 2.14.1 ..."),
        ModuleNotFoundError("No module named 'irpe_ops._C'", name="irpe_ops._C"),
        OSError("libc10.so: cannot open shared object file"),
    ],
)
def test_installed_but_broken_ops_warn_once(monkeypatch, caplog, error):
    def broken(name):
        raise error

    monkeypatch.setattr(backend_module, "_warned_broken_ops", False)
    with caplog.at_level(logging.DEBUG, logger=backend_module.__name__):
        assert backend_module._import_ops(broken) is None
        assert backend_module._import_ops(broken) is None
    warnings = [message for level, message in _records(caplog) if level == logging.WARNING]
    assert len(warnings) == 1
    assert "installed but failed to import" in warnings[0]
    assert "PyTorch fallback" in warnings[0] and str(error) in warnings[0]
