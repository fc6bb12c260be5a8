"""``detr-irpe-eval``: COCO box evaluation of a checkpoint.

::

    detr-irpe-eval CHECKPOINT --coco_path ./coco_data [--output stats.json]
    torchrun --nproc_per_node=8 -m detr_irpe.cli.evaluate CHECKPOINT --coco_path ./coco_data

The network is rebuilt from the options stored in the checkpoint (this package's
checkpoints and the original's, whose ``args`` namespace is read without unpickling code);
any model option given on the command line (``--enc_rpe2d``, ``--num_classes``, ...) wins.
For a checkpoint without stored options, give the model options it was trained with.

Prints the 12 COCO metrics as a table on standard output and, with ``--output``, writes
them as JSON (``metrics`` by name, ``coco_eval_bbox`` as the original's list, the
validation ``losses``, the ``checkpoint`` path and its ``epoch``). With ``--output_dir`` it
also writes ``eval.pth`` (COCO precision/recall arrays) and ``eval_stats.json`` there, as
``detr-irpe-train --eval`` does.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

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
    save_torch_atomic,
    write_json,
)
from detr_irpe.cli.loaders import build_val_loader
from detr_irpe.config import complete_args
from detr_irpe.engine import evaluate
from detr_irpe.evaluation import evaluation_report, format_stats
from detr_irpe.utils.distributed import init_distributed_mode, is_main_process
from detr_irpe.utils.logging import setup_logging

__all__ = ["build_parser", "main", "run_evaluation"]

PROG = "detr-irpe-eval"

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = checkpoint_parser(PROG, "COCO box evaluation of a DETR-with-iRPE checkpoint.")
    parser.add_argument("--output", default=None, help="write the statistics to this JSON file")
    return parser


def run_evaluation(args: argparse.Namespace, argv: Sequence[str] | None) -> dict[str, object]:
    """Evaluate ``args.checkpoint``; returns the JSON report (on every rank)."""
    from detr_irpe.checkpoint import load_checkpoint, read_checkpoint
    from detr_irpe.data.coco import build_dataset, get_coco_api
    from detr_irpe.models import build_model

    args = complete_args(args)
    resolve_device(args)
    path = locate_checkpoint(args.checkpoint)
    if not args.coco_path:
        raise CLIError("--coco_path is required: the folder holding annotations/ and val2017")
    if not Path(args.coco_path).is_dir():
        raise CLIError(f"--coco_path '{args.coco_path}' is not a directory")
    init_distributed_mode(args)
    setup_logging(args.rank)
    device = torch.device(args.device)

    state = read_checkpoint(path)
    explicit = explicit_options(build_parser, argv, MODEL_OPTIONS)
    args = complete_args(merge_checkpoint_args(args, state, explicit))
    check_model_options(args)
    logger.info("evaluating %s (epoch %s) with %s", path, state.get("epoch", "?"), args)

    build_args = argparse.Namespace(**vars(args))
    build_args.backbone_weights = "none"  # the checkpoint holds the backbone
    model, criterion, postprocessors = build_model(build_args)
    try:
        load_checkpoint(state, model)
    except RuntimeError as err:
        raise CLIError(
            f"{path} does not fit the model built from its options ({err}); give the model "
            "options it was trained with (e.g. --enc_rpe2d, --num_classes)"
        ) from None
    model.to(device)

    dataset = build_dataset("val", args)
    loader = build_val_loader(dataset, args, device)
    # No DDP wrapper: evaluation has no gradients to synchronise; ranks share the work
    # through the sampler and gather detections in the evaluator.
    stats, evaluator = evaluate(
        model,
        criterion,
        postprocessors,
        loader,
        get_coco_api(dataset),
        device,
        amp=args.amp,
        progress=args.progress,
    )
    report = evaluation_report(stats, checkpoint=str(path), epoch=state.get("epoch"))
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
        if args.output_dir and evaluator is not None:
            save_torch_atomic(evaluator.eval, Path(args.output_dir) / "eval.pth")
            write_json(Path(args.output_dir) / "eval_stats.json", report)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``detr-irpe-eval``; returns the exit status."""
    args = build_parser().parse_args(None if argv is None else list(argv))
    return run_cli(PROG, lambda: run_evaluation(args, argv))


if __name__ == "__main__":
    sys.exit(main())
