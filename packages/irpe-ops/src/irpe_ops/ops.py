"""Typed wrappers, fake (meta) kernels and autograd of the ``irpe_ops`` operators.

The schemas and the CPU/CUDA kernels come from the compiled extension (``csrc/``); this module
adds what is not a kernel:

* fake kernels, so the ops work with meta tensors, ``FakeTensor`` and ``torch.compile``;
* autograd: each op's backward is the other op (``rpe_index`` and ``bucket_sum`` are adjoint
  linear maps), so both directions exist on every device and double backward works;
  ``rpe_attention``'s backward is its own operator, ``rpe_attention_backward`` (no double
  backward).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["bucket_sum", "rpe_attention", "rpe_index"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INDEX_DTYPES = (torch.int32, torch.int64)


def rpe_index(input: Tensor, index: Tensor) -> Tensor:
    """Gather relative-position scores by bucket id.

    ``out[b, h, i, j] = input[b, h, i, index[i, j]]``.

    Args:
        input: ``(B, H, Lq, K)`` float16, bfloat16, float32 or float64, any strides (for example
            the transposed view of a ``(H, B*Lq, K)`` matmul result); scores per bucket.
        index: ``(Lq, Lk)`` int32 or int64 on the same device, values in ``[0, K)``; the bucket
            of every (query, key) pair.

    Returns:
        ``(B, H, Lq, Lk)`` contiguous tensor of ``input``'s dtype. Differentiable in ``input``
        (the gradient is :func:`bucket_sum` of the output gradient).

    Raises:
        RuntimeError: wrong rank, mismatched ``Lq``, unsupported dtype, different devices,
            ``K < 1``, or index values outside ``[0, K)``.
    """
    return torch.ops.irpe_ops.rpe_index.default(input, index)


def bucket_sum(weights: Tensor, index: Tensor, num_buckets: int) -> Tensor:
    """Sum each row of ``weights`` into ``num_buckets`` buckets given by ``index``.

    ``out[b, h, i, k] = sum_j weights[b, h, i, j] * [index[i, j] == k]``: the adjoint of
    :func:`rpe_index`. Accumulates in float32 for float16/bfloat16 and in the input type
    otherwise; the result is deterministic (bitwise reproducible) on CPU and CUDA.

    Args:
        weights: ``(B, H, Lq, Lk)`` float16, bfloat16, float32 or float64, any strides.
        index: ``(Lq, Lk)`` int32 or int64 on the same device, values in ``[0, num_buckets)``.
        num_buckets: ``K >= 1``, the size of the last output dimension.

    Returns:
        ``(B, H, Lq, K)`` contiguous tensor of ``weights``' dtype. Differentiable in ``weights``
        (the gradient is :func:`rpe_index` of the output gradient).

    Raises:
        RuntimeError: wrong rank, ``weights.shape[2:] != index.shape``, unsupported dtype,
            different devices, ``num_buckets < 1``, or index values outside the buckets.
    """
    return torch.ops.irpe_ops.bucket_sum.default(weights, index, num_buckets)


# ---------------------------------------------------------------------------------------------
# Fake kernels: shapes and the checks that need no data (the index range needs data).
# ---------------------------------------------------------------------------------------------


def _check_common(op: str, data: Tensor, name: str, layout: str, index: Tensor) -> None:
    torch._check(
        data.dim() == 4, lambda: f"{op}: {name} must be 4-D {layout}, got shape {tuple(data.shape)}"
    )
    torch._check(
        data.dtype in _FLOAT_DTYPES,
        lambda: f"{op}: {name} must be float16, bfloat16, float32 or float64, got {data.dtype}",
    )
    torch._check(
        index.dim() == 2,
        lambda: f"{op}: index must be 2-D (Lq, Lk), got shape {tuple(index.shape)}",
    )
    torch._check(
        index.dtype in _INDEX_DTYPES,
        lambda: f"{op}: index must be int32 or int64, got {index.dtype}",
    )
    torch._check(
        data.device == index.device,
        lambda: (
            f"{op}: {name} and index must be on the same device, got {name} on "
            f"{data.device} and index on {index.device}"
        ),
    )


@torch.library.register_fake("irpe_ops::rpe_index")
def _rpe_index_fake(input: Tensor, index: Tensor) -> Tensor:
    op = "irpe_ops.rpe_index"
    _check_common(op, input, "input", "(B, H, Lq, K)", index)
    torch._check(
        input.shape[2] == index.shape[0],
        lambda: (
            f"{op}: input.size(2) (Lq) must equal index.size(0), got input shape "
            f"{tuple(input.shape)} and index shape {tuple(index.shape)}"
        ),
    )
    torch._check(
        input.shape[3] >= 1,
        lambda: f"{op}: input.size(3) (K, the number of buckets) must be at least 1",
    )
    B, H, Lq, _ = input.shape
    return input.new_empty((B, H, Lq, index.shape[1]))


@torch.library.register_fake("irpe_ops::bucket_sum")
def _bucket_sum_fake(weights: Tensor, index: Tensor, num_buckets: int) -> Tensor:
    op = "irpe_ops.bucket_sum"
    _check_common(op, weights, "weights", "(B, H, Lq, Lk)", index)
    torch._check(
        weights.shape[2] == index.shape[0] and weights.shape[3] == index.shape[1],
        lambda: (
            f"{op}: weights.shape[2:] (Lq, Lk) must equal index.shape, got weights shape "
            f"{tuple(weights.shape)} and index shape {tuple(index.shape)}"
        ),
    )
    torch._check(num_buckets >= 1, lambda: f"{op}: num_buckets must be at least 1")
    B, H, Lq, _ = weights.shape
    return weights.new_empty((B, H, Lq, num_buckets))


# ---------------------------------------------------------------------------------------------
# Autograd: the two ops are each other's backward.
# ---------------------------------------------------------------------------------------------


def _rpe_index_setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    input, index = inputs
    ctx.save_for_backward(index)
    ctx.num_buckets = input.shape[3]


def _rpe_index_backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None]:
    (index,) = ctx.saved_tensors
    grad_input = None
    if ctx.needs_input_grad[0]:
        grad_input = torch.ops.irpe_ops.bucket_sum.default(grad, index, ctx.num_buckets)
    return grad_input, None


def _bucket_sum_setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    _, index, _ = inputs
    ctx.save_for_backward(index)


def _bucket_sum_backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None]:
    (index,) = ctx.saved_tensors
    grad_weights = None
    if ctx.needs_input_grad[0]:
        grad_weights = torch.ops.irpe_ops.rpe_index.default(grad, index)
    return grad_weights, None, None


torch.library.register_autograd(
    "irpe_ops::rpe_index", _rpe_index_backward, setup_context=_rpe_index_setup_context
)
torch.library.register_autograd(
    "irpe_ops::bucket_sum", _bucket_sum_backward, setup_context=_bucket_sum_setup_context
)


# ---------------------------------------------------------------------------------------------
# rpe_attention: fused iRPE attention (CPU kernels only).
# ---------------------------------------------------------------------------------------------

_ATTN_DTYPES = (torch.float32, torch.bfloat16, torch.float64)


def rpe_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    ids: Tensor,
    *,
    wq: Tensor | None = None,
    wk: Tensor | None = None,
    wv: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    seed: int | None = None,
    offset: int = 0,
) -> Tensor:
    """Fused attention with contextual iRPE terms, without any ``(L, L)`` tensor per head.

    With ``s = D ** -0.5`` and ``q`` **already multiplied by** ``s``, per batch ``b`` and head
    ``h``::

        logits[i, j] = q_i . k_j + q_i . wk[:, ids[i, j]] + (s k_j) . wq[:, ids[j, i]]
        logits[i, j] = -inf                      where key_padding_mask[b, j]
        P = softmax_j(logits);  P' = P * M / (1 - dropout_p)
        out_i = sum_j P'_ij (v_j + wv[ids[i, j]])

    (each table term only when the table is given; note ``ids[j, i]`` and the scaled key in the
    query-side term). ``M`` is a keep mask drawn from a counter-based hash of
    ``(seed, offset, b, h, i, j)``, regenerated by the backward; it is not the mask
    ``torch.nn.functional.dropout`` would draw. A query whose keys are all padded gets
    ``out = 0`` (not NaN) and zero gradients.

    Args:
        q, k, v: ``(B, H, L, D)`` float32, bfloat16 or float64 (float32 accumulation for
            bfloat16), any strides; ``q`` pre-scaled by ``D ** -0.5``.
        ids: ``(L, L)`` int32 bucket ids in ``[0, K)``, the same table for both sides.
        wq, wk: ``(Hq, D, K)``, ``(Hk, D, K)`` query-side and key-side tables, or ``None``.
        wv: ``(Hv, K, D)`` value table, or ``None``. Every table has 1 (shared) or ``H`` heads,
            the input dtype, and the same ``K``.
        key_padding_mask: ``(B, L)`` bool, ``True`` = ignore that key; or ``None``.
        dropout_p: probability of dropping an attention weight, in ``[0, 1)``; pass 0 in eval.
        seed, offset: the dropout stream; ``seed=None`` draws one from torch's default CPU
            generator (a host sync that ``torch.compile`` graph-breaks on: pass a seed there).
            Same ``(seed, offset)`` and shapes give the same mask, bitwise.

    Returns:
        ``out``, ``(B, H, L, D)`` in the input dtype; differentiable in ``q``, ``k``, ``v`` and
        the tables (once: no double backward). The logsumexp of the logits, ``(B, H, L)``, is
        the second output of the underlying op ``torch.ops.irpe_ops.rpe_attention``.

    Raises:
        RuntimeError: wrong shapes, dtypes or devices, ``dropout_p`` outside ``[0, 1)``, ids
            outside ``[0, K)``, or a non-CPU device (only CPU kernels exist).
    """
    if seed is None:
        seed = (
            int(torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64).item())
            if (dropout_p > 0.0)
            else 0
        )
    out, _ = torch.ops.irpe_ops.rpe_attention.default(
        q, k, v, ids, wq, wk, wv, key_padding_mask, float(dropout_p), int(seed), int(offset)
    )
    return out


def _check_like_q(op: str, q: Tensor, t: Tensor, name: str) -> None:
    torch._check(
        t.shape == q.shape,
        lambda: f"{op}: {name} must have q's shape {tuple(q.shape)}, got {tuple(t.shape)}",
    )
    torch._check(t.dtype == q.dtype, lambda: f"{op}: {name} must have q's dtype {q.dtype}")
    torch._check(t.device == q.device, lambda: f"{op}: {name} must be on q's device")


def _check_table(
    op: str, q: Tensor, w: Tensor, name: str, layout: str, d_dim: int, k_dim: int
) -> int:
    _, H, _, D = q.shape
    torch._check(w.dim() == 3, lambda: f"{op}: {name} must be 3-D {layout}")
    torch._check(
        w.shape[0] == 1 or w.shape[0] == H,
        lambda: f"{op}: {name}.size(0) must be 1 (shared) or H = {H}",
    )
    torch._check(w.shape[d_dim] == D, lambda: f"{op}: {name} must be {layout} with D = {D}")
    torch._check(w.shape[k_dim] >= 1, lambda: f"{op}: {name} must have at least one bucket")
    torch._check(w.dtype == q.dtype, lambda: f"{op}: {name} must have q's dtype {q.dtype}")
    torch._check(w.device == q.device, lambda: f"{op}: {name} must be on q's device")
    return w.shape[k_dim]


def _check_rpe_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    ids: Tensor,
    wq: Tensor | None,
    wk: Tensor | None,
    wv: Tensor | None,
    key_padding_mask: Tensor | None,
    dropout_p: float,
) -> None:
    """The shape/dtype/device checks of the C++ kernel, for fake tensors."""
    op = "irpe_ops.rpe_attention"
    torch._check(q.dim() == 4, lambda: f"{op}: q must be 4-D (B, H, L, D), got shape {q.shape}")
    torch._check(
        q.dtype in _ATTN_DTYPES,
        lambda: f"{op}: q must be float32, bfloat16 or float64, got {q.dtype}",
    )
    B, _, L, D = q.shape
    torch._check(L >= 1 and D >= 1, lambda: f"{op}: q must have L >= 1 and D >= 1")
    _check_like_q(op, q, k, "k")
    _check_like_q(op, q, v, "v")
    torch._check(
        ids.dim() == 2 and ids.shape[0] == L and ids.shape[1] == L,
        lambda: f"{op}: ids must be (L, L) = ({L}, {L}), got shape {tuple(ids.shape)}",
    )
    torch._check(ids.dtype == torch.int32, lambda: f"{op}: ids must be int32, got {ids.dtype}")
    torch._check(ids.device == q.device, lambda: f"{op}: ids must be on q's device")
    buckets = [
        _check_table(op, q, w, name, layout, d_dim, k_dim)
        for w, name, layout, d_dim, k_dim in (
            (wq, "wq", "(Hq, D, K)", 1, 2),
            (wk, "wk", "(Hk, D, K)", 1, 2),
            (wv, "wv", "(Hv, K, D)", 2, 1),
        )
        if w is not None
    ]
    torch._check(
        all(n == buckets[0] for n in buckets),
        lambda: f"{op}: the tables must agree on the number of buckets K",
    )
    if key_padding_mask is not None:
        m = key_padding_mask
        torch._check(
            m.dim() == 2 and m.shape[0] == B and m.shape[1] == L,
            lambda: f"{op}: key_padding_mask must be (B, L) = ({B}, {L})",
        )
        torch._check(m.dtype == torch.bool, lambda: f"{op}: key_padding_mask must be bool")
        torch._check(m.device == q.device, lambda: f"{op}: key_padding_mask must be on q's device")
    torch._check(
        0.0 <= dropout_p < 1.0, lambda: f"{op}: dropout_p must be in [0, 1), got {dropout_p}"
    )


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("irpe_ops::rpe_attention")
def _rpe_attention_fake(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    ids: Tensor,
    wq: Tensor | None,
    wk: Tensor | None,
    wv: Tensor | None,
    key_padding_mask: Tensor | None,
    dropout_p: float,
    seed: int,
    offset: int,
) -> tuple[Tensor, Tensor]:
    _check_rpe_attention(q, k, v, ids, wq, wk, wv, key_padding_mask, dropout_p)
    B, H, L, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((B, H, L), dtype=_lse_dtype(q.dtype))


@torch.library.register_fake("irpe_ops::rpe_attention_backward")
def _rpe_attention_backward_fake(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    ids: Tensor,
    wq: Tensor | None,
    wk: Tensor | None,
    wv: Tensor | None,
    key_padding_mask: Tensor | None,
    out: Tensor,
    logsumexp: Tensor,
    dropout_p: float,
    seed: int,
    offset: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    _check_rpe_attention(q, k, v, ids, wq, wk, wv, key_padding_mask, dropout_p)

    def table_grad(w: Tensor | None) -> Tensor:
        return q.new_empty(w.shape) if w is not None else q.new_empty((0,))

    return (
        q.new_empty(q.shape),
        q.new_empty(q.shape),
        q.new_empty(q.shape),
        table_grad(wq),
        table_grad(wk),
        table_grad(wv),
    )


@torch.library.register_fake("irpe_ops::_rpe_attention_keep_mask")
def _rpe_attention_keep_mask_fake(q: Tensor, dropout_p: float, seed: int, offset: int) -> Tensor:
    B, H, L, _ = q.shape
    return q.new_empty((B, H, L, L), dtype=torch.bool)


def _rpe_attention_setup_context(
    ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]
) -> None:
    q, k, v, ids, wq, wk, wv, mask, dropout_p, seed, offset = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, ids, wq, wk, wv, mask, out, lse)
    ctx.dropout = (dropout_p, seed, offset)
    ctx.mark_non_differentiable(lse)


def _rpe_attention_backward(
    ctx: Any, grad_out: Tensor | None, grad_lse: Tensor | None
) -> tuple[Tensor | None, ...]:
    q, k, v, ids, wq, wk, wv, mask, out, lse = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv, dwq, dwk, dwv = torch.ops.irpe_ops.rpe_attention_backward.default(
        grad_out, q, k, v, ids, wq, wk, wv, mask, out, lse, *ctx.dropout
    )
    needs = ctx.needs_input_grad
    return (
        dq if needs[0] else None,
        dk if needs[1] else None,
        dv if needs[2] else None,
        None,
        dwq if wq is not None and needs[4] else None,
        dwk if wk is not None and needs[5] else None,
        dwv if wv is not None and needs[6] else None,
        None,
        None,
        None,
        None,
    )


torch.library.register_autograd(
    "irpe_ops::rpe_attention",
    _rpe_attention_backward,
    setup_context=_rpe_attention_setup_context,
)
