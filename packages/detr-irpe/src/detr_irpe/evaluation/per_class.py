"""Per-class box AP of a COCO evaluation: ``ap_per_class.json``, its bar chart
``ap_per_class.png`` (:mod:`~detr_irpe.evaluation.per_class_chart`) and a table for the log.

Read from pycocotools' ``eval["precision"]`` array of shape ``(T, R, K, A, M)``: T IoU
thresholds (0.50:0.05:0.95), R recall points, K categories, A area ranges (index 0: all),
M max-detection settings (index -1: 100). A category's AP is the mean over its entries that
are not -1; a category without ground truth gets -1, as pycocotools' summary does.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from detr_irpe.atomic import write_json
from detr_irpe.evaluation.per_class_chart import PER_CLASS_CHART, save_per_class_chart

__all__ = [
    "PER_CLASS_CHART",
    "PER_CLASS_FILE",
    "format_per_class",
    "per_class_ap",
    "report_per_class",
]

logger = logging.getLogger(__name__)

PER_CLASS_FILE = "ap_per_class.json"


def _mean(values: np.ndarray) -> float:
    valid = values[values > -1]
    return float(valid.mean()) if valid.size else -1.0


def per_class_ap(evaluator: Any) -> dict[str, dict[str, float | int]]:
    """``{class name: {"AP", "AP50", "AP75", "n_gt"}}`` of a summarised
    :class:`~detr_irpe.evaluation.CocoEvaluator` (``{}`` when nothing was evaluated).

    ``n_gt`` counts the category's non-crowd ground-truth boxes in the evaluated images.
    """
    coco_eval = getattr(evaluator, "coco_eval", None)
    if coco_eval is None:
        return {}
    precision = coco_eval.eval["precision"]  # (T, R, K, A, M)
    params = coco_eval.params
    iou = np.asarray(params.iouThrs)
    at50, at75 = np.isclose(iou, 0.5), np.isclose(iou, 0.75)
    gt = evaluator.coco_gt
    table: dict[str, dict[str, float | int]] = {}
    for k, cat_id in enumerate(params.catIds):
        p = precision[:, :, k, 0, -1]
        anns = gt.loadAnns(gt.getAnnIds(imgIds=params.imgIds, catIds=[cat_id]))
        name = str(gt.cats[cat_id].get("name", cat_id))
        if name in table:
            name = f"{name} (id {cat_id})"
        table[name] = {
            "AP": _mean(p),
            "AP50": _mean(p[at50]),
            "AP75": _mean(p[at75]),
            "n_gt": sum(1 for a in anns if not a.get("iscrowd", 0)),
        }
    return table


def format_per_class(table: dict[str, dict[str, float | int]]) -> str:
    """A fixed-width text table of :func:`per_class_ap`, one class a line."""
    width = max([5, *(len(name) for name in table)])
    lines = [f"{'class':<{width}}  {'AP':>6}  {'AP50':>6}  {'AP75':>6}  {'n_gt':>6}"]
    for name, row in table.items():
        lines.append(
            f"{name:<{width}}  {row['AP']:6.3f}  {row['AP50']:6.3f}  {row['AP75']:6.3f}  "
            f"{row['n_gt']:6d}"
        )
    return "\n".join(lines)


def report_per_class(evaluator: Any, output_dir: str | os.PathLike[str] | None) -> dict:
    """Log the per-class table of ``evaluator`` and, with ``output_dir``, write it there as
    ``ap_per_class.json`` and its chart ``ap_per_class.png``; returns the table."""
    table = per_class_ap(evaluator)
    if not table:
        return table
    logger.info("AP per class:\n%s", format_per_class(table))
    if output_dir:
        write_json(os.path.join(os.fspath(output_dir), PER_CLASS_FILE), table)
        save_per_class_chart(table, os.path.join(os.fspath(output_dir), PER_CLASS_CHART))
    return table
