"""CUDA kernels of the irpe_ops operators (skipped without a GPU or without CUDA kernels)."""

from __future__ import annotations

import re

import pytest
import torch
from ops_reference import bucket_sum_reference, detr_like_index, rpe_index_reference
from ops_samples import FLOAT_DTYPES, INDEX_DTYPES, LAYOUTS, SHAPES, make_data, make_index

import irpe_ops

pytestmark = pytest.mark.needs_cuda

TOLERANCES = {
    torch.float16: {"rtol": 2e-3, "atol": 2e-3},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 1.6e-2},
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.float64: {"rtol": 1e-12, "atol": 1e-12},
}


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_rpe_index_matches_reference(
    dtype: torch.dtype, index_dtype: torch.dtype, layout: str, generator: torch.Generator
) -> None:
    for B, H, Lq, Lk, K in SHAPES:
        x = make_data((B, H, Lq, K), dtype, layout, generator, device="cuda")
        index = make_index(Lq, Lk, K, index_dtype, generator, device="cuda")
        out = irpe_ops.rpe_index(x, index)
        assert out.device == x.device and out.is_contiguous()
        assert torch.equal(out.cpu(), rpe_index_reference(x.cpu(), index.cpu()))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_bucket_sum_matches_reference(
    dtype: torch.dtype, index_dtype: torch.dtype, layout: str, generator: torch.Generator
) -> None:
    for B, H, Lq, Lk, K in SHAPES:
        w = make_data((B, H, Lq, Lk), dtype, layout, generator, device="cuda")
        index = make_index(Lq, Lk, K, index_dtype, generator, device="cuda")
        out = irpe_ops.bucket_sum(w, index, K)
        assert out.shape == (B, H, Lq, K) and out.dtype == dtype and out.is_contiguous()
        expected = bucket_sum_reference(w.cpu(), index.cpu(), K).to(dtype)
        torch.testing.assert_close(out.cpu(), expected, **TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_bucket_sum_is_bitwise_deterministic(
    dtype: torch.dtype, generator: torch.Generator
) -> None:
    index, K = detr_like_index(17, 23)
    L = index.shape[0]
    w = make_data((2, 8, L, L), dtype, "heads_major_view", generator, device="cuda")
    index = index.cuda()
    first = irpe_ops.bucket_sum(w, index, K)
    for _ in range(5):
        assert torch.equal(irpe_ops.bucket_sum(w, index, K), first)
    torch.testing.assert_close(
        first.cpu(), bucket_sum_reference(w.cpu(), index.cpu(), K).to(dtype), **TOLERANCES[dtype]
    )


@pytest.mark.parametrize(
    ("dtype", "K"),
    [(torch.float16, 13000), (torch.float32, 13000), (torch.float64, 7000)],
    ids=["float16", "float32", "float64"],
)
def test_bucket_sum_with_buckets_beyond_shared_memory(
    dtype: torch.dtype, K: int, generator: torch.Generator
) -> None:
    # K accumulators of a row no longer fit in 48 KiB of shared memory: global workspace path.
    w = make_data((2, 2, 3, 300), dtype, "contiguous", generator, device="cuda")
    index = make_index(3, 300, K, torch.int64, generator, device="cuda")
    out = irpe_ops.bucket_sum(w, index, K)
    torch.testing.assert_close(
        out.cpu(), bucket_sum_reference(w.cpu(), index.cpu(), K).to(dtype), **TOLERANCES[dtype]
    )
    assert torch.equal(irpe_ops.bucket_sum(w, index, K), out)


def test_cuda_matches_cpu_on_a_detr_sized_problem(generator: torch.Generator) -> None:
    index, K = detr_like_index(25, 34)
    L = index.shape[0]
    x = make_data((2, 8, L, K), torch.float32, "heads_major_view", generator)
    assert torch.equal(
        irpe_ops.rpe_index(x.cuda(), index.cuda()).cpu(), irpe_ops.rpe_index(x, index)
    )


def test_gradcheck_on_cuda(generator: torch.Generator) -> None:
    x = make_data((2, 2, 3, 4), torch.float64, "heads_major_view", generator, device="cuda")
    x.requires_grad_()
    index = make_index(3, 5, 4, torch.int32, generator, device="cuda")
    assert torch.autograd.gradcheck(lambda t: irpe_ops.rpe_index(t, index), (x,))
    assert torch.autograd.gradgradcheck(lambda t: irpe_ops.rpe_index(t, index), (x,))
    w = make_data((2, 2, 3, 5), torch.float64, "contiguous", generator, device="cuda")
    w.requires_grad_()
    assert torch.autograd.gradcheck(lambda t: irpe_ops.bucket_sum(t, index, 4), (w,))


def test_opcheck_on_cuda(generator: torch.Generator) -> None:
    x = make_data((2, 3, 4, 5), torch.float32, "heads_major_view", generator, device="cuda")
    index = make_index(4, 6, 5, torch.int64, generator, device="cuda")
    torch.library.opcheck(torch.ops.irpe_ops.rpe_index.default, (x.requires_grad_(), index))
    w = make_data((2, 3, 4, 6), torch.bfloat16, "contiguous", generator, device="cuda")
    torch.library.opcheck(torch.ops.irpe_ops.bucket_sum.default, (w, index, 5))


def test_runs_on_the_current_stream(generator: torch.Generator) -> None:
    x = make_data((2, 4, 32, 9), torch.float32, "contiguous", generator, device="cuda")
    index = make_index(32, 40, 9, torch.int32, generator, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out = irpe_ops.rpe_index(x, index)
        sums = irpe_ops.bucket_sum(out, index, 9)
    torch.cuda.current_stream().wait_stream(stream)
    assert torch.equal(out.cpu(), rpe_index_reference(x.cpu(), index.cpu()))
    torch.testing.assert_close(sums.cpu(), bucket_sum_reference(out.cpu(), index.cpu(), 9).float())


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_second_device(generator: torch.Generator) -> None:
    x = make_data((1, 2, 3, 4), torch.float32, "contiguous", generator, device="cuda:1")
    index = make_index(3, 5, 4, torch.int64, generator, device="cuda:1")
    out = irpe_ops.rpe_index(x, index)
    assert out.device == torch.device("cuda:1")
    assert torch.equal(out.cpu(), rpe_index_reference(x.cpu(), index.cpu()))


def test_errors_on_cuda() -> None:
    x = torch.zeros(2, 3, 4, 5, device="cuda")
    with pytest.raises(RuntimeError, match="input and index must be on the same device"):
        irpe_ops.rpe_index(x, torch.zeros(4, 6, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="input and index must be on the same device"):
        irpe_ops.rpe_index(x.cpu(), torch.zeros(4, 6, dtype=torch.int64, device="cuda"))
    bad = torch.full((4, 6), 5, dtype=torch.int64, device="cuda")
    with pytest.raises(RuntimeError, match=re.escape("index values must lie in [0, 5)")):
        irpe_ops.rpe_index(x, bad)
    with pytest.raises(RuntimeError, match=re.escape("index values must lie in [0, 3)")):
        irpe_ops.bucket_sum(torch.zeros(2, 3, 4, 6, device="cuda"), bad, 3)
    # The refused calls left no sticky CUDA error behind.
    torch.cuda.synchronize()
    assert irpe_ops.rpe_index(x, bad - 1).shape == (2, 3, 4, 6)
