"""The steps of a training run, in the order ``detr-irpe-train`` takes them.

:func:`set_up` builds a :class:`TrainingRun` (options from the checkpoint, process group,
model, optimizer, validation data) and resumes or fine-tunes it; :func:`train_epoch`,
:func:`evaluate_run` and :func:`commit_epoch` are one turn of the loop. ``cli/train.py``
strings them together as the original ``main.py`` does.

What a kill at any moment costs: the checkpoint of an epoch and its ``log.txt`` record are
committed together (the record travels inside the checkpoint, and a resumed run writes it to
``log.txt`` when a kill came between the two), so a resumed run continues from the last
committed epoch with a ``log.txt`` line for every epoch before it. Weights that are not
finite are never written: the run stops and the last good checkpoint stays.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from detr_irpe import __version__
from detr_irpe.atomic import check_writable_dir, remove_stale_temporaries, write_json
from detr_irpe.best import BestTracker
from detr_irpe.checkpoint import (
    is_resumable,
    load_checkpoint,
    load_for_finetuning,
    locate_checkpoint,
    num_classes_of,
    options_from_checkpoint,
    read_checkpoint,
    restore_training_state,
    save_checkpoint,
    save_torch,
)
from detr_irpe.cli.loaders import build_train_loader, build_val_loader, set_epoch
from detr_irpe.compiled import CompileTimes, compile_for_training
from detr_irpe.config import prepare_options
from detr_irpe.data.coco import build_dataset, category_names, get_coco_api
from detr_irpe.ema import ModelEma
from detr_irpe.engine import NonFiniteLossError, evaluate, make_grad_scaler, train_one_epoch
from detr_irpe.evaluation import evaluation_report
from detr_irpe.evaluation.per_class import PER_CLASS_CHART, per_class_ap, report_per_class
from detr_irpe.memory_format import backbone_memory_format, use_backbone_memory_format
from detr_irpe.models import build_model
from detr_irpe.optim import build_optimizer
from detr_irpe.utils.distributed import init_distributed_mode, is_main_process
from detr_irpe.utils.logging import JsonLinesLog, MetricLogger, TensorBoardLog, setup_logging
from detr_irpe.utils.trackers import Tracker, open_trackers

__all__ = [
    "RunLogs",
    "TrainingRun",
    "build_train_data",
    "checkpoint_paths",
    "commit_epoch",
    "eval_model",
    "evaluate_run",
    "open_logs",
    "prepare_run_options",
    "save_evaluation",
    "set_up",
    "track_best",
    "train_epoch",
    "with_test_stats",
]

logger = logging.getLogger(__name__)

# The original keeps a numbered checkpoint every 100 epochs besides multiples of --lr_drop,
# and eval/{epoch:03}.pth every 50 epochs.
KEEP_EVERY = 100
EVAL_KEEP_EVERY = 50


@dataclass
class StartCheckpoint:
    """The checkpoint a run starts from: ``--resume`` (``resume=True``) or ``--finetune``."""

    path: Path
    state: dict[str, Any]
    resume: bool


@dataclass
class TrainingRun:
    """Everything one run holds; built by :func:`set_up`."""

    args: argparse.Namespace
    device: torch.device
    model: nn.Module  # DDP-wrapped under torch.distributed
    model_without_ddp: nn.Module
    criterion: nn.Module
    postprocessors: dict[str, nn.Module]
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    scaler: Any
    loader_val: Any
    base_ds: Any
    output_dir: Path | None  # None: nothing is written (also on ranks other than 0)
    start: StartCheckpoint | None
    start_epoch: int
    n_parameters: int
    ema: ModelEma | None = None  # --ema
    compiled: nn.Module | None = None  # --compile: what the training steps call
    compile_times: CompileTimes | None = None  # --compile: logs each size's first step
    best: BestTracker = field(default_factory=BestTracker)  # --save_best, --early_stop


def eval_model(run: TrainingRun) -> nn.Module:
    """The model evaluations use: the moving average with ``--ema``, else the trained one."""
    return run.ema.module if run.ema is not None else run.model


def checkpoint_paths(output_dir: Path, epoch: int, lr_drop: int) -> list[Path]:
    """Files the checkpoint of ``epoch`` (0-based, just finished) is written to."""
    paths = [output_dir / "checkpoint.pth"]
    if (epoch + 1) % lr_drop == 0 or (epoch + 1) % KEEP_EVERY == 0:
        paths.append(output_dir / f"checkpoint{epoch:04}.pth")
    return paths


# ------------------------------------------------------------------------------------------
# set up


def _read_start(args: argparse.Namespace) -> StartCheckpoint | None:
    if args.resume:
        path = locate_checkpoint(args.resume, "--resume")
        return StartCheckpoint(path, read_checkpoint(path), resume=True)
    if args.finetune:
        path = locate_checkpoint(args.finetune, "--finetune")
        return StartCheckpoint(path, read_checkpoint(path), resume=False)
    return None


def prepare_run_options(
    args: argparse.Namespace, given: Iterable[str] = ()
) -> tuple[argparse.Namespace, StartCheckpoint | None]:
    """The run's options, checked once: the model options of ``--resume``/``--finetune``'s
    checkpoint (a contradicting flag in ``given`` is refused), then every option checked.
    ``--data`` (YOLO) is converted to the COCO layout first and becomes ``coco_path``."""
    if getattr(args, "data", None):
        from detr_irpe.data.yolo import yolo_as_coco

        args = yolo_as_coco(args)
    args = prepare_options(args)
    start = _read_start(args)
    if start is not None:
        args = options_from_checkpoint(
            args, start.state, given, keep_architecture=True, source=str(start.path)
        )
        if not start.resume and "num_classes" not in set(given):
            args.num_classes = None  # fine-tuning: the classes of the new data
        args = prepare_options(args)
    if args.output_dir:
        check_writable_dir(args.output_dir)
    return args, start


def _num_classes(args: argparse.Namespace, start: StartCheckpoint | None) -> int:
    """``--num_classes``, else what a resumed checkpoint's classifier implies, else the largest
    category id + 1 of the training annotations (the validation ones for ``--eval``)."""
    from detr_irpe.data.coco import num_classes_from_annotations, split_paths

    if args.num_classes is not None:
        return int(args.num_classes)
    if start is not None and start.resume and num_classes_of(start.state) is not None:
        return int(num_classes_of(start.state))  # type: ignore[arg-type]
    split = "train"
    if args.eval and not split_paths(args, "train")[1].is_file():
        split = "val"
    num_classes = num_classes_from_annotations(split_paths(args, split)[1])
    logger.info(
        "num_classes = %d (largest category id + 1 of the %s annotations)", num_classes, split
    )
    return num_classes


def _build_model(args: argparse.Namespace, start: StartCheckpoint | None) -> tuple[Any, ...]:
    build_args = argparse.Namespace(**vars(args))
    if (
        start is not None
        or args.eval
        or (not is_main_process() and args.backbone_weights == "imagenet")
    ):
        # The checkpoint replaces the backbone weights; other ranks get rank 0's weights from
        # DDP's initial broadcast. Either way, nothing to download.
        build_args.backbone_weights = "none"
    return build_model(build_args)


def _load_start(run: TrainingRun, given: Iterable[str]) -> None:
    """Load ``run.start`` into the model (and, to resume, the optimizer and schedule)."""
    start, args = run.start, run.args
    if start is None:
        return
    if not start.resume:
        load_for_finetuning(
            start.state, run.model_without_ddp, str(start.path),
            allow_new_rpe="enc_rpe2d" in set(given),
        )  # fmt: skip
        logger.info("fine-tuning from %s", start.path)
        return
    load_checkpoint(start.state, run.model_without_ddp, source=str(start.path))
    if args.ema or args.eval:
        _restore_ema(run, start)
    if args.eval or not is_resumable(start.state):
        logger.info("loaded the model weights of %s", start.path)
        return
    run.start_epoch = restore_training_state(
        start.state, run.optimizer, run.lr_scheduler, run.scaler, str(start.path)
    )
    run.best = BestTracker.from_checkpoint(start.state)
    step_size = getattr(run.lr_scheduler, "step_size", args.lr_drop)
    if step_size != args.lr_drop:
        logger.warning(
            "the resumed schedule drops the lr every %d epochs (from the checkpoint), not "
            "every --lr_drop %d epochs", step_size, args.lr_drop,
        )  # fmt: skip
    logger.info("resumed from %s: continuing at epoch %d", start.path, run.start_epoch)


def _restore_ema(run: TrainingRun, start: StartCheckpoint) -> None:
    """The resumed checkpoint's moving average into ``run.ema`` (made for ``--eval`` when the
    checkpoint has one, so that the evaluation uses it)."""
    weights = start.state.get("ema")
    if not isinstance(weights, dict):
        if run.args.ema:
            logger.warning("%s has no EMA weights: the average starts from its weights", start.path)
        return
    run.ema = ModelEma(run.model_without_ddp, run.args.ema_decay)
    load_checkpoint({"model": weights}, run.ema.module, source=f"{start.path} (ema)")
    run.ema.updates = int(start.state.get("ema_updates", 0))
    logger.info("restored the EMA weights of %s (%d updates)", start.path, run.ema.updates)


def _set_memory_format(model: nn.Module, device: torch.device, amp: str) -> None:
    """channels_last for the backbone where it pays under ``--amp``; untouched otherwise."""
    memory_format = backbone_memory_format(device, amp)
    if memory_format != torch.contiguous_format:
        use_backbone_memory_format(model, memory_format)
        logger.info("backbone in %s (--amp %s on %s)", memory_format, amp, device.type)


def set_up(args: argparse.Namespace, given: Iterable[str] = ()) -> TrainingRun:
    """Options, process group, logging, seed, model, optimizer, validation data; resumed or
    fine-tuned from the start checkpoint."""
    from detr_irpe.utils.seeding import seed_everything

    args, start = prepare_run_options(args, given)
    init_distributed_mode(args)
    setup_logging(args.rank)
    device = torch.device(args.device)
    logger.info("detr-irpe %s", __version__)
    logger.info("%s", args)
    seed_everything(args.seed + args.rank)
    args.num_classes = _num_classes(args, start)

    model, criterion, postprocessors = _build_model(args, start)
    model.to(device)
    _set_memory_format(model, device, args.amp)
    model_without_ddp = model
    if args.distributed:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[args.gpu] if device.type == "cuda" else None
        )
    optimizer, lr_scheduler = build_optimizer(model_without_ddp, args)
    dataset_val = build_dataset("val", args)
    output_dir = Path(args.output_dir) if args.output_dir and is_main_process() else None
    if output_dir is not None:
        remove_stale_temporaries(output_dir)
    loader_val = build_val_loader(dataset_val, args, device)
    run = TrainingRun(
        args, device, model, model_without_ddp, criterion, postprocessors, optimizer,
        lr_scheduler, make_grad_scaler(args.amp, device), loader_val,
        get_coco_api(dataset_val), output_dir, start, args.start_epoch,
        sum(p.numel() for p in model_without_ddp.parameters() if p.requires_grad),
    )  # fmt: skip
    logger.info("number of params: %d", run.n_parameters)
    if args.compile:
        run.compiled, run.compile_times = compile_for_training(model), CompileTimes()
    _load_start(run, given)
    if args.ema and run.ema is None:  # from the start (or fine-tuned) weights
        run.ema = ModelEma(model_without_ddp, args.ema_decay)
    return run


# ------------------------------------------------------------------------------------------
# one epoch


def _epoch_seed(seed: int, rank: int, epoch: int) -> int:
    """The seed of torch's, numpy's and Python's generators for ``epoch`` on ``rank``."""
    return seed + rank + 1_000_003 * epoch


