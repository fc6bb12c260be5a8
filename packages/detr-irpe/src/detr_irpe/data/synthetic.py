"""A deterministic synthetic detection dataset in the COCO layout, for demos and tests.

Flat-coloured shapes (circle, square, triangle, cross) of varied size, colour and rotation on
gradient backgrounds with noise and line clutter, 1..``max_objects`` per image, objects never
overlapping (so every box is tight around a fully visible shape). Written as::

    out_dir/annotations/instances_train2017.json   out_dir/annotations/instances_val2017.json
    out_dir/train2017/*.png  out_dir/val2017/*.png      (or train2017.zip / val2017.zip)

so that ``detr-irpe-train --coco_path out_dir`` reads it like COCO. Category ids start at 1.
Each annotation also records the shape's ``color`` ``[r, g, b]``. The same configuration gives
byte-identical files: every image draws from its own generator seeded by ``(seed, split,
index)``, PNG encoding is deterministic and zip members carry a fixed timestamp.

``difficulty`` (0..1) shrinks objects, strengthens background noise and clutter, lowers the
colour contrast and allows stronger rotation. ``class_colors`` gives each category its own hue
(circle red, square green, triangle blue, cross yellow; saturation and brightness still vary),
so colour is a cue besides shape: a detector trained from scratch on a CPU for minutes can then
tell the classes apart, while telling shapes apart from random colours alone takes a backbone
far longer to learn (the README demo uses it).
"""

from __future__ import annotations

import colorsys
import io
import json
import logging
import math
import os
import shutil
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from detr_irpe.atomic import write_text

__all__ = [
    "SYNTHETIC_CATEGORIES",
    "SyntheticConfig",
    "SyntheticObject",
    "SyntheticSample",
    "generate_synthetic_coco",
    "render_sample",
]

logger = logging.getLogger(__name__)

# Category names; the id of SYNTHETIC_CATEGORIES[k] is k + 1.
SYNTHETIC_CATEGORIES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
# Hue (0..1) of each category with class_colors: red, green, blue, yellow.
_CLASS_HUES: tuple[float, ...] = (0.0, 1 / 3, 2 / 3, 1 / 6)
_HUE_JITTER = 0.03

_SPLITS = {"train": 0, "val": 1}
# A fixed zip timestamp (the earliest zip allows) keeps archives byte-identical across runs.
_ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)
_PLACEMENT_TRIES = 50
_OBJECT_MARGIN = 2


@dataclass(frozen=True)
class SyntheticConfig:
    """What :func:`generate_synthetic_coco` writes.

    Attributes:
        num_train, num_val: images per split.
        image_size: longest possible image side in pixels.
        min_image_size: shortest possible side; default ``round(0.75 * image_size)``. Width and
            height are drawn independently, so aspect ratios vary.
        max_objects: objects per image are drawn uniformly from ``1..max_objects``.
        difficulty: 0 (large objects, clean backgrounds) .. 1 (small objects, noisy clutter).
        seed: generator seed.
        as_zip: write ``train2017.zip``/``val2017.zip`` instead of folders.
        class_colors: draw each category in its own hue (see the module docstring).
    """

    num_train: int = 1500
    num_val: int = 150
    image_size: int = 160
    min_image_size: int | None = None
    max_objects: int = 3
    difficulty: float = 0.3
    seed: int = 0
    as_zip: bool = False
    class_colors: bool = False

    def __post_init__(self) -> None:
        if self.num_train < 0 or self.num_val < 0:
            raise ValueError("num_train and num_val must be >= 0")
        if self.image_size < 32:
            raise ValueError(f"image_size must be at least 32 pixels, got {self.image_size}")
        if not 16 <= self.smallest_side <= self.image_size:
            raise ValueError(
                f"min_image_size must be in [16, image_size={self.image_size}], "
                f"got {self.min_image_size}"
            )
        if self.max_objects < 1:
            raise ValueError(f"max_objects must be >= 1, got {self.max_objects}")
        if not 0.0 <= self.difficulty <= 1.0:
            raise ValueError(f"difficulty must be in [0, 1], got {self.difficulty}")

    @property
    def smallest_side(self) -> int:
        """The resolved ``min_image_size``."""
        if self.min_image_size is not None:
            return self.min_image_size
        return round(0.75 * self.image_size)


