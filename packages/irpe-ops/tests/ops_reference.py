"""Naive references for the irpe_ops tests, written from the operator definitions.

Two independent formulations of each op: a vectorised one through ``torch.gather`` /
``scatter_add_`` in float64 (fast enough for every test) and a plain Python loop for tiny sizes
(which checks the vectorised one).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "bucket_sum_loops",
    "bucket_sum_reference",
    "detr_like_index",
    "rpe_attention_reference",
    "rpe_index_loops",
    "rpe_index_reference",
]


def rpe_index_reference(input: Tensor, index: Tensor) -> Tensor:
    """``out[b, h, i, j] = input[b, h, i, index[i, j]]`` via ``torch.gather`` (exact)."""
    B, H, Lq, _ = input.shape
    expanded = index.long().expand(B, H, Lq, index.shape[1])
    return torch.gather(input, -1, expanded)


def bucket_sum_reference(weights: Tensor, index: Tensor, num_buckets: int) -> Tensor:
    """``out[b, h, i, k] = sum_j weights[b, h, i, j] [index[i, j] == k]`` in float64."""
    B, H, Lq, Lk = weights.shape
    out = torch.zeros(B, H, Lq, num_buckets, dtype=torch.float64, device=weights.device)
    expanded = index.long().expand(B, H, Lq, Lk)
    return out.scatter_add_(-1, expanded, weights.double())


def rpe_index_loops(input: Tensor, index: Tensor) -> Tensor:
    B, H, Lq, _ = input.shape
    Lk = index.shape[1]
    out = torch.empty(B, H, Lq, Lk, dtype=input.dtype)
    for b in range(B):
        for h in range(H):
            for i in range(Lq):
                for j in range(Lk):
                    out[b, h, i, j] = input[b, h, i, int(index[i, j])]
    return out


def bucket_sum_loops(weights: Tensor, index: Tensor, num_buckets: int) -> Tensor:
    B, H, Lq, Lk = weights.shape
    out = torch.zeros(B, H, Lq, num_buckets, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for i in range(Lq):
                for j in range(Lk):
                    out[b, h, i, int(index[i, j])] += float(weights[b, h, i, j])
    return out


def detr_like_index(height: int, width: int, per_axis: int = 9) -> tuple[Tensor, int]:
    """A product-style id table ``(L, L)``, ``L = height * width``, and its bucket count.

    Clipped row/column offsets, so that ids repeat along each row as iRPE's do (the shape of the
    table, not iRPE's exact piecewise function).
    """
    half = per_axis // 2
    pos = torch.arange(height * width)
    rows, cols = pos // width, pos % width
    d_row = (rows[:, None] - rows[None, :]).clamp(-half, half) + half
    d_col = (cols[:, None] - cols[None, :]).clamp(-half, half) + half
    return d_row * per_axis + d_col, per_axis * per_axis


def rpe_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    ids: Tensor,
    wq: Tensor | None = None,
    wk: Tensor | None = None,
    wv: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    keep: Tensor | None = None,
    dropout_p: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Naive iRPE attention (materialises every ``(B, H, L, L)`` tensor): ``(out, logsumexp)``.

    Written from the definition in ``irpe_ops.rpe_attention``'s docstring, in the dtype of the
    inputs (differentiable). ``keep``: the ``(B, H, L, L)`` bool dropout keep mask, or ``None``.
    A query whose keys are all padded gets ``out = 0`` (its softmax would be NaN).
    """
    B, H, L, D = q.shape
    s = D**-0.5
    index = ids.long().expand(B, H, L, L)
    logits = q @ k.transpose(-1, -2)
    if wk is not None:
        logits = logits + torch.gather(q @ wk, -1, index)
    if wq is not None:
        # (s k_j) . wq[:, ids[j, i]]: gathered along the rows of k, then transposed to (i, j).
        logits = logits + torch.gather((s * k) @ wq, -1, index).transpose(-1, -2)
    if key_padding_mask is not None:
        logits = logits.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    probs = torch.softmax(logits, dim=-1)
    probs = torch.where(torch.isnan(probs), torch.zeros_like(probs), probs)
    if keep is not None:
        probs = probs * keep.to(probs.dtype) / (1.0 - dropout_p)
    out = probs @ v
    if wv is not None:
        buckets = torch.zeros(B, H, L, wv.shape[1], dtype=probs.dtype).scatter_add(-1, index, probs)
        out = out + buckets @ wv
    return out, lse
