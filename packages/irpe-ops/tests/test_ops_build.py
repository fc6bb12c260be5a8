"""Package metadata, build information and the extension loader's version checks."""

from __future__ import annotations

import re
import subprocess
import sys
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
        "FUSED_ATTENTION_DEVICES",
        "__version__",
        "build_info",
        "bucket_sum",
        "cuda_built",
        "rpe_attention",
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


_TOOLS = "pip install scikit-build-core pybind11 cmake ninja"
_REBUILD = "pip install --no-build-isolation ./packages/irpe-ops"


def test_another_torch_minor_names_both_versions_and_a_rebuild_command() -> None:
    major, minor = torch.__version__.split(".")[:2]
    other = f"{major}.{int(minor) + 1}.0+cpu"
    with pytest.raises(ImportError) as caught:
        _library.check_build(_info(torch_version=other), "0.1.0")
    message = str(caught.value)
    assert f"built against torch {other}" in message
    assert f"running torch {torch.__version__}" in message
    assert _TOOLS in message and _REBUILD in message


def _failing_import() -> None:
    raise ImportError("_C.so: undefined symbol: _ZN3c1017SomethingFromAnotherTorch")


def test_a_binary_that_cannot_load_names_both_versions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_library, "_import_extension", _failing_import)
    meta = {"TORCH_VERSION": "2.13.0+cpu", "CUDA": False}
    monkeypatch.setattr(_library, "_build_meta", meta.get)
    with pytest.raises(ImportError) as caught:
        _library.load_extension()
    message = str(caught.value)
    assert "built against torch 2.13.0+cpu" in message
    assert f"running torch {torch.__version__}" in message
    assert "undefined symbol" in message
    assert _TOOLS in message and _REBUILD in message


def test_a_binary_without_build_metadata_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_library, "_import_extension", _failing_import)
    monkeypatch.setattr(_library, "_build_meta", lambda name: None)
    with pytest.raises(ImportError, match=re.escape("built against an unknown torch")):
        _library.load_extension()


def test_build_metadata_beside_the_binary_matches_it() -> None:
    built = _library._build_meta("TORCH_VERSION")
    if built is None:
        pytest.skip("irpe_ops/_build_meta.py is missing: a build older than the metadata module")
    info = irpe_ops.build_info()
    assert built == info["torch_version"]
    assert _library._build_meta("VERSION") == info["version"]
    assert _library._build_meta("CUDA") == (info["cuda_version"] is not None)


def test_a_cuda_build_under_a_cpu_only_torch_says_which_wheel_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_library, "_import_extension", _failing_import)
    meta = {"TORCH_VERSION": "2.14.1+cu130", "CUDA": True, "VERSION": "0.1.0+pt214cu130"}
    monkeypatch.setattr(_library, "_build_meta", meta.get)
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(ImportError) as caught:
        _library.load_extension()
    message = str(caught.value)
    assert "0.1.0+pt214cu130) holds CUDA kernels" in message
    assert "CPU-only irpe-ops wheel" in message and "IRPE_WITH_CUDA=OFF" in message


def test_an_unloadable_binary_is_reported_end_to_end() -> None:
    """A fresh interpreter in which ``irpe_ops._C`` cannot be imported at all."""
    code = (
        "import sys, torch\n"
        "sys.modules['irpe_ops._C'] = None  # makes `from irpe_ops import _C` raise ImportError\n"
        "try:\n"
        "    import irpe_ops\n"
        "except ImportError as err:\n"
        "    print(err)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert "cannot load the compiled extension irpe_ops._C" in done.stdout
    assert f"running torch {torch.__version__}" in done.stdout
    built = _library._build_meta("TORCH_VERSION")
    if built is not None:
        assert f"built against torch {built}" in done.stdout
    assert _REBUILD in done.stdout
