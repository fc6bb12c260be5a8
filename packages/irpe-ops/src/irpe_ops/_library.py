"""Loading of the compiled extension ``irpe_ops._C``.

Importing ``_C`` runs the extension's static initialisers, which register the ``irpe_ops``
operator schemas and their CPU (and, when built, CUDA) kernels with the torch dispatcher.

Failures raise :class:`ImportError` with a message that says what to do, so that callers with a
fallback (``irpe_nn`` catches ``ImportError``) keep working when the binary does not match.
"""

from __future__ import annotations

import logging
from importlib import metadata
from types import ModuleType
from typing import Any

import torch

__all__ = ["check_build", "load_extension"]

_log = logging.getLogger(__name__)

# Either install the wheel built for the running torch (one per torch x CUDA variant, see
# docs/install.md) or rebuild from a checkout against the installed torch (--no-build-isolation).
_REBUILD_HINT = (
    "Install the irpe-ops wheel built for this torch (docs/install.md), or rebuild it against "
    "the running torch from the root of a checkout of the repository: "
    "`pip install scikit-build-core pybind11 cmake ninja`, then "
    "`pip install --no-build-isolation ./packages/irpe-ops`."
)


def _build_meta(name: str) -> Any:
    """``name`` from ``irpe_ops._build_meta``: what the binary was built against.

    CMake installs that small module beside the extension, so the build can be described even
    when ``_C`` itself cannot be loaded (as for a binary built against another torch, whose
    symbols no longer resolve). ``None`` when it is missing (a build from before it existed).
    """
    try:
        from irpe_ops import _build_meta
    except ImportError:
        return None
    return getattr(_build_meta, name, None)


def _load_failure(err: ImportError) -> ImportError:
    """The ImportError to raise when ``_C`` cannot be loaded: what was built, what runs, the fix."""
    built = _build_meta("TORCH_VERSION")
    if _build_meta("CUDA") and torch.version.cuda is None:
        return ImportError(
            f"irpe_ops: this build ({_build_meta('VERSION')}) holds CUDA kernels, but torch "
            f"{torch.__version__} is a CPU-only build; install the CPU-only irpe-ops wheel "
            f"(the +pt..cpu one, see docs/install.md) or rebuild with IRPE_WITH_CUDA=OFF: {err}"
        )
    built_against = f"torch {built}" if built else "an unknown torch (no build metadata)"
    return ImportError(
        f"irpe_ops: cannot load the compiled extension irpe_ops._C (built against "
        f"{built_against}, running torch {torch.__version__}): {err}. {_REBUILD_HINT}"
    )


def _import_extension() -> ModuleType:
    """``import irpe_ops._C`` (a function so the tests can simulate a failing load)."""
    from irpe_ops import _C

    return _C


def _major_minor(version: str) -> tuple[int, ...]:
    """``"2.14.1+cu130"`` -> ``(2, 14)``."""
    numbers = version.split("+")[0].split(".")[:2]
    return tuple(int("".join(ch for ch in part if ch.isdigit()) or 0) for part in numbers)


def check_build(info: dict[str, Any], package_version: str | None) -> None:
    """Raise :class:`ImportError` when the binary was built for another torch or package version.

    Args:
        info: ``_C.build_info()`` of the loaded binary.
        package_version: the installed ``irpe-ops`` distribution version (``None`` if unknown).
    """
    built = str(info["torch_version"])
    if _major_minor(built) != _major_minor(torch.__version__):
        raise ImportError(
            f"irpe_ops: the compiled extension was built against torch {built}, running torch "
            f"{torch.__version__}; C++ extensions only work with the torch major.minor they were "
            f"built against. {_REBUILD_HINT}"
        )
    if package_version is not None and info["version"] != package_version:
        raise ImportError(
            f"irpe_ops: the compiled extension is version {info['version']} but the installed "
            f"package is {package_version} (a stale build). {_REBUILD_HINT}"
        )


def load_extension() -> ModuleType:
    """Import ``irpe_ops._C`` (registering the operators) and check that it fits this torch.

    Returns:
        The extension module, whose ``build_info()`` describes the binary.

    Raises:
        ImportError: the extension is missing, cannot be loaded (for example undefined symbols
            from another torch build), or was built for another torch major.minor.
    """
    try:
        _C = _import_extension()
    except ImportError as err:
        raise _load_failure(err) from err
    try:
        package_version: str | None = metadata.version("irpe-ops")
    except metadata.PackageNotFoundError:
        package_version = None
    check_build(_C.build_info(), package_version)
    _log.debug("irpe_ops: loaded %s (%s)", _C.__file__, _C.build_info())
    return _C