@dataclass
class SyntheticObject:
    """One drawn shape.

    Attributes:
        category_id: 1-based index into :data:`SYNTHETIC_CATEGORIES`.
        bbox: tight COCO box ``[x, y, w, h]`` in pixels (integers).
        area: number of shape pixels.
        color: the shape's RGB colour.
        mask: ``(h, w)`` bool array of the shape's pixels inside ``bbox``.
    """

    category_id: int
    bbox: list[int]
    area: int
    color: tuple[int, int, int]
    mask: np.ndarray = field(repr=False)


@dataclass
class SyntheticSample:
    """An image and its objects."""

    image: Image.Image
    objects: list[SyntheticObject]


def _background(rng: np.random.Generator, height: int, width: int, difficulty: float) -> np.ndarray:
    """A random two-colour linear gradient with Gaussian noise, ``(H, W, 3)`` float."""
    start, end = rng.uniform(0, 255, size=(2, 3))
    angle = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    ramp = xs * math.cos(angle) + ys * math.sin(angle)
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-9)
    image = start + ramp[..., None] * (end - start)
    noise_sigma = 3.0 + 22.0 * difficulty
    return image + rng.normal(0.0, noise_sigma, size=image.shape)


def _add_clutter(rng: np.random.Generator, image: Image.Image, difficulty: float) -> None:
    """Thin random lines: edges that are not objects."""
    draw = ImageDraw.Draw(image)
    width, height = image.size
    for _ in range(int(rng.integers(0, 1 + round(8 * difficulty)))):
        points = rng.uniform(0, 1, size=4) * [width, height, width, height]
        color = tuple(int(c) for c in rng.integers(0, 256, size=3))
        draw.line([float(p) for p in points], fill=color, width=1)


def _shape_mask(category: str, side: int, angle: float) -> np.ndarray:
    """``(side, side)`` bool mask of a shape centred in the square, rotated by ``angle``.

    Every shape lies inside the square's inscribed circle, so any rotation fits.
    """
    radius = side / 2.0
    coords = np.arange(side, dtype=np.float64) + 0.5 - radius  # pixel centres
    y, x = np.meshgrid(coords, coords, indexing="ij")
    cos, sin = math.cos(angle), math.sin(angle)
    u = cos * x + sin * y  # shape-frame coordinates
    v = -sin * x + cos * y
    if category == "circle":
        return u**2 + v**2 <= radius**2
    if category == "square":
        half = radius / math.sqrt(2.0)
        return (np.abs(u) <= half) & (np.abs(v) <= half)
    if category == "triangle":
        # Equilateral, circumradius `radius`, apex up: inside all three edge half-planes.
        inside = np.ones_like(u, dtype=bool)
        for normal_angle in (
            math.pi / 2,
            math.pi / 2 + 2 * math.pi / 3,
            math.pi / 2 - 2 * math.pi / 3,
        ):
            inside &= u * math.cos(normal_angle) + v * math.sin(normal_angle) <= radius / 2
        return inside
    if category == "cross":
        arm = radius / math.sqrt(1.0 + 1.0 / 9.0)  # corner (arm, arm/3) on the circle
        thickness = arm / 3.0
        horizontal = (np.abs(u) <= arm) & (np.abs(v) <= thickness)
        vertical = (np.abs(v) <= arm) & (np.abs(u) <= thickness)
        return horizontal | vertical
    raise ValueError(f"unknown shape {category!r}")


