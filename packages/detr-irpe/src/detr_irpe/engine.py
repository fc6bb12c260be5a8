"""One training epoch and one evaluation pass, as the original ``engine.py``.

Both functions accept any iterable of ``(samples, targets)`` as made by
:func:`detr_irpe.collate_fn`, run on one process or under ``torch.distributed`` (losses
are averaged over ranks for logging, COCO detections gathered from every rank), and return
the original's statistics dictionaries, so ``log.txt`` keeps its keys.

Mixed precision (``amp``): ``"bf16"`` runs the model under ``torch.autocast`` with bfloat16
(CUDA and CPU); ``"fp16"`` uses float16 with a ``GradScaler`` and needs CUDA. The losses are
always computed in float32 (the criterion and the post-processing cast the outputs once, see
:mod:`detr_irpe.models.outputs`), because the Hungarian matching and the box losses are
sensitive to rounding and cost little.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from detr_irpe.compiled import CompileTimes
from detr_irpe.evaluation.coco_eval import CocoEvaluator, format_stats
from detr_irpe.utils.distributed import reduce_dict
from detr_irpe.utils.logging import MetricLogger, SmoothedValue

__all__ = [
    "AMP_MODES",
    "NonFiniteLossError",
    "autocast",
    "autocast_dtype",
    "evaluate",
    "evaluate_detector",
    "make_grad_scaler",
    "train_one_epoch",
]

logger = logging.getLogger(__name__)

AMP_MODES = ("off", "bf16", "fp16")

Batch = tuple[Any, Sequence[Mapping[str, Any]]]


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss (or model output); training must stop.

    Attributes:
        epoch, iteration: where it happened.
        losses: the weighted loss terms and the total (``'loss'``), averaged over ranks.
    """

    def __init__(
        self,
        epoch: int,
        iteration: int,
        losses: Mapping[str, float],
        detail: str = "",
    ) -> None:
        self.epoch = epoch
        self.iteration = iteration
        self.losses = dict(losses)
        bad = [k for k, v in self.losses.items() if not math.isfinite(v)]
        terms = ", ".join(f"{k}={v:.6g}" for k, v in self.losses.items())
        if iteration >= 0:
            message = f"non-finite loss at epoch {epoch}, iteration {iteration}"
        else:  # found when the epoch's weights are checked before they are saved
            message = f"non-finite weights at the end of epoch {epoch}"
        if detail:
            message += f": {detail}"
        if bad:
            message += f"; non-finite terms: {', '.join(bad)}"
        if terms:
            message += f"; all terms: {terms}"
        message += (
            ". Training stopped: try a lower --lr, gradient clipping (--clip_max_norm), "
            "--amp off, or check the annotations of this batch"
        )
        super().__init__(message)


