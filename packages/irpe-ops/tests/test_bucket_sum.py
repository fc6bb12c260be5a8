"""irpe_ops.bucket_sum on CPU against float64 scatter-add references."""

from __future__ import annotations

import pytest
import torch
from ops_reference import bucket_sum_loops, bucket_sum_reference, detr_like_index
from ops_samples import FLOAT_DTYPES, INDEX_DTYPES, LAYOUTS, SHAPES, make_data, make_index

import irpe_ops

# The op accumulates in float32 (float64 for float64) and rounds once, so the result is within
# about one unit in the last place of the output dtype of the exact sum.
TOLERANCES = {
    torch.float16: {"rtol": 2e-3, "atol": 2e-3},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 1.6e-2},
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.float64: {"rtol": 1e-12, "atol": 1e-12},
}


def test_reference_matches_loops(generator: torch.Generator) -> None:
    w = make_data((2, 3, 4, 6), torch.float64, "strided_last", generator)
    index = make_index(4, 6, 5, torch.int32, generator)
    torch.testing.assert_close(bucket_sum_reference(w, index, 5), bucket_sum_loops(w, index, 5))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_matches_reference(
    dtype: torch.dtype, index_dtype: torch.dtype, layout: str, generator: torch.Generator
) -> None:
    for B, H, Lq, Lk, K in SHAPES:
        w = make_data((B, H, Lq, Lk), dtype, layout, generator)
        index = make_index(Lq, Lk, K, index_dtype, generator)
        out = irpe_ops.bucket_sum(w, index, K)
        assert out.shape == (B, H, Lq, K)
        assert out.dtype == dtype
        assert out.is_contiguous()
        expected = bucket_sum_reference(w, index, K).to(dtype)
        torch.testing.assert_close(out, expected, **TOLERANCES[dtype], msg=str((B, H, Lq, Lk, K)))


def test_accumulates_half_in_float32() -> None:
    # 4097 ones into one bucket. A float16 accumulator stalls at 2048 (2048 + 1 rounds back to
    # 2048) and a bfloat16 one at 256; a float32 accumulator reaches 4097, which rounds once to
    # 4096 in either output type.
    Lk = 4097
    w = torch.ones(1, 1, 1, Lk, dtype=torch.float16)
    index = torch.zeros(1, Lk, dtype=torch.int64)
    out = irpe_ops.bucket_sum(w, index, 1)
    assert out.item() == 4096.0
    bf = irpe_ops.bucket_sum(w.bfloat16(), index, 1)
    assert bf.item() == 4096.0


def test_adjoint_of_rpe_index(generator: torch.Generator) -> None:
    # <rpe_index(x), w> == <x, bucket_sum(w)> for all x, w: the definition of the adjoint.
    index, K = detr_like_index(4, 6)
    x = make_data((2, 3, 24, K), torch.float64, "heads_major_view", generator)
    w = make_data((2, 3, 24, 24), torch.float64, "contiguous", generator)
    lhs = (irpe_ops.rpe_index(x, index) * w).sum()
    rhs = (x * irpe_ops.bucket_sum(w, index, K)).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-12)


def test_unused_buckets_are_zero(generator: torch.Generator) -> None:
    w = make_data((2, 2, 3, 5), torch.float32, "contiguous", generator)
    index = torch.randint(0, 4, (3, 5), generator=generator)
    out = irpe_ops.bucket_sum(w, index, 10)
    assert torch.equal(out[..., 4:], torch.zeros(2, 2, 3, 6))


def test_many_rows_split_across_threads_and_deterministic(generator: torch.Generator) -> None:
    # Chunks that start mid-way through a query row's planes; the result must not depend on the
    # thread count (each row is summed by one thread in a fixed order) nor on the run.
    index, K = detr_like_index(7, 43)
    Lq = index.shape[0]
    w = make_data((3, 5, Lq, Lq), torch.float32, "heads_major_view", generator)
    expected = bucket_sum_reference(w, index, K).float()
    results = []
    for threads in (1, 2, 3, 2):
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            results.append(irpe_ops.bucket_sum(w, index, K))
        finally:
            torch.set_num_threads(previous)
    torch.testing.assert_close(results[0], expected, rtol=1e-5, atol=1e-4)
    for other in results[1:]:
        assert torch.equal(other, results[0])


def test_rows_reduced_in_groups_equal_rows_reduced_alone(generator: torch.Generator) -> None:
    # Planes of one query row are reduced four at a time; a plane on its own (B = H = 1) is
    # reduced alone. Both must add in the same order: equal bits.
    index, K = detr_like_index(6, 9)
    Lq = index.shape[0]
    w = make_data((2, 4, Lq, Lq), torch.float32, "contiguous", generator)
    grouped = irpe_ops.bucket_sum(w, index, K)
    for b in range(2):
        for h in range(4):
            alone = irpe_ops.bucket_sum(w[b : b + 1, h : h + 1], index, K)
            assert torch.equal(alone[0, 0], grouped[b, h])


def test_wide_rows_with_many_buckets(generator: torch.Generator) -> None:
    # K = 5000 buckets for 50 columns: accumulators far wider than the rows.
    w = make_data((2, 2, 3, 50), torch.float64, "contiguous", generator)
    index = make_index(3, 50, 5000, torch.int64, generator)
    torch.testing.assert_close(
        irpe_ops.bucket_sum(w, index, 5000), bucket_sum_reference(w, index, 5000)
    )


def test_empty_key_axis_gives_zeros() -> None:
    out = irpe_ops.bucket_sum(torch.empty(2, 3, 4, 0), torch.empty(4, 0, dtype=torch.int64), 6)
    assert torch.equal(out, torch.zeros(2, 3, 4, 6))


@pytest.mark.parametrize(("B", "H", "Lq"), [(0, 2, 3), (2, 0, 3), (2, 2, 0)])
def test_empty_shapes(B: int, H: int, Lq: int, generator: torch.Generator) -> None:
    w = torch.randn(B, H, Lq, 4, generator=generator)
    index = torch.randint(0, 6, (Lq, 4), generator=generator)
    assert irpe_ops.bucket_sum(w, index, 6).shape == (B, H, Lq, 6)


def test_meta_tensors_give_shapes() -> None:
    w = torch.empty(2, 3, 5, 7, device="meta", dtype=torch.float16)
    index = torch.empty(5, 7, device="meta", dtype=torch.int64)
    out = irpe_ops.bucket_sum(w, index, 13)
    assert out.shape == (2, 3, 5, 13)
    assert out.dtype == torch.float16
