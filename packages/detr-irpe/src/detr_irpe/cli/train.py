"""``detr-irpe-train``: train or evaluate DETR with iRPE on COCO (the original ``main.py``).

Accepts every flag of the original programme, single-process or under ``torchrun`` /
``python -m torch.distributed.launch --use_env`` / SLURM, e.g.::

    torchrun --nproc_per_node=8 -m detr_irpe.cli.train --lr_drop 100 --epochs 150 \\
        --coco_path ./coco_data --enc_rpe2d rpe-2.0-product-ctx-1-k --output_dir ./output
    detr-irpe-train --coco_path ./coco_data --enc_rpe2d rpe-2.0-product-ctx-1-k \\
        --eval --resume rpe-2.0-product-ctx-1-k.pth

Files written to ``--output_dir`` (rank 0; docs/detector.md, 'Output directory'): ``checkpoint.pth``
every epoch and ``checkpoint{epoch:04}.pth`` when ``epoch + 1`` is a multiple of
``--lr_drop`` or 100, both written atomically so a run killed at any moment resumes with
``--resume output/checkpoint.pth``; ``log.txt`` (one JSON line per epoch with the
original's keys, plus ``epoch_time``, ``train_data_time`` and ``train_iter_time`` in
seconds); ``eval/latest.pth`` and ``eval/{epoch:03}.pth`` (every 50 epochs) with the COCO
precision/recall arrays; ``tensorboard/`` with ``--tensorboard``. An ``--eval`` run writes
``eval.pth`` and ``eval_stats.json``.

``--finetune CHECKPOINT`` starts a new training (epoch 0, fresh optimizer) from another
checkpoint's weights, e.g. a released COCO model on a dataset with other classes.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from detr_irpe.cli.common import (
    CLIError,
    check_model_options,
    locate_checkpoint,
    resolve_device,
    run_cli,
    save_torch_atomic,
    seed_everything,
    write_json,
)
from detr_irpe.cli.loaders import build_train_loader, build_val_loader, set_epoch
from detr_irpe.config import complete_args, get_args_parser
from detr_irpe.engine import evaluate, make_grad_scaler, train_one_epoch
from detr_irpe.evaluation import evaluation_report
from detr_irpe.optim import build_optimizer
from detr_irpe.utils.distributed import init_distributed_mode, is_main_process
from detr_irpe.utils.logging import JsonLinesLog, MetricLogger, TensorBoardLog, setup_logging

__all__ = ["build_parser", "checkpoint_paths", "main", "train"]

PROG = "detr-irpe-train"

logger = logging.getLogger(__name__)

# Numbered checkpoints are also kept every this many epochs (besides multiples of --lr_drop).
KEEP_EVERY = 100
# eval/{epoch:03}.pth is kept every this many epochs.
EVAL_KEEP_EVERY = 50


def build_parser() -> argparse.ArgumentParser:
    parser = get_args_parser()
    parser.prog = PROG
    parser.description = "Train (or with --eval, evaluate) DETR with iRPE on a COCO-style dataset."
    return parser


def checkpoint_paths(output_dir: Path, epoch: int, lr_drop: int) -> list[Path]:
    """Files the checkpoint of ``epoch`` (0-based, just finished) is written to."""
    paths = [output_dir / "checkpoint.pth"]
    if (epoch + 1) % lr_drop == 0 or (epoch + 1) % KEEP_EVERY == 0:
        paths.append(output_dir / f"checkpoint{epoch:04}.pth")
    return paths


def _annotation_file(coco_path: str, split: str) -> Path:
    from detr_irpe.data.coco import SPLITS

    return Path(coco_path) / SPLITS[split][1]


def _check_args(args: argparse.Namespace) -> None:
    if not args.coco_path:
        raise CLIError("--coco_path is required: the folder holding annotations/ and the images")
    if not Path(args.coco_path).is_dir():
        raise CLIError(f"--coco_path '{args.coco_path}' is not a directory")
    for name in ("batch_size", "epochs", "lr_drop", "eval_every"):
        if getattr(args, name) < 1:
            raise CLIError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.num_workers < 0:
        raise CLIError(f"--num_workers must be >= 0, got {args.num_workers}")
    if args.tensorboard and not args.output_dir:
        raise CLIError("--tensorboard needs --output_dir (the event files are written there)")


def _num_classes(args: argparse.Namespace, state: dict[str, Any] | None) -> int:
    """``--num_classes``, else what a resumed checkpoint's classifier implies, else the largest
    category id + 1 of the training annotations (the validation ones for ``--eval``)."""
    from detr_irpe.data.coco import num_classes_from_annotations

    if args.num_classes is not None:
        return int(args.num_classes)
    if state is not None:
        weight = state.get("model", {}).get("class_embed.weight")
        if isinstance(weight, torch.Tensor):
            return int(weight.shape[0]) - 1
    split = "train"
    if args.eval and not _annotation_file(args.coco_path, "train").is_file():
        split = "val"
    num_classes = num_classes_from_annotations(_annotation_file(args.coco_path, split))
    logger.info(
        "num_classes = %d (largest category id + 1 of the %s annotations)", num_classes, split
    )
    return num_classes


def _args_for_checkpoint(args: argparse.Namespace) -> dict[str, Any]:
    """``args`` as a plain dict (checkpoints then load with ``weights_only=True``)."""
    plain: dict[str, Any] = {}
    for key, value in vars(args).items():
        if isinstance(value, (Path, torch.device)):
            value = str(value)
        plain[key] = value
    return plain


def _restore_training_state(
    state: dict[str, Any],
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    args: argparse.Namespace,
) -> int:
    """Load optimizer, scheduler and scaler states; return the first epoch to train."""
    try:
        optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError) as err:
        raise CLIError(
            f"the optimizer state of --resume {args.resume} does not fit this model's parameter "
            f"groups ({err}); were --lr_backbone or the model options changed?"
        ) from None
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    step_size = getattr(lr_scheduler, "step_size", args.lr_drop)
    if step_size != args.lr_drop:
        logger.warning(
            "the resumed schedule drops the lr every %d epochs (from the checkpoint), not every "
            "--lr_drop %d epochs",
            step_size,
            args.lr_drop,
        )
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    return int(state["epoch"]) + 1


def _load_for_finetuning(path: Path, model: nn.Module) -> None:
    """Model weights of ``path`` as a starting point: everything that fits is loaded; a class
    head for another number of classes and missing tensors (iRPE tables when starting from
    upstream DETR) keep their initialisation."""
    from detr_irpe.checkpoint import load_checkpoint, read_checkpoint

    state = read_checkpoint(path)
    ours = model.state_dict().get("class_embed.weight")
    theirs = (state.get("model") or state).get("class_embed.weight")
    drop_head = isinstance(theirs, torch.Tensor) and ours is not None and theirs.shape != ours.shape
    loaded = load_checkpoint(state, model, strict=False, drop_class_head=drop_head)
    logger.info(
        "fine-tuning from %s: %d tensor(s) left at initialisation%s",
        path,
        len(loaded.missing_keys) + len(loaded.skipped_keys),
        " (class head re-initialised for the new classes)" if drop_head else "",
    )


def _class_names(dataset: Any) -> dict[int, str]:
    from detr_irpe.data.coco import category_names

    try:
        return category_names(dataset)
    except (TypeError, AttributeError):  # a dataset without COCO categories
        return {}


def train(args: argparse.Namespace) -> None:
    """Run the programme for parsed options ``args`` (see the module docstring)."""
    from detr_irpe import __version__
    from detr_irpe.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
    from detr_irpe.data.coco import build_dataset, get_coco_api
    from detr_irpe.models import build_model

    args = complete_args(args)
    resolve_device(args)
    check_model_options(args)
    _check_args(args)
    resume_path = locate_checkpoint(args.resume, "--resume") if args.resume else None
    finetune_path = None
    if args.finetune and not args.resume:
        finetune_path = locate_checkpoint(args.finetune, "--finetune")

    init_distributed_mode(args)
    setup_logging(args.rank)
    device = torch.device(args.device)
    logger.info("detr-irpe %s", __version__)
    logger.info("%s", args)
    seed_everything(args.seed + args.rank)

    state = read_checkpoint(resume_path) if resume_path is not None else None
    args.num_classes = _num_classes(args, state)

    build_args = argparse.Namespace(**vars(args))
    if (
        state is not None
        or finetune_path is not None
        or args.eval
        or (not is_main_process() and args.backbone_weights == "imagenet")
    ):
        # The checkpoint replaces the backbone weights; other ranks get rank 0's weights from
        # DDP's initial broadcast. Either way, nothing to download.
        build_args.backbone_weights = "none"
    model, criterion, postprocessors = build_model(build_args)
    model.to(device)
    model_without_ddp = model
    if args.distributed:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[args.gpu] if device.type == "cuda" else None
        )
    n_parameters = sum(p.numel() for p in model_without_ddp.parameters() if p.requires_grad)
    logger.info("number of params: %d", n_parameters)

    optimizer, lr_scheduler = build_optimizer(model_without_ddp, args)
    scaler = make_grad_scaler(args.amp, device)

    dataset_val = build_dataset("val", args)
    loader_val = build_val_loader(dataset_val, args, device)
    base_ds = get_coco_api(dataset_val)

    def evaluate_val() -> tuple[dict[str, Any], Any]:
        return evaluate(
            model,
            criterion,
            postprocessors,
            loader_val,
            base_ds,
            device,
            amp=args.amp,
            progress=args.progress,
        )

    start_epoch = args.start_epoch
    if state is not None:
        load_checkpoint(state, model_without_ddp)
        if not args.eval and all(k in state for k in ("optimizer", "lr_scheduler", "epoch")):
            start_epoch = _restore_training_state(state, optimizer, lr_scheduler, scaler, args)
            logger.info("resumed from %s: continuing at epoch %d", resume_path, start_epoch)
        else:
            logger.info("loaded the model weights of %s", resume_path)
    elif finetune_path is not None:
        _load_for_finetuning(finetune_path, model_without_ddp)
    output_dir = Path(args.output_dir) if args.output_dir else None
    if output_dir is not None and is_main_process():
        output_dir.mkdir(parents=True, exist_ok=True)

    if args.eval:
        test_stats, evaluator = evaluate_val()
        if output_dir is not None and is_main_process() and evaluator is not None:
            save_torch_atomic(evaluator.eval, output_dir / "eval.pth")
            report = evaluation_report(
                test_stats, checkpoint=str(args.resume), epoch=(state or {}).get("epoch")
            )
            write_json(output_dir / "eval_stats.json", report)
        return

    dataset_train = build_dataset("train", args)
    loader_train = build_train_loader(dataset_train, args, device)
    if len(loader_train) == 0:
        raise CLIError(
            f"the training set has {len(dataset_train)} image(s): fewer than one batch of "
            f"--batch_size {args.batch_size} per process ({args.world_size} process(es))"
        )
    class_names = _class_names(dataset_train)

    json_log = JsonLinesLog(output_dir / "log.txt") if output_dir and is_main_process() else None
    if json_log is not None and start_epoch > args.start_epoch:
        json_log.truncate_after(start_epoch - 1)  # resumed: drop what a killed run left after
    tb_log = None
    if args.tensorboard and is_main_process():
        try:
            tb_log = TensorBoardLog(output_dir / "tensorboard")  # type: ignore[operator]
        except RuntimeError as err:
            raise CLIError(str(err)) from None

    if start_epoch >= args.epochs:
        logger.warning("nothing to train: start epoch %d >= --epochs %d", start_epoch, args.epochs)
    logger.info("Start training")
    start_time = time.time()
    for epoch in range(start_epoch, args.epochs):
        epoch_start = time.time()
        set_epoch(loader_train, epoch, args.seed)
        train_logger = MetricLogger()
        train_stats = train_one_epoch(
            model,
            criterion,
            loader_train,
            optimizer,
            device,
            epoch,
            args.clip_max_norm,
            amp=args.amp,
            scaler=scaler,
            progress=args.progress,
            metric_logger=train_logger,
        )
        lr_scheduler.step()
        if output_dir is not None and is_main_process():
            checkpoint = {
                "model": model_without_ddp.state_dict(),
                "optimizer": optimizer.state_dict(),
                "lr_scheduler": lr_scheduler.state_dict(),
                "epoch": epoch,
                "args": _args_for_checkpoint(args),
                "class_names": class_names,
                "detr_irpe_version": __version__,
            }
            if scaler is not None:
                checkpoint["scaler"] = scaler.state_dict()
            for path in checkpoint_paths(output_dir, epoch, args.lr_drop):
                save_checkpoint(path, checkpoint)

        test_stats: dict[str, Any] = {}
        evaluator = None
        if (epoch + 1) % args.eval_every == 0 or epoch == args.epochs - 1:
            test_stats, evaluator = evaluate_val()

        log_stats: dict[str, Any] = {
            **{f"train_{k}": v for k, v in train_stats.items()},
            **{f"test_{k}": v for k, v in test_stats.items()},
            "epoch": epoch,
            "n_parameters": n_parameters,
            "epoch_time": time.time() - epoch_start,
            "train_data_time": train_logger.data_time.global_avg,
            "train_iter_time": train_logger.iter_time.global_avg,
        }
        if json_log is not None:
            json_log.write(log_stats)
        if tb_log is not None:
            tb_log.write(log_stats, step=epoch)
        if output_dir is not None and is_main_process() and evaluator is not None:
            names = ["latest.pth"]
            if epoch % EVAL_KEEP_EVERY == 0:
                names.append(f"{epoch:03}.pth")
            for name in names:
                save_torch_atomic(evaluator.eval, output_dir / "eval" / name)

    if tb_log is not None:
        tb_log.close()
    total_time = datetime.timedelta(seconds=int(time.time() - start_time))
    logger.info("Training time %s", total_time)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``detr-irpe-train``; returns the exit status."""
    args = build_parser().parse_args(None if argv is None else list(argv))
    return run_cli(PROG, lambda: train(args))


if __name__ == "__main__":
    sys.exit(main())
