"""irpe_ops.rpe_index on CPU against the gather reference: all dtypes, index types, layouts."""

from __future__ import annotations

import pytest
import torch
from ops_reference import detr_like_index, rpe_index_loops, rpe_index_reference
from ops_samples import FLOAT_DTYPES, INDEX_DTYPES, LAYOUTS, SHAPES, make_data, make_index

import irpe_ops


def test_reference_matches_loops(generator: torch.Generator) -> None:
    x = make_data((2, 3, 4, 5), torch.float64, "heads_major_view", generator)
    index = make_index(4, 6, 5, torch.int64, generator)
    torch.testing.assert_close(rpe_index_reference(x, index), rpe_index_loops(x, index))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_matches_reference(
    dtype: torch.dtype, index_dtype: torch.dtype, layout: str, generator: torch.Generator
) -> None:
    for B, H, Lq, Lk, K in SHAPES:
        x = make_data((B, H, Lq, K), dtype, layout, generator)
        index = make_index(Lq, Lk, K, index_dtype, generator)
        out = irpe_ops.rpe_index(x, index)
        assert out.shape == (B, H, Lq, Lk)
        assert out.dtype == dtype
        assert out.is_contiguous()
        # A gather copies values: the result must be bitwise exact.
        assert torch.equal(out, rpe_index_reference(x, index)), (B, H, Lq, Lk, K)


def test_non_contiguous_index(generator: torch.Generator) -> None:
    x = make_data((2, 3, 6, 5), torch.float32, "contiguous", generator)
    index = make_index(6, 8, 5, torch.int32, generator, contiguous=False)
    assert not index.is_contiguous()
    assert torch.equal(irpe_ops.rpe_index(x, index), rpe_index_reference(x, index))


def test_dispatcher_path_is_the_same_op(generator: torch.Generator) -> None:
    x = make_data((1, 2, 3, 4), torch.float32, "contiguous", generator)
    index = make_index(3, 5, 4, torch.int64, generator)
    assert torch.equal(torch.ops.irpe_ops.rpe_index(x, index), irpe_ops.rpe_index(x, index))


def test_many_rows_split_across_threads(generator: torch.Generator) -> None:
    # 3 * 5 planes and 67 query rows: the parallel chunks start in the middle of a query row's
    # run of planes, which the kernel's row cursor and per-row index check must handle.
    x = make_data((3, 5, 67, 11), torch.float32, "heads_major_view", generator)
    index = make_index(67, 301, 11, torch.int32, generator)
    expected = rpe_index_reference(x, index)
    for threads in (1, 2, 3):
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            out = irpe_ops.rpe_index(x, index)
        finally:
            torch.set_num_threads(previous)
        assert torch.equal(out, expected), threads


def test_detr_like_table(generator: torch.Generator) -> None:
    index, K = detr_like_index(5, 7)
    x = make_data((2, 4, 35, K), torch.float32, "heads_major_view", generator)
    assert torch.equal(irpe_ops.rpe_index(x, index), rpe_index_reference(x, index))


@pytest.mark.parametrize(
    ("B", "H", "Lq", "Lk"), [(0, 2, 3, 4), (2, 0, 3, 4), (2, 2, 0, 4), (2, 2, 3, 0)]
)
def test_empty_shapes(B: int, H: int, Lq: int, Lk: int, generator: torch.Generator) -> None:
    x = torch.randn(B, H, Lq, 5, generator=generator)
    index = torch.randint(0, 5, (Lq, Lk), generator=generator)
    out = irpe_ops.rpe_index(x, index)
    assert out.shape == (B, H, Lq, Lk)


def test_meta_tensors_give_shapes() -> None:
    x = torch.empty(2, 3, 5, 7, device="meta", dtype=torch.bfloat16)
    index = torch.empty(5, 11, device="meta", dtype=torch.int32)
    out = irpe_ops.rpe_index(x, index)
    assert out.shape == (2, 3, 5, 11)
    assert out.dtype == torch.bfloat16
    assert out.device.type == "meta"
