"""The wheel's metadata: the torch pin and the version label of build_support/irpe_build_meta.py."""

from __future__ import annotations

import importlib.util
from importlib import metadata
from pathlib import Path
from types import ModuleType

import pytest
import torch

import irpe_ops

_PROVIDER = Path(__file__).resolve().parents[1] / "build_support" / "irpe_build_meta.py"


def _major_minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


@pytest.fixture
def provider() -> ModuleType:
    if not _PROVIDER.is_file():
        pytest.skip("build_support/ is not beside the tests (an installed copy of the tests)")
    spec = importlib.util.spec_from_file_location("irpe_build_meta", _PROVIDER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_installed_package_requires_the_torch_it_was_built_against() -> None:
    requires = metadata.requires("irpe-ops") or []
    pins = [r for r in requires if r.startswith("torch") and "extra ==" not in r]
    assert pins == [f"torch=={_major_minor(irpe_ops.build_info()['torch_version'])}.*"]


def test_a_version_label_names_the_torch_and_cuda_variant_of_the_binary() -> None:
    version = metadata.version("irpe-ops")
    if "+" not in version:
        pytest.skip(f"irpe-ops {version} was built without a label (IRPE_LOCAL_VERSION unset)")
    info = irpe_ops.build_info()
    major, minor = _major_minor(info["torch_version"]).split(".")
    cuda = info["cuda_version"]
    variant = "cpu" if cuda is None else "cu" + info["torch_cuda_version"].replace(".", "")
    assert version.split("+")[1] == f"pt{major}{minor}{variant}"


@pytest.mark.parametrize(
    ("torch_cuda", "setting", "expected"),
    [
        (None, "AUTO", "cpu"),
        (None, "ON", "cpu"),  # CMake refuses this build with the reason
        ("13.0", "OFF", "cpu"),
        ("13.0", "on", "cu130"),
        ("12.8", "ON", "cu128"),
    ],
)
def test_cuda_variant_follows_the_build_setting(
    provider: ModuleType, torch_cuda: str | None, setting: str, expected: str
) -> None:
    assert provider.cuda_variant(torch_cuda, setting) == expected


def test_auto_builds_cuda_kernels_only_when_nvcc_is_found(
    provider: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(provider, "_nvcc_found", lambda: False)
    assert provider.cuda_variant("13.0", "AUTO") == "cpu"
    monkeypatch.setattr(provider, "_nvcc_found", lambda: True)
    assert provider.cuda_variant("13.0", "AUTO") == "cu130"


def test_an_unknown_cuda_setting_is_refused(provider: ModuleType) -> None:
    with pytest.raises(RuntimeError, match="IRPE_WITH_CUDA must be AUTO, ON or OFF, got 'MAYBE'"):
        provider.cuda_variant("13.0", "maybe")


def test_the_label_is_added_only_on_request(
    provider: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IRPE_WITH_CUDA", "OFF")
    monkeypatch.delenv("IRPE_LOCAL_VERSION", raising=False)
    assert provider.dynamic_metadata("version", {"base": "0.1.0"}) == "0.1.0"
    monkeypatch.setenv("IRPE_LOCAL_VERSION", "1")
    major, minor = _major_minor(torch.__version__).split(".")
    assert provider.dynamic_metadata("version", {"base": "0.1.0"}) == f"0.1.0+pt{major}{minor}cpu"


def test_the_dependency_pins_the_building_torch(provider: ModuleType) -> None:
    expected = [f"torch=={_major_minor(torch.__version__)}.*"]
    assert provider.dynamic_metadata("dependencies", {}) == expected