def _pick_color(
    rng: np.random.Generator, background: np.ndarray, difficulty: float
) -> tuple[int, int, int]:
    """A colour far enough (L1) from the mean background colour under the object."""
    reference = background.reshape(-1, 3).mean(axis=0)
    min_distance = 200.0 - 120.0 * difficulty
    best, best_distance = None, -1.0
    for _ in range(20):
        candidate = rng.integers(0, 256, size=3)
        distance = float(np.abs(candidate - reference).sum())
        if distance >= min_distance:
            return (int(candidate[0]), int(candidate[1]), int(candidate[2]))
        if distance > best_distance:
            best, best_distance = candidate, distance
    assert best is not None
    return (int(best[0]), int(best[1]), int(best[2]))


def _pick_class_color(
    rng: np.random.Generator, background: np.ndarray, category_index: int, difficulty: float
) -> tuple[int, int, int]:
    """A colour of the category's hue, as far (L1) from the background under it as allowed."""
    reference = background.reshape(-1, 3).mean(axis=0)
    min_distance = 200.0 - 120.0 * difficulty
    best, best_distance = None, -1.0
    for _ in range(20):
        hue = (_CLASS_HUES[category_index] + rng.uniform(-_HUE_JITTER, _HUE_JITTER)) % 1.0
        rgb = colorsys.hsv_to_rgb(hue, rng.uniform(0.65, 1.0), rng.uniform(0.45, 1.0))
        candidate = np.rint(np.array(rgb) * 255)
        distance = float(np.abs(candidate - reference).sum())
        if distance >= min_distance:
            best = candidate
            break
        if distance > best_distance:
            best, best_distance = candidate, distance
    assert best is not None
    return (int(best[0]), int(best[1]), int(best[2]))


def _overlaps(box: tuple[int, int, int, int], placed: list[tuple[int, int, int, int]]) -> bool:
    x0, y0, x1, y1 = box
    margin = _OBJECT_MARGIN
    return any(
        x0 < px1 + margin and px0 < x1 + margin and y0 < py1 + margin and py0 < y1 + margin
        for px0, py0, px1, py1 in placed
    )


def render_sample(config: SyntheticConfig, split: str, index: int) -> SyntheticSample:
    """Draw image ``index`` (0-based) of ``split`` (``'train'`` or ``'val'``).

    Depends only on ``config.seed``, the image-size, object and difficulty settings, ``split``
    and ``index`` (not on ``num_train``/``num_val``).
    """
    rng = np.random.default_rng([config.seed, _SPLITS[split], index])
    difficulty = config.difficulty
    width, height = (int(s) for s in rng.integers(config.smallest_side, config.image_size + 1, 2))
    canvas = np.clip(np.rint(_background(rng, height, width, difficulty)), 0, 255).astype(np.uint8)
    image = Image.fromarray(canvas)
    _add_clutter(rng, image, difficulty)
    pixels = np.array(image)

    shorter = min(width, height)
    low, high = 0.28 - 0.14 * difficulty, 0.55 - 0.10 * difficulty
    max_angle = math.radians(10.0 + 35.0 * difficulty)
    placed: list[tuple[int, int, int, int]] = []
    objects: list[SyntheticObject] = []
    for _ in range(int(rng.integers(1, config.max_objects + 1))):
        category_index = int(rng.integers(len(SYNTHETIC_CATEGORIES)))
        side = max(8, round(rng.uniform(low, high) * shorter))
        mask = _shape_mask(
            SYNTHETIC_CATEGORIES[category_index], side, rng.uniform(-1, 1) * max_angle
        )
        rows, cols = np.nonzero(mask)
        mask = mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        box_height, box_width = mask.shape
        for _ in range(_PLACEMENT_TRIES):
            x0 = int(rng.integers(0, width - box_width + 1))
            y0 = int(rng.integers(0, height - box_height + 1))
            box = (x0, y0, x0 + box_width, y0 + box_height)
            if not _overlaps(box, placed):
                break
        else:
            continue  # no free spot: fewer objects in this image
        region = pixels[box[1] : box[3], box[0] : box[2]]
        if config.class_colors:
            color = _pick_class_color(rng, region, category_index, difficulty)
        else:
            color = _pick_color(rng, region, difficulty)
        region[mask] = color
        placed.append(box)
        objects.append(
            SyntheticObject(
                category_id=category_index + 1,
                bbox=[x0, y0, box_width, box_height],
                area=int(mask.sum()),
                color=color,
                mask=mask,
            )
        )
    return SyntheticSample(Image.fromarray(pixels), objects)


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _split_samples(
    config: SyntheticConfig, split: str, count: int, progress: bool
) -> Iterator[tuple[int, SyntheticSample]]:
    indices = range(count)
    iterator = tqdm(indices, desc=f"synthetic {split}", disable=not progress, leave=False)
    for index in iterator:
        yield index + 1, render_sample(config, split, index)


