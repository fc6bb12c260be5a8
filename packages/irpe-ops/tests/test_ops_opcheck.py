"""torch.library.opcheck on every operator: schema, autograd registration, fake tensors, AOT."""

from __future__ import annotations

import pytest
import torch
from ops_samples import make_data, make_index


def _rpe_index_samples(generator: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [
        (
            make_data((2, 3, 4, 5), torch.float32, "contiguous", generator).requires_grad_(),
            make_index(4, 6, 5, torch.int32, generator),
        ),
        (
            make_data((2, 3, 4, 5), torch.float64, "heads_major_view", generator),
            make_index(4, 3, 5, torch.int64, generator),
        ),
        (
            make_data((1, 2, 3, 1), torch.float16, "strided_last", generator),
            make_index(3, 4, 1, torch.int64, generator),
        ),
        (
            make_data((2, 2, 3, 4), torch.bfloat16, "expanded_batch", generator).requires_grad_(),
            make_index(3, 7, 4, torch.int32, generator),
        ),
    ]


def _bucket_sum_samples(generator: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    return [
        (
            make_data((2, 3, 4, 6), torch.float32, "contiguous", generator).requires_grad_(),
            make_index(4, 6, 5, torch.int32, generator),
            5,
        ),
        (
            make_data((2, 3, 4, 3), torch.float64, "heads_major_view", generator),
            make_index(4, 3, 5, torch.int64, generator),
            7,
        ),
        (
            make_data((1, 2, 3, 4), torch.float16, "strided_last", generator),
            make_index(3, 4, 1, torch.int64, generator),
            1,
        ),
        (
            make_data((2, 2, 3, 7), torch.bfloat16, "expanded_batch", generator).requires_grad_(),
            make_index(3, 7, 4, torch.int32, generator),
            4,
        ),
    ]


@pytest.mark.parametrize("sample", range(4))
def test_opcheck_rpe_index(sample: int, generator: torch.Generator) -> None:
    args = _rpe_index_samples(generator)[sample]
    torch.library.opcheck(torch.ops.irpe_ops.rpe_index.default, args)


@pytest.mark.parametrize("sample", range(4))
def test_opcheck_bucket_sum(sample: int, generator: torch.Generator) -> None:
    args = _bucket_sum_samples(generator)[sample]
    torch.library.opcheck(torch.ops.irpe_ops.bucket_sum.default, args)
