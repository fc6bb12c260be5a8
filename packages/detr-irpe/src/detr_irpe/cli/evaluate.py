"""``detr-irpe-eval``: COCO box evaluation of a checkpoint.

::

    detr-irpe-eval CHECKPOINT --coco_path ./coco_data [--output stats.json]
    detr-irpe-eval CHECKPOINT --data ./yolo_dataset     # a YOLO/Ultralytics layout
    torchrun --nproc_per_node=8 -m detr_irpe.cli.evaluate CHECKPOINT --coco_path ./coco_data

The network is rebuilt from the options stored in the checkpoint (this package's
checkpoints and the original's, whose ``args`` namespace is read without unpickling code);
any model option given on the command line (``--enc_rpe2d``, ``--num_classes``, ...) wins.
For a checkpoint without stored options, give the model options it was trained with.

Prints the 12 COCO metrics as a table on standard output and, with ``--output``, writes
them as JSON (``metrics`` by name, ``coco_eval_bbox`` as the original's list, the
validation ``losses``, the ``checkpoint`` path and its ``epoch``). With ``--output_dir`` it
also writes ``eval.pth`` (COCO precision/recall arrays), ``eval_stats.json`` and the AP of
each class (``ap_per_class.json`` and its bar chart ``ap_per_class.png``) there, as
``detr-irpe-train --eval`` does; the per-class table is logged either way.

The checkpoint becomes a :class:`detr_irpe.Detector` (as for ``detr-irpe-predict`` and the
Python API): the data set's images get its preprocessing, and its model and
post-processing make the detections that are scored.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from detr_irpe.cli.errors import run_cli
from detr_irpe.cli.parsers import checkpoint_parser
from detr_irpe.config import parse_options

__all__ = ["build_parser", "main", "run_evaluation"]

PROG = "detr-irpe-eval"

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = checkpoint_parser(PROG, "COCO box evaluation of a DETR-with-iRPE checkpoint.")
    parser.add_argument("--output", default=None, help="write the statistics to this JSON file")
    return parser


def run_evaluation(args: argparse.Namespace, given: Iterable[str] = ()) -> dict[str, object]:
    """Evaluate ``args.checkpoint``; returns the JSON report (on every rank). ``given`` names
    the options set on the command line: those win over the checkpoint's."""
    from detr_irpe.atomic import check_writable_dir, write_json
    from detr_irpe.checkpoint import model_from_checkpoint, save_torch
    from detr_irpe.cli.loaders import build_val_loader
    from detr_irpe.config import prepare_options
    from detr_irpe.data.coco import build_dataset, get_coco_api
    from detr_irpe.detector import Detector
    from detr_irpe.engine import evaluate_detector
    from detr_irpe.evaluation import evaluation_report, format_stats
    from detr_irpe.evaluation.per_class import report_per_class
    from detr_irpe.utils.distributed import init_distributed_mode, is_main_process
    from detr_irpe.utils.logging import setup_logging

    if getattr(args, "data", None):  # a YOLO dataset, converted as detr-irpe-train converts it
        from detr_irpe.data.yolo import yolo_as_coco

        args, given = yolo_as_coco(args), [*given, "coco_path"]
    args = prepare_options(args)
    if args.output_dir:
        check_writable_dir(args.output_dir)
    init_distributed_mode(args)
    setup_logging(args.rank)
    loaded = model_from_checkpoint(
        args.checkpoint, {name: getattr(args, name) for name in given}, base=args
    )
    args, path = loaded.args, loaded.path
    logger.info("evaluating %s (epoch %s) with %s", path, loaded.checkpoint.get("epoch"), args)

    detector = Detector.from_loaded(loaded)
    dataset = build_dataset("val", args, transforms=detector.transform)
    # No DDP wrapper: evaluation has no gradients to synchronise; ranks share the work
    # through the sampler and gather detections in the evaluator.
    loader = build_val_loader(dataset, args, detector.device)
    stats, evaluator = evaluate_detector(
        detector, loaded.criterion, loader, get_coco_api(dataset), progress=args.progress
    )
    report = evaluation_report(stats, checkpoint=str(path), epoch=loaded.checkpoint.get("epoch"))
    if is_main_process():
        num_images = len(evaluator.img_ids) if evaluator is not None else 0
        sys.stdout.write(
            f"COCO box evaluation of {path} ({num_images} images)\n"
            f"{format_stats(stats['coco_eval_bbox'])}\n"
        )
        sys.stdout.flush()
        if args.output:
            write_json(args.output, report)
            logger.info("wrote %s", args.output)
        if evaluator is not None:
            report_per_class(evaluator, args.output_dir or None)
        if args.output_dir and evaluator is not None:
            save_torch(evaluator.eval, Path(args.output_dir) / "eval.pth")
            write_json(Path(args.output_dir) / "eval_stats.json", report)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``detr-irpe-eval``; returns the exit status."""
    args, given = parse_options(build_parser(), argv)
    return run_cli(PROG, lambda: run_evaluation(args, given))


if __name__ == "__main__":
    sys.exit(main())
