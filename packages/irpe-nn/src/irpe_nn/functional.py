"""iRPE attention as functions, in the style of ``F.scaled_dot_product_attention``.

* :func:`rpe_attention` -- attention of ``(N, H, L, D)`` queries, keys and values with the
  iRPE terms of ``rpe = (rpe_q, rpe_k, rpe_v)`` (what :func:`irpe_nn.build_rpe` returns);
* :func:`rpe_bias` -- the additive iRPE bias ``R_k + R_q^T`` ``(N, H, L, L)``, for code that calls
  ``F.scaled_dot_product_attention(q, k, v, attn_mask=bias)`` itself.

The logits are ``A = s q k^T + R_k + R_q^T`` with ``s = scale`` (default ``D**-0.5``),
``R_k = rpe_k(s q)`` and ``R_q = rpe_q(s k)``; masks are applied after the iRPE terms (as the
original); ``P = dropout(softmax(A))``; ``out = P v + rpe_v(P)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["rpe_attention", "rpe_bias"]


def _unpack(rpe: Sequence[Any] | None) -> tuple[Any, Any, Any]:
    if rpe is None:
        return None, None, None
    if len(rpe) != 3:
        raise ValueError(
            f"rpe must be (rpe_q, rpe_k, rpe_v) as build_rpe returns, got {len(rpe)} items"
        )
    return rpe[0], rpe[1], rpe[2]


def _grid(hw: Any, rpe: tuple[Any, Any, Any]) -> tuple[int | None, int | None]:
    if all(m is None for m in rpe):
        return None, None
    if hw is None:
        raise ValueError("iRPE attention needs hw=(height, width) of the token grid")
    return hw[0], hw[1]


def _relative_logits(q: Tensor, k: Tensor, rpe: Any, hw: Any, scale: float) -> Tensor:
    """``(s q) k^T + R_k + R_q^T`` ``(N, H, Lq, Lk)`` from ``q`` already multiplied by ``s``,
    added in the original's order."""
    rpe_q, rpe_k, _ = rpe
    grid = _grid(hw, rpe)
    logits = torch.matmul(q, k.transpose(-2, -1))
    if rpe_k is not None:
        logits += rpe_k(q, *grid)
    if rpe_q is not None:
        logits += rpe_q(k * scale, *grid).transpose(-2, -1)
    return logits


def _mask_(logits: Tensor, masks: Sequence[Tensor | None]) -> None:
    """Apply each mask (broadcastable to ``logits``; bool ``True`` = masked, or float added)."""
    for mask in masks:
        if mask is None:
            continue
        if mask.dtype == torch.bool:
            logits.masked_fill_(mask, float("-inf"))
        else:
            logits += mask


