"""Model outputs to per-image detections in original-image pixels."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from detr_irpe.models.box_ops import box_cxcywh_to_xyxy
from detr_irpe.models.outputs import as_float32

__all__ = ["PostProcess", "decode_detections"]


def decode_detections(
    pred_logits: Tensor, pred_boxes: Tensor, target_sizes: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Every query's best real class, its score and its box in original-image pixels.

    No shape checks and no Python control flow, so that it traces into an exported graph
    (``detr-irpe-export --postprocess``); :class:`PostProcess` checks its inputs first.

    Args:
        pred_logits: ``(N, Q, C+1)``, the last class being no-object.
        pred_boxes: ``(N, Q, 4)`` normalised ``(cx, cy, w, h)``.
        target_sizes: ``(N, 2)`` original image sizes ``(height, width)``, any dtype.

    Returns:
        ``scores (N, Q)`` float32, ``labels (N, Q)`` int64, ``boxes (N, Q, 4)`` float32
        absolute ``(x0, y0, x1, y1)``. The scores come from the softmax over all logits
        (no-object included in the normalisation, excluded from the max).
    """
    prob = as_float32(pred_logits).softmax(-1)
    scores, labels = prob[..., :-1].max(-1)
    boxes = box_cxcywh_to_xyxy(as_float32(pred_boxes))
    img_h, img_w = target_sizes.to(boxes).unbind(1)
    scale_fct = torch.stack([img_w, img_h, img_w, img_h], dim=1)
    return scores, labels, boxes * scale_fct[:, None, :]


class PostProcess(nn.Module):
    """Converts ``pred_logits``/``pred_boxes`` to the format the COCO API expects.

    Every query yields one detection (no threshold, no top-k): its score and label are the
    best real class of the softmax over all logits (no-object excluded from the max, included
    in the normalisation).
    """

    @torch.no_grad()
    def forward(
        self, outputs: Mapping[str, Tensor], target_sizes: Tensor
    ) -> list[dict[str, Tensor]]:
        """
        Args:
            outputs: ``pred_logits (N, Q, C+1)``, ``pred_boxes (N, Q, 4)`` normalised cxcywh.
            target_sizes: ``(N, 2)`` original image sizes ``(height, width)``.

        Returns:
            per image ``{'scores': (Q,) float32, 'labels': (Q,) int64, 'boxes': (Q, 4) float32}``,
            boxes absolute ``(x0, y0, x1, y1)`` in the original image.
        """
        out_logits, out_bbox = outputs["pred_logits"], outputs["pred_boxes"]
        if target_sizes.dim() != 2 or target_sizes.shape[1] != 2:
            raise ValueError(
                "target_sizes must have shape (N, 2) (height, width), got "
                f"{tuple(target_sizes.shape)}"
            )
        if len(out_logits) != len(target_sizes):
            raise ValueError(
                f"{len(target_sizes)} target sizes for a batch of {len(out_logits)} images"
            )
        scores, labels, boxes = decode_detections(out_logits, out_bbox, target_sizes)
        return [
            {"scores": s, "labels": lab, "boxes": b}
            for s, lab, b in zip(scores, labels, boxes, strict=True)
        ]
