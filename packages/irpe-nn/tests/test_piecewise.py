"""piecewise_index against the definition of g (docs/layers.md, 'Bucket ids'): level tables
and a per-element reference."""

from __future__ import annotations

import math

import pytest
import torch
from reference import coefficients, g_ref

from irpe_nn import piecewise_index

RATIOS = [0.5, 1.0, 1.5, 1.9, 2.0, 2.2, 2.5, 3.0, 4.0]

# The first x >= 0 reaching each level g = 0, 1, 2, ...
LEVEL_STARTS = {
    1.9: [0, 1, 2, 4],
    2.0: [0, 1, 2, 4, 10],
    2.5: [0, 1, 2, 3, 6, 14],
    3.0: [0, 1, 2, 3, 5, 9, 17],
}


def expected_level(ratio: float, x: int) -> int:
    starts = LEVEL_STARTS[ratio]
    level = max(i for i, start in enumerate(starts) if abs(x) >= start)
    return int(math.copysign(level, x)) if x else 0


@pytest.mark.parametrize("ratio", sorted(LEVEL_STARTS))
def test_level_table(ratio):
    x = torch.arange(-40, 41)
    got = piecewise_index(x, *coefficients(ratio), dtype=torch.long)
    assert got.tolist() == [expected_level(ratio, int(v)) for v in x]


@pytest.mark.parametrize("ratio", RATIOS)
def test_integers_match_reference(ratio):
    x = torch.arange(-3000, 3001)
    got = piecewise_index(x, *coefficients(ratio), dtype=torch.long)
    want = [g_ref(int(v), *coefficients(ratio), integer=True) for v in x]
    assert got.tolist() == want


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ratio", [0.5, 1.9, 2.0, 2.5, 3.0, 4.0])
def test_floats_match_reference(ratio, dtype):
    x = torch.linspace(-50, 50, 20001, dtype=dtype)
    got = piecewise_index(x, *coefficients(ratio), dtype=torch.long)
    want = [g_ref(float(v), *coefficients(ratio), integer=False) for v in x]
    assert got.tolist() == want


def test_inside_values_round_half_to_even():
    x = torch.tensor([-1.5, -0.5, 0.5, 1.5, 2.5, 1.49])
    got = piecewise_index(x, 3.0, 6.0, 24.0, dtype=torch.long)
    assert got.tolist() == [-2, 0, 0, 2, 2, 1]


def test_clip_at_beta_then_truncate():
    # ratio 1.9: t(19) = 4.004 -> 4 -> clipped to 3.8 -> truncated to 3.
    got = piecewise_index(torch.tensor([19, -19, 1000]), 1.9, 3.8, 15.2, dtype=torch.long)
    assert got.tolist() == [3, -3, 3]


@pytest.mark.parametrize("in_dtype", [torch.int16, torch.int32, torch.int64])
@pytest.mark.parametrize("out_dtype", [torch.int16, torch.int32, torch.int64])
def test_every_integer_dtype_combination(in_dtype, out_dtype):
    """The original fails when an integer input dtype differs from ``dtype``."""
    x = torch.arange(-200, 201, dtype=in_dtype)
    got = piecewise_index(x, 2.0, 4.0, 16.0, dtype=out_dtype)
    assert got.dtype == out_dtype
    assert got.tolist() == [g_ref(int(v), 2.0, 4.0, 16.0, integer=True) for v in x]


@pytest.mark.parametrize("in_dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_are_rounded(in_dtype):
    x = torch.tensor([-7.0, -1.25, 0.75, 1.5, 30.0], dtype=in_dtype)
    got = piecewise_index(x, 2.0, 4.0, 16.0, dtype=torch.int32)
    assert got.dtype == torch.int32
    assert got.tolist() == [g_ref(float(v), 2.0, 4.0, 16.0, integer=False) for v in x]


def test_no_gradient_and_shape_kept():
    x = torch.randn(3, 4, 5, requires_grad=True) * 20
    got = piecewise_index(x, 2.0, 4.0, 16.0, dtype=torch.long)
    assert got.shape == (3, 4, 5) and not got.requires_grad


def test_bad_arguments():
    with pytest.raises(ValueError, match="integer dtype"):
        piecewise_index(torch.arange(3), 2.0, 4.0, 16.0, dtype=torch.float32)
    with pytest.raises(ValueError, match="alpha > 0"):
        piecewise_index(torch.arange(3), 0.0, 4.0, 16.0, dtype=torch.long)
    with pytest.raises(ValueError, match="real"):
        piecewise_index(torch.ones(3, dtype=torch.bool), 2.0, 4.0, 16.0, dtype=torch.long)
