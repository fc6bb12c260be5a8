"""COCO reading (folders or unextracted zips), DETR transforms and a synthetic dataset.

The names below are imported on first use, so that a programme that only needs one module
(``detr-irpe-synthetic``, ``--help``) does not load torch through the others.
"""

from __future__ import annotations

from detr_irpe._lazy import lazy_attributes

_LAZY = {
    "AnnotationError": "detr_irpe.data.coco",
    "CocoDetection": "detr_irpe.data.coco",
    "ImageFileReader": "detr_irpe.data.zip_reader",
    "ImageLoadError": "detr_irpe.data.coco",
    "SYNTHETIC_CATEGORIES": "detr_irpe.data.synthetic",
    "SyntheticConfig": "detr_irpe.data.synthetic",
    "build_dataset": "detr_irpe.data.coco",
    "category_names": "detr_irpe.data.coco",
    "coco_annotations_to_target": "detr_irpe.data.coco",
    "generate_synthetic_coco": "detr_irpe.data.synthetic",
    "get_coco_api": "detr_irpe.data.coco",
    "load_coco_annotations": "detr_irpe.data.coco",
    "load_rgb": "detr_irpe.data.images",
    "make_transforms": "detr_irpe.data.transforms",
    "num_classes_from_annotations": "detr_irpe.data.coco",
    "render_sample": "detr_irpe.data.synthetic",
}

__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, globals())