def train_epoch(run: TrainingRun, loader: Any, epoch: int) -> dict[str, Any]:
    """Train one epoch; returns the ``log.txt`` fields of the training part.

    The epoch's randomness is a function of ``(seed, rank, epoch)`` only, so a resumed run
    trains its epochs as the uninterrupted run does: the generators (dropout's among them) are
    re-seeded with :func:`_epoch_seed`, the order is seeded with ``(seed, epoch)`` and each
    sample's augmentation with ``(seed, epoch, index)`` (:func:`set_epoch`).
    """
    from detr_irpe.utils.seeding import seed_everything

    epoch_start = time.time()
    seed_everything(_epoch_seed(run.args.seed, run.args.rank, epoch))
    set_epoch(loader, epoch, run.args.seed)
    timing = MetricLogger()
    model = run.model if run.compiled is None else run.compiled
    stats = train_one_epoch(
        model, run.criterion, loader, run.optimizer, run.device, epoch,
        run.args.clip_max_norm, amp=run.args.amp, scaler=run.scaler,
        progress=run.args.progress, metric_logger=timing,
        grad_accum_steps=run.args.grad_accum_steps,
        on_step=None if run.ema is None else lambda: run.ema.update(run.model_without_ddp),
        compile_times=run.compile_times,
    )  # fmt: skip
    run.lr_scheduler.step()
    return {
        **{f"train_{k}": v for k, v in stats.items()},
        "epoch": epoch,
        "n_parameters": run.n_parameters,
        "epoch_time": time.time() - epoch_start,
        "train_data_time": timing.data_time.global_avg,
        "train_iter_time": timing.iter_time.global_avg,
    }


