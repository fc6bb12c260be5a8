"""Typed wrappers, fake (meta) kernels and autograd of the ``irpe_ops`` operators.

The schemas and the CPU/CUDA kernels come from the compiled extension (``csrc/``); this module
adds what is not a kernel:

* fake kernels, so the ops work with meta tensors, ``FakeTensor`` and ``torch.compile``;
* autograd: each op's backward is the other op (``rpe_index`` and ``bucket_sum`` are adjoint
  linear maps), so both directions exist on every device and double backward works.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["bucket_sum", "rpe_index"]

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
