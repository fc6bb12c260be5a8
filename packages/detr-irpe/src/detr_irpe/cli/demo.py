"""``detr-irpe-demo``: train and evaluate a small DETR-iRPE on the synthetic dataset, on the CPU.

The whole pipeline a user runs on COCO, end to end, in minutes::

    detr-irpe-demo --output_dir outputs/demo           # about 5 minutes on 2 CPU cores
    detr-irpe-demo --output_dir outputs/demo --quick   # under a minute: the pipeline only

1. ``detr-irpe-synthetic``: a synthetic shapes dataset in the COCO layout (``data/``);
2. ``detr-irpe-train``: a small DETR with ``rpe-2.0-product-ctx-1-k`` iRPE in the encoder,
   trained from scratch (nothing is downloaded) (``run/``: checkpoints, ``log.txt``);
3. ``detr-irpe-eval``: COCO AP with pycocotools (``metrics.json``, ``ap_table.txt``);
4. ``detr-irpe-predict``: detections drawn on validation images (``prediction.png``);
5. ``detr-irpe-plot``: losses and AP per epoch (``curves.png``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from detr_irpe.atomic import atomic_write, write_json, write_text
from detr_irpe.cli import evaluate as evaluate_cli
from detr_irpe.cli import plot as plot_cli
from detr_irpe.cli import predict as predict_cli
from detr_irpe.cli import train as train_cli
from detr_irpe.cli.errors import CLIError, run_cli
from detr_irpe.data.synthetic import SyntheticConfig, generate_synthetic_coco
from detr_irpe.utils.logging import setup_logging

__all__ = ["DEMO_IMAGE_SIZE", "demo_model_argv", "main"]

PROG = "detr-irpe-demo"

logger = logging.getLogger(__name__)

# Longest side of the synthetic images; the model sees them at this size (no rescaling).
DEMO_IMAGE_SIZE = 128


def demo_model_argv() -> list[str]:
    """The small model of the demo, as ``detr-irpe-train`` options.

    A ResNet-18 trained from scratch with trainable batch norm (nothing is downloaded; the
    original's frozen batch norm only makes sense for pretrained weights), a 2+2-layer
    transformer of width 128 with the original's default iRPE (contextual product shared-head,
    9x9 buckets, on keys), and 10 queries for at most 3 objects per image.
    """
    return [
        "--backbone", "resnet18", "--backbone_weights", "none", "--backbone_norm", "batch",
        "--hidden_dim", "128", "--dim_feedforward", "256", "--nheads", "4",
        "--enc_layers", "2", "--dec_layers", "2", "--num_queries", "10", "--dropout", "0.0",
        "--enc_rpe2d", "rpe-2.0-product-ctx-1-k",
    ]  # fmt: skip


@dataclass(frozen=True)
class DemoPlan:
    """How much data and training a demo run uses."""

    num_train: int
    num_val: int
    epochs: int
    lr_drop: int
    batch_size: int
    eval_every: int


# Sized for 5 minutes of training on 2 CPU cores. Measured on a 2-core Intel Xeon (validation
# AP50 after epochs 2, 4, 6, 8 and 9: 0.04, 0.24, 0.45, 0.52, then 0.70 after the 10x
# learning-rate drop before the last epoch; 274 s): batches of 16 train more images per second
# than batches of 8 on a CPU and learn as much per epoch, and the drop pays most at the end.
FULL = DemoPlan(num_train=1200, num_val=100, epochs=9, lr_drop=8, batch_size=16, eval_every=2)
QUICK = DemoPlan(num_train=16, num_val=8, epochs=2, lr_drop=2, batch_size=4, eval_every=1)


def train_argv(plan: DemoPlan, data_dir: Path, run_dir: Path, device: str) -> list[str]:
    """The ``detr-irpe-train`` command line of a demo run."""
    side = str(DEMO_IMAGE_SIZE)
    return [
        *demo_model_argv(),
        "--coco_path", str(data_dir), "--output_dir", str(run_dir), "--device", device,
        "--epochs", str(plan.epochs), "--lr_drop", str(plan.lr_drop),
        "--batch_size", str(plan.batch_size), "--eval_every", str(plan.eval_every),
        # Loading in the training process: on 2 cores a data worker takes CPU time from the two
        # compute threads (an epoch took 10% longer with one worker).
        "--num_workers", "0",
        # From scratch the backbone learns at the transformer's rate (1e-4 for the backbone, as
        # for pretrained weights, gave AP50 0.09 instead of 0.14 after 4 epochs).
        "--lr", "4e-4", "--lr_backbone", "4e-4", "--weight_decay", "1e-4",
        # Images keep their generated size: multi-scale and crops matter on COCO, not here.
        "--train_scales", side, "--train_max_size", side, "--no_crop_aug",
        "--val_size", side, "--val_max_size", side,
    ]  # fmt: skip


def _montage(images: Sequence[Path], out: Path, columns: int = 2, zoom: int = 2) -> None:
    """Tile images into one PNG, each enlarged ``zoom`` times (the demo's images are small)."""
    tiles = []
    for path in images:
        with Image.open(path) as tile:
            tiles.append(tile.convert("RGB").resize((tile.width * zoom, tile.height * zoom)))
    width = max(tile.width for tile in tiles)
    height = max(tile.height for tile in tiles)
    rows = (len(tiles) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * width, rows * height), "white")
    for i, tile in enumerate(tiles):
        sheet.paste(tile, ((i % columns) * width, (i // columns) * height))
    with atomic_write(out) as handle:
        sheet.save(handle, format="PNG")


def _step(name: str, status: int) -> None:
    if status != 0:
        raise CLIError(f"the demo stopped: {name} failed (exit status {status})")


def run_demo(options: argparse.Namespace) -> None:
    plan = QUICK if options.quick else FULL
    out = Path(options.output_dir)
    data_dir, run_dir = out / "data", out / "run"
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    config = SyntheticConfig(
        num_train=plan.num_train,
        num_val=plan.num_val,
        image_size=DEMO_IMAGE_SIZE,
        min_image_size=DEMO_IMAGE_SIZE,
        seed=options.seed,
        # A colour cue per class: a backbone trained from scratch for minutes on a CPU learns
        # colours long before it learns shapes.
        class_colors=True,
    )
    logger.info("1/5 synthetic dataset: %d train, %d val images", plan.num_train, plan.num_val)
    generate_synthetic_coco(data_dir, config, overwrite=True)

    logger.info("2/5 training for %d epochs", plan.epochs)
    argv = train_argv(plan, data_dir, run_dir, options.device)
    if not options.progress:
        argv.append("--no_progress")
    _step("training", train_cli.main(argv))
    train_seconds = time.perf_counter() - start
    checkpoint = run_dir / "checkpoint.pth"

    logger.info("3/5 COCO evaluation")
    metrics_path = out / "metrics.json"
    _step(
        "evaluation",
        evaluate_cli.main(
            [str(checkpoint), "--coco_path", str(data_dir), "--output", str(metrics_path),
             "--device", options.device, "--num_workers", "0"]
        ),
    )  # fmt: skip
    metrics = json.loads(metrics_path.read_text())

    logger.info("4/5 predictions")
    val_images = sorted((data_dir / "val2017").glob("*"))[:4]
    predictions = out / "predictions"
    _step(
        "prediction",
        predict_cli.main(
            [str(checkpoint), *map(str, val_images), "--output_dir", str(predictions),
             "--device", options.device, "--threshold", "0.7"]
        ),
    )  # fmt: skip
    _montage(sorted(predictions.glob("*.png")), out / "prediction.png")

    logger.info("5/5 curves")
    _step("plotting", plot_cli.main([str(run_dir / "log.txt"), "-o", str(out / "curves.png")]))

    total_seconds = time.perf_counter() - start
    summary = {
        "ap": metrics["metrics"]["AP"],
        "ap50": metrics["metrics"]["AP50"],
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(total_seconds, 1),
        "plan": vars(options) | {"epochs": plan.epochs, "num_train": plan.num_train},
    }
    from detr_irpe.evaluation import format_stats

    write_json(out / "summary.json", summary)
    write_text(out / "ap_table.txt", format_stats(metrics["coco_eval_bbox"]) + "\n")
    logger.info(
        "demo done in %.0f s (training %.0f s): AP %.3f, AP50 %.3f; outputs in %s",
        total_seconds,
        train_seconds,
        summary["ap"],
        summary["ap50"],
        out,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="outputs/demo", help="where everything goes")
    parser.add_argument("--quick", action="store_true", help="a few images and 2 epochs (CI)")
    parser.add_argument("--device", default="cpu", help="the demo is sized for the CPU")
    parser.add_argument("--seed", default=0, type=int, help="seed of the synthetic dataset")
    parser.add_argument("--no_progress", dest="progress", action="store_false")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    options = build_parser().parse_args(None if argv is None else list(argv))
    setup_logging(0)
    return run_cli(PROG, lambda: run_demo(options))


if __name__ == "__main__":
    sys.exit(main())