def with_test_stats(record: dict[str, Any], test_stats: dict[str, Any]) -> dict[str, Any]:
    """``record`` with ``test_<k>`` fields inserted before ``epoch``, the original's order."""
    keys = list(record)
    cut = keys.index("epoch")
    return {
        **{k: record[k] for k in keys[:cut]},
        **{f"test_{k}": v for k, v in test_stats.items()},
        **{k: record[k] for k in keys[cut:]},
    }


def evaluate_run(run: TrainingRun) -> tuple[dict[str, Any], Any]:
    """Validation losses and COCO metrics of the current weights (their moving average with
    ``--ema``): ``(stats, evaluator)``. The AP of each class is logged and written to
    ``ap_per_class.json`` and ``ap_per_class.png`` in the output folder."""
    stats, evaluator = evaluate(
        eval_model(run), run.criterion, run.postprocessors, run.loader_val, run.base_ds, run.device,
        amp=run.args.amp, progress=run.args.progress,
    )  # fmt: skip
    if evaluator is not None and is_main_process():
        report_per_class(evaluator, run.output_dir)
    return stats, evaluator


def track_best(run: TrainingRun, epoch: int, test_stats: dict[str, Any]) -> bool:
    """Record an evaluation's AP in ``run.best``; whether ``--early_stop`` ends the run now."""
    ap_list = test_stats.get("coco_eval_bbox")
    if not ap_list:
        return False
    if run.best.update(float(ap_list[0]), epoch):
        logger.info("epoch %d: best validation AP so far, %.4f", epoch, ap_list[0])
    stop = 0 < run.args.early_stop <= run.best.evals_since_best
    if stop:
        logger.info(
            "early stop after epoch %d: %d evaluations without improving on AP %.4f (epoch %d)",
            epoch, run.best.evals_since_best, run.best.best_ap, run.best.best_epoch,
        )  # fmt: skip
    return stop


