"""Package metadata, build information and the extension loader's version checks."""

from __future__ import annotations

import re
from importlib import metadata

import pytest
import torch

import irpe_ops
from irpe_ops import _library


def test_version_is_the_distribution_version() -> None:
    assert irpe_ops.__version__ == metadata.version("irpe-ops")


def test_build_info_describes_this_binary() -> None:
    info = irpe_ops.build_info()
    assert set(info) >= {
        "version",
        "torch_version",
        "torch_cuda_version",
        "cuda_version",
        "cuda_archs",
    }
    assert info["version"] == irpe_ops.__version__
    assert info["torch_version"].split(".")[:2] == torch.__version__.split(".")[:2]
    if irpe_ops.cuda_built():
        assert info["cuda_archs"], "a CUDA build must list its architectures"
        assert all(a.startswith(("sm_", "compute_")) for a in info["cuda_archs"])
    else:
        assert info["cuda_version"] is None
        assert info["cuda_archs"] == []


def test_cuda_built_matches_the_registered_kernels() -> None:
    for op in ("irpe_ops::rpe_index", "irpe_ops::bucket_sum"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU")
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA") == irpe_ops.cuda_built()


def test_public_names() -> None:
    assert set(irpe_ops.__all__) == {
        "__version__",
        "build_info",
        "bucket_sum",
        "cuda_built",
        "rpe_index",
    }
    # The CPU output cache is an internal detail, reachable only through private names.
    assert not hasattr(irpe_ops, "empty_cache") and not hasattr(irpe_ops, "cached_bytes")
    assert callable(irpe_ops._empty_cache) and callable(irpe_ops._cached_bytes)


def _info(**overrides: object) -> dict[str, object]:
    info: dict[str, object] = {"version": "0.1.0", "torch_version": torch.__version__}
    info.update(overrides)
    return info


def test_loader_accepts_the_same_torch_minor() -> None:
    major, minor = torch.__version__.split(".")[:2]
    _library.check_build(_info(torch_version=f"{major}.{minor}.99+cpu"), "0.1.0")
    _library.check_build(_info(), None)


def test_loader_refuses_another_torch_minor() -> None:
    major, minor = torch.__version__.split(".")[:2]
    other = f"{major}.{int(minor) + 1}.0"
    with pytest.raises(ImportError, match=re.escape(f"built against torch {other}")):
        _library.check_build(_info(torch_version=other), "0.1.0")


def test_loader_refuses_a_stale_build() -> None:
    with pytest.raises(
        ImportError,
        match=re.escape("extension is version 0.0.9 but the installed package is 0.1.0"),
    ):
        _library.check_build(_info(version="0.0.9"), "0.1.0")
