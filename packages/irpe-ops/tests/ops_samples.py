"""Sample inputs for the irpe_ops tests: shapes, dtypes and memory layouts."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["FLOAT_DTYPES", "INDEX_DTYPES", "LAYOUTS", "SHAPES", "make_data", "make_index"]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)
# (B, H, Lq, Lk, K): tiny, K = 1, Lk > K, Lk < K, many planes, one plane.
SHAPES = (
    (2, 3, 5, 4, 7),
    (2, 2, 3, 6, 1),
    (1, 2, 4, 33, 5),
    (2, 1, 3, 2, 40),
    (4, 16, 3, 9, 6),
    (1, 1, 7, 70, 9),
)
# How the 4-D data tensor is laid out in memory.
LAYOUTS = ("contiguous", "heads_major_view", "strided_last", "expanded_batch")


def make_data(
    shape: tuple[int, int, int, int],
    dtype: torch.dtype,
    layout: str,
    generator: torch.Generator,
    device: str | torch.device = "cpu",
) -> Tensor:
    """Random ``(B, H, L, N)`` data of the given layout.

    Layouts:
        contiguous: plain.
        heads_major_view: the ``(B, H, L, N)`` view of a ``(H, B * L, N)`` tensor, the layout the
            attention's matmul produces (non-contiguous in B and H).
        strided_last: every second element of a ``(B, H, L, 2N)`` tensor (last stride 2).
        expanded_batch: a ``(1, H, L, N)`` tensor expanded over B (batch stride 0).
    """
    B, H, L, N = shape
    if layout == "contiguous":
        base = torch.randn(B, H, L, N, generator=generator)
        out = base
    elif layout == "heads_major_view":
        base = torch.randn(H, B * L, N, generator=generator)
        out = base.view(H, B, L, N).transpose(0, 1)
    elif layout == "strided_last":
        base = torch.randn(B, H, L, 2 * N, generator=generator)
        out = base[..., ::2]
    elif layout == "expanded_batch":
        base = torch.randn(1, H, L, N, generator=generator)
        out = base.expand(B, H, L, N)
    else:
        raise ValueError(f"unknown layout {layout!r}")
    # Convert the base and re-take the view so the layout survives the dtype/device change.
    converted = base.to(device=device, dtype=dtype)
    return converted.as_strided(out.shape, out.stride(), out.storage_offset())


def make_index(
    Lq: int,
    Lk: int,
    K: int,
    dtype: torch.dtype,
    generator: torch.Generator,
    device: str | torch.device = "cpu",
    contiguous: bool = True,
) -> Tensor:
    """Random ids ``(Lq, Lk)`` in ``[0, K)`` that use both ends of the range when they can."""
    index = torch.randint(0, K, (Lq, Lk), generator=generator)
    if index.numel() >= 2:
        index.view(-1)[0] = 0
        index.view(-1)[-1] = K - 1
    if not contiguous:
        index = index.t().contiguous().t()
    return index.to(device=device, dtype=dtype)
