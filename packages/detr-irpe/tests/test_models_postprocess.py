"""PostProcess against a naive per-query computation."""

from __future__ import annotations

import math

import pytest
import torch

from detr_irpe.models.postprocess import PostProcess


def test_matches_naive() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 6, generator=generator)
    logits[0, 1, -1] = 10.0  # a query that is confidently "no object"
    boxes = torch.rand(2, 4, 4, generator=generator) * 0.5 + 0.1
    sizes = torch.tensor([[480, 640], [300, 200]])
    results = PostProcess()({"pred_logits": logits, "pred_boxes": boxes}, sizes)
    assert len(results) == 2
    for b, result in enumerate(results):
        assert set(result) == {"scores", "labels", "boxes"}
        height, width = sizes[b].tolist()
        for q in range(4):
            row = logits[b, q].tolist()
            z = sum(math.exp(v) for v in row)
            probs = [math.exp(v) / z for v in row[:-1]]  # no-object excluded from the max only
            best = max(range(5), key=lambda c: probs[c])
            assert int(result["labels"][q]) == best
            assert float(result["scores"][q]) == pytest.approx(probs[best], rel=1e-5)
            cx, cy, w, h = boxes[b, q].tolist()
            expected = [
                (cx - w / 2) * width,
                (cy - h / 2) * height,
                (cx + w / 2) * width,
                (cy + h / 2) * height,
            ]
            assert result["boxes"][q].tolist() == pytest.approx(expected, rel=1e-5)
    assert float(results[0]["scores"][1]) < 0.01


def test_size_errors() -> None:
    outputs = {"pred_logits": torch.zeros(2, 3, 4), "pred_boxes": torch.full((2, 3, 4), 0.5)}
    with pytest.raises(ValueError, match=r"shape \(N, 2\)"):
        PostProcess()(outputs, torch.tensor([480, 640]))
    with pytest.raises(ValueError, match="1 target sizes for a batch of 2"):
        PostProcess()(outputs, torch.tensor([[480, 640]]))
