"""COCO evaluation of detections (pycocotools)."""

from detr_irpe.evaluation.coco_eval import (
    COCO_STAT_NAMES,
    CocoEvaluator,
    evaluation_report,
    format_stats,
    named_stats,
)

__all__ = ["COCO_STAT_NAMES", "CocoEvaluator", "evaluation_report", "format_stats", "named_stats"]