def _check_finite_weights(model: nn.Module, epoch: int) -> None:
    bad = [name for name, t in model.state_dict().items() if t.is_floating_point()
           and not bool(torch.isfinite(t).all())]  # fmt: skip
    if bad:
        raise NonFiniteLossError(
            epoch, -1, {}, detail=f"{len(bad)} weight tensor(s) are not finite (first: "
            f"{bad[0]}); the checkpoint was not written, the previous one is intact",
        )  # fmt: skip


def _checkpoint(run: TrainingRun, epoch: int, record: dict[str, Any]) -> dict[str, Any]:
    checkpoint = {
        "model": run.model_without_ddp.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "lr_scheduler": run.lr_scheduler.state_dict(),
        "epoch": epoch,
        "args": vars(run.args),
        "class_names": _class_names(run),
        "log_record": record,  # restored into log.txt by a resumed run if a kill lost it
        "detr_irpe_version": __version__,
        **run.best.state_dict(),
    }
    if run.scaler is not None:
        checkpoint["scaler"] = run.scaler.state_dict()
    if run.ema is not None:
        checkpoint["ema"] = run.ema.state_dict()
        checkpoint["ema_updates"] = run.ema.updates
    return checkpoint


def _class_names(run: TrainingRun) -> dict[int, str]:
    try:
        return category_names(run.base_ds)
    except (TypeError, AttributeError):  # a dataset without COCO categories
        return {}


def commit_epoch(
    run: TrainingRun, epoch: int, record: dict[str, Any], evaluator: Any, logs: RunLogs
) -> None:
    """Write the epoch's checkpoint(s), then its ``log.txt`` record, then the evaluation.

    Raises:
        NonFiniteLossError: the weights are not finite; nothing was written.
    """
    _check_finite_weights(run.model_without_ddp, epoch)
    if run.output_dir is None:
        return
    checkpoint = _checkpoint(run, epoch, record)
    paths = checkpoint_paths(run.output_dir, epoch, run.args.lr_drop)
    if run.args.save_best and run.best.best_epoch == epoch and evaluator is not None:
        paths.append(run.output_dir / "checkpoint_best.pth")
    for path in paths:
        save_checkpoint(path, checkpoint)
    logs.write(record, epoch)
    if evaluator is not None and logs.trackers:
        logs.write_evaluation(per_class_ap(evaluator), run.output_dir / PER_CLASS_CHART, epoch)
        logs.write_images("predictions", _previews(run), epoch)
    if evaluator is not None:
        names = ["latest.pth"] + ([f"{epoch:03}.pth"] if epoch % EVAL_KEEP_EVERY == 0 else [])
        for name in names:
            save_torch(evaluator.eval, run.output_dir / "eval" / name)


