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


def _rpe_attention_samples(generator: torch.Generator) -> list[tuple]:
    """(q, k, v, ids, wq, wk, wv, key_padding_mask, dropout_p, seed, offset) samples."""

    def qkv(B: int, H: int, L: int, D: int, dtype: torch.dtype) -> list[torch.Tensor]:
        return [
            torch.randn(B, H, L, D, generator=generator, dtype=dtype).requires_grad_()
            for _ in range(3)
        ]

    def table(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=dtype).requires_grad_()

    q, k, v = qkv(2, 2, 70, 8, torch.float32)
    mask = torch.zeros(2, 70, dtype=torch.bool)
    mask[1, 3:9] = True
    ids = make_index(70, 70, 5, torch.int32, generator)
    q2, k2, v2 = qkv(1, 3, 9, 4, torch.float64)
    q3, k3, v3 = qkv(2, 2, 12, 8, torch.bfloat16)
    return [
        (q, k, v, ids, table(1, 8, 5), table(2, 8, 5), table(1, 5, 8), mask, 0.1, 3, 1),
        (
            q2,
            k2,
            v2,
            make_index(9, 9, 4, torch.int32, generator),
            None,
            table(1, 4, 4, dtype=torch.float64),
            None,
            None,
            0.0,
            0,
            0,
        ),
        (
            q3,
            k3,
            v3,
            make_index(12, 12, 3, torch.int32, generator),
            None,
            None,
            table(2, 3, 8, dtype=torch.bfloat16),
            None,
            0.5,
            11,
            0,
        ),
    ]


@pytest.mark.parametrize("sample", range(3))
def test_opcheck_rpe_attention(sample: int, generator: torch.Generator) -> None:
    args = _rpe_attention_samples(generator)[sample]
    torch.library.opcheck(torch.ops.irpe_ops.rpe_attention.default, args)


@pytest.mark.parametrize("sample", range(3))
def test_opcheck_rpe_attention_backward(sample: int, generator: torch.Generator) -> None:
    q, k, v, ids, wq, wk, wv, mask, p, seed, offset = _rpe_attention_samples(generator)[sample]
    with torch.no_grad():
        out, lse = torch.ops.irpe_ops.rpe_attention.default(
            q, k, v, ids, wq, wk, wv, mask, p, seed, offset
        )
    grad = torch.randn(out.shape, generator=generator).to(out.dtype)
    args = (grad, q.detach(), k.detach(), v.detach(), ids)
    tables = tuple(w.detach() if w is not None else None for w in (wq, wk, wv))
    torch.library.opcheck(
        torch.ops.irpe_ops.rpe_attention_backward.default,
        (*args, *tables, mask, out, lse, p, seed, offset),
    )


def test_opcheck_keep_mask() -> None:
    torch.library.opcheck(
        torch.ops.irpe_ops._rpe_attention_keep_mask.default, (torch.empty(2, 3, 7, 1), 0.3, 5, 2)
    )
