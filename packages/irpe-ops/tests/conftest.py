"""Shared fixtures and the ``needs_cuda`` mark of the irpe_ops tests."""

from __future__ import annotations

import pytest
import torch

import irpe_ops

CUDA_READY = torch.cuda.is_available() and irpe_ops.cuda_built()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if CUDA_READY:
        return
    reason = (
        "needs a CUDA device"
        if irpe_ops.cuda_built()
        else "irpe_ops was built without CUDA kernels"
        if torch.cuda.is_available()
        else "needs a CUDA device and irpe_ops built with CUDA kernels"
    )
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "needs_cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def generator() -> torch.Generator:
    """A seeded CPU generator: every test draws the same data on every run."""
    return torch.Generator().manual_seed(1234)
