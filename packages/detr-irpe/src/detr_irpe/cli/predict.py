"""``detr-irpe-predict``: draw a checkpoint's detections on images.

::

    detr-irpe-predict CHECKPOINT photo1.jpg photo2.png --output_dir ./predictions --threshold 0.7
    detr-irpe-predict CHECKPOINT photos/ 'more/*.jpg' --output_dir ./predictions

Each image argument is a file, a folder (the images directly inside it, by extension
``.jpg .jpeg .png .bmp .webp .tif .tiff``, sorted by name; sub-folders are not searched, as
a folder of photos often holds earlier outputs or thumbnails below it) or a quoted glob
pattern (``'imgs/*.jpg'``; ``**`` searches sub-folders), expanded in sorted order. The
images are decoded by :func:`detr_irpe.data.images.load_rgb` and run through the model up
to ``--batch_size`` at a time (images of one size per batch, see :func:`detect_in_batches`),
with a progress bar (``--no_progress`` hides it).

The checkpoint becomes a :class:`detr_irpe.Detector`, which runs each image through the
validation transform (shorter side ``--val_size``, longer side at most ``--val_max_size``),
the model and the post-processing; detections scoring at least ``--threshold`` are drawn
with their class name and score on the original image and saved as
``<output_dir>/<image stem>.png``. ``<output_dir>/detections.json`` lists them, best first
(boxes in pixels, ``[x0, y0, x1, y1]``).

Class names come from the checkpoint (this package stores them), else from the annotation
files under ``--coco_path``, else the COCO names for a 91-class model, else the category ids
are shown. Model options default to the checkpoint's, as in ``detr-irpe-eval``.
"""

from __future__ import annotations

import argparse
import glob
import logging
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from detr_irpe.cli.errors import CLIError, run_cli
from detr_irpe.cli.parsers import checkpoint_parser
from detr_irpe.config import parse_options

if TYPE_CHECKING:
    from detr_irpe.detector import Detections, Detector

__all__ = [
    "build_parser",
    "class_names_for",
    "collect_images",
    "detect_in_batches",
    "main",
    "predict",
]

PROG = "detr-irpe-predict"

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = checkpoint_parser(
        PROG, "Draw the detections of a DETR-with-iRPE checkpoint on images (PNG)."
    )
    parser.add_argument(
        "images",
        nargs="+",
        help="image files, folders (the images directly inside) or quoted glob patterns",
    )
    parser.add_argument(
        "--threshold", default=0.5, type=float, help="lowest score drawn (default: 0.5)"
    )
    return parser


def class_names_for(state: Mapping[str, Any], args: argparse.Namespace) -> dict[int, str]:
    """``{category_id: name}`` from the checkpoint's ``class_names`` or the annotations of
    ``--coco_path`` (``--val_ann``/``--train_ann`` when given); ``{}`` without either."""
    stored = state.get("class_names")
    if stored:
        return {int(k): str(v) for k, v in stored.items()}
    if args.coco_path:
        from detr_irpe.data.coco import category_names, split_paths

        for split in ("val", "train"):
            ann_file = split_paths(args, split)[1]
            if ann_file.is_file():
                return category_names(ann_file)
    return {}


def _output_paths(images: Sequence[Path], output_dir: Path) -> list[Path]:
    """``<stem>.png`` per image, numbered when two images share a stem."""
    paths: list[Path] = []
    taken: set[str] = set()
    for image in images:
        name, n = image.stem, 1
        while name in taken:
            n += 1
            name = f"{image.stem}_{n}"
        taken.add(name)
        paths.append(output_dir / f"{name}.png")
    return paths


def _load_image(path: Path) -> Image.Image:
    from detr_irpe.data.images import ImageLoadError, load_rgb

    try:
        return load_rgb(path)
    except ImageLoadError as err:
        raise CLIError(str(err)) from None


def _images_in_folder(folder: Path) -> list[Path]:
    from detr_irpe.data.images import IMAGE_EXTENSIONS

    found = sorted(
        p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
    )
    if not found:
        raise CLIError(f"no image files ({' '.join(IMAGE_EXTENSIONS)}) in folder '{folder}'")
    return found


def collect_images(patterns: Sequence[str]) -> list[Path]:
    """The image files named by ``patterns``, in order, each once.

    A pattern is an existing file (taken whatever its extension), a folder (the files
    directly inside with an image extension, sorted by name) or a glob pattern (the matching
    files, sorted; ``**`` matches sub-folders).

    Raises:
        CLIError: a path that does not exist, a folder without images, or a glob that
            matches no file (the message names each).
    """
    found: list[Path] = []
    missing: list[str] = []
    for pattern in patterns:
        path = Path(pattern).expanduser()
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            found.extend(_images_in_folder(path))
        elif glob.has_magic(pattern):
            matches = sorted(glob.glob(str(path), recursive=True))
            files = [Path(m) for m in matches if Path(m).is_file()]
            if not files:
                raise CLIError(f"no file matches the pattern '{pattern}'")
            found.extend(files)
        else:
            missing.append(pattern)
    if missing:
        raise CLIError(f"image file(s) not found: {', '.join(missing)}")
    unique: dict[Path, Path] = {}
    for path in found:
        unique.setdefault(path.resolve(), path)
    return list(unique.values())


