"""Box conversions, generalised IoU and box validation used by the matcher, losses and
post-processing. Thin wrappers over ``torchvision.ops``."""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_convert, generalized_box_iou

__all__ = [
    "box_cxcywh_to_xyxy",
    "box_xyxy_to_cxcywh",
    "check_boxes_xyxy",
    "elementwise_generalized_box_iou",
    "generalized_box_iou",
]


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """``(..., 4)`` ``(cx, cy, w, h)`` -> ``(cx - w/2, cy - h/2, cx + w/2, cy + h/2)``."""
    return box_convert(boxes, in_fmt="cxcywh", out_fmt="xyxy")


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """``(..., 4)`` ``(x0, y0, x1, y1)`` -> ``((x0+x1)/2, (y0+y1)/2, x1-x0, y1-y0)``."""
    return box_convert(boxes, in_fmt="xyxy", out_fmt="cxcywh")


def check_boxes_xyxy(boxes: Tensor, name: str) -> None:
    """Raise ``ValueError`` naming ``name`` unless every ``(x0, y0, x1, y1)`` row is finite with
    ``x1 >= x0`` and ``y1 >= y0`` (GIoU is undefined otherwise)."""
    if boxes.dim() < 1 or boxes.shape[-1] != 4:
        raise ValueError(f"{name} must have shape (..., 4), got {tuple(boxes.shape)}")
    if boxes.numel() == 0:
        return
    finite = torch.isfinite(boxes).all(dim=-1)
    ordered = (boxes[..., 2:] >= boxes[..., :2]).all(dim=-1)
    bad = ~(finite & ordered)
    if bool(bad.any()):
        first = bad.nonzero()[0].tolist()
        raise ValueError(
            f"{name} holds {int(bad.sum())} degenerate or non-finite box(es) (need x1 >= x0 and "
            f"y1 >= y0 after conversion to xyxy); first at index {first}: "
            f"{boxes[tuple(first)].tolist()}"
        )


def elementwise_generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """GIoU of corresponding rows of ``boxes1 (N, 4)`` and ``boxes2 (N, 4)`` (xyxy) -> ``(N,)``.

    Uses torchvision's batched pairwise function on ``N`` 1x1 problems, which computes the exact
    formula ``IoU - (area_C - union) / area_C`` without the epsilon of
    ``torchvision.ops.generalized_box_iou_loss``.
    """
    return generalized_box_iou(boxes1.unsqueeze(-2), boxes2.unsqueeze(-2)).reshape(
        boxes1.shape[:-1]
    )
