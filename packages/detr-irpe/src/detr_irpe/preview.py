"""Detections drawn on the first validation images, which the experiment trackers
(``--tensorboard``, ``--mlflow``, ``--wandb``) log after each evaluation: the same few images,
epoch after epoch, show what the numbers mean.
"""

from __future__ import annotations

import logging
from typing import Any

from PIL import Image
from torch import nn

from detr_irpe.data.coco import CocoDetection, category_names
from detr_irpe.data.images import ImageLoadError
from detr_irpe.detector import Detector
from detr_irpe.visualize import draw_detections

__all__ = ["PREVIEW_COUNT", "PREVIEW_THRESHOLD", "draw_previews"]

logger = logging.getLogger(__name__)

PREVIEW_COUNT = 4
PREVIEW_THRESHOLD = 0.5  # detr-irpe-predict's default


def _first_images(dataset: CocoDetection, count: int) -> list[tuple[int, Image.Image]]:
    """``(image id, image)`` of the first ``count`` readable images, in id order."""
    found: list[tuple[int, Image.Image]] = []
    for image_id in dataset.ids:
        if len(found) == count:
            break
        try:
            found.append((image_id, dataset.load_image(image_id)))
        except ImageLoadError as err:  # --skip_bad_samples let the run go on without it
            logger.debug("no preview of a bad image: %s", err)
    return found


def draw_previews(
    model: nn.Module,
    postprocess: nn.Module,
    dataset: CocoDetection,
    transform: Any,
    device: Any,
    count: int = PREVIEW_COUNT,
    threshold: float = PREVIEW_THRESHOLD,
) -> dict[str, Image.Image]:
    """``{file name: RGB drawing}`` of the detections scoring at least ``threshold`` on the
    first ``count`` images of ``dataset``, as ``detr-irpe-predict`` draws them.

    ``model`` is the plain module (never a DDP wrapper: only rank 0 draws); its train/eval
    mode is restored afterwards. ``transform`` is the validation ``(image, target)`` transform.
    """
    names = category_names(dataset.coco)
    images = _first_images(dataset, count)
    was_training = model.training
    try:
        detector = Detector(model, postprocess, transform, names, device, threshold)
        found = detector([image for _, image in images]) if images else []
    finally:
        model.train(was_training)
    return {
        dataset.coco.imgs[image_id]["file_name"]: draw_detections(
            image, result.boxes, result.labels, result.scores, names, threshold
        )
        for (image_id, image), result in zip(images, found, strict=True)
    }
