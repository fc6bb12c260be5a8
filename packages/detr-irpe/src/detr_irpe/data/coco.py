"""COCO detection dataset: images from folders or unextracted zips, targets as DETR expects.

Layout under ``coco_path`` (spec detr-irpe.md §5.1)::

    annotations/instances_train2017.json   annotations/instances_val2017.json
    train2017/ or train2017.zip            val2017/ or val2017.zip

The annotation file is validated before pycocotools indexes it, so a malformed record is
reported with the file, the image id and the annotation id instead of failing later inside a
DataLoader worker. With ``skip_bad_samples`` such images are dropped with a warning, and an
image that cannot be read is replaced by the next readable one.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import zipfile
from argparse import Namespace
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from pycocotools.coco import COCO
from torch.utils.data import Dataset, Subset

from detr_irpe.data.zip_reader import ImageFileReader

__all__ = [
    "AnnotationError",
    "CocoDetection",
    "ImageLoadError",
    "build_dataset",
    "category_names",
    "coco_annotations_to_target",
    "get_coco_api",
    "load_coco_annotations",
    "num_classes_from_annotations",
]

logger = logging.getLogger(__name__)

Target = dict[str, torch.Tensor]
Transforms = Callable[[Any, Target], tuple[Any, Target]]

# Image folder and annotation file of each split, relative to ``coco_path``.
SPLITS: dict[str, tuple[str, str]] = {
    "train": ("train2017", "annotations/instances_train2017.json"),
    "val": ("val2017", "annotations/instances_val2017.json"),
}

# How many skipped records are logged one by one before only a total is given.
_MAX_LOGGED_SKIPS = 10


class AnnotationError(ValueError):
    """An annotation file or one of its records is malformed; the message names both."""


class ImageLoadError(OSError):
    """An image is missing or cannot be decoded; the message names the file and image id."""


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
        if category_id < 0:
            raise AnnotationError(f"{ann_file}: category id {category_id} is negative")
        if category_id in names:
            raise AnnotationError(f"{ann_file}: category id {category_id} appears twice")
        names[category_id] = str(category.get("name", category_id))
    return names


def _image_problem(image: object, seen: Mapping[int, object]) -> str | None:
    if not isinstance(image, dict) or not _is_int(image.get("id")):
        return "has no integer 'id'"
    if image["id"] in seen:
        return "appears twice"
    file_name = image.get("file_name")
    if not isinstance(file_name, str) or not file_name:
        return "has no 'file_name'"
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
    ids; each image has a unique integer ``id`` and a ``file_name``; each annotation has a
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


def coco_annotations_to_target(
    annotations: Sequence[Mapping[str, Any]], image_id: int, width: int, height: int
) -> Target:
    """DETR's target for one image (spec detr-irpe.md §5.1, ``ConvertCocoPolysToMask``).

    Crowd annotations (``iscrowd == 1``) are dropped; ``[x, y, w, h]`` becomes
    ``[x, y, x + w, y + h]`` (float32), x is clamped to ``[0, width]`` and y to
    ``[0, height]``, and only boxes with positive width and height are kept.

    Returns:
        ``boxes`` (N, 4) float32 absolute xyxy; ``labels`` (N,) int64 raw ``category_id``;
        ``image_id`` (1,) int64; ``area`` (N,) float32 (the annotation's ``area``, else
        ``w * h``);
        ``iscrowd`` (N,) int64; ``orig_size`` and ``size`` (2,) int64 ``[height, width]``.
    """
    kept = [ann for ann in annotations if ann.get("iscrowd", 0) == 0]
    boxes = torch.as_tensor([ann["bbox"] for ann in kept], dtype=torch.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    boxes[:, 0::2].clamp_(min=0, max=width)
    boxes[:, 1::2].clamp_(min=0, max=height)
    labels = torch.tensor([ann["category_id"] for ann in kept], dtype=torch.int64)
    # ``area`` is the segmentation area in COCO; records without one count their box area.
    area = torch.tensor(
        [ann.get("area", ann["bbox"][2] * ann["bbox"][3]) for ann in kept], dtype=torch.float32
    )
    iscrowd = torch.tensor([ann.get("iscrowd", 0) for ann in kept], dtype=torch.int64)
    keep = (boxes[:, 3] > boxes[:, 1]) & (boxes[:, 2] > boxes[:, 0])
    size = torch.tensor([height, width], dtype=torch.int64)
    return {
        "boxes": boxes[keep],
        "labels": labels[keep],
        "image_id": torch.tensor([image_id], dtype=torch.int64),
        "area": area[keep],
        "iscrowd": iscrowd[keep],
        "orig_size": size,
        "size": size.clone(),
    }


class CocoDetection(Dataset[tuple[Any, Target]]):
    """COCO images with DETR targets, read from a folder or its unextracted zip.

    Item ``i`` is ``transforms(image, target)`` for the ``i``-th smallest image id (all listed
    images, including those without annotations). ``image`` is an RGB ``PIL.Image`` before
    the transforms (a ``(3, H, W)`` float tensor after the usual ones); ``target`` is the dict
    of :func:`coco_annotations_to_target` after the transforms.

    Args:
        img_folder: image folder, or the path whose ``.zip`` holds the images.
        ann_file: COCO ``instances_*.json``.
        transforms: callable ``(image, target) -> (image, target)``, e.g. from
            :func:`detr_irpe.data.transforms.make_transforms`.
        return_masks: segmentation masks; not supported (raises ``NotImplementedError``).
        skip_bad_samples: drop malformed records at construction and replace unreadable
            images by the next readable one, with a warning, instead of raising.

    Attributes:
        coco: the ``pycocotools.coco.COCO`` ground truth (after cleaning).
        ids: the image ids, sorted.
        reader: the :class:`ImageFileReader` of the images.
    """

    def __init__(
        self,
        img_folder: str | os.PathLike[str],
        ann_file: str | os.PathLike[str],
        transforms: Transforms | None = None,
        return_masks: bool = False,
        skip_bad_samples: bool = False,
    ) -> None:
        if return_masks:
            raise NotImplementedError("segmentation masks (--masks) are not supported")
        self.ann_file = Path(ann_file)
        self.coco = load_coco_annotations(self.ann_file, skip_bad_samples)
        self.reader = ImageFileReader(img_folder)
        self.ids: list[int] = sorted(self.coco.imgs)
        self.skip_bad_samples = skip_bad_samples
        self._transforms = transforms
        # Indices found unreadable in this process, so later epochs skip them without retrying.
        self._bad_indices: set[int] = set()

    def __len__(self) -> int:
        return len(self.ids)

    def load_image(self, image_id: int) -> Image.Image:
        """The RGB image of ``image_id``.

        Raises:
            ImageLoadError: the file is missing or cannot be decoded (names file and image id).
        """
        file_name = self.coco.imgs[image_id]["file_name"]
        where = self.reader.describe(file_name)
        try:
            data = self.reader.read(file_name)
        except (OSError, zipfile.BadZipFile) as err:
            raise ImageLoadError(f"image id {image_id} ({self.ann_file.name}): {err}") from err
        try:
            with Image.open(io.BytesIO(data)) as image:
                return image.convert("RGB")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            raise ImageLoadError(
                f"image id {image_id} ({self.ann_file.name}): cannot decode {where}: {err}"
            ) from err

    def load_target(self, image_id: int, width: int, height: int) -> Target:
        """The target of ``image_id`` for an image of ``width`` x ``height`` pixels."""
        annotations = self.coco.loadAnns(self.coco.getAnnIds(imgIds=image_id))
        return coco_annotations_to_target(annotations, image_id, width, height)

    def _load(self, index: int) -> tuple[Any, Target]:
        image_id = self.ids[index]
        image = self.load_image(image_id)
        target = self.load_target(image_id, *image.size)
        if self._transforms is not None:
            return self._transforms(image, target)
        return image, target

    def __getitem__(self, index: int) -> tuple[Any, Target]:
        if not self.skip_bad_samples:
            return self._load(index)
        for offset in range(len(self)):
            candidate = (index + offset) % len(self)
            if candidate in self._bad_indices:
                continue
            try:
                return self._load(candidate)
            except ImageLoadError as err:
                self._bad_indices.add(candidate)
                logger.warning("skipping bad sample: %s", err)
        raise ImageLoadError(f"no readable image left in '{self.reader.location}'")

    def close(self) -> None:
        """Close the zip archive handle of this process, if any."""
        self.reader.close()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(images={len(self)}, ann_file='{self.ann_file}', "
            f"reader={self.reader!r})"
        )


def build_dataset(image_set: str, args: Namespace) -> CocoDetection:
    """The ``'train'`` or ``'val'`` COCO split under ``args.coco_path``.

    Reads ``args.coco_path``, ``args.dataset_file`` (only ``'coco'``), ``args.masks`` (must be
    off), ``args.skip_bad_samples`` and the transform options of
    :func:`detr_irpe.data.transforms.make_transforms`.

    Raises:
        ValueError: unknown ``image_set``, ``dataset_file`` or no ``coco_path``.
        NotImplementedError: ``--masks``.
        FileNotFoundError: the annotation file, or both the image folder and its zip, missing.
    """
    from detr_irpe.data.transforms import make_transforms

    if image_set not in SPLITS:
        raise ValueError(f"image_set must be one of {sorted(SPLITS)}, got {image_set!r}")
    dataset_file = getattr(args, "dataset_file", "coco")
    if dataset_file != "coco":
        raise ValueError(f"--dataset_file {dataset_file!r} is not supported; only 'coco' is")
    if getattr(args, "masks", False):
        raise NotImplementedError("segmentation (--masks) is not supported by detr-irpe")
    if not getattr(args, "coco_path", None):
        raise ValueError("--coco_path is required: the folder holding annotations/ and images")
    root = Path(args.coco_path)
    if not root.is_dir():
        raise FileNotFoundError(f"--coco_path '{root}' is not a directory")
    folder, ann_file = SPLITS[image_set]
    return CocoDetection(
        root / folder,
        root / ann_file,
        transforms=make_transforms(image_set, args),
        skip_bad_samples=bool(getattr(args, "skip_bad_samples", False)),
    )


def _categories_of(source: COCO | CocoDetection | str | os.PathLike[str]) -> dict[int, str]:
    if isinstance(source, CocoDetection):
        source = source.coco
    if isinstance(source, COCO):
        return {cat_id: str(cat.get("name", cat_id)) for cat_id, cat in source.cats.items()}
    path = Path(source)
    return _validate_categories(path, _read_json(path))


def num_classes_from_annotations(source: COCO | CocoDetection | str | os.PathLike[str]) -> int:
    """Number of class logits DETR needs: the largest category id + 1 (91 for COCO).

    ``source`` is an annotation file, a ``COCO`` object or a :class:`CocoDetection`.
    """
    return max(_categories_of(source)) + 1


def category_names(source: COCO | CocoDetection | str | os.PathLike[str]) -> dict[int, str]:
    """``{category_id: name}`` of an annotation file, ``COCO`` object or dataset."""
    return dict(sorted(_categories_of(source).items()))


def get_coco_api(dataset: Dataset[Any]) -> COCO:
    """The pycocotools ground truth behind ``dataset`` (unwrapping ``torch.utils.data.Subset``).

    Raises:
        TypeError: ``dataset`` is not (a subset of) a dataset with a ``coco`` attribute.
    """
    inner: Any = dataset
    while isinstance(inner, Subset):
        inner = inner.dataset
    coco = getattr(inner, "coco", None)
    if not isinstance(coco, COCO):
        raise TypeError(f"{type(inner).__name__} has no pycocotools 'coco' ground truth")
    return coco