def _write_split(
    out_dir: Path, config: SyntheticConfig, split: str, count: int, progress: bool
) -> None:
    folder_name = f"{split}2017"
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    archive: zipfile.ZipFile | None = None
    if config.as_zip:
        archive = zipfile.ZipFile(out_dir / f"{folder_name}.zip", "w", zipfile.ZIP_STORED)
    else:
        (out_dir / folder_name).mkdir(parents=True)
    try:
        for image_id, sample in _split_samples(config, split, count, progress):
            file_name = f"{image_id:012d}.png"
            data = _png_bytes(sample.image)
            if archive is not None:
                info = zipfile.ZipInfo(f"{folder_name}/{file_name}", date_time=_ZIP_DATE_TIME)
                info.external_attr = 0o644 << 16
                archive.writestr(info, data)
            else:
                (out_dir / folder_name / file_name).write_bytes(data)
            width, height = sample.image.size
            images.append(
                {"id": image_id, "file_name": file_name, "width": width, "height": height}
            )
            for obj in sample.objects:
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": obj.category_id,
                        "bbox": obj.bbox,
                        "area": obj.area,
                        "iscrowd": 0,
                        "color": list(obj.color),
                    }
                )
    finally:
        if archive is not None:
            archive.close()
    coco = {
        "info": {
            "description": "detr-irpe synthetic shapes",
            "version": "1",
            "seed": config.seed,
            "difficulty": config.difficulty,
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": k + 1, "name": name, "supercategory": "shape"}
            for k, name in enumerate(SYNTHETIC_CATEGORIES)
        ],
    }
    ann_path = out_dir / "annotations" / f"instances_{split}2017.json"
    write_text(ann_path, json.dumps(coco, separators=(",", ":")))
    logger.info("wrote %d %s images, %d objects", count, split, len(annotations))


def _outputs(out_dir: Path) -> list[Path]:
    names = [f"{split}2017{suffix}" for split in _SPLITS for suffix in ("", ".zip")]
    names += [f"annotations/instances_{split}2017.json" for split in _SPLITS]
    return [out_dir / name for name in names]


def generate_synthetic_coco(
    out_dir: str | os.PathLike[str],
    config: SyntheticConfig | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Write the synthetic dataset of ``config`` (default :class:`SyntheticConfig`) to ``out_dir``.

    Args:
        out_dir: dataset root, created if needed.
        config: what to write.
        overwrite: replace existing split folders, archives and annotation files; otherwise
            their presence raises ``FileExistsError``.
        progress: show progress bars.

    Returns:
        ``out_dir`` as a ``Path`` (use it as ``--coco_path``).
    """
    config = config or SyntheticConfig()
    root = Path(out_dir)
    existing = [path for path in _outputs(root) if path.exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"'{root}' already holds a dataset ({', '.join(str(p) for p in existing)}); "
            "pass overwrite=True (--overwrite) to replace it"
        )
    for path in existing:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    _write_split(root, config, "train", config.num_train, progress)
    _write_split(root, config, "val", config.num_val, progress)
    return root
