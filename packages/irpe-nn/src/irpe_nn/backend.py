"""The one place that decides between the compiled ``irpe_ops`` operators and the pure
PyTorch fallback.

``irpe_ops`` is used when it is importable and has kernels for the tensor's device (CPU
always, CUDA iff ``irpe_ops.cuda_built()``). The environment variable ``IRPE_BACKEND``
overrides the choice; it is read at every call (so it can be changed at run time, though a
``torch.compile``-d model keeps the choice it was traced with):

* unset, ``""`` or ``"auto"``: as above;
* ``"torch"``: always the fallback;
* ``"irpe_ops"``: always the operators (an error if they are missing).

Both backends compute the same values; ids are int32 for ``irpe_ops`` (half the memory
traffic) and int64 for the fallback (what ``torch.gather``/``scatter_add_`` require).
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable
from types import ModuleType

import torch

__all__ = ["BACKEND_ENV", "backend", "bucket_sum", "index_dtype", "rpe_index"]

BACKEND_ENV = "IRPE_BACKEND"
"""Environment variable forcing a backend: ``torch``, ``irpe_ops`` or ``auto``."""

_log = logging.getLogger(__name__)


_warned_broken_ops = False


def _import_ops(
    import_module: Callable[[str], ModuleType] = importlib.import_module,
) -> ModuleType | None:
    """``irpe_ops``, or ``None`` (then the layers use the PyTorch fallback).

    Not installed is normal (logged at DEBUG). Installed but failing to import (a binary built
    for another torch, a broken build) is logged once at WARNING, with irpe_ops' own message,
    which says how to rebuild it.
    """
    global _warned_broken_ops
    try:
        return import_module("irpe_ops")
    except ModuleNotFoundError as exc:
        if exc.name == "irpe_ops":
            _log.debug("irpe_ops is not installed; using the PyTorch fallback")
            return None
        error: Exception = exc
    except Exception as exc:  # a broken build must not take the layers down with it
        error = exc
    if not _warned_broken_ops:
        _warned_broken_ops = True
        _log.warning(
            "irpe_ops is installed but failed to import, so the iRPE layers use the slower "
            "PyTorch fallback: %s: %s",
            type(error).__name__,
            error,
        )
    return None


# Resolved once at import: plain module globals keep backend() cheap and transparent to
# torch.compile (no import or cache machinery inside a traced region).
_OPS = _import_ops()
_OPS_CUDA_BUILT = _OPS is not None and bool(_OPS.cuda_built())


def _ops_module() -> ModuleType | None:
    return _OPS


def _ops_cuda_built() -> bool:
    return _OPS_CUDA_BUILT


def backend(device: torch.device | str | None = None) -> str:
    """Which implementation the iRPE layers use for tensors on ``device`` (default CPU).

    Returns:
        ``"irpe_ops"`` or ``"torch"``.

    Raises:
        ValueError: ``IRPE_BACKEND`` has an unknown value.
        RuntimeError: ``IRPE_BACKEND=irpe_ops`` but the operators are missing or lack
            kernels for ``device``.
    """
    requested = os.environ.get(BACKEND_ENV, "").strip().lower()
    if requested not in ("", "auto", "torch", "irpe_ops"):
        raise ValueError(
            f"{BACKEND_ENV}={requested!r} is not valid; use 'torch', 'irpe_ops' or 'auto'"
        )
    if requested == "torch":
        return "torch"
    device_type = torch.device(device).type if device is not None else "cpu"
    usable = _ops_module() is not None and (
        device_type == "cpu" or (device_type == "cuda" and _ops_cuda_built())
    )
    if requested == "irpe_ops" and not usable:
        raise RuntimeError(
            f"{BACKEND_ENV}=irpe_ops but irpe_ops is not installed or has no kernels for "
            f"device type {device_type!r} (install irpe-nn[ops] built with CUDA)"
        )
    return "irpe_ops" if usable else "torch"


def index_dtype(name: str) -> torch.dtype:
    """Bucket-id dtype preferred by backend ``name``."""
    return torch.int32 if name == "irpe_ops" else torch.int64


def rpe_index(input: torch.Tensor, index: torch.Tensor, name: str) -> torch.Tensor:
    """``out[b, h, i, j] = input[b, h, i, index[i, j]]`` on backend ``name``.

    Args:
        input: ``(B, H, Lq, K)`` floating, any strides.
        index: ``(Lq, Lk)`` integer ids in ``[0, K)``.

    Returns:
        ``(B, H, Lq, Lk)``, differentiable in ``input``.
    """
    if name == "irpe_ops":
        return _ops_module().rpe_index(input, index)
    B, H, Lq, _ = input.shape
    # An expanded (stride-0) index costs no memory; gather's backward is a scatter-add.
    return torch.gather(input, -1, index.expand(B, H, Lq, index.shape[-1]))


def bucket_sum(weights: torch.Tensor, index: torch.Tensor, num_buckets: int, name: str):
    """``out[b, h, i, k] = sum_j weights[b, h, i, j] * [index[i, j] == k]`` (the adjoint of
    :func:`rpe_index`) on backend ``name``.

    Args:
        weights: ``(B, H, Lq, Lk)`` floating.
        index: ``(Lq, Lk)`` integer ids in ``[0, num_buckets)``.

    Returns:
        ``(B, H, Lq, num_buckets)``, differentiable in ``weights``.
    """
    if name == "irpe_ops":
        return _ops_module().bucket_sum(weights, index, num_buckets)
    B, H, Lq, _ = weights.shape
    out = weights.new_zeros(B, H, Lq, num_buckets)
    return out.scatter_add(-1, index.expand(weights.shape), weights)