def autocast_dtype(amp: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype of an ``--amp`` mode on ``device`` (None for ``"off"``).

    Raises:
        ValueError: an unknown mode, or ``"fp16"`` on a device other than CUDA.
    """
    device = torch.device(device)
    if amp == "off":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        if device.type != "cuda":
            raise ValueError(
                f"--amp fp16 needs a CUDA device (got {device}); use --amp bf16 or --amp off on CPU"
            )
        return torch.float16
    raise ValueError(f"unknown --amp mode {amp!r}; choose one of {', '.join(AMP_MODES)}")


def make_grad_scaler(amp: str, device: torch.device | str) -> torch.amp.GradScaler | None:
    """A ``GradScaler`` for ``--amp fp16`` (float16 gradients underflow without one), else None."""
    if autocast_dtype(amp, device) == torch.float16:
        return torch.amp.GradScaler("cuda")
    return None


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` for an ``--amp`` mode on ``device`` (nothing for ``"off"``)."""
    dtype = autocast_dtype(amp, device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _targets_to(targets: Sequence[Mapping[str, Any]], device: torch.device) -> list[dict[str, Any]]:
    return [
        {
            k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in t.items()
        }
        for t in targets
    ]


def _outputs_finite(outputs: Mapping[str, Any]) -> bool:
    tensors = [outputs["pred_logits"], outputs["pred_boxes"]]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _compute_losses(
    criterion: nn.Module,
    outputs: Mapping[str, Any],
    targets: list[dict[str, Any]],
    epoch: int,
    iteration: int,
) -> dict[str, torch.Tensor]:
    """``criterion(outputs, targets)``, turning the matcher's failure on NaN costs into a
    :class:`NonFiniteLossError` (scipy refuses non-finite cost matrices)."""
    try:
        return criterion(outputs, targets)
    except ValueError as err:
        if _outputs_finite(outputs):
            raise
        raise NonFiniteLossError(
            epoch, iteration, {}, detail=f"the model's outputs contain NaN or inf ({err})"
        ) from err


def _log_values(
    loss_dict: Mapping[str, torch.Tensor], weight_dict: Mapping[str, float]
) -> dict[str, float]:
    """The original's logged values: weighted terms, their sum ``loss``, every raw term as
    ``<k>_unscaled`` and ``class_error``, read back to the host in one transfer."""
    reduced = reduce_dict(dict(loss_dict))
    names = sorted(reduced)
    raw = torch.stack([reduced[k].detach().float().reshape(()) for k in names]).tolist()
    raw_by_name = dict(zip(names, raw, strict=True))
    scaled = {k: v * weight_dict[k] for k, v in raw_by_name.items() if k in weight_dict}
    values: dict[str, float] = {"loss": sum(scaled.values())}
    values.update(scaled)
    values.update({f"{k}_unscaled": v for k, v in raw_by_name.items()})
    if "class_error" in raw_by_name:
        values["class_error"] = raw_by_name["class_error"]
    return values


def _backward(loss: torch.Tensor, scaler: torch.amp.GradScaler | None) -> None:
    """Accumulate the gradients of ``loss`` (through the ``scaler`` for fp16)."""
    if scaler is None:
        loss.backward()
    else:
        scaler.scale(loss).backward()


def _step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    max_norm: float,
    scaler: torch.amp.GradScaler | None,
    on_step: Callable[[], None] | None,
) -> None:
    """Clipping of the (accumulated) global gradient norm to ``max_norm`` (when > 0), step,
    zero_grad, ``on_step()``; through the ``scaler`` for fp16, clipping the true (unscaled)
    gradients."""
    if scaler is None:
        if max_norm > 0:
            nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        optimizer.step()
    else:
        if max_norm > 0:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        scaler.step(optimizer)
        scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if on_step is not None:
        on_step()


def _sync_context(model: nn.Module, final: bool) -> contextlib.AbstractContextManager[Any]:
    """``model.no_sync()`` on the micro-steps before the last of a group (DDP), else nothing."""
    if final or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()


def _first_of_shape(
    compile_times: CompileTimes | None, samples: Any
) -> contextlib.AbstractContextManager[Any]:
    """``compile_times.step(samples)`` (times a step of a new shape), or nothing."""
    if compile_times is None:
        return contextlib.nullcontext()
    return compile_times.step(samples)


def _forward(
    model: nn.Module,
    criterion: nn.Module,
    samples: Any,
    targets: list[dict[str, Any]],
    device: torch.device,
    amp: str,
    where: tuple[int, int],
) -> tuple[torch.Tensor, dict[str, float]]:
    """``(weighted total loss, logged values)`` of one batch; ``where`` is (epoch, iteration).

    Raises:
        NonFiniteLossError: the total loss, averaged over ranks, is not finite.
    """
    weight_dict = criterion.weight_dict
    with autocast(device, amp):
        outputs = model(samples)
    loss_dict = _compute_losses(criterion, outputs, targets, *where)
    losses = sum(loss_dict[k] * weight_dict[k] for k in loss_dict if k in weight_dict)
    values = _log_values(loss_dict, weight_dict)
    if not math.isfinite(values["loss"]):
        terms = {k: v for k, v in values.items() if k == "loss" or k in weight_dict}
        raise NonFiniteLossError(*where, terms)
    return losses, values


def train_one_epoch(
    model: nn.Module,
    criterion: nn.Module,
    data_loader: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    device: torch.device | str,
    epoch: int,
    max_norm: float = 0,
    *,
    amp: str = "off",
    scaler: torch.amp.GradScaler | None = None,
    print_freq: int = 10,
    progress: bool = True,
    metric_logger: MetricLogger | None = None,
    grad_accum_steps: int = 1,
    on_step: Callable[[], None] | None = None,
    compile_times: CompileTimes | None = None,
) -> dict[str, float]:
    """Train for one pass over ``data_loader``.

    Per batch: forward, losses (weighted sum over ``criterion.weight_dict``), backward.
    Every ``grad_accum_steps`` batches (and after the last batch of the epoch): gradient
    clipping to a global L2 norm of ``max_norm`` over all parameters when ``max_norm > 0``,
    optimizer step, ``on_step()``, zero_grad.

    Args:
        model: the detector (optionally DDP-wrapped); ``model(samples)`` returns
            ``pred_logits``, ``pred_boxes`` (and ``aux_outputs``).
        criterion: ``criterion(outputs, targets) -> dict`` of losses, with ``weight_dict``.
        data_loader: iterable of ``(samples, targets)``; ``samples.to(device)`` must work.
        optimizer: its group 0 learning rate is logged as ``lr``.
        device: where the model lives.
        epoch: used in messages and the progress header.
        max_norm: gradient clipping threshold (0 disables it).
        amp: ``"off"``, ``"bf16"`` or ``"fp16"`` (see the module docstring).
        scaler: the ``GradScaler`` for ``"fp16"`` (made here when omitted; pass your own to
            keep its state across epochs and checkpoints).
        print_freq: iterations between log lines / progress-bar refreshes.
        progress: allow a progress bar (rank 0, terminal only).
        metric_logger: pass one to read the timings afterwards (``data_time``,
            ``iter_time``); a new one is used otherwise.
        grad_accum_steps: batches whose gradients are accumulated into one step, each loss
            scaled by ``1 / grad_accum_steps``: the update of a batch that many times larger.
            Under DDP the gradients are all-reduced only on the last batch of a group.
        on_step: called after every optimizer step (e.g. to update a moving average).
        compile_times: with a compiled ``model`` (``--compile``), logs the first step of each
            batch shape, which includes its compilation.

    Returns:
        Global averages over the epoch (and over ranks): ``lr``, ``class_error``, ``loss``,
        each weighted term (``loss_ce``, ``loss_bbox``, ``loss_giou`` and their ``_0``..``_4``
        versions) and every raw term as ``<k>_unscaled``.

    Raises:
        NonFiniteLossError: the total loss, averaged over ranks, is not finite (every rank
            raises, so a distributed run stops together).
    """
    device = torch.device(device)
    if amp == "fp16" and scaler is None:
        scaler = make_grad_scaler(amp, device)
    else:
        autocast_dtype(amp, device)  # validates the mode for this device
    model.train()
    criterion.train()
    metrics = metric_logger if metric_logger is not None else MetricLogger()
    metrics.add_meter("lr", SmoothedValue(window_size=1, fmt="{value:.6f}"))
    metrics.add_meter("class_error", SmoothedValue(window_size=1, fmt="{value:.2f}"))
    header = f"Epoch: [{epoch}]"
    total = len(data_loader) if hasattr(data_loader, "__len__") else None
    pending = False
    optimizer.zero_grad(set_to_none=True)

    for iteration, (samples, targets) in enumerate(
        metrics.log_every(data_loader, print_freq, header, progress=progress)
    ):
        final = (iteration + 1) % grad_accum_steps == 0 or iteration + 1 == total
        samples = samples.to(device)
        targets = _targets_to(targets, device)
        with _sync_context(model, final), _first_of_shape(compile_times, samples):
            losses, values = _forward(
                model, criterion, samples, targets, device, amp, (epoch, iteration)
            )
            _backward(losses / grad_accum_steps, scaler)
        pending = not final
        if final:
            _step(model, optimizer, max_norm, scaler, on_step)
        metrics.update(**values)
        metrics.update(lr=optimizer.param_groups[0]["lr"])

    if pending:  # an iterable without a length ended inside a group
        _step(model, optimizer, max_norm, scaler, on_step)
    metrics.synchronize_between_processes()
    logger.info("Epoch %d averaged stats: %s", epoch, metrics)
    return metrics.global_averages()


def evaluate(
    model: nn.Module,
    criterion: nn.Module,
    postprocessors: Mapping[str, nn.Module],
    data_loader: Iterable[Batch],
    base_ds: Any,
    device: torch.device | str,
    *,
    amp: str = "off",
    print_freq: int = 10,
    progress: bool = True,
    metric_logger: MetricLogger | None = None,
) -> tuple[dict[str, Any], CocoEvaluator | None]:
    """Validation losses and COCO box metrics of ``model`` over ``data_loader``:
    :func:`evaluate_detector` of the :class:`~detr_irpe.detector.Detector` made of ``model``
    and ``postprocessors['bbox']``.

    Args:
        postprocessors: ``{'bbox': PostProcess}``; ``PostProcess(outputs, orig_sizes (N, 2))``
            gives per-image ``scores``, ``labels``, ``boxes`` (absolute xyxy).
        amp: ``"off"``, ``"bf16"`` or ``"fp16"`` (see the module docstring).
        Other arguments as :func:`evaluate_detector`.
    """
    from detr_irpe.detector import Detector

    detector = Detector(model, postprocessors["bbox"], device=device, amp=amp)
    return evaluate_detector(
        detector, criterion, data_loader, base_ds,
        print_freq=print_freq, progress=progress, metric_logger=metric_logger,
    )  # fmt: skip


@torch.no_grad()
def evaluate_detector(
    detector: Any,
    criterion: nn.Module,
    data_loader: Iterable[Batch],
    base_ds: Any,
    *,
    print_freq: int = 10,
    progress: bool = True,
    metric_logger: MetricLogger | None = None,
) -> tuple[dict[str, Any], CocoEvaluator | None]:
    """Validation losses and COCO box metrics of a :class:`~detr_irpe.detector.Detector`.

    The batches are already resized and normalised (the validation transform of the data
    set); the detector runs its model on them (:meth:`~detr_irpe.detector.Detector.forward`)
    and its post-processing gives every query of every image to the COCO evaluator (no
    threshold: the COCO metrics rank all of them).

    Args:
        detector: runs on its ``device`` with its ``amp`` mode.
        criterion: ``criterion(outputs, targets) -> dict`` of losses, with ``weight_dict``.
        data_loader: iterable of ``(samples, targets)``; targets hold ``orig_size`` and
            ``image_id`` when ``base_ds`` is given.
        base_ds: the ground truth as a pycocotools ``COCO`` object; None skips the COCO
            metrics (losses only).
        print_freq, progress, metric_logger: as :func:`train_one_epoch`.

    Returns:
        ``(stats, evaluator)``: ``stats`` holds the averaged loss values (the training keys
        without ``lr``) and, with ``base_ds``, ``coco_eval_bbox`` (12 floats: AP, AP50, AP75,
        APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl). The evaluator's ``eval`` is what the
        original saves as ``eval.pth``.
    """
    detector.model.eval()
    criterion.eval()
    metrics = metric_logger if metric_logger is not None else MetricLogger()
    metrics.add_meter("class_error", SmoothedValue(window_size=1, fmt="{value:.2f}"))
    evaluator = CocoEvaluator(base_ds) if base_ds is not None else None
    weight_dict = criterion.weight_dict

    for samples, targets in metrics.log_every(data_loader, print_freq, "Test:", progress=progress):
        targets = _targets_to(targets, detector.device)
        outputs = detector.forward(samples)
        loss_dict = criterion(outputs, targets)
        metrics.update(**_log_values(loss_dict, weight_dict))

        if evaluator is not None:
            orig_sizes = torch.stack([t["orig_size"] for t in targets], dim=0)
            results = detector.postprocess(outputs, orig_sizes)
            evaluator.update(
                {int(t["image_id"].item()): r for t, r in zip(targets, results, strict=True)}
            )

    metrics.synchronize_between_processes()
    logger.info("Test averaged stats: %s", metrics)
    stats: dict[str, Any] = metrics.global_averages()
    if evaluator is not None:
        evaluator.synchronize_between_processes()
        stats["coco_eval_bbox"] = evaluator.summarize()
        logger.info(
            "COCO box evaluation (%d images):\n%s",
            len(evaluator.img_ids),
            format_stats(stats["coco_eval_bbox"]),
        )
    return stats, evaluator
