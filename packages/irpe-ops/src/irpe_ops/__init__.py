"""irpe_ops: C++/CUDA operators for image relative position encoding (iRPE).

Operators registered with ``torch.library`` under the namespace ``irpe_ops`` (so they are
also reachable as ``torch.ops.irpe_ops.rpe_index`` and ``torch.ops.irpe_ops.bucket_sum``), with
CPU kernels always, CUDA kernels when the binary was built with them, fake kernels for
``torch.compile`` and autograd:

* :func:`rpe_index` -- ``out[b, h, i, j] = input[b, h, i, index[i, j]]``;
* :func:`bucket_sum` -- its adjoint, ``out[b, h, i, k] = sum_j w[b, h, i, j] [index[i, j] == k]``;
* :func:`rpe_attention` -- fused attention with the contextual iRPE terms (CPU only).

Importing this package raises :class:`ImportError` when the compiled extension is missing or was
built against another torch major.minor.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

from irpe_ops._library import load_extension

_C = load_extension()

from irpe_ops.cuda_attention import register_cuda_kernels  # noqa: E402
from irpe_ops.ops import bucket_sum, rpe_attention, rpe_index  # noqa: E402 - needs the operators registered

# Devices the fused attention (rpe_attention) has kernels for: CPU always, CUDA through Triton.
FUSED_ATTENTION_DEVICES: frozenset[str] = frozenset(
    {"cpu", "cuda"} if register_cuda_kernels() else {"cpu"}
)

__all__ = [
    "FUSED_ATTENTION_DEVICES",
    "__version__",
    "bucket_sum",
    "build_info",
    "cuda_built",
    "rpe_attention",
    "rpe_index",
]

__version__: str = metadata.version("irpe-ops")


def build_info() -> dict[str, Any]:
    """How the installed binary was built.

    Returns:
        A dict with ``version`` (of the binary), ``torch_version`` and ``torch_cuda_version`` (the
        torch it was built against), ``cuda_version`` (the nvcc release, ``None`` without CUDA
        kernels) and ``cuda_archs`` (e.g. ``["sm_80", "sm_86", "sm_89", "sm_90", "compute_90"]``).
    """
    return dict(_C.build_info())


def cuda_built() -> bool:
    """``True`` when the installed binary has CUDA kernels (whether or not a GPU is present)."""
    return _C.build_info()["cuda_version"] is not None


def _empty_cache() -> int:
    """Private (tests, tuning): free the CPU output blocks kept for reuse; returns the bytes freed.

    CPU outputs of 4 MiB and more come from a small internal cache of blocks that earlier outputs
    released, which saves the page faults of fresh memory on every call; its size is bounded by
    the internal tuning variable ``IRPE_OPS_CPU_CACHE_MB`` (default 256, ``0`` disables it), see
    docs/operators.md, 'Performance notes'. Tensors in use are not affected.
    """
    return int(_C.empty_cache())


def _cached_bytes() -> int:
    """Private (tests, tuning): bytes of released CPU output blocks kept for reuse."""
    return int(_C.cached_bytes())
