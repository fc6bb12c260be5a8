"""Naive references written from the rules in docs/layers.md ('Bucket ids', 'Attention'):
per-element Python math for the piecewise function and bucket ids, float64 einsum / advanced
indexing (with the full ``(H, L, L, D)`` value term) for the attention. Deliberately
independent of irpe_nn's code."""

from __future__ import annotations

import math

import numpy as np
import torch

EUC, QUANT, PRODUCT, CROSS, CROSS_ROWS, CROSS_COLS = 0, 1, 3, 4, 41, 42


def coefficients(ratio: float) -> tuple[float, float, float]:
    return 1 * ratio, 2 * ratio, 8 * ratio


def g_ref(x: float, alpha: float, beta: float, gamma: float, integer: bool) -> int:
    """The piecewise function g for one value (round half to even = Python's round on floats)."""
    if abs(x) <= alpha:
        return int(x) if integer else round(x)
    t = alpha + math.log(abs(x) / alpha) / math.log(gamma / alpha) * (beta - alpha)
    clipped = min(float(round(t)), beta)
    return int(math.copysign(clipped, x))  # int() truncates toward zero


def num_buckets_ref(method: int, ratio: float, skip: int = 0) -> int:
    side = 2 * int(2 * ratio) + 1
    base = side * side if method == PRODUCT else side
    return base + (1 if skip > 0 else 0)


def bucket_ids_ref(method: int, height: int, width: int, skip: int, ratio: float) -> torch.Tensor:
    """``(skip + h*w, skip + h*w)`` int64 ids by a loop over every token pair."""
    alpha, beta, gamma = coefficients(ratio)
    beta_int = int(beta)
    side = 2 * beta_int + 1
    n = height * width
    length = skip + n
    extra = num_buckets_ref(method, ratio, 0)
    ids = np.full((length, length), extra, dtype=np.int64)
    for i in range(n):
        ri, ci = divmod(i, width)
        for j in range(n):
            rj, cj = divmod(j, width)
            dr, dc = ri - rj, ci - cj
            if method == EUC:
                dist = float(round(float(np.sqrt(np.float32(dr * dr + dc * dc)))))
                bkt = g_ref(dist, alpha, beta, gamma, integer=False) + beta_int
            elif method == QUANT:
                bkt = g_ref(dr * dr + dc * dc, alpha, beta, gamma, integer=True) + beta_int
            elif method == PRODUCT:
                bkt = (g_ref(dr, alpha, beta, gamma, True) + beta_int) * side + (
                    g_ref(dc, alpha, beta, gamma, True) + beta_int
                )
            elif method == CROSS_ROWS:
                bkt = g_ref(dr, alpha, beta, gamma, True) + beta_int
            elif method == CROSS_COLS:
                bkt = g_ref(dc, alpha, beta, gamma, True) + beta_int
            else:
                raise ValueError(method)
            ids[skip + i, skip + j] = bkt
    return torch.from_numpy(ids)


def _gathered_table(module, method: int, hw, length: int, ratio: float, transpose: bool):
    """Table entries for every pair by advanced indexing.

    Returns ``(Hm, L, L)`` for bias, ``(Hm, D, L, L)`` for contextual q/k and
    ``(Hm, L, L, D)`` for v; cross sums the rows and columns tables.
    """
    height, width = hw
    skip = length - height * width
    parts = (
        [(module.rp_rows, CROSS_ROWS), (module.rp_cols, CROSS_COLS)]
        if method == CROSS
        else [(module, method)]
    )
    total = 0
    for part, part_method in parts:
        ids = bucket_ids_ref(part_method, height, width, skip, ratio)
        if transpose:
            ids = ids.t()
        if part.mode == "bias":
            table = part.lookup_table_bias.double()
            total = total + table[:, ids]
        elif part.transposed:
            table = part.lookup_table_weight.double()
            total = total + table[:, :, ids]
        else:
            table = part.lookup_table_weight.double()
            total = total + table[:, ids]
    return total


def attention_ref(
    mha,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    hw,
    method: int,
    ratio: float,
):
    """The attention of docs/layers.md ('Attention') in float64, eval mode (no dropout),
    self-attention with all q/k/v dims = E.

    Returns ``(out (L, N, E), head-averaged weights (N, L, L))``.
    """
    E = mha.embed_dim
    nh = mha.num_heads
    D = E // nh
    s = float(D) ** -0.5
    W = mha.in_proj_weight.double()
    b = mha.in_proj_bias.double()
    q = query.double() @ W[:E].t() + b[:E]
    k = key.double() @ W[E : 2 * E].t() + b[E : 2 * E]
    v = value.double() @ W[2 * E :].t() + b[2 * E :]
    q = q * s
    L, N, _ = q.shape

    def heads(t):  # (L, N, E) -> (N, nh, L, D)
        return t.reshape(t.shape[0], N, nh, D).permute(1, 2, 0, 3)

    qh, kh, vh = heads(q), heads(k), heads(v)

    def expand_heads(table):  # table first dim Hm in {1, nh}
        return table.expand(nh, *table.shape[1:])

    logits = torch.einsum("bhid,bhjd->bhij", qh, kh)
    if mha.rpe_k is not None:
        table = expand_heads(_gathered_table(mha.rpe_k, method, hw, L, ratio, transpose=False))
        if mha.rpe_k.mode == "bias":
            logits = logits + table.unsqueeze(0)
        else:
            logits = logits + torch.einsum("bhid,hdij->bhij", qh, table)
    if mha.rpe_q is not None:
        # R_q[i, j] = <s k_j, T_q[:, bkt(j, i)]>: index the table with the transposed ids.
        table = expand_heads(_gathered_table(mha.rpe_q, method, hw, L, ratio, transpose=True))
        if mha.rpe_q.mode == "bias":
            logits = logits + table.unsqueeze(0)
        else:
            logits = logits + torch.einsum("bhjd,hdij->bhij", kh * s, table)
    if key_padding_mask is not None:
        logits = logits.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    out = torch.einsum("bhij,bhjd->bhid", probs, vh)
    if mha.rpe_v is not None:
        table = expand_heads(_gathered_table(mha.rpe_v, method, hw, L, ratio, transpose=False))
        out = out + torch.einsum("bhij,hijd->bhid", probs, table)
    out = out.permute(2, 0, 1, 3).reshape(L, N, E)
    out = out @ mha.out_proj.weight.double().t() + mha.out_proj.bias.double()
    return out, probs.mean(dim=1)
