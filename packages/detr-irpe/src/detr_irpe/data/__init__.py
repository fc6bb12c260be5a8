"""COCO reading (folders or unextracted zips), DETR transforms and a synthetic dataset."""

from detr_irpe.data.coco import (
    AnnotationError,
    CocoDetection,
    ImageLoadError,
    build_dataset,
    category_names,
    coco_annotations_to_target,
    get_coco_api,
    load_coco_annotations,
    num_classes_from_annotations,
)
from detr_irpe.data.images import load_rgb
from detr_irpe.data.synthetic import (
    SYNTHETIC_CATEGORIES,
    SyntheticConfig,
    generate_synthetic_coco,
    render_sample,
)
from detr_irpe.data.transforms import make_transforms
from detr_irpe.data.zip_reader import ImageFileReader

__all__ = [
    "SYNTHETIC_CATEGORIES",
    "AnnotationError",
    "CocoDetection",
    "ImageFileReader",
    "ImageLoadError",
    "SyntheticConfig",
    "build_dataset",
    "category_names",
    "coco_annotations_to_target",
    "generate_synthetic_coco",
    "get_coco_api",
    "load_coco_annotations",
    "load_rgb",
    "make_transforms",
    "num_classes_from_annotations",
    "render_sample",
]
