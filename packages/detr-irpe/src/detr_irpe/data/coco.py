"""COCO detection dataset: images from folders or unextracted zips, targets as DETR expects.

Layout under ``coco_path``::

    annotations/instances_train2017.json   annotations/instances_val2017.json
    train2017/ or train2017.zip            val2017/ or val2017.zip

The annotation file is validated by :mod:`detr_irpe.data.coco_annotations` before use (its
``AnnotationError`` and ``load_coco_annotations`` stay importable from here). With
``skip_bad_samples`` malformed records are dropped with a warning, and an image that cannot
be read is replaced by the next readable one.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import zipfile
from argparse import Namespace
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from pycocotools.coco import COCO
from torch.utils.data import Dataset, Subset

from detr_irpe.data.coco_annotations import (
    AnnotationError,
    load_coco_annotations,
    read_categories,
)
from detr_irpe.data.images import ImageLoadError, load_rgb
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
    "sample_randomness",
]

logger = logging.getLogger(__name__)

Target = dict[str, torch.Tensor]
Transforms = Callable[[Any, Target], tuple[Any, Target]]

# Image folder and annotation file of each split, relative to ``coco_path``.
SPLITS: dict[str, tuple[str, str]] = {
    "train": ("train2017", "annotations/instances_train2017.json"),
    "val": ("val2017", "annotations/instances_val2017.json"),
}


def split_paths(args: Namespace, image_set: str) -> tuple[Path, Path]:
    """``(image folder, annotation file)`` of a split: ``--train_images``/``--val_images`` and
    ``--train_ann``/``--val_ann`` when given (relative to ``--coco_path`` unless absolute),
    else the original's ``train2017/`` and ``annotations/instances_train2017.json``.
    The image folder may also be a ``.zip`` of that name (see :class:`CocoDetection`)."""
    if image_set not in SPLITS:
        raise ValueError(f"image_set must be one of {sorted(SPLITS)}, got {image_set!r}")
    root = Path(args.coco_path or ".")
    folder, ann_file = SPLITS[image_set]
    folder = getattr(args, f"{image_set}_images", None) or folder
    ann_file = getattr(args, f"{image_set}_ann", None) or ann_file
    return root / folder, root / ann_file


def coco_annotations_to_target(
    annotations: Sequence[Mapping[str, Any]], image_id: int, width: int, height: int
) -> Target:
    """DETR's target for one image, as the original's ``ConvertCocoPolysToMask`` builds it.

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


@contextlib.contextmanager
def sample_randomness(seed: int, epoch: int, index: int) -> Iterator[None]:
    """Inside: Python's ``random`` and torch's CPU generator (the augmentation draws from both)
    seeded from ``(seed, epoch, index)``. After: both as they were, so loading a sample in the
    main process (``num_workers=0``) leaves the training's draws (dropout) as they would be
    with workers."""
    digest = hashlib.sha256(f"{seed}/{epoch}/{index}".encode()).digest()
    sample_seed = int.from_bytes(digest[:8], "little")
    python_state, torch_state = random.getstate(), torch.get_rng_state()
    random.seed(sample_seed)
    torch.default_generator.manual_seed(sample_seed)
    try:
        yield
    finally:
        random.setstate(python_state)
        torch.set_rng_state(torch_state)


