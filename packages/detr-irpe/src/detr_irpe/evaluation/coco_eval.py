"""COCO box evaluation with pycocotools, across any number of processes.

:class:`CocoEvaluator` collects detections batch by batch, gathers them from every rank,
drops repeated images (``DistributedSampler`` pads the last batch with images another rank
already saw), then runs ``COCOeval`` once over all of them: ``evaluate``, ``accumulate``,
``summarize`` with the default COCO parameters (IoU 0.50:0.05:0.95, maxDets 1/10/100, area
all/small/medium/large). Running ``evaluate`` once at the end gives the same numbers as the
original's per-batch evaluation followed by merging, and is simpler.

pycocotools prints progress and the summary table; that output is captured and the table is
available from :func:`format_stats` for logging.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detr_irpe.utils.distributed import all_gather_object

__all__ = [
    "COCO_STAT_NAMES",
    "CocoEvaluator",
    "evaluation_report",
    "format_stats",
    "named_stats",
]

logger = logging.getLogger(__name__)

# The 12 numbers of COCOeval.summarize() for boxes, in order.
COCO_STAT_NAMES: tuple[str, ...] = (
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "AR1",
    "AR10",
    "AR100",
    "ARs",
    "ARm",
    "ARl",
)

_STAT_DESCRIPTIONS: tuple[str, ...] = (
    "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]",
    "Average Precision  (AP) @[ IoU=0.50      | area=   all | maxDets=100 ]",
    "Average Precision  (AP) @[ IoU=0.75      | area=   all | maxDets=100 ]",
    "Average Precision  (AP) @[ IoU=0.50:0.95 | area= small | maxDets=100 ]",
    "Average Precision  (AP) @[ IoU=0.50:0.95 | area=medium | maxDets=100 ]",
    "Average Precision  (AP) @[ IoU=0.50:0.95 | area= large | maxDets=100 ]",
    "Average Recall     (AR) @[ IoU=0.50:0.95 | area=   all | maxDets=  1 ]",
    "Average Recall     (AR) @[ IoU=0.50:0.95 | area=   all | maxDets= 10 ]",
    "Average Recall     (AR) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]",
    "Average Recall     (AR) @[ IoU=0.50:0.95 | area= small | maxDets=100 ]",
    "Average Recall     (AR) @[ IoU=0.50:0.95 | area=medium | maxDets=100 ]",
    "Average Recall     (AR) @[ IoU=0.50:0.95 | area= large | maxDets=100 ]",
)


def named_stats(stats: Sequence[float]) -> dict[str, float]:
    """``{'AP': ..., 'AP50': ..., ...}`` from the 12 summary numbers."""
    return {name: float(v) for name, v in zip(COCO_STAT_NAMES, stats, strict=True)}


def format_stats(stats: Sequence[float]) -> str:
    """The COCO summary table (one line per metric, as pycocotools prints it)."""
    lines = [
        f"{name:>5}  {desc} = {value:0.3f}"
        for name, desc, value in zip(COCO_STAT_NAMES, _STAT_DESCRIPTIONS, stats, strict=True)
    ]
    return "\n".join(lines)


def evaluation_report(stats: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
    """The JSON document the programmes write for an evaluation.

    ``{**extra, "metrics": {"AP": ..., ...}, "coco_eval_bbox": [12 floats],
    "losses": {other stats}}`` from the ``stats`` of :func:`detr_irpe.engine.evaluate`.
    """
    report: dict[str, Any] = dict(extra)
    coco = stats.get("coco_eval_bbox")
    if coco is not None:
        report["metrics"] = named_stats(coco)
        report["coco_eval_bbox"] = [float(v) for v in coco]
    report["losses"] = {k: float(v) for k, v in stats.items() if k != "coco_eval_bbox"}
    return report


def _xyxy_to_xywh(boxes: torch.Tensor) -> torch.Tensor:
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack((x0, y0, x1 - x0, y1 - y0), dim=-1)


class CocoEvaluator:
    """Accumulate detections and compute the COCO box metrics.

    Args:
        coco_gt: ground truth; deep-copied so the caller's object is never modified.

    Usage::

        evaluator = CocoEvaluator(coco_gt)
        for batch ...:
            evaluator.update({image_id: {"scores": (Q,), "labels": (Q,), "boxes": (Q, 4) xyxy}})
        evaluator.synchronize_between_processes()   # all ranks
        stats = evaluator.summarize()                # 12 floats (on every rank)
    """

    iou_type = "bbox"

    def __init__(self, coco_gt: COCO) -> None:
        self.coco_gt = copy.deepcopy(coco_gt)
        # image id -> detection records of that image; one entry per image, first seen wins.
        self._by_image: dict[int, list[dict[str, Any]]] = {}
        self.coco_eval: COCOeval | None = None
        self.stats: list[float] | None = None

    @property
    def img_ids(self) -> list[int]:
        """Ids of the images seen so far (sorted)."""
        return sorted(self._by_image)

    def update(self, predictions: Mapping[int, Mapping[str, torch.Tensor]]) -> None:
        """Add the detections of some images.

        Args:
            predictions: ``{image_id: {'scores' (Q,), 'labels' (Q,) category ids,
                'boxes' (Q, 4) absolute xyxy}}``, as ``PostProcess`` returns them. An image
                with no detections still counts as evaluated.
        """
        for image_id, pred in predictions.items():
            image_id = int(image_id)
            if image_id in self._by_image:
                continue  # the same image again (sampler padding): keep the first copy
            boxes = _xyxy_to_xywh(pred["boxes"].detach().float().cpu()).tolist()
            scores = pred["scores"].detach().float().cpu().tolist()
            labels = pred["labels"].detach().cpu().tolist()
            self._by_image[image_id] = [
                {"image_id": image_id, "category_id": int(c), "bbox": b, "score": float(s)}
                for b, s, c in zip(boxes, scores, labels, strict=True)
            ]

    def synchronize_between_processes(self) -> None:
        """Merge the detections of every rank (a collective: call it on all ranks)."""
        merged: dict[int, list[dict[str, Any]]] = {}
        for part in all_gather_object(self._by_image):
            for image_id, records in part.items():
                merged.setdefault(image_id, records)
        self._by_image = merged

    def _results(self, records: list[dict[str, Any]]) -> COCO:
        with contextlib.redirect_stdout(io.StringIO()):
            if records:
                return self.coco_gt.loadRes(records)
            # loadRes cannot take an empty list; an empty result set is a COCO object with
            # the ground truth's images and categories and no annotations.
            empty = COCO()
            empty.dataset = {
                "images": copy.deepcopy(self.coco_gt.dataset.get("images", [])),
                "categories": copy.deepcopy(self.coco_gt.dataset.get("categories", [])),
                "annotations": [],
            }
            empty.createIndex()
            return empty

    def summarize(self) -> list[float]:
        """Run COCOeval over the collected images and return the 12 summary numbers.

        Metrics without any ground truth come out as -1, as in pycocotools. With no image
        collected at all, all 12 numbers are -1.
        """
        img_ids = self.img_ids
        if not img_ids:
            logger.warning("COCO evaluation: no image was evaluated")
            self.stats = [-1.0] * len(COCO_STAT_NAMES)
            return self.stats
        records = [r for image_id in img_ids for r in self._by_image[image_id]]
        coco_dt = self._results(records)
        coco_eval = COCOeval(self.coco_gt, coco_dt, iouType=self.iou_type)
        coco_eval.params.imgIds = img_ids
        with contextlib.redirect_stdout(io.StringIO()):
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()
        self.coco_eval = coco_eval
        self.stats = [float(v) for v in coco_eval.stats]
        return self.stats

    @property
    def eval(self) -> dict[str, Any]:
        """``COCOeval.eval`` (precision/recall arrays), the object the original saves as
        ``eval.pth``; available after :meth:`summarize`."""
        if self.coco_eval is None:
            raise RuntimeError("call summarize() first")
        return self.coco_eval.eval
