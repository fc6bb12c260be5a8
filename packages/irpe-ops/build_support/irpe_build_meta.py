"""Build-time metadata of irpe-ops: the torch pin and the version label of a wheel.

A compiled irpe-ops binary only works with the torch release it was built against, so every
wheel requires ``torch==X.Y.*`` of that torch (a looser range let installers put the wheel next
to another torch, whose import then failed). With ``IRPE_LOCAL_VERSION=1`` the version also gets
a local label naming torch and the CUDA variant, ``0.1.0+pt214cu130`` or ``0.1.0+pt213cpu``, as
the wheels of a release carry it (one wheel per torch × CUDA build, like torchvision's). Builds
from a checkout and the sdist keep the plain version.

The CUDA variant is decided here the way ``CMakeLists.txt`` decides whether to compile CUDA
kernels (``IRPE_WITH_CUDA``: ``ON``, ``OFF`` or ``AUTO`` = when torch is a CUDA build and nvcc is
found); CMake checks that the label and its own decision agree, so a label never lies.

This is a scikit-build-core metadata provider (``tool.scikit-build.metadata`` in
pyproject.toml): ``dynamic_metadata(field, settings)`` returns the field's value.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

_TRUE = {"1", "on", "true", "yes"}


def _torch() -> Any:
    try:
        import torch
    except ImportError as err:  # build-system.requires lists torch; this is a broken build env
        raise RuntimeError(f"irpe-ops: torch must be importable to build irpe-ops: {err}") from err
    return torch


def _major_minor(version: str) -> tuple[str, str]:
    major, minor = version.split("+")[0].split(".")[:2]
    return major, minor


def _nvcc_found() -> bool:
    """Whether CMake's CUDA search would find nvcc (CUDACXX, PATH, CUDA_HOME, /usr/local/cuda)."""
    if os.environ.get("CUDACXX"):
        return True
    if shutil.which("nvcc"):
        return True
    roots = (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda")
    return any(root and (Path(root) / "bin" / "nvcc").is_file() for root in roots)


def cuda_variant(torch_cuda: str | None, setting: str) -> str:
    """``"cpu"`` or ``"cu130"``: the kernels a build with ``IRPE_WITH_CUDA=setting`` holds."""
    setting = setting.upper()
    if setting not in {"AUTO", "ON", "OFF"}:
        raise RuntimeError(f"IRPE_WITH_CUDA must be AUTO, ON or OFF, got {setting!r}")
    if setting == "OFF" or torch_cuda is None:
        return "cpu"  # ON with a CPU-only torch fails in CMake with the reason
    if setting == "ON" or _nvcc_found():
        return "cu" + torch_cuda.replace(".", "")
    return "cpu"


def local_label() -> str:
    """``pt214cu130``: the torch major.minor and the CUDA variant of this build."""
    torch = _torch()
    major, minor = _major_minor(torch.__version__)
    variant = cuda_variant(torch.version.cuda, os.environ.get("IRPE_WITH_CUDA", "AUTO"))
    return f"pt{major}{minor}{variant}"


def dynamic_metadata(field: str, settings: Mapping[str, Any] | None = None) -> str | list[str]:
    """The value of ``version`` or ``dependencies`` for this build.

    Args:
        field: the ``[project]`` field asked for.
        settings: the provider's table in pyproject.toml; ``base`` holds the public version.
    """
    settings = settings or {}
    if field == "version":
        base = str(settings["base"])
        labelled = os.environ.get("IRPE_LOCAL_VERSION", "").lower() in _TRUE
        return f"{base}+{local_label()}" if labelled else base
    if field == "dependencies":
        major, minor = _major_minor(_torch().__version__)
        return [f"torch=={major}.{minor}.*"]
    raise RuntimeError(f"irpe_build_meta provides version and dependencies, not {field!r}")