class CocoDetection(Dataset[tuple[Any, Target]]):
    """COCO images with DETR targets, read from a folder or its unextracted zip.

    Item ``i`` is ``transforms(image, target)`` for the ``i``-th smallest image id (all listed
    images, including those without annotations). ``image`` is an RGB ``PIL.Image`` before
    the transforms (a ``(3, H, W)`` float tensor after the usual ones); ``target`` is the dict
    of :func:`coco_annotations_to_target` after the transforms.

    The key may also be ``(epoch, i)`` (what the training loader's
    :class:`detr_irpe.cli.loaders.EpochKeySampler` yields): the random augmentation then draws
    from generators seeded from ``(seed, epoch, i)`` (:func:`sample_randomness`), so the
    augmented sample is a function of those three only, whichever process or DataLoader worker
    loads it and whether or not the run was resumed. A plain ``i`` draws from the global
    generators as they stand.

    Args:
        img_folder: image folder, or the path whose ``.zip`` holds the images.
        ann_file: COCO ``instances_*.json``.
        transforms: callable ``(image, target) -> (image, target)``, e.g. from
            :func:`detr_irpe.data.transforms.make_transforms`.
        return_masks: segmentation masks; not supported (raises ``NotImplementedError``).
        skip_bad_samples: drop malformed records at construction and replace unreadable
            images by the next readable one, with a warning, instead of raising.
        seed: the run's seed, for ``(epoch, i)`` keys.

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
        seed: int = 0,
    ) -> None:
        if return_masks:
            raise NotImplementedError("segmentation masks (--masks) are not supported")
        self.ann_file = Path(ann_file)
        self.coco = load_coco_annotations(self.ann_file, skip_bad_samples)
        self.reader = ImageFileReader(img_folder)
        self.ids: list[int] = sorted(self.coco.imgs)
        self.skip_bad_samples = skip_bad_samples
        self._transforms = transforms
        self.seed = seed
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
        where = f"image id {image_id} ({self.ann_file.name})"
        try:
            data = self.reader.read(file_name)
        except (OSError, zipfile.BadZipFile) as err:
            raise ImageLoadError(f"{where}: {err}") from err
        try:
            return load_rgb(data, self.reader.describe(file_name))
        except ImageLoadError as err:
            raise ImageLoadError(f"{where}: {err}") from err

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

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Any, Target]:
        if isinstance(key, tuple):
            epoch, index = key
            with sample_randomness(self.seed, epoch, index):
                return self._get(index)
        return self._get(key)

    def _get(self, index: int) -> tuple[Any, Target]:
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


def build_dataset(
    image_set: str, args: Namespace, transforms: Transforms | None = None
) -> CocoDetection:
    """The ``'train'`` or ``'val'`` COCO split under ``args.coco_path``.

    Reads ``args.coco_path``, ``args.dataset_file`` (only ``'coco'``), ``args.masks`` (must be
    off), ``args.skip_bad_samples`` and the transform options of
    :func:`detr_irpe.data.transforms.make_transforms`. ``transforms`` replaces that transform
    (``detr-irpe-eval`` gives the :class:`~detr_irpe.detector.Detector`'s, so that evaluation
    and prediction preprocess images alike).

    ``args`` are completed options (:func:`detr_irpe.config.prepare_options` has checked
    ``coco_path``, ``dataset_file`` and ``masks``).

    Raises:
        ValueError: unknown ``image_set``.
        FileNotFoundError: the annotation file, or both the image folder and its zip, missing.
        AnnotationError: a malformed annotation file, or a split without images.
        ArchiveError: the image zip is not readable (e.g. truncated).
    """
    from detr_irpe.data.transforms import make_transforms

    images, annotations = split_paths(args, image_set)
    skip_bad_samples = bool(args.skip_bad_samples)
    dataset = CocoDetection(
        images,
        annotations,
        transforms=transforms if transforms is not None else make_transforms(image_set, args),
        skip_bad_samples=skip_bad_samples,
        seed=int(args.seed),
    )
    if len(dataset) == 0:
        # Refused now: an empty split would otherwise fail only after a whole training epoch,
        # inside pycocotools' evaluation (val) or the sampler (train).
        dropped = " once the bad records were skipped" if skip_bad_samples else ""
        raise AnnotationError(f"{annotations}: the {image_set} split has no images{dropped}")
    return dataset


def _categories_of(source: COCO | CocoDetection | str | os.PathLike[str]) -> dict[int, str]:
    if isinstance(source, CocoDetection):
        source = source.coco
    if isinstance(source, COCO):
        return {cat_id: str(cat.get("name", cat_id)) for cat_id, cat in source.cats.items()}
    return read_categories(source)


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
