"""Bucket ids of image relative positions (the rules: docs/layers.md, 'Bucket ids').

Every ordered pair of tokens ``(i, j)`` of a ``height x width`` grid (row-major, optionally
preceded by ``skip`` non-spatial tokens) is mapped to a bucket id ``bkt(i, j)`` in
``[0, num_buckets)``; the iRPE lookup tables are indexed with these ids.

The ids only depend on the offset ``pos_i - pos_j``, so the piecewise function is evaluated
once per distinct offset (a ``(2h-1, 2w-1)`` table) and the ``(L, L)`` id table is gathered
from it, instead of evaluating it on the whole ``(N, N, 2)`` offset array as the original did.
The values are identical (verified against a naive per-pair reference in the tests).
"""

from __future__ import annotations

import enum
import math

import torch

__all__ = [
    "METHOD",
    "get_bucket_ids_2d",
    "get_bucket_ids_2d_traceable",
    "num_base_buckets",
    "offset_bucket_table",
    "piecewise_index",
]


class METHOD(enum.IntEnum):
    """Ids of the ways 2-D offsets are turned into buckets (values as in the original)."""

    EUCLIDEAN = 0
    """Rounded Euclidean distance ``|pos_i - pos_j|`` through the piecewise function."""
    QUANT = 1
    """Squared Euclidean distance through the piecewise function (no square root)."""
    PRODUCT = 3
    """One bucket per pair ``(g(Δr), g(Δc))``: ``(2βi+1)²`` buckets."""
    CROSS = 4
    """Two tables, one for rows and one for columns, whose encodings are added."""
    CROSS_ROWS = 41
    """The rows half of :attr:`CROSS` (bucket ``g(Δr)``)."""
    CROSS_COLS = 42
    """The columns half of :attr:`CROSS` (bucket ``g(Δc)``)."""


