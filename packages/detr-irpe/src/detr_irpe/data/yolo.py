"""YOLO / Ultralytics datasets (``--data DIR``), converted to the COCO layout the rest uses.

The layout read::

    DIR/data.yaml            names: [cat, dog] or {0: cat, 1: dog}
    DIR/images/train/*.jpg   DIR/labels/train/*.txt   (same stem; no file: no objects)
    DIR/images/val/*.jpg     DIR/labels/val/*.txt

Each label line is ``class cx cy w h`` with the box centre and size normalised to [0, 1].
YOLO class ``k`` becomes COCO category id ``k`` (so ``num_classes`` is the number of names).
:func:`convert_yolo` writes ``annotations/instances_{train,val}2017.json`` and links
``train2017``/``val2017`` to the image folders under a target folder, which then serves as
``--coco_path``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from PIL import Image

from detr_irpe.atomic import write_json
from detr_irpe.data.coco import SPLITS
from detr_irpe.data.coco_annotations import AnnotationError
from detr_irpe.data.images import IMAGE_EXTENSIONS

__all__ = ["convert_yolo", "read_names", "yolo_split_to_coco"]

logger = logging.getLogger(__name__)

_YOLO_SPLITS = {"train": "train", "val": "val"}


def read_names(data_yaml: Path) -> list[str]:
    """The class names of ``data.yaml`` (``names`` as a list, or a mapping index -> name)."""
    import yaml

    if not data_yaml.is_file():
        raise FileNotFoundError(f"YOLO dataset description not found: '{data_yaml}'")
    try:
        data = yaml.safe_load(data_yaml.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise AnnotationError(f"{data_yaml}{line}: not valid YAML") from None
    names = data.get("names") if isinstance(data, Mapping) else None
    if isinstance(names, Mapping):
        try:
            names = {int(k): v for k, v in names.items()}
        except (TypeError, ValueError):
            raise AnnotationError(f"{data_yaml}: 'names' keys must be class indices") from None
        if sorted(names) != list(range(len(names))):
            raise AnnotationError(f"{data_yaml}: 'names' keys must be 0..{len(names) - 1}")
        names = [names[k] for k in range(len(names))]
    if not isinstance(names, list) or not names:
        raise AnnotationError(f"{data_yaml}: 'names' must be a non-empty list or mapping")
    return [str(n) for n in names]


def _parse_line(text: str, num_names: int) -> tuple[int, float, float, float, float]:
    """``(class, cx, cy, w, h)`` of a label line; ValueError saying what is wrong."""
    fields = text.split()
    if len(fields) != 5:
        raise ValueError(f"expected 'class cx cy w h' (5 fields), got {len(fields)}")
    try:
        label = int(fields[0])
        cx, cy, w, h = (float(f) for f in fields[1:])
    except ValueError:
        raise ValueError(f"not numbers: {text.strip()!r}") from None
    if not 0 <= label < num_names:
        raise ValueError(f"class {label} is not in 0..{num_names - 1} (data.yaml names)")
    if not all(math.isfinite(v) and 0 <= v <= 1 for v in (cx, cy, w, h)) or w <= 0 or h <= 0:
        raise ValueError(f"the box {cx} {cy} {w} {h} is not normalised to [0, 1] with w, h > 0")
    return label, cx, cy, w, h


def _annotations(label_file: Path, image_id: int, size: tuple[int, int], num_names: int,
                 skip_bad: bool, first_id: int) -> list[dict[str, Any]]:  # fmt: skip
    if not label_file.is_file():
        return []
    width, height = size
    anns: list[dict[str, Any]] = []
    for number, text in enumerate(label_file.read_text(encoding="utf-8").splitlines(), 1):
        if not text.strip():
            continue
        try:
            label, cx, cy, w, h = _parse_line(text, num_names)
        except ValueError as err:
            message = f"{label_file}:{number}: {err}"
            if not skip_bad:
                raise AnnotationError(message) from None
            logger.warning("skipping %s", message)
            continue
        box = [(cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height]
        anns.append({
            "id": first_id + len(anns), "image_id": image_id, "category_id": label,
            "bbox": box, "area": box[2] * box[3], "iscrowd": 0,
        })  # fmt: skip
    return anns


def yolo_split_to_coco(root: Path, split: str, names: list[str], skip_bad: bool) -> dict:
    """The COCO annotation dict of ``root/images/<split>`` and ``root/labels/<split>``.

    Raises:
        FileNotFoundError: the image folder is missing.
        AnnotationError: a bad label line (``file:line: problem``), unless ``skip_bad``.
    """
    images_dir = root / "images" / split
    if not images_dir.is_dir():
        raise FileNotFoundError(f"YOLO image folder not found: '{images_dir}'")
    files = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for image_id, path in enumerate(files, 1):
        with Image.open(path) as image:
            size = image.size
        images.append({"id": image_id, "file_name": path.name, "width": size[0],
                       "height": size[1]})  # fmt: skip
        label_file = root / "labels" / split / f"{path.stem}.txt"
        annotations += _annotations(
            label_file, image_id, size, len(names), skip_bad, len(annotations) + 1
        )
    categories = [{"id": k, "name": name} for k, name in enumerate(names)]
    return {"images": images, "annotations": annotations, "categories": categories}


def convert_yolo(root: str | os.PathLike[str], target: str | os.PathLike[str],
                 skip_bad: bool = False) -> Path:  # fmt: skip
    """Write the COCO layout of the YOLO dataset ``root`` under ``target``; returns it.

    ``target/annotations/instances_{train,val}2017.json`` are written atomically and
    ``target/{train,val}2017`` link to ``root/images/{train,val}``.
    """
    root, target = Path(root).resolve(), Path(target)
    names = read_names(root / "data.yaml")
    for split, (folder, ann_file) in SPLITS.items():
        data = yolo_split_to_coco(root, _YOLO_SPLITS[split], names, skip_bad)
        (target / ann_file).parent.mkdir(parents=True, exist_ok=True)
        write_json(target / ann_file, data)
        link = target / folder
        if not link.is_symlink() or link.resolve() != root / "images" / _YOLO_SPLITS[split]:
            if link.is_symlink():
                link.unlink()
            link.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileExistsError):  # another process made it
                link.symlink_to(root / "images" / _YOLO_SPLITS[split], target_is_directory=True)
    logger.info("YOLO dataset %s (%d classes) converted to COCO in %s", root, len(names), target)
    return target


def yolo_as_coco(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with ``coco_path`` the COCO conversion of the ``--data`` YOLO dataset.

    The conversion goes to ``<output_dir>/yolo_as_coco`` (a temporary folder without
    ``--output_dir``). Used by ``detr-irpe-train`` and ``detr-irpe-eval``, so that both see
    the same category ids (YOLO class k is category id k).

    Raises:
        OptionError: ``--coco_path`` is given too, or ``--data`` is not a directory.
    """
    from detr_irpe.config import OptionError

    if args.coco_path:
        raise OptionError("--data and --coco_path exclude each other: give one dataset")
    if not Path(args.data).is_dir():
        raise OptionError(f"--data '{args.data}' is not a directory")
    if args.output_dir:
        target = Path(args.output_dir) / "yolo_as_coco"
    else:
        target = Path(tempfile.mkdtemp(prefix="detr-irpe-yolo-"))
    converted = argparse.Namespace(**vars(args))
    converted.coco_path = str(convert_yolo(args.data, target, bool(args.skip_bad_samples)))
    return converted
