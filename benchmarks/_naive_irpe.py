"""The attention with iRPE computed the way the original implementation does it, slow
paths included: the benchmark's baseline.

* the projection path is chosen by comparing whole activations with ``torch.equal``;
* contextual q/k terms are gathered by advanced indexing with a flat ``L*K`` index into the
  ``(B, nh, L*K)`` products;
* bias terms index the table with the ``(L, L)`` ids (index_put backward);
* the value term materialises ``T_v[:, bkt]`` as ``(Hm, L, L, D)`` and runs one tiny
  matmul per (head, query).

It reads its parameters from an :class:`irpe_nn.RPEMultiheadAttention`, so both can be
checked against each other. Bucket ids come from :func:`irpe_nn.get_bucket_ids_2d`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import irpe_nn


def _ids(rpe, height: int, width: int, length: int) -> torch.Tensor:
    cfg = rpe.rpe_config
    skip = length - height * width
    ids, _ = irpe_nn.get_bucket_ids_2d(
        rpe.method, height, width, skip, cfg.alpha, cfg.beta, cfg.gamma
    )
    return ids


def _naive_rpe(rpe, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    if isinstance(rpe, irpe_nn.iRPE_Cross):
        return _naive_rpe(rpe.rp_rows, x, height, width) + _naive_rpe(rpe.rp_cols, x, height, width)
    B, _, L, _ = x.shape
    ids = _ids(rpe, height, width, L)
    K = rpe.num_buckets
    if rpe.mode == "bias":
        return rpe.lookup_table_bias[:, ids.flatten()].view(1, -1, L, L)
    table = rpe.lookup_table_weight
    if rpe.transposed:
        # (nh, B*L, D) @ (Hm, D, K) -> (B, nh, L, K), then the flat L*K gather.
        products = torch.matmul(x.transpose(0, 1).reshape(-1, B * L, x.shape[-1]), table)
        products = products.view(-1, B, L, K).transpose(0, 1)
        flat = (ids + torch.arange(L).view(L, 1) * K).flatten()
        return products.flatten(2)[:, :, flat].view(B, -1, L, L)
    # (Hm, L*L, D) materialised, then per (head, query): (B, Lk) @ (Lk, D).
    gathered = table[:, ids.flatten()].view(-1, L, L, table.shape[-1])
    out = torch.matmul(x.permute(1, 2, 0, 3), gathered)  # (nh, L, B, D)
    return out.permute(2, 0, 1, 3)


def naive_attention(
    layer: irpe_nn.RPEMultiheadAttention,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    hw: tuple[int, int],
    key_padding_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out (L, N, E), head-averaged weights (N, L, L))`` like the original forward."""
    E, nh = layer.embed_dim, layer.num_heads
    D = E // nh
    L, B, _ = query.shape
    W, b = layer.in_proj_weight, layer.in_proj_bias
    if torch.equal(query, key) and torch.equal(key, value):
        q, k, v = F.linear(query, W, b).chunk(3, dim=-1)
    elif torch.equal(key, value):
        q = F.linear(query, W[:E], b[:E])
        k, v = F.linear(key, W[E:], b[E:]).chunk(2, dim=-1)
    else:
        q = F.linear(query, W[:E], b[:E])
        k = F.linear(key, W[E : 2 * E], b[E : 2 * E])
        v = F.linear(value, W[2 * E :], b[2 * E :])
    scaling = float(D) ** -0.5
    q = q * scaling
    q = q.contiguous().view(L, B * nh, D).transpose(0, 1)
    k = k.contiguous().view(L, B * nh, D).transpose(0, 1)
    v = v.contiguous().view(L, B * nh, D).transpose(0, 1)
    attn = torch.bmm(q, k.transpose(1, 2))
    if layer.rpe_k is not None:
        rel = _naive_rpe(layer.rpe_k, q.view(B, nh, L, D), *hw)
        attn = attn + rel.expand(B, nh, L, L).reshape(B * nh, L, L)
    if layer.rpe_q is not None:
        rel = _naive_rpe(layer.rpe_q, k.view(B, nh, L, D) * scaling, *hw).transpose(-2, -1)
        attn = attn + rel.expand(B, nh, L, L).reshape(B * nh, L, L)
    if key_padding_mask is not None:
        attn = attn.view(B, nh, L, L).masked_fill(key_padding_mask[:, None, None], float("-inf"))
        attn = attn.view(B * nh, L, L)
    attn = F.softmax(attn, dim=-1)
    attn = F.dropout(attn, p=layer.dropout, training=layer.training)
    out = torch.bmm(attn, v)
    if layer.rpe_v is not None:
        out = out + _naive_rpe(layer.rpe_v, attn.view(B, nh, L, L), *hw).reshape(B * nh, L, D)
    out = out.transpose(0, 1).contiguous().view(L, B, E)
    out = F.linear(out, layer.out_proj.weight, layer.out_proj.bias)
    return out, attn.view(B, nh, L, L).sum(dim=1) / nh
