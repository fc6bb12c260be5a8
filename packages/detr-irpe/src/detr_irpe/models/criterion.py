"""The DETR training losses, as the original ``SetCriterion``."""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn import functional as F

from detr_irpe.models.box_ops import box_cxcywh_to_xyxy, elementwise_generalized_box_iou
from detr_irpe.models.matcher import HungarianMatcher
from detr_irpe.models.outputs import as_float32

__all__ = ["DEFAULT_LOSSES", "SetCriterion", "build_weight_dict", "top1_error"]

# Losses computed by default; 'masks' (segmentation) is not supported by this package.
DEFAULT_LOSSES = ("labels", "boxes", "cardinality")

Indices = Sequence[tuple[Tensor, Tensor]]


def top1_error(logits: Tensor, labels: Tensor) -> Tensor:
    """``100 - top-1 accuracy`` in percent of ``logits (n, C)`` against ``labels (n,)``.

    With no sample the accuracy is taken as 0, i.e. the error is 100 (the original's value).
    """
    if labels.numel() == 0:
        return torch.full((), 100.0, device=logits.device)
    correct = (logits.argmax(-1) == labels).float().sum()
    return 100.0 - correct * (100.0 / labels.numel())


def build_weight_dict(args: argparse.Namespace) -> dict[str, float]:
    """``{loss_ce: 1, loss_bbox: bbox_loss_coef, loss_giou: giou_loss_coef}``, repeated with the
    suffixes ``_0 .. _{dec_layers-2}`` for the auxiliary decoder outputs when ``aux_loss``."""
    weight_dict = {
        "loss_ce": 1.0,
        "loss_bbox": args.bbox_loss_coef,
        "loss_giou": args.giou_loss_coef,
    }
    if args.aux_loss:
        aux_weight_dict = {}
        for layer in range(args.dec_layers - 1):
            aux_weight_dict.update({f"{k}_{layer}": v for k, v in weight_dict.items()})
        weight_dict.update(aux_weight_dict)
    return weight_dict


def _average_num_boxes(targets: Sequence[Mapping[str, Tensor]], device: torch.device) -> Tensor:
    """Targets per process, averaged over all processes, at least 1 (a 0-d float32 tensor).

    A single all-reduce when ``torch.distributed`` is initialised; gloo reduces a CPU tensor,
    other backends a tensor on ``device``.
    """
    count = float(sum(len(t["labels"]) for t in targets))
    world_size = 1
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        world_size = dist.get_world_size()
        reduce_device = torch.device("cpu") if dist.get_backend() == "gloo" else device
        total = torch.tensor([count], dtype=torch.float32, device=reduce_device)
        dist.all_reduce(total)
        return torch.clamp(total[0].to(device) / world_size, min=1)
    return torch.tensor(max(count, 1.0), dtype=torch.float32, device=device)