def _is_index_dtype(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def piecewise_index(
    relative_position: torch.Tensor,
    alpha: float,
    beta: float,
    gamma: float,
    dtype: torch.dtype = torch.long,
) -> torch.Tensor:
    """The piecewise index function ``g`` of the paper (Eq. 18), element-wise.

    ``g(x) = x`` (rounded half-to-even for float inputs) where ``|x| <= alpha``; beyond,
    ``sign(x) * min(round(alpha + ln(|x|/alpha) / ln(gamma/alpha) * (beta - alpha)), beta)``
    converted to ``dtype`` (truncation toward zero, so the magnitude saturates at
    ``int(beta)``).

    Args:
        relative_position: any shape, integer or floating dtype.
        alpha, beta, gamma: the coefficients (``alpha > 0``, ``gamma > alpha``).
        dtype: integer dtype of the result.

    Returns:
        Tensor of the input's shape and dtype ``dtype``.

    The values equal the original's for every input it accepts. Unlike the original, the
    result always has ``dtype`` (the original kept an integer input's dtype and failed when
    it differed from ``dtype``), and float16/bfloat16 inputs are rounded like float32 ones.
    """
    if not _is_index_dtype(dtype):
        raise ValueError(f"piecewise_index: dtype must be an integer dtype, got {dtype}")
    if not alpha > 0 or not gamma > alpha:
        raise ValueError(
            f"piecewise_index: need alpha > 0 and gamma > alpha, got alpha={alpha}, gamma={gamma}"
        )
    x = relative_position
    if x.dtype == torch.bool or x.is_complex():
        raise ValueError(f"piecewise_index: relative_position must be real, got {x.dtype}")
    with torch.no_grad():
        # Float precision of the original: an integer tensor divided by a Python float gives
        # the default float dtype; float32/float64 inputs keep theirs. Half inputs go through
        # float32 (the original did not round them at all).
        if x.is_floating_point():
            xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
            inside_value = torch.round(xf).to(dtype)
        else:
            xf = x.to(torch.get_default_dtype())
            inside_value = x.to(dtype)
        x_abs = xf.abs()
        inside = x_abs <= alpha
        # Clamping at alpha keeps log() finite on the inside elements, whose value is
        # discarded by the where() below; outside elements are unchanged by it.
        t = alpha + torch.log(x_abs.clamp(min=alpha) / alpha) / math.log(gamma / alpha) * (
            beta - alpha
        )
        outside_value = (torch.sign(xf) * torch.round(t).clamp(max=beta)).to(dtype)
        return torch.where(inside, inside_value, outside_value)


def num_base_buckets(method: int, beta: float) -> int:
    """Number of buckets of a table without skip tokens: ``S²`` for product, ``S`` otherwise.

    ``S = 2 * int(beta) + 1``. For :attr:`METHOD.CROSS` this is the size of each of its
    two tables.
    """
    side = 2 * int(beta) + 1
    return side * side if method == METHOD.PRODUCT else side


def offset_bucket_table(
    method: int, height: int, width: int, alpha: float, beta: float, gamma: float
) -> torch.Tensor:
    """Bucket id of every 2-D offset, int64 ``(2*height-1, 2*width-1)``.

    Entry ``[dr + height-1, dc + width-1]`` is the id of the offset ``(Δr, Δc) = (dr, dc)``.
    """
    beta_int = int(beta)
    dr = torch.arange(-(height - 1), height, dtype=torch.long).view(-1, 1)
    dc = torch.arange(-(width - 1), width, dtype=torch.long).view(1, -1)
    if method == METHOD.EUCLIDEAN:
        # The original rounds the float32 square root before applying g.
        dist = torch.round(torch.sqrt((dr * dr + dc * dc).to(torch.float32)))
        level = piecewise_index(dist, alpha, beta, gamma, torch.long)
    elif method == METHOD.QUANT:
        level = piecewise_index(dr * dr + dc * dc, alpha, beta, gamma, torch.long)
    elif method == METHOD.PRODUCT:
        side = 2 * beta_int + 1
        rows = piecewise_index(dr, alpha, beta, gamma, torch.long) + beta_int
        cols = piecewise_index(dc, alpha, beta, gamma, torch.long) + beta_int
        return rows * side + cols
    elif method == METHOD.CROSS_ROWS:
        level = piecewise_index(dr, alpha, beta, gamma, torch.long).expand(-1, 2 * width - 1)
    elif method == METHOD.CROSS_COLS:
        level = piecewise_index(dc, alpha, beta, gamma, torch.long).expand(2 * height - 1, -1)
    elif method == METHOD.CROSS:
        raise ValueError(
            "get_bucket_ids_2d: METHOD.CROSS uses two tables; ask for METHOD.CROSS_ROWS and "
            "METHOD.CROSS_COLS separately"
        )
    else:
        valid = ", ".join(f"{m.name}={m.value}" for m in METHOD if m != METHOD.CROSS)
        raise ValueError(f"get_bucket_ids_2d: unknown method {method!r}; valid: {valid}")
    return level + beta_int


def get_bucket_ids_2d(
    method: int,
    height: int,
    width: int,
    skip: int,
    alpha: float,
    beta: float,
    gamma: float,
    dtype: torch.dtype = torch.long,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, int]:
    """Bucket id of every ordered token pair of a ``height x width`` grid with skip tokens.

    Tokens ``0..skip-1`` are non-spatial; token ``skip + t`` sits at ``(t // width,
    t % width)``. The id of a spatial pair depends only on ``pos_i - pos_j``; every
    pair involving a skip token gets the single extra id ``num_base_buckets``.

    Args:
        method: a :class:`METHOD` id other than ``CROSS`` (use ``CROSS_ROWS``/``CROSS_COLS``).
        height, width: grid size (>= 1).
        skip: number of leading non-spatial tokens (>= 0).
        alpha, beta, gamma: coefficients of :func:`piecewise_index`.
        dtype: integer dtype of the ids.
        device: device of the ids.

    Returns:
        ``(ids, num_buckets)``: ``ids`` contiguous ``(L, L)`` with ``L = skip +
        height*width`` (row = query token i, column = key token j); ``num_buckets`` is
        ``num_base_buckets(method, beta)`` plus one if ``skip > 0``.
    """
    for name, value, low in (("height", height, 1), ("width", width, 1), ("skip", skip, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"get_bucket_ids_2d: {name} must be an int >= {low}, got {value!r}")
    if not _is_index_dtype(dtype):
        raise ValueError(f"get_bucket_ids_2d: dtype must be an integer dtype, got {dtype}")
    table = offset_bucket_table(method, height, width, alpha, beta, gamma)
    rows = torch.arange(height).view(height, 1, 1, 1)
    cols = torch.arange(width).view(1, width, 1, 1)
    # Offsets pos_i - pos_j shifted to non-negative table coordinates.
    ids_sp = table[
        rows - rows.view(1, 1, height, 1) + (height - 1),
        cols - cols.view(1, 1, 1, width) + (width - 1),
    ].view(height * width, height * width)
    num_buckets = num_base_buckets(method, beta)
    if skip > 0:
        length = skip + height * width
        ids = torch.full((length, length), num_buckets, dtype=torch.long)
        ids[skip:, skip:] = ids_sp
        num_buckets += 1
    else:
        ids = ids_sp
    # Computed in int64 whatever the requested dtype, so narrow dtypes cannot overflow or
    # mismatch midway (the original's quant + int32 failure).
    return ids.to(device=device, dtype=dtype).contiguous(), num_buckets


def get_bucket_ids_2d_traceable(
    method: int,
    height: int | torch.SymInt | torch.Tensor,
    width: int | torch.SymInt | torch.Tensor,
    skip: int,
    alpha: float,
    beta: float,
    gamma: float,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, int]:
    """:func:`get_bucket_ids_2d` in plain tensor ops, for graphs with symbolic grid sizes.

    Same values (int64), but ``height``/``width`` may be symbolic (``torch.export`` with
    dynamic shapes, ONNX export): the piecewise function is applied to the ``(L, L)`` row
    and column differences directly instead of through the cached offset table, and no
    Python-side validation or caching touches the sizes.

    Returns:
        ``(ids (L, L) int64, num_buckets)`` with ``L = skip + height*width``.
    """
    # Row and column of every token, row-major (no integer division: ONNX-friendly).
    grid = (height, width)
    rows = torch.arange(height, device=device).view(-1, 1).expand(grid).reshape(-1)
    cols = torch.arange(width, device=device).view(1, -1).expand(grid).reshape(-1)
    dr = rows.view(-1, 1) - rows.view(1, -1)
    dc = cols.view(-1, 1) - cols.view(1, -1)
    beta_int = int(beta)
    if method == METHOD.EUCLIDEAN:
        dist = torch.round(torch.sqrt((dr * dr + dc * dc).to(torch.float32)))
        ids = piecewise_index(dist, alpha, beta, gamma, torch.long) + beta_int
    elif method == METHOD.QUANT:
        ids = piecewise_index(dr * dr + dc * dc, alpha, beta, gamma, torch.long) + beta_int
    elif method == METHOD.PRODUCT:
        side = 2 * beta_int + 1
        ids = (piecewise_index(dr, alpha, beta, gamma, torch.long) + beta_int) * side + (
            piecewise_index(dc, alpha, beta, gamma, torch.long) + beta_int
        )
    elif method in (METHOD.CROSS_ROWS, METHOD.CROSS_COLS):
        offset = dr if method == METHOD.CROSS_ROWS else dc
        ids = piecewise_index(offset, alpha, beta, gamma, torch.long) + beta_int
    else:
        offset_bucket_table(method, 1, 1, alpha, beta, gamma)  # raises the usual error
        raise AssertionError("unreachable")
    num_buckets = num_base_buckets(method, beta)
    if skip > 0:
        ids = torch.nn.functional.pad(ids, (skip, 0, skip, 0), value=num_buckets)
        num_buckets += 1
    return ids, num_buckets
