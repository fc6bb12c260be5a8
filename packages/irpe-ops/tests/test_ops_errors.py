"""Bad input to the irpe_ops operators raises a clear RuntimeError, never a crash."""

from __future__ import annotations

import re

import pytest
import torch

import irpe_ops


def _x(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.zeros(*shape, dtype=dtype)


def _ids(Lq: int, Lk: int, high: int = 1, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    return torch.zeros(Lq, Lk, dtype=dtype) + (high - 1)


RPE_INDEX_CASES = [
    # (input, index, message pattern)
    (_x(2, 3, 4), _ids(3, 5), "input must be 4-D (B, H, Lq, K), got shape [2, 3, 4]"),
    (_x(1, 2, 3, 4, 5), _ids(3, 5), "input must be 4-D"),
    (_x(2, 3, 4, 5), _ids(4, 5)[0], "index must be 2-D (Lq, Lk), got shape [5]"),
    (_x(2, 3, 4, 5), _ids(4, 5).float(), "index must be int32 or int64, got Float"),
    (_x(2, 3, 4, 5), _ids(4, 5, dtype=torch.int16), "index must be int32 or int64, got Short"),
    (_x(2, 3, 4, 5, dtype=torch.int32), _ids(4, 5), "input must be float16, bfloat16, float32"),
    (_x(2, 3, 4, 5, dtype=torch.complex64), _ids(4, 5), "input must be float16"),
    (
        _x(2, 3, 4, 5),
        _ids(3, 5),
        "input.size(2) (Lq) must equal index.size(0), got input shape [2, 3, 4, 5] and index "
        "shape [3, 5]",
    ),
    (_x(2, 3, 4, 0), _ids(4, 0), "input.size(3) (K, the number of buckets) must be at least 1"),
    (
        _x(2, 3, 4, 5),
        _ids(4, 6, high=6),
        "index values must lie in [0, 5) (5 buckets), found values in [5, 5]",
    ),
    (
        _x(2, 3, 4, 5),
        _ids(4, 6, high=0),
        "index values must lie in [0, 5) (5 buckets), found values in [-1, -1]",
    ),
]


@pytest.mark.parametrize(("input", "index", "message"), RPE_INDEX_CASES)
def test_rpe_index_rejects(input: torch.Tensor, index: torch.Tensor, message: str) -> None:
    with pytest.raises(RuntimeError, match=re.escape(message)):
        irpe_ops.rpe_index(input, index)


BUCKET_SUM_CASES = [
    # (weights, index, num_buckets, message pattern)
    (_x(3, 4, 5), _ids(4, 5), 3, "weights must be 4-D (B, H, Lq, Lk), got shape [3, 4, 5]"),
    (_x(2, 3, 4, 5), _ids(4, 5)[None], 3, "index must be 2-D (Lq, Lk), got shape [1, 4, 5]"),
    (_x(2, 3, 4, 5), _ids(4, 5).double(), 3, "index must be int32 or int64, got Double"),
    (_x(2, 3, 4, 5, dtype=torch.int64), _ids(4, 5), 3, "weights must be float16, bfloat16"),
    (
        _x(2, 3, 4, 5),
        _ids(4, 6),
        3,
        "weights.shape[2:] (Lq, Lk) must equal index.shape, got weights shape [2, 3, 4, 5] and "
        "index shape [4, 6]",
    ),
    (_x(2, 3, 4, 5), _ids(5, 5), 3, "weights.shape[2:] (Lq, Lk) must equal index.shape"),
    (_x(2, 3, 4, 5), _ids(4, 5), 0, "num_buckets must be at least 1, got 0"),
    (_x(2, 3, 4, 5), _ids(4, 5), -2, "num_buckets must be at least 1, got -2"),
    (
        _x(2, 3, 4, 5),
        _ids(4, 5, high=4),
        3,
        "index values must lie in [0, 3) (3 buckets), found values in [3, 3]",
    ),
    (
        _x(2, 3, 4, 5),
        _ids(4, 5, high=-4),
        3,
        "index values must lie in [0, 3) (3 buckets), found values in [-5, -5]",
    ),
    # The range check also guards calls whose output is empty.
    (_x(0, 3, 4, 5), _ids(4, 5, high=9), 3, "index values must lie in [0, 3)"),
]


@pytest.mark.parametrize(("weights", "index", "num_buckets", "message"), BUCKET_SUM_CASES)
def test_bucket_sum_rejects(
    weights: torch.Tensor, index: torch.Tensor, num_buckets: int, message: str
) -> None:
    with pytest.raises(RuntimeError, match=re.escape(message)):
        irpe_ops.bucket_sum(weights, index, num_buckets)


def test_range_error_reports_the_whole_index_range() -> None:
    # One bad id deep inside an otherwise valid table: the message names the overall range.
    index = torch.zeros(64, 50, dtype=torch.int32)
    index[40, 17] = 12
    index[3, 2] = -3
    with pytest.raises(RuntimeError, match=re.escape("found values in [-3, 12]")):
        irpe_ops.rpe_index(_x(2, 4, 64, 10), index)
    with pytest.raises(RuntimeError, match=re.escape("found values in [-3, 12]")):
        irpe_ops.bucket_sum(_x(2, 4, 64, 50), index, 10)


def test_int32_index_near_the_limits() -> None:
    index = torch.full((2, 3), torch.iinfo(torch.int32).max, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="index values must lie in"):
        irpe_ops.rpe_index(_x(1, 1, 2, 4), index)
    index.fill_(torch.iinfo(torch.int32).min)
    with pytest.raises(RuntimeError, match="index values must lie in"):
        irpe_ops.bucket_sum(_x(1, 1, 2, 3), index, 4)


def test_devices_must_agree() -> None:
    # A meta index with a CPU input: no CUDA needed to exercise the device check.
    with pytest.raises(RuntimeError, match="input and index must be on the same device"):
        irpe_ops.rpe_index(_x(1, 2, 3, 4), torch.zeros(3, 4, dtype=torch.int64, device="meta"))
    with pytest.raises(RuntimeError, match="weights and index must be on the same device"):
        irpe_ops.bucket_sum(_x(1, 2, 3, 4), torch.zeros(3, 4, dtype=torch.int64, device="meta"), 4)


def test_float_num_buckets_is_refused() -> None:
    with pytest.raises((RuntimeError, TypeError)):
        irpe_ops.bucket_sum(_x(1, 1, 2, 3), _ids(2, 3), 2.5)  # type: ignore[arg-type]


def test_meta_tensors_are_checked_too() -> None:
    meta = {"device": "meta"}
    with pytest.raises(
        RuntimeError, match=re.escape("input.size(2) (Lq) must equal index.size(0)")
    ):
        irpe_ops.rpe_index(
            torch.empty(1, 2, 3, 4, **meta), torch.empty(5, 4, dtype=torch.int64, **meta)
        )
    with pytest.raises(RuntimeError, match="num_buckets must be at least 1"):
        irpe_ops.bucket_sum(
            torch.empty(1, 2, 3, 4, **meta), torch.empty(3, 4, dtype=torch.int64, **meta), 0
        )
