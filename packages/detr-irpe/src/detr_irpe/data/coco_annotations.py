"""The COCO annotation file (``instances_*.json``): read, validate and index with pycocotools.

The file is validated before pycocotools indexes it, so a malformed record is reported with
the file, the image id and the annotation id instead of failing later inside a DataLoader
worker. With ``skip_bad_samples`` the bad records (and the images they belong to) are dropped
with a warning instead.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pycocotools.coco import COCO

from detr_irpe.data.zip_reader import unsafe_path_reason

__all__ = ["MAX_CATEGORY_ID", "AnnotationError", "load_coco_annotations", "read_categories"]

logger = logging.getLogger(__name__)

# The largest category id accepted. DETR allocates one class logit per id up to the largest
# (COCO's ids reach 90), so a stray huge id would try to allocate a gigantic classifier;
# 100000 leaves room for every public label set (ImageNet-21k has about 22000 classes).
MAX_CATEGORY_ID = 100_000

# Image ids become int64 tensors in the targets.
_INT64_RANGE = range(-(2**63), 2**63)

# How many skipped records are logged one by one before only a total is given.
_MAX_LOGGED_SKIPS = 10


class AnnotationError(ValueError):
    """An annotation file or one of its records is malformed; the message names both."""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _read_json(ann_file: Path) -> dict[str, Any]:
    if not ann_file.is_file():
        raise FileNotFoundError(f"annotation file not found: '{ann_file}'")
    try:
        with ann_file.open("rb") as stream:
            data = json.load(stream)
    except json.JSONDecodeError as err:
        raise AnnotationError(
            f"{ann_file}: not valid JSON (line {err.lineno}, column {err.colno}): {err.msg}"
        ) from None
    except UnicodeDecodeError as err:
        raise AnnotationError(f"{ann_file}: not UTF-8 text: {err}") from None
    if not isinstance(data, dict):
        raise AnnotationError(f"{ann_file}: the top level must be a JSON object")
    return data


def _validate_categories(ann_file: Path, data: Mapping[str, Any]) -> dict[int, str]:
    categories = data.get("categories")
    if not isinstance(categories, list) or not categories:
        raise AnnotationError(f"{ann_file}: needs a non-empty list 'categories'")
    names: dict[int, str] = {}
    for index, category in enumerate(categories):
        if not isinstance(category, dict) or not _is_int(category.get("id")):
            raise AnnotationError(f"{ann_file}: category #{index} has no integer 'id'")
        category_id = category["id"]
        if not 0 <= category_id <= MAX_CATEGORY_ID:
            raise AnnotationError(
                f"{ann_file}: category id {category_id} ({category.get('name')!r}) must lie "
                f"in 0..{MAX_CATEGORY_ID} (DETR allocates one class logit per id)"
            )
        if category_id in names:
            raise AnnotationError(f"{ann_file}: category id {category_id} appears twice")
        names[category_id] = str(category.get("name", category_id))
    return names


def _image_problem(image: object, seen: Mapping[int, object]) -> str | None:
    if not isinstance(image, dict) or not _is_int(image.get("id")):
        return "has no integer 'id'"
    if image["id"] not in _INT64_RANGE:
        return "does not fit in 64 bits"
    if image["id"] in seen:
        return "appears twice"
    file_name = image.get("file_name")
    if not isinstance(file_name, str) or not file_name:
        return "has no 'file_name'"
    unsafe = unsafe_path_reason(file_name)
    if unsafe is not None:
        return f"has a 'file_name' {file_name!r} that {unsafe}"
    return None


def _annotation_problem(ann: Mapping[str, Any], category_ids: Mapping[int, str]) -> str | None:
    bbox = ann.get("bbox")
    if (
        not isinstance(bbox, (list, tuple))
        or len(bbox) != 4
        or not all(_is_finite_number(v) for v in bbox)
    ):
        return f"'bbox' must be 4 finite numbers [x, y, w, h], got {bbox!r}"
    if bbox[2] < 0 or bbox[3] < 0:
        return f"'bbox' has a negative width or height: {bbox!r}"
    if not _is_int(ann.get("category_id")) or ann["category_id"] not in category_ids:
        return f"unknown 'category_id' {ann.get('category_id')!r}"
    if "iscrowd" in ann and ann["iscrowd"] not in (0, 1):
        return f"'iscrowd' must be 0 or 1, got {ann['iscrowd']!r}"
    if "area" in ann and not _is_finite_number(ann["area"]):
        return f"'area' must be a finite number, got {ann['area']!r}"
    return None


class _SkipLog:
    """Reports skipped records: the first few one by one, then only how many."""

    def __init__(self, ann_file: Path, skip: bool) -> None:
        self.ann_file, self.skip, self.count = ann_file, skip, 0

    def __call__(self, message: str) -> None:
        if not self.skip:
            raise AnnotationError(f"{self.ann_file}: {message}")
        self.count += 1
        if self.count <= _MAX_LOGGED_SKIPS:
            logger.warning("skipping bad sample: %s: %s", self.ann_file, message)

    def summary(self) -> None:
        if self.count:
            logger.warning("%s: skipped %d bad record(s) in total", self.ann_file, self.count)


def load_coco_annotations(ann_file: str | os.PathLike[str], skip_bad_samples: bool = False) -> COCO:
    """Validate a COCO ``instances_*.json`` and index it with pycocotools.

    Checked: the file exists and is JSON; ``categories`` is a non-empty list of unique integer
    ids in ``0..MAX_CATEGORY_ID``; each image has a unique 64-bit integer ``id`` and a
    relative ``file_name`` that stays inside the image folder; each annotation has a
    unique integer ``id``, an ``image_id`` of a listed image, a ``category_id`` of a listed
    category, a ``bbox`` of 4 finite numbers with ``w, h >= 0``, ``iscrowd`` in {0, 1} and a
    finite ``area`` when present. A missing ``iscrowd`` becomes 0 and a missing ``area``
    becomes ``w * h`` (COCO evaluation needs both).

    Args:
        ann_file: the annotation file.
        skip_bad_samples: drop a bad image record, or an image with a bad annotation (the
            whole image, so that no object silently becomes background), with a warning.
            Problems with the file itself or its categories always raise.

    Returns:
        A ``pycocotools.coco.COCO`` built from the (cleaned) records.

    Raises:
        FileNotFoundError: ``ann_file`` does not exist.
        AnnotationError: malformed file or record; names the file, image id and annotation id.
    """
    ann_file = Path(ann_file)
    data = _read_json(ann_file)
    category_ids = _validate_categories(ann_file, data)
    images = data.get("images")
    if not isinstance(images, list):
        raise AnnotationError(f"{ann_file}: needs a list 'images'")
    annotations = data.get("annotations", [])
    if not isinstance(annotations, list):
        raise AnnotationError(f"{ann_file}: 'annotations' must be a list")
    skipped = _SkipLog(ann_file, skip_bad_samples)

    good_images: dict[int, dict[str, Any]] = {}
    for index, image in enumerate(images):
        problem = _image_problem(image, good_images)
        if problem is not None:
            image_id = image.get("id") if isinstance(image, dict) else None
            skipped(f"image record #{index} (image id {image_id!r}) {problem}")
            continue
        good_images[image["id"]] = image

    bad_image_ids: set[int] = set()
    annotation_ids: set[int] = set()
    kept_annotations: list[dict[str, Any]] = []
    for index, ann in enumerate(annotations):
        if not isinstance(ann, dict) or not _is_int(ann.get("id")):
            skipped(f"annotation record #{index} has no integer 'id'")
            if isinstance(ann, dict) and ann.get("image_id") in good_images:
                bad_image_ids.add(ann["image_id"])
            continue
        ann_id, image_id = ann["id"], ann.get("image_id")
        if ann_id in annotation_ids:
            skipped(f"annotation id {ann_id} appears twice")
            continue
        if not _is_int(image_id) or image_id not in good_images:
            skipped(f"annotation id {ann_id}: 'image_id' {image_id!r} is not a listed image")
            continue
        problem = _annotation_problem(ann, category_ids)
        if problem is not None:
            file_name = good_images[image_id]["file_name"]
            skipped(f"annotation id {ann_id} (image id {image_id}, '{file_name}'): {problem}")
            bad_image_ids.add(image_id)
            continue
        annotation_ids.add(ann_id)
        ann.setdefault("iscrowd", 0)
        ann.setdefault("area", float(ann["bbox"][2]) * float(ann["bbox"][3]))
        kept_annotations.append(ann)
    skipped.summary()

    data["images"] = [img for i, img in good_images.items() if i not in bad_image_ids]
    data["annotations"] = [a for a in kept_annotations if a["image_id"] not in bad_image_ids]
    coco = COCO()
    coco.dataset = data
    # pycocotools reports progress with print(); keep it off the user's console.
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def read_categories(ann_file: str | os.PathLike[str]) -> dict[int, str]:
    """``{category_id: name}`` of an annotation file, after checking the file and its categories.

    Raises:
        FileNotFoundError: ``ann_file`` does not exist.
        AnnotationError: the file is not JSON or its ``categories`` are malformed.
    """
    path = Path(ann_file)
    return _validate_categories(path, _read_json(path))
