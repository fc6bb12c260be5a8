"""Gradients of the irpe_ops operators: gradcheck, gradgradcheck and agreement with gather."""

from __future__ import annotations

import pytest
import torch
from ops_reference import rpe_index_reference
from ops_samples import INDEX_DTYPES, make_data, make_index

import irpe_ops


@pytest.mark.parametrize("index_dtype", INDEX_DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "heads_major_view"])
def test_rpe_index_gradcheck(
    index_dtype: torch.dtype, layout: str, generator: torch.Generator
) -> None:
    x = make_data((2, 2, 3, 4), torch.float64, layout, generator).detach().requires_grad_()
    index = make_index(3, 5, 4, index_dtype, generator)
    assert torch.autograd.gradcheck(lambda t: irpe_ops.rpe_index(t, index), (x,))
    assert torch.autograd.gradgradcheck(lambda t: irpe_ops.rpe_index(t, index), (x,))


@pytest.mark.parametrize("index_dtype", INDEX_DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "strided_last"])
def test_bucket_sum_gradcheck(
    index_dtype: torch.dtype, layout: str, generator: torch.Generator
) -> None:
    w = make_data((2, 2, 3, 5), torch.float64, layout, generator).detach().requires_grad_()
    index = make_index(3, 5, 4, index_dtype, generator)
    assert torch.autograd.gradcheck(lambda t: irpe_ops.bucket_sum(t, index, 4), (w,))
    assert torch.autograd.gradgradcheck(lambda t: irpe_ops.bucket_sum(t, index, 4), (w,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rpe_index_backward_matches_gather_backward(
    dtype: torch.dtype, generator: torch.Generator
) -> None:
    index = make_index(6, 9, 5, torch.int32, generator)
    base = make_data((2, 3, 6, 5), dtype, "heads_major_view", generator)
    grad = make_data((2, 3, 6, 9), dtype, "contiguous", generator)
    x_ops = base.detach().clone().requires_grad_()
    x_ref = base.detach().double().requires_grad_()
    irpe_ops.rpe_index(x_ops, index).backward(grad)
    rpe_index_reference(x_ref, index).backward(grad.double())
    tol = (
        {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1.6e-2, "atol": 1.6e-2}
    )
    assert x_ops.grad is not None and x_ref.grad is not None
    torch.testing.assert_close(x_ops.grad, x_ref.grad.to(dtype), **tol)


def test_expanded_gradient_of_a_sum(generator: torch.Generator) -> None:
    # out.sum().backward() feeds an expanded (all-zero-stride) gradient to the backward.
    x = make_data((2, 2, 3, 4), torch.float64, "contiguous", generator).requires_grad_()
    index = make_index(3, 7, 4, torch.int64, generator)
    irpe_ops.rpe_index(x, index).sum().backward()
    counts = torch.zeros(3, 4, dtype=torch.float64).scatter_add_(
        1, index, torch.ones(3, 7, dtype=torch.float64)
    )
    assert x.grad is not None
    torch.testing.assert_close(x.grad, counts.expand(2, 2, 3, 4))


def test_no_gradient_without_requires_grad(generator: torch.Generator) -> None:
    x = make_data((1, 2, 3, 4), torch.float32, "contiguous", generator)
    index = make_index(3, 4, 4, torch.int32, generator)
    assert not irpe_ops.rpe_index(x, index).requires_grad
    assert not irpe_ops.bucket_sum(x, index[:, :4], 4).requires_grad
