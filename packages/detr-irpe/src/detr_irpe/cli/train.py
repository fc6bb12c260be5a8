"""``detr-irpe-train``: train or evaluate DETR with iRPE on COCO (the original ``main.py``).

Accepts every flag of the original programme, single-process or under ``torchrun`` /
``python -m torch.distributed.launch --use_env`` / SLURM, e.g.::

    torchrun --nproc_per_node=8 -m detr_irpe.cli.train --lr_drop 100 --epochs 150 \\
        --coco_path ./coco_data --enc_rpe2d rpe-2.0-product-ctx-1-k --output_dir ./output
    detr-irpe-train --coco_path ./coco_data --enc_rpe2d rpe-2.0-product-ctx-1-k \\
        --eval --resume rpe-2.0-product-ctx-1-k.pth

Files written to ``--output_dir`` (rank 0; docs/detector.md, 'Output directory'):
``checkpoint.pth`` every epoch and ``checkpoint{epoch:04}.pth`` when ``epoch + 1`` is a
multiple of ``--lr_drop`` or 100, both written atomically after the epoch's evaluation, so a
run killed at any moment resumes with ``--resume output/checkpoint.pth``; ``log.txt`` (one
JSON line per epoch with the original's keys, plus ``epoch_time``, ``train_data_time`` and
``train_iter_time`` in seconds); ``eval/latest.pth`` and ``eval/{epoch:03}.pth`` (every 50
epochs) with the COCO precision/recall arrays; ``tensorboard/`` with ``--tensorboard``;
``checkpoint_best.pth`` with ``--save_best`` whenever the validation AP improves;
``ap_per_class.json`` and its bar chart ``ap_per_class.png`` after each evaluation;
``config.yaml``, the run's options, which ``--config`` accepts to repeat the run. An
``--eval`` run writes ``eval.pth`` and ``eval_stats.json``. ``--tensorboard``, ``--mlflow``
and ``--wandb`` also send the options, the numbers of every epoch, the per-class AP and
pictures of the detections to those trackers (:mod:`detr_irpe.utils.trackers`).

``--finetune CHECKPOINT`` starts a new training (epoch 0, fresh optimizer) from another
checkpoint's weights, e.g. a released COCO model on a dataset with other classes. With
``--resume`` or ``--finetune`` the architecture is the checkpoint's: model flags may be left
out, and one that contradicts the checkpoint is refused. Only the class head may change size
(the new data's classes).

The steps live in :mod:`detr_irpe.training`; torch and the models are imported only after the
options parse, so ``--help`` and bad flags answer at once.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import logging
import sys
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from detr_irpe.cli.errors import run_cli
from detr_irpe.config import get_args_parser, parse_options

if TYPE_CHECKING:
    from detr_irpe.training import RunLogs, TrainingRun

__all__ = ["build_parser", "main", "train"]

PROG = "detr-irpe-train"

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = get_args_parser()
    parser.prog = PROG
    parser.description = "Train (or with --eval, evaluate) DETR with iRPE on a COCO-style dataset."
    return parser


def train(args: argparse.Namespace, given: Iterable[str] = ()) -> None:
    """Run the programme for parsed options ``args``; ``given`` names the options set on
    the command line (see :func:`detr_irpe.config.parse_options`)."""
    from detr_irpe import training

    run = training.set_up(args, given)
    if run.args.eval:
        stats, evaluator = training.evaluate_run(run)
        training.save_evaluation(run, stats, evaluator)
        return

    loader_train = training.build_train_data(run)
    logs = training.open_logs(run)
    if run.output_dir is not None:
        from detr_irpe.config_file import write_run_config

        options = argparse.Namespace(**vars(run.args))
        if options.data:  # the conversion is redone from --data
            options.coco_path = None
        write_run_config(options, build_parser(), run.output_dir)
    if run.start_epoch >= run.args.epochs:
        logger.warning(
            "nothing to train: start epoch %d >= --epochs %d", run.start_epoch, run.args.epochs
        )
    logger.info("Start training")
    start_time = time.time()
    try:
        _train_epochs(run, loader_train, logs)
    except BaseException:
        # The trackers mark the run as failed; the run's own error is the one to report.
        with contextlib.suppress(Exception):
            logs.close(failed=True)
        raise
    logs.close()
    logger.info("Training time %s", datetime.timedelta(seconds=int(time.time() - start_time)))


def _train_epochs(run: TrainingRun, loader_train: Any, logs: RunLogs) -> None:
    """The epochs from ``run.start_epoch`` on, until ``--epochs`` or ``--early_stop``."""
    from detr_irpe import training

    for epoch in range(run.start_epoch, run.args.epochs):
        record = training.train_epoch(run, loader_train, epoch)
        test_stats, evaluator = {}, None
        if (epoch + 1) % run.args.eval_every == 0 or epoch == run.args.epochs - 1:
            test_stats, evaluator = training.evaluate_run(run)
        record = training.with_test_stats(record, test_stats)
        stop = training.track_best(run, epoch, test_stats)
        training.commit_epoch(run, epoch, record, evaluator, logs)
        if stop:
            break


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``detr-irpe-train``; returns the exit status."""

    def body() -> None:
        args, given = parse_options(build_parser(), argv)  # --config errors: one line
        train(args, given)

    return run_cli(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
