"""One-to-one assignment of predictions to ground-truth objects."""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from detr_irpe.models.box_ops import box_cxcywh_to_xyxy, check_boxes_xyxy, generalized_box_iou
from detr_irpe.models.outputs import as_float32

__all__ = ["HungarianMatcher", "build_matcher", "validate_targets"]


class HungarianMatcher(nn.Module):
    """Minimum-cost bipartite matching between the queries and the targets of every image.

    Cost of predicting target ``j`` with query ``i``:
    ``cost_bbox * ||b_i - b_j||_1 - cost_class * prob_i[label_j] - cost_giou * GIoU(b_i, b_j)``
    (boxes normalised cxcywh; ``prob`` a softmax over all logits, no-object included).
    Computed in float32 whatever the autocast state.
    """

    def __init__(self, cost_class: float = 1, cost_bbox: float = 1, cost_giou: float = 1) -> None:
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher: all costs are 0")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou

    @torch.no_grad()
    def forward(
        self, outputs: Mapping[str, Tensor], targets: Sequence[Mapping[str, Tensor]]
    ) -> list[tuple[Tensor, Tensor]]:
        """
        Args:
            outputs: ``pred_logits (N, Q, C+1)`` and ``pred_boxes (N, Q, 4)`` (cxcywh), any
                floating dtype (matched in float32, see :mod:`detr_irpe.models.outputs`).
            targets: ``N`` dicts with ``labels (n_b,)`` int64 in ``[0, C)`` and
                ``boxes (n_b, 4)`` normalised cxcywh.

        Returns:
            per image ``(pred_idx, gt_idx)``, int64 CPU tensors of length ``min(Q, n_b)``,
            ``pred_idx`` ascending.
        """
        pred_logits = as_float32(outputs["pred_logits"])
        pred_boxes = as_float32(outputs["pred_boxes"])
        bs, num_queries, num_logits = pred_logits.shape
        if len(targets) != bs:
            raise ValueError(f"the matcher got {len(targets)} target dicts for {bs} images")
        sizes = []
        for index, target in enumerate(targets):
            labels, boxes = target["labels"], target["boxes"]
            if labels.dim() != 1 or boxes.dim() != 2 or boxes.shape != (labels.shape[0], 4):
                raise ValueError(
                    f"targets[{index}]: labels {tuple(labels.shape)} and boxes "
                    f"{tuple(boxes.shape)} must have shapes (n,) and (n, 4)"
                )
            if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
                raise TypeError(
                    f"targets[{index}]['labels'] must be an integer tensor, got {labels.dtype}"
                )
            sizes.append(labels.shape[0])
        if sum(sizes) == 0:
            empty = torch.empty(0, dtype=torch.int64)
            return [(empty, empty) for _ in targets]

        with torch.autocast(pred_logits.device.type, enabled=False):
            out_prob = pred_logits.flatten(0, 1).softmax(-1)  # (N*Q, C+1)
            out_bbox = pred_boxes.flatten(0, 1)  # (N*Q, 4)
            tgt_ids = torch.cat([t["labels"] for t in targets]).to(out_prob.device)
            tgt_bbox = torch.cat([t["boxes"] for t in targets]).to(out_bbox)
            out_xyxy = box_cxcywh_to_xyxy(out_bbox)
            # Labels are clamped for the lookup so that a bad label cannot trigger a CUDA
            # device-side assert; the validity flags are checked after the single device->host
            # copy below, which keeps this function at one synchronisation.
            cost = (
                self.cost_bbox * torch.cdist(out_bbox, tgt_bbox, p=1)
                - self.cost_class * out_prob[:, tgt_ids.clamp(0, num_logits - 1)]
                - self.cost_giou * generalized_box_iou(out_xyxy, box_cxcywh_to_xyxy(tgt_bbox))
            )
            flags = torch.stack(
                [
                    _labels_valid(tgt_ids, num_logits - 1),
                    _boxes_valid(tgt_bbox),
                    _boxes_valid(out_bbox, check_range=False),
                ]
            )
        cost = cost.view(bs, num_queries, -1).cpu()
        labels_ok, targets_ok, predictions_ok = flags.tolist()
        if not (labels_ok and targets_ok):
            validate_targets(targets, num_logits - 1)
        if not predictions_ok:
            check_boxes_xyxy(out_xyxy, "outputs['pred_boxes']")
        if not bool(torch.isfinite(cost).all()):
            raise ValueError(
                "the matching cost is not finite: outputs['pred_logits'] holds NaN/inf "
                "(has the training diverged?)"
            )
        indices = []
        for image, image_cost in enumerate(cost.split(sizes, -1)):
            rows, cols = linear_sum_assignment(image_cost[image].numpy())
            indices.append(
                (torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64))
            )
        return indices


# Tolerance on the [0, 1] range of normalised target boxes (float rounding of x / W).
_BOX_RANGE_TOLERANCE = 1e-3


def _labels_valid(labels: Tensor, num_classes: int) -> Tensor:
    """0-d bool tensor: every label is a real class, in ``[0, num_classes)``."""
    return ((labels >= 0) & (labels < num_classes)).all()


def _boxes_valid(boxes: Tensor, check_range: bool = True) -> Tensor:
    """0-d bool tensor: every ``(cx, cy, w, h)`` row is finite with ``w, h >= 0`` (and, with
    ``check_range``, lies in [0, 1])."""
    valid = torch.isfinite(boxes).all(-1) & (boxes[..., 2:] >= 0).all(-1)
    if check_range:
        in_range = (boxes >= -_BOX_RANGE_TOLERANCE) & (boxes <= 1 + _BOX_RANGE_TOLERANCE)
        valid = valid & in_range.all(-1)
    return valid.all()


def validate_targets(targets: Sequence[Mapping[str, Tensor]], num_classes: int) -> None:
    """Raise ``ValueError`` naming the first image whose ``labels`` are outside
    ``[0, num_classes)`` or whose ``boxes`` are not normalised ``(cx, cy, w, h)`` in [0, 1]."""
    for index, target in enumerate(targets):
        labels, boxes = target["labels"], target["boxes"]
        if not bool(_labels_valid(labels, num_classes)):
            raise ValueError(
                f"targets[{index}]['labels'] holds labels in [{int(labels.min())}, "
                f"{int(labels.max())}] but the model has {num_classes} classes (labels must lie "
                f"in [0, {num_classes}); {num_classes} is 'no object'); build the model with a "
                "larger --num_classes"
            )
        if boxes.numel() and not bool(torch.isfinite(boxes).all()):
            raise ValueError(f"targets[{index}]['boxes'] holds NaN or inf")
        if not bool(_boxes_valid(boxes.float())):
            raise ValueError(
                f"targets[{index}]['boxes'] must be normalised (cx, cy, w, h) boxes in [0, 1] "
                f"with w, h >= 0; got values in [{float(boxes.min())}, {float(boxes.max())}] "
                f"and min w/h {float(boxes[:, 2:].min())}"
            )


def build_matcher(args: argparse.Namespace) -> HungarianMatcher:
    return HungarianMatcher(
        cost_class=args.set_cost_class, cost_bbox=args.set_cost_bbox, cost_giou=args.set_cost_giou
    )
