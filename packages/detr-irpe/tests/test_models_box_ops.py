"""Box conversions and generalised IoU against naive formulas."""

from __future__ import annotations

import pytest
import torch

from detr_irpe.models.box_ops import (
    box_cxcywh_to_xyxy,
    box_xyxy_to_cxcywh,
    check_boxes_xyxy,
    elementwise_generalized_box_iou,
    generalized_box_iou,
)


def naive_giou(a: list[float], b: list[float]) -> float:
    """GIoU = IoU - (area_C - union) / area_C for xyxy boxes, written from the definition."""
    area_a = (a[2] - a[0]) * (a[3] - a[1])
    area_b = (b[2] - b[0]) * (b[3] - b[1])
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = area_a + area_b - inter
    cw = max(a[2], b[2]) - min(a[0], b[0])
    ch = max(a[3], b[3]) - min(a[1], b[1])
    area_c = cw * ch
    return inter / union - (area_c - union) / area_c


def random_cxcywh(n: int, generator: torch.Generator) -> torch.Tensor:
    centre = torch.rand(n, 2, generator=generator, dtype=torch.float64)
    size = 0.05 + 0.5 * torch.rand(n, 2, generator=generator, dtype=torch.float64)
    return torch.cat([centre, size], dim=1)


def test_conversions_match_the_formulas_and_invert() -> None:
    boxes = random_cxcywh(20, torch.Generator().manual_seed(0))
    xyxy = box_cxcywh_to_xyxy(boxes)
    for (cx, cy, w, h), (x0, y0, x1, y1) in zip(boxes.tolist(), xyxy.tolist(), strict=True):
        assert (x0, y0, x1, y1) == pytest.approx((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2))
    back = box_xyxy_to_cxcywh(xyxy)
    for (x0, y0, x1, y1), (cx, cy, w, h) in zip(xyxy.tolist(), back.tolist(), strict=True):
        assert (cx, cy, w, h) == pytest.approx(((x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0))
    torch.testing.assert_close(back, boxes)


def test_pairwise_and_elementwise_giou_match_naive() -> None:
    generator = torch.Generator().manual_seed(1)
    a = box_cxcywh_to_xyxy(random_cxcywh(6, generator))
    b = box_cxcywh_to_xyxy(random_cxcywh(5, generator))
    pairwise = generalized_box_iou(a, b)
    for i in range(6):
        for j in range(5):
            assert float(pairwise[i, j]) == pytest.approx(naive_giou(a[i].tolist(), b[j].tolist()))
    elementwise = elementwise_generalized_box_iou(a[:5], b)
    for i in range(5):
        assert float(elementwise[i]) == pytest.approx(naive_giou(a[i].tolist(), b[i].tolist()))


def test_giou_special_values() -> None:
    box = torch.tensor([[0.1, 0.2, 0.4, 0.6]])
    assert float(elementwise_generalized_box_iou(box, box)[0]) == pytest.approx(1.0)
    far_a = torch.tensor([[0.0, 0.0, 0.1, 0.1]])
    far_b = torch.tensor([[0.9, 0.9, 1.0, 1.0]])
    # Disjoint boxes far apart: IoU 0 and the penalty approaches 1.
    assert float(elementwise_generalized_box_iou(far_a, far_b)[0]) == pytest.approx(
        0 - (1.0 - 0.02) / 1.0
    )
    assert elementwise_generalized_box_iou(torch.zeros(0, 4), torch.zeros(0, 4)).shape == (0,)


def test_degenerate_boxes_are_named() -> None:
    check_boxes_xyxy(torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.1, 0.1, 0.2, 0.3]]), "ok")
    with pytest.raises(ValueError, match=r"my_boxes .* 1 degenerate .* index \[1\]"):
        check_boxes_xyxy(torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.5, 0.1, 0.4, 0.3]]), "my_boxes")
    with pytest.raises(ValueError, match="non-finite"):
        check_boxes_xyxy(torch.tensor([[0.0, float("nan"), 1.0, 1.0]]), "nan_boxes")
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 4\)"):
        check_boxes_xyxy(torch.zeros(3, 5), "wide")
