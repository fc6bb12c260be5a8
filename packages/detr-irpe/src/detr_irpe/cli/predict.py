"""``detr-irpe-predict``: draw a checkpoint's detections on images.

::

    detr-irpe-predict CHECKPOINT photo1.jpg photo2.png --output_dir ./predictions --threshold 0.7

Each image goes through the validation transform (shorter side ``--val_size``, longer side
at most ``--val_max_size``), the model and the post-processing; detections scoring at least
``--threshold`` are drawn with their class name and score on the original image and saved
as ``<output_dir>/<image stem>.png``. ``<output_dir>/detections.json`` lists them (boxes in
pixels, ``[x0, y0, x1, y1]``).

Class names come from the checkpoint (this package stores them), else from the annotation
files under ``--coco_path``, else the category ids are shown. Model options default to the
checkpoint's, as in ``detr-irpe-eval``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from detr_irpe.cli.common import (
    MODEL_OPTIONS,
    CLIError,
    check_model_options,
    checkpoint_parser,
    explicit_options,
    locate_checkpoint,
    merge_checkpoint_args,
    resolve_device,
    run_cli,
    write_json,
)
from detr_irpe.config import complete_args
from detr_irpe.nested_tensor import nested_tensor_from_tensor_list
from detr_irpe.utils.logging import setup_logging

__all__ = ["build_parser", "class_names_for", "main", "predict"]

PROG = "detr-irpe-predict"

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = checkpoint_parser(
        PROG, "Draw the detections of a DETR-with-iRPE checkpoint on images (PNG)."
    )
    parser.add_argument("images", nargs="+", help="image files to run the detector on")
    parser.add_argument(
        "--threshold", default=0.5, type=float, help="lowest score drawn (default: 0.5)"
    )
    return parser


def class_names_for(state: Mapping[str, Any], coco_path: str | None) -> dict[int, str]:
    """``{category_id: name}`` from the checkpoint's ``class_names`` or the annotations."""
    stored = state.get("class_names")
    if stored:
        return {int(k): str(v) for k, v in stored.items()}
    if coco_path:
        from detr_irpe.data.coco import SPLITS, category_names

        for split in ("val", "train"):
            ann_file = Path(coco_path) / SPLITS[split][1]
            if ann_file.is_file():
                return category_names(ann_file)
    logger.warning("no class names in the checkpoint and no --coco_path: showing category ids")
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


def predict(args: argparse.Namespace, argv: Sequence[str] | None) -> None:
    """Run the programme for parsed options ``args`` (see the module docstring)."""
    from detr_irpe.checkpoint import load_checkpoint, read_checkpoint
    from detr_irpe.data.transforms import make_transforms
    from detr_irpe.models import build_model
    from detr_irpe.visualize import draw_detections

    args = complete_args(args)
    setup_logging(0)
    device = resolve_device(args)
    if not args.output_dir:
        raise CLIError("--output_dir is required: where the PNG files are written")
    if not 0.0 <= args.threshold <= 1.0:
        raise CLIError(f"--threshold must lie in [0, 1], got {args.threshold}")
    images = [Path(p) for p in args.images]
    missing = [str(p) for p in images if not p.is_file()]
    if missing:
        raise CLIError(f"image file(s) not found: {', '.join(missing)}")
    path = locate_checkpoint(args.checkpoint)

    state = read_checkpoint(path)
    explicit = explicit_options(build_parser, argv, MODEL_OPTIONS)
    args = complete_args(merge_checkpoint_args(args, state, explicit))
    check_model_options(args)
    class_names = class_names_for(state, args.coco_path)

    build_args = argparse.Namespace(**vars(args))
    build_args.backbone_weights = "none"  # the checkpoint holds the backbone
    model, _criterion, postprocessors = build_model(build_args)
    try:
        load_checkpoint(state, model)
    except RuntimeError as err:
        raise CLIError(
            f"{path} does not fit the model built from its options ({err}); give the model "
            "options it was trained with (e.g. --enc_rpe2d, --num_classes)"
        ) from None
    model.to(device).eval()
    transform = make_transforms("val", args)

    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    listing = []
    for image_path, out_path in zip(images, _output_paths(images, output_dir), strict=True):
        image = _load_image(image_path)
        tensor, _ = transform(image, None)
        with torch.no_grad():
            outputs = model(nested_tensor_from_tensor_list([tensor]).to(device))
            orig_size = torch.tensor([[image.height, image.width]], device=device)
            result = postprocessors["bbox"](outputs, orig_size)[0]
        keep = result["scores"] >= args.threshold
        boxes = result["boxes"][keep].cpu()
        labels = result["labels"][keep].cpu()
        scores = result["scores"][keep].cpu()
        draw_detections(
            image,
            boxes,
            labels,
            scores,
            class_names=class_names,
            score_threshold=args.threshold,
            path=out_path,
        )
        detections = [
            {
                "label": int(label),
                "name": class_names.get(int(label), str(int(label))),
                "score": float(score),
                "box": [float(v) for v in box],
            }
            for box, label, score in zip(boxes, labels, scores, strict=True)
        ]
        listing.append(
            {"image": str(image_path), "output": str(out_path), "detections": detections}
        )
        logger.info("%s: %d detection(s) -> %s", image_path, len(detections), out_path)
    write_json(output_dir / "detections.json", listing)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``detr-irpe-predict``; returns the exit status."""
    args = build_parser().parse_args(None if argv is None else list(argv))
    return run_cli(PROG, lambda: predict(args, argv))


if __name__ == "__main__":
    sys.exit(main())