class SetCriterion(nn.Module):
    """Hungarian-matched set losses.

    Args:
        num_classes: real classes; index ``num_classes`` of the logits is "no object".
        matcher: assigns queries to targets.
        weight_dict: weight of every loss key that enters the total loss (informational here;
            the caller forms ``sum(weight_dict[k] * losses[k])``).
        eos_coef: cross-entropy weight of the no-object class.
        losses: any of ``'labels'``, ``'boxes'``, ``'cardinality'``.

    ``forward(outputs, targets)`` returns a dict of 0-d tensors:
    ``loss_ce``, ``class_error`` (from ``'labels'``), ``loss_bbox``, ``loss_giou``
    (``'boxes'``), ``cardinality_error`` (``'cardinality'``), and for every entry ``k`` of
    ``outputs['aux_outputs']`` the same keys suffixed ``_k`` (without ``class_error``).
    Everything is computed in float32, also under autocast.
    """

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher,
        weight_dict: Mapping[str, float],
        eos_coef: float,
        losses: Sequence[str] = DEFAULT_LOSSES,
    ) -> None:
        super().__init__()
        unknown = [name for name in losses if name not in DEFAULT_LOSSES]
        if unknown:
            raise ValueError(
                f"unsupported losses {unknown}; available: {list(DEFAULT_LOSSES)} (the "
                "segmentation 'masks' loss is not implemented)"
            )
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.eos_coef = eos_coef
        self.losses = list(losses)
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight)

    @staticmethod
    def _src_permutation_idx(indices: Indices) -> tuple[Tensor, Tensor]:
        """``(batch_idx, query_idx)`` of all matched queries, image by image."""
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        src_idx = torch.cat([src for src, _ in indices])
        return batch_idx, src_idx

    def loss_labels(
        self,
        outputs: Mapping[str, Tensor],
        targets: Sequence[Mapping[str, Tensor]],
        indices: Indices,
        num_boxes: Tensor,
        log: bool = True,
    ) -> dict[str, Tensor]:
        """``loss_ce``: weighted cross-entropy over all ``N*Q`` queries (unmatched ones target
        "no object", weighted ``eos_coef``); ``class_error`` (with ``log``)."""
        src_logits = outputs["pred_logits"]
        idx = self._src_permutation_idx(indices)
        target_classes_o = torch.cat(
            [t["labels"][tgt] for t, (_, tgt) in zip(targets, indices, strict=True)]
        ).to(src_logits.device)
        target_classes = torch.full(
            src_logits.shape[:2], self.num_classes, dtype=torch.int64, device=src_logits.device
        )
        target_classes[idx] = target_classes_o
        # Flattening instead of the original's transpose(1, 2): the same weighted mean, no copy.
        loss_ce = F.cross_entropy(
            src_logits.flatten(0, 1),
            target_classes.flatten(),
            weight=self.empty_weight.to(src_logits.device),
        )
        losses = {"loss_ce": loss_ce}
        if log:
            with torch.no_grad():
                losses["class_error"] = top1_error(src_logits[idx], target_classes_o)
        return losses

    @torch.no_grad()
    def loss_cardinality(
        self,
        outputs: Mapping[str, Tensor],
        targets: Sequence[Mapping[str, Tensor]],
        indices: Indices,
        num_boxes: Tensor,
    ) -> dict[str, Tensor]:
        """``cardinality_error``: mean over images of ``|#queries not predicting no-object -
        #targets|`` (logging only, no gradient)."""
        pred_logits = outputs["pred_logits"]
        tgt_lengths = torch.as_tensor(
            [len(t["labels"]) for t in targets], dtype=torch.float32, device=pred_logits.device
        )
        card_pred = (pred_logits.argmax(-1) != pred_logits.shape[-1] - 1).sum(1)
        return {"cardinality_error": F.l1_loss(card_pred.float(), tgt_lengths)}

    def loss_boxes(
        self,
        outputs: Mapping[str, Tensor],
        targets: Sequence[Mapping[str, Tensor]],
        indices: Indices,
        num_boxes: Tensor,
    ) -> dict[str, Tensor]:
        """``loss_bbox``: L1 distance of matched normalised cxcywh boxes / ``num_boxes``;
        ``loss_giou``: ``sum(1 - GIoU) / num_boxes``."""
        idx = self._src_permutation_idx(indices)
        src_boxes = outputs["pred_boxes"][idx]
        target_boxes = torch.cat(
            [t["boxes"][tgt] for t, (_, tgt) in zip(targets, indices, strict=True)], dim=0
        ).to(src_boxes)
        loss_bbox = F.l1_loss(src_boxes, target_boxes, reduction="none").sum() / num_boxes
        giou = elementwise_generalized_box_iou(
            box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(target_boxes)
        )
        loss_giou = (1 - giou).sum() / num_boxes
        return {"loss_bbox": loss_bbox, "loss_giou": loss_giou}

    def get_loss(
        self,
        loss: str,
        outputs: Mapping[str, Tensor],
        targets: Sequence[Mapping[str, Tensor]],
        indices: Indices,
        num_boxes: Tensor,
        **kwargs: bool,
    ) -> dict[str, Tensor]:
        loss_map = {
            "labels": self.loss_labels,
            "cardinality": self.loss_cardinality,
            "boxes": self.loss_boxes,
        }
        return loss_map[loss](outputs, targets, indices, num_boxes, **kwargs)

    def forward(
        self, outputs: Mapping[str, object], targets: Sequence[Mapping[str, Tensor]]
    ) -> dict[str, Tensor]:
        """
        Args:
            outputs: the model's dict (``pred_logits (N, Q, C+1)``, ``pred_boxes (N, Q, 4)``,
                optional ``aux_outputs``), any floating dtype: cast to float32 once here
                (:func:`~detr_irpe.models.outputs.as_float32`), so the losses and the
                matching run in float32 under ``--amp`` too.
            targets: ``N`` dicts with ``labels (n_b,)`` and ``boxes (n_b, 4)`` normalised cxcywh.
        """
        outputs = as_float32(outputs)
        device = outputs["pred_logits"].device
        with torch.autocast(device.type, enabled=False):
            outputs_without_aux = {k: v for k, v in outputs.items() if k != "aux_outputs"}
            indices = self.matcher(outputs_without_aux, targets)
            num_boxes = _average_num_boxes(targets, device)

            losses: dict[str, Tensor] = {}
            for loss in self.losses:
                losses.update(self.get_loss(loss, outputs_without_aux, targets, indices, num_boxes))
            for layer, aux_outputs in enumerate(outputs.get("aux_outputs", ())):  # type: ignore[arg-type]
                indices = self.matcher(aux_outputs, targets)
                for loss in self.losses:
                    kwargs = {"log": False} if loss == "labels" else {}
                    layer_losses = self.get_loss(
                        loss, aux_outputs, targets, indices, num_boxes, **kwargs
                    )
                    losses.update({f"{k}_{layer}": v for k, v in layer_losses.items()})
        return losses