def _previews(run: TrainingRun) -> dict[str, Any]:
    """The detections of the evaluated weights on the first validation images, drawn."""
    from detr_irpe.data.transforms import make_transforms
    from detr_irpe.preview import draw_previews

    # The plain module, never the DDP wrapper: only rank 0 draws, and a DDP forward would wait
    # for the other ranks.
    model = run.ema.module if run.ema is not None else run.model_without_ddp
    return draw_previews(
        model, run.postprocessors["bbox"], run.loader_val.dataset,
        make_transforms("val", run.args), run.device,
    )  # fmt: skip


def save_evaluation(run: TrainingRun, stats: dict[str, Any], evaluator: Any) -> None:
    """``--eval``: ``eval.pth`` and ``eval_stats.json`` in the output folder."""
    if run.output_dir is None or evaluator is None:
        return
    save_torch(evaluator.eval, run.output_dir / "eval.pth")
    epoch = run.start.state.get("epoch") if run.start is not None else None
    report = evaluation_report(stats, checkpoint=str(run.args.resume), epoch=epoch)
    write_json(run.output_dir / "eval_stats.json", report)


# ------------------------------------------------------------------------------------------
# the records of a run


def _last_logged_epoch(path: Path) -> int | None:
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    return json.loads(lines[-1]).get("epoch") if lines else None


class RunLogs:
    """``log.txt`` and the trackers (``--tensorboard``, ``--mlflow``, ``--wandb``) of rank 0;
    nothing elsewhere."""

    def __init__(self, run: TrainingRun) -> None:
        self.json_log = None
        self.trackers: list[Tracker] = []
        if run.output_dir is None:
            return
        self.json_log = JsonLinesLog(run.output_dir / "log.txt")
        if run.start is not None and run.start.resume and run.start_epoch > 0:
            self._repair(run.start_epoch - 1, run.start.state.get("log_record"))
        if run.args.tensorboard:
            self.trackers.append(TensorBoardLog(run.output_dir / "tensorboard"))
        self.trackers += open_trackers(run.args, run.output_dir)

    def _repair(self, last_epoch: int, record: Any) -> None:
        """Make ``log.txt`` end with the resumed checkpoint's epoch: drop what a killed run
        wrote after it, add its record if the kill came before the line was written."""
        assert self.json_log is not None
        self.json_log.truncate_after(last_epoch)
        if isinstance(record, dict) and _last_logged_epoch(self.json_log.path) != last_epoch:
            self.json_log.write(record)

    def write(self, record: dict[str, Any], epoch: int) -> None:
        if self.json_log is not None:
            self.json_log.write(record)
        for tracker in self.trackers:
            tracker.write(record, step=epoch)

    def write_evaluation(self, table: dict[str, Any], chart: Path, epoch: int) -> None:
        """An evaluation's per-class AP ``table`` and its ``chart`` PNG, to the trackers."""
        if not table or not chart.is_file():  # nothing was evaluated
            return
        for tracker in self.trackers:
            tracker.log_evaluation(table, chart, step=epoch)

    def write_images(self, key: str, images: dict[str, Any], epoch: int) -> None:
        """``{caption: RGB image}`` to the trackers under ``key``."""
        for tracker in self.trackers:
            tracker.log_images(key, images, step=epoch)

    def close(self, failed: bool = False) -> None:
        """Finish every tracker; ``failed``: the run stopped on an error."""
        for tracker in self.trackers:
            tracker.close(failed=failed)


def open_logs(run: TrainingRun) -> RunLogs:
    """The run's records, repaired after a kill when resuming."""
    try:
        return RunLogs(run)
    except RuntimeError as err:  # TensorBoard missing
        from detr_irpe.cli.errors import CLIError

        raise CLIError(str(err)) from None


def build_train_data(run: TrainingRun) -> Any:
    """The training loader; refuses a set smaller than one batch per process."""
    from detr_irpe.cli.errors import CLIError

    dataset = build_dataset("train", run.args)
    loader = build_train_loader(dataset, run.args, run.device)
    if len(loader) == 0:
        raise CLIError(
            f"the training set has {len(dataset)} image(s): fewer than one batch of "
            f"--batch_size {run.args.batch_size} per process ({run.args.world_size} process(es))"
        )
    return loader