def _same_size_batches(paths: Sequence[Path], batch_size: int) -> list[list[int]]:
    """Indices of ``paths`` in batches of at most ``batch_size`` images of one stored size.

    Sizes come from the file headers (nothing is decoded); a file whose header cannot be
    read gets a batch of its own, where decoding it reports the error.
    """
    groups: dict[Any, list[int]] = {}
    for index, path in enumerate(paths):
        try:
            with Image.open(path) as image:
                key: Any = image.size
        except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
            key = ("unreadable", index)  # decoding it in its own batch reports the problem
        groups.setdefault(key, []).append(index)
    return [
        group[start : start + batch_size]
        for group in groups.values()
        for start in range(0, len(group), batch_size)
    ]


def detect_in_batches(
    detector: Detector,
    paths: Sequence[Path],
    progress: bool = False,
) -> Iterator[tuple[int, Image.Image, Detections]]:
    """Run ``detector`` on the images of ``paths``, up to ``detector.batch_size`` at a time.

    Only images of the same size share a batch, so none is padded: DETR's output for an image
    changes when the batch pads it (the backbone sees the padding), and an image's detections
    must not depend on the other images given. The sizes come from the file headers, so only
    one batch of images is decoded at a time: a folder of photos from one camera runs in
    full batches; images of many sizes run in smaller ones.

    Args:
        detector: its threshold selects the detections.
        paths: the image files.
        progress: show a tqdm bar (only when stderr is a terminal).

    Yields:
        Per image, grouped by size rather than in the order of ``paths``: its index in
        ``paths``, the decoded RGB image and its :class:`~detr_irpe.detector.Detections`.
    """
    from tqdm import tqdm

    bar = tqdm(
        total=len(paths),
        desc="predict",
        unit="img",
        disable=not (progress and sys.stderr.isatty()),
        file=sys.stderr,
        dynamic_ncols=True,
    )
    try:
        for batch in _same_size_batches(paths, detector.batch_size):
            images = [_load_image(paths[index]) for index in batch]
            results = detector.detect_images(images)
            yield from zip(batch, images, results, strict=True)
            bar.update(len(images))
    finally:
        bar.close()


def _draw_and_list(
    image: Image.Image,
    result: Detections,
    image_path: Path,
    out_path: Path,
    class_names: Mapping[int, str],
    threshold: float,
) -> dict[str, Any]:
    """Draw ``result`` to ``out_path``; their listing."""
    from detr_irpe.visualize import draw_detections

    draw_detections(
        image,
        result.boxes,
        result.labels,
        result.scores,
        class_names=class_names,
        score_threshold=threshold,
        path=out_path,
    )
    detections = [
        {"label": int(label), "name": name, "score": float(score), "box": [float(v) for v in box]}
        for box, label, name, score in zip(
            result.boxes, result.labels, result.names, result.scores, strict=True
        )
    ]
    logger.info("%s: %d detection(s) -> %s", image_path, len(detections), out_path)
    return {"image": str(image_path), "output": str(out_path), "detections": detections}


def predict(args: argparse.Namespace, given: Iterable[str] = ()) -> None:
    """Run the programme for parsed options ``args`` (see the module docstring); ``given``
    names the options set on the command line: those win over the checkpoint's."""
    from detr_irpe.atomic import check_writable_dir, write_json
    from detr_irpe.checkpoint import model_from_checkpoint
    from detr_irpe.config import prepare_options
    from detr_irpe.detector import Detector
    from detr_irpe.utils.logging import setup_logging

    args = prepare_options(args, needs_data=False)
    setup_logging(0)
    if not args.output_dir:
        raise CLIError("--output_dir is required: where the PNG files are written")
    if not 0.0 <= args.threshold <= 1.0:
        raise CLIError(f"--threshold must lie in [0, 1], got {args.threshold}")
    images = collect_images(args.images)
    check_writable_dir(args.output_dir)
    loaded = model_from_checkpoint(
        args.checkpoint, {name: getattr(args, name) for name in given}, base=args
    )
    detector = Detector.from_loaded(
        loaded, args.threshold, args.batch_size, class_names_for(loaded.checkpoint, loaded.args)
    )
    if not detector.class_names:
        logger.warning("no class names in the checkpoint and no --coco_path: showing category ids")

    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    out_paths = _output_paths(images, output_dir)
    listing: list[dict[str, Any]] = [{} for _ in images]
    for index, image, result in detect_in_batches(detector, images, progress=args.progress):
        listing[index] = _draw_and_list(
            image, result, images[index], out_paths[index], detector.class_names, args.threshold
        )
    write_json(output_dir / "detections.json", listing)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``detr-irpe-predict``; returns the exit status."""
    args, given = parse_options(build_parser(), argv)
    return run_cli(PROG, lambda: predict(args, given))


if __name__ == "__main__":
    sys.exit(main())
