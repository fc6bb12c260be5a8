"""Sine and learned position encodings against naive formulas."""

from __future__ import annotations

import argparse
import math

import pytest
import torch

from detr_irpe.models.position_encoding import (
    PositionEmbeddingLearned,
    PositionEmbeddingSine,
    build_position_encoding,
)
from detr_irpe.nested_tensor import NestedTensor


def padded_batch(
    sizes: list[tuple[int, int]], height: int, width: int, channels: int = 2
) -> NestedTensor:
    mask = torch.ones(len(sizes), height, width, dtype=torch.bool)
    for b, (h, w) in enumerate(sizes):
        mask[b, :h, :w] = False
    return NestedTensor(torch.rand(len(sizes), channels, height, width), mask)


def naive_sine(mask: torch.Tensor, num_feats: int, normalize: bool) -> torch.Tensor:
    batch, height, width = mask.shape
    out = torch.zeros(batch, 2 * num_feats, height, width, dtype=torch.float64)
    for b in range(batch):
        for r in range(height):
            for c in range(width):
                y = sum(1 for rr in range(r + 1) if not mask[b, rr, c])
                x = sum(1 for cc in range(c + 1) if not mask[b, r, cc])
                if normalize:
                    y_last = sum(1 for rr in range(height) if not mask[b, rr, c])
                    x_last = sum(1 for cc in range(width) if not mask[b, r, cc])
                    y = y / (y_last + 1e-6) * 2 * math.pi
                    x = x / (x_last + 1e-6) * 2 * math.pi
                for k in range(num_feats):
                    dim_t = 10000 ** (2 * (k // 2) / num_feats)
                    trig = math.sin if k % 2 == 0 else math.cos
                    out[b, k, r, c] = trig(y / dim_t)  # rows first
                    out[b, num_feats + k, r, c] = trig(x / dim_t)  # then columns
    return out


@pytest.mark.parametrize("normalize", [True, False])
def test_sine_matches_naive(normalize: bool) -> None:
    batch = padded_batch([(3, 5), (4, 2)], height=4, width=5)
    encoding = PositionEmbeddingSine(8, normalize=normalize)
    pos = encoding(batch)
    assert pos.shape == (2, 16, 4, 5) and pos.dtype == torch.float32
    torch.testing.assert_close(
        pos.double(), naive_sine(batch.mask, 8, normalize), atol=2e-5, rtol=0
    )


def test_sine_valid_region_does_not_depend_on_padding() -> None:
    alone = PositionEmbeddingSine(8, normalize=True)(padded_batch([(3, 4)], 3, 4))
    padded = PositionEmbeddingSine(8, normalize=True)(padded_batch([(3, 4)], 6, 7))
    torch.testing.assert_close(padded[..., :3, :4], alone)


def test_learned_matches_naive_and_is_columns_first() -> None:
    torch.manual_seed(0)
    encoding = PositionEmbeddingLearned(6)
    assert encoding.row_embed.weight.shape == (50, 6) and encoding.col_embed.weight.shape == (50, 6)
    for table in (encoding.row_embed.weight.detach(), encoding.col_embed.weight.detach()):
        assert float(table.min()) >= 0 and float(table.max()) < 1  # uniform on [0, 1)
    batch = padded_batch([(2, 3), (3, 1)], height=3, width=4)
    pos = encoding(batch)
    assert pos.shape == (2, 12, 3, 4)
    for b in range(2):
        for r in range(3):
            for c in range(4):
                expected = torch.cat([encoding.col_embed.weight[c], encoding.row_embed.weight[r]])
                torch.testing.assert_close(pos[b, :, r, c], expected)


def test_learned_rejects_maps_larger_than_its_tables() -> None:
    with pytest.raises(ValueError, match=r"up to 50x50 .* got 51x3"):
        PositionEmbeddingLearned(4)(NestedTensor(torch.zeros(1, 1, 51, 3), None))


def test_build_position_encoding() -> None:
    sine = build_position_encoding(argparse.Namespace(hidden_dim=64, position_embedding="sine"))
    assert isinstance(sine, PositionEmbeddingSine) and sine.num_pos_feats == 32 and sine.normalize
    assert sine.scale == pytest.approx(2 * math.pi) and sine.temperature == 10000
    learned = build_position_encoding(
        argparse.Namespace(hidden_dim=64, position_embedding="learned")
    )
    assert isinstance(learned, PositionEmbeddingLearned)
    assert learned.row_embed.weight.shape == (50, 32)
    with pytest.raises(ValueError, match="unknown --position_embedding 'fourier'"):
        build_position_encoding(argparse.Namespace(hidden_dim=64, position_embedding="fourier"))