def attention_with_weights(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rpe: Sequence[Any] | None,
    hw: Any,
    masks: Sequence[Tensor | None] = (),
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """``(out (N, H, Lq, D), P (N, H, Lq, Lk))``: the materialised path, which also returns
    the post-dropout probabilities. ``masks`` use ``True`` = masked (``nn.MultiheadAttention``'s
    convention) and broadcast to ``(N, H, Lq, Lk)``."""
    rpe = _unpack(rpe)
    scale = float(q.shape[-1]) ** -0.5 if scale is None else scale
    logits = _relative_logits(q * scale, k, rpe, hw, scale)
    _mask_(logits, masks)
    probs = torch.softmax(logits, dim=-1)
    if dropout_p > 0:  # an `if`, not training=(p > 0): a symbolic bool breaks torch.compile
        probs = F.dropout(probs, p=dropout_p)
    out = torch.matmul(probs, v)
    if rpe[2] is not None:
        out += rpe[2](probs, *_grid(hw, rpe))  # from the post-dropout probabilities
    return out, probs


def _as_masked(attn_mask: Tensor | None) -> Tensor | None:
    """SDPA's mask convention (bool ``True`` = takes part) as ``True`` = masked."""
    if attn_mask is None or attn_mask.dtype != torch.bool:
        return attn_mask
    return ~attn_mask


def _fused(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rpe: tuple[Any, Any, Any],
    hw: Any,
    key_padding_mask: Tensor | None,
    dropout_p: float,
    scale: float,
) -> Tensor | None:
    """The fused kernel's output, or ``None`` where it does not apply (see irpe_nn.fused)."""
    from .fused import _fused_op, attention_path, fused_tables

    tables = fused_tables(rpe)
    if tables is None or all(t is None for t in tables):
        return None
    if attention_path(q.device, q.dtype) != "fused" or q.shape[2] != k.shape[2]:
        return None
    if key_padding_mask is not None and key_padding_mask.dtype != torch.bool:
        return None
    module = next(m for m in rpe if m is not None)
    ids = module.bucket_ids(q.shape[2], hw[0], hw[1], q.device, "irpe_ops")
    wq, wk, wv = (None if t is None else t.to(q.dtype) for t in tables)
    return _fused_op()(
        q * scale, k, v, ids, wq=wq, wk=wk, wv=wv, key_padding_mask=key_padding_mask,
        dropout_p=dropout_p,
    )  # fmt: skip


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rpe: Sequence[Any] | None,
    hw: Any,
    masks: Sequence[Tensor | None] = (),
    key_padding_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> Tensor:
    """``out (N, H, Lq, D)`` without the weights: the fused kernel where it applies (no
    ``masks``), else the materialised path. ``masks`` and ``key_padding_mask`` as in
    :func:`attention_with_weights` (``True`` = masked)."""
    rpe = _unpack(rpe)
    scale = float(q.shape[-1]) ** -0.5 if scale is None else scale
    if not any(m is not None for m in masks):
        out = _fused(q, k, v, rpe, hw, key_padding_mask, dropout_p, scale)
        if out is not None:
            return out
    if key_padding_mask is not None:
        masks = [*masks, key_padding_mask.view(q.shape[0], 1, 1, k.shape[2])]
    return attention_with_weights(q, k, v, rpe, hw, masks, dropout_p, scale)[0]


def rpe_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rpe: Sequence[Any] | None,
    hw: tuple[int, int] | None,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    *,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Scaled dot-product attention with iRPE.

    Args:
        q: ``(N, H, Lq, D)`` queries (not scaled; ``scale`` is applied here, as SDPA does).
        k, v: ``(N, H, Lk, D)``; with iRPE, ``Lq = Lk = skip + height * width``.
        rpe: ``(rpe_q, rpe_k, rpe_v)`` modules (each may be ``None``), or ``None``.
        hw: ``(height, width)`` of the token grid (needed when ``rpe`` has a module).
        attn_mask: broadcastable to ``(N, H, Lq, Lk)``; as SDPA: bool ``True`` = the pair takes
            part, or float added to the logits (after the iRPE terms).
        dropout_p: dropout on the attention probabilities (applied whenever > 0, as SDPA:
            pass ``0.0`` in evaluation).
        key_padding_mask: ``(N, Lk)`` bool, ``True`` = padding (``nn.MultiheadAttention``'s
            convention), or float added.
        scale: ``s``; default ``D**-0.5``.

    Returns:
        ``(N, H, Lq, D)``.
    """
    return attention(q, k, v, rpe, hw, [_as_masked(attn_mask)], key_padding_mask, dropout_p, scale)


def rpe_bias(
    q: Tensor,
    k: Tensor,
    rpe: Sequence[Any] | None,
    hw: tuple[int, int] | None,
    scale: float | None = None,
) -> Tensor | None:
    """The iRPE terms of the logits as an additive bias ``R_k + R_q^T`` ``(N, H, L, L)``.

    ``F.scaled_dot_product_attention(q, k, v, attn_mask=rpe_bias(q, k, rpe, hw))`` then
    equals :func:`rpe_attention` for encodings on queries and keys (bias or contextual).
    Differentiable in ``q``, ``k`` and the tables.

    Raises:
        ValueError: ``rpe`` encodes values (``rpe_v``): that term is not a logit bias; use
            :func:`rpe_attention`.
    """
    rpe_q, rpe_k, rpe_v = _unpack(rpe)
    if rpe_v is not None:
        raise ValueError(
            "rpe_bias: the value encoding (rpe_v) is not a logit bias; use rpe_attention"
        )
    if rpe_q is None and rpe_k is None:
        return None
    scale = float(q.shape[-1]) ** -0.5 if scale is None else scale
    grid = _grid(hw, (rpe_q, rpe_k, None))
    terms = []
    if rpe_k is not None:
        terms.append(rpe_k(q * scale, *grid))
    if rpe_q is not None:
        terms.append(rpe_q(k * scale, *grid).transpose(-2, -1))
    bias = terms[0] if len(terms) == 1 else terms[0] + terms[1]
    return bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
