"""Training step, optimizer and evaluation pass of ``detr_irpe.engine`` / ``detr_irpe.optim``
on a tiny model and the tiny synthetic dataset of ``conftest.py``."""

from __future__ import annotations

import math
from argparse import Namespace
from collections.abc import Callable

import pytest
import torch

from detr_irpe.data.coco import build_dataset, get_coco_api
from detr_irpe.engine import NonFiniteLossError, evaluate, train_one_epoch
from detr_irpe.models import build_model
from detr_irpe.nested_tensor import collate_fn
from detr_irpe.optim import build_optimizer

AUX = [f"_{i}" for i in range(5)]


def expected_train_keys(num_aux: int) -> set[str]:
    """Keys of the original engine's training statistics."""
    suffixes = ["", *[f"_{i}" for i in range(num_aux)]]
    weighted = {f"{k}{s}" for k in ("loss_ce", "loss_bbox", "loss_giou") for s in suffixes}
    raw = weighted | {f"cardinality_error{s}" for s in suffixes} | {"class_error"}
    return {"lr", "class_error", "loss"} | weighted | {f"{k}_unscaled" for k in raw}


def fixed_batch(args: Namespace, size: int = 2) -> tuple:
    """The first ``size`` validation images (deterministic transform) as one batch."""
    dataset = build_dataset("val", args)
    return collate_fn([dataset[i] for i in range(size)])


# One intra-op thread (the conftest fixture): much faster on a shared, busy machine.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def model_parts(make_args: Callable[..., Namespace]) -> tuple:
    """A tiny model with a frozen backbone (fast steps) and no dropout (repeatable losses)."""
    torch.manual_seed(0)
    args = make_args("--dropout", "0", "--num_classes", "5", "--lr_backbone", "0")
    model, criterion, postprocessors = build_model(args)
    return args, model, criterion, postprocessors


def test_build_optimizer_groups_are_the_originals(make_args: Callable[..., Namespace]) -> None:
    args = make_args("--lr_backbone", "1e-5")
    model, _, _ = build_model(args)
    optimizer, scheduler = build_optimizer(model, args)
    named = list(model.named_parameters())
    group0 = [p for n, p in named if "backbone" not in n and p.requires_grad]
    group1 = [p for n, p in named if "backbone" in n and p.requires_grad]
    assert len(optimizer.param_groups) == 2
    # Same tensors in the same (named_parameters) order: optimizer states stay interchangeable.
    assert [id(p) for p in optimizer.param_groups[0]["params"]] == [id(p) for p in group0]
    assert [id(p) for p in optimizer.param_groups[1]["params"]] == [id(p) for p in group1]
    backbone_names = [n for n, p in named if "backbone" in n and p.requires_grad]
    assert backbone_names and all(
        any(stage in n for stage in ("layer2", "layer3", "layer4")) for n in backbone_names
    )
    assert optimizer.param_groups[0]["lr"] == args.lr
    assert optimizer.param_groups[1]["lr"] == args.lr_backbone
    assert all(g["weight_decay"] == args.weight_decay for g in optimizer.param_groups)
    assert isinstance(optimizer, torch.optim.AdamW)
    for _ in range(args.lr_drop):
        optimizer.step()  # no gradients: a no-op that keeps the scheduler's order check quiet
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(args.lr * 0.1)
    assert optimizer.param_groups[1]["lr"] == pytest.approx(args.lr_backbone * 0.1)


def test_build_optimizer_with_frozen_backbone(make_args: Callable[..., Namespace]) -> None:
    args = make_args("--lr_backbone", "0")
    model, _, _ = build_model(args)
    optimizer, _ = build_optimizer(model, args)
    assert optimizer.param_groups[1]["params"] == []
    assert not any(p.requires_grad for n, p in model.named_parameters() if "backbone" in n)


def test_train_one_epoch_overfits_a_fixed_batch(model_parts: tuple) -> None:
    args, model, criterion, _ = model_parts
    args.lr = 1e-3
    optimizer, _ = build_optimizer(model, args)
    batch = fixed_batch(args)
    first = train_one_epoch(model, criterion, [batch], optimizer, "cpu", 0, max_norm=0.1)
    train_one_epoch(model, criterion, [batch] * 12, optimizer, "cpu", 1, max_norm=0.1)
    last = train_one_epoch(model, criterion, [batch], optimizer, "cpu", 2, max_norm=0.1)
    assert set(first) == expected_train_keys(num_aux=args.dec_layers - 1)
    assert first["lr"] == args.lr
    assert last["loss"] < 0.85 * first["loss"], (first["loss"], last["loss"])
    # `loss` is the weighted sum of the weighted terms, as in the original.
    weighted = sum(v for k, v in first.items() if k.startswith("loss_") and "unscaled" not in k)
    assert first["loss"] == pytest.approx(weighted, rel=1e-5)


class _NormRecorder:
    """Wraps ``optimizer.step`` to record the global gradient L2 norm it is called with."""

    def __init__(self, optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> None:
        self.norms: list[float] = []
        step = optimizer.step

        def recording_step(*a: object, **k: object) -> object:
            grads = [p.grad.flatten() for p in params if p.grad is not None]
            self.norms.append(float(torch.cat(grads).norm()))
            return step(*a, **k)

        optimizer.step = recording_step  # type: ignore[method-assign]


@pytest.mark.parametrize("max_norm", [0.0, 1e-3])
def test_gradients_are_clipped_to_max_norm(model_parts: tuple, max_norm: float) -> None:
    args, model, criterion, _ = model_parts
    optimizer, _ = build_optimizer(model, args)
    recorder = _NormRecorder(optimizer, list(model.parameters()))
    batch = fixed_batch(args)
    train_one_epoch(model, criterion, [batch, batch], optimizer, "cpu", 0, max_norm=max_norm)
    assert len(recorder.norms) == 2
    if max_norm > 0:
        assert all(n <= max_norm * (1 + 1e-4) for n in recorder.norms), recorder.norms
    else:  # unclipped gradients of a fresh model are far larger than the threshold above
        assert all(n > 1e-2 for n in recorder.norms), recorder.norms


class _BrokenCriterion(torch.nn.Module):
    """The real criterion with ``loss_bbox`` replaced by infinity."""

    def __init__(self, criterion: torch.nn.Module) -> None:
        super().__init__()
        self.inner = criterion
        self.weight_dict = criterion.weight_dict

    def forward(self, outputs: dict, targets: list) -> dict:
        losses = self.inner(outputs, targets)
        losses["loss_bbox"] = losses["loss_bbox"] * math.inf
        return losses


def test_non_finite_loss_stops_training_with_the_terms(model_parts: tuple) -> None:
    args, model, criterion, _ = model_parts
    optimizer, _ = build_optimizer(model, args)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(NonFiniteLossError) as info:
        train_one_epoch(
            model, _BrokenCriterion(criterion), [fixed_batch(args)], optimizer, "cpu", 3
        )
    message = str(info.value)
    assert "epoch 3, iteration 0" in message
    assert "loss_bbox=inf" in message and "non-finite terms: loss, loss_bbox" in message
    assert "loss_ce=" in message  # the finite terms are listed too
    assert info.value.losses["loss_bbox"] == math.inf
    # No step was taken with the broken loss.
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_non_finite_model_outputs_raise_the_same_error(model_parts: tuple) -> None:
    args, model, criterion, _ = model_parts
    optimizer, _ = build_optimizer(model, args)
    with torch.no_grad():
        model.bbox_embed.layers[-1].bias.fill_(math.nan)
    with pytest.raises(NonFiniteLossError, match="outputs contain NaN or inf"):
        train_one_epoch(model, criterion, [fixed_batch(args)], optimizer, "cpu", 0)


def test_bf16_autocast_trains_on_cpu_and_fp16_is_refused(model_parts: tuple) -> None:
    args, model, criterion, _ = model_parts
    optimizer, _ = build_optimizer(model, args)
    batch = fixed_batch(args)
    stats = train_one_epoch(model, criterion, [batch], optimizer, "cpu", 0, amp="bf16")
    assert math.isfinite(stats["loss"])
    # The model's parameters stay float32 (autocast only changes the compute dtype).
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        train_one_epoch(model, criterion, [batch], optimizer, "cpu", 0, amp="fp16")


def test_evaluate_returns_test_losses_and_coco_stats(model_parts: tuple) -> None:
    args, model, criterion, postprocessors = model_parts
    dataset = build_dataset("val", args)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=collate_fn)
    stats, evaluator = evaluate(
        model, criterion, postprocessors, loader, get_coco_api(dataset), "cpu"
    )
    expected = expected_train_keys(num_aux=args.dec_layers - 1) - {"lr"}
    assert set(stats) == expected | {"coco_eval_bbox"}
    assert len(stats["coco_eval_bbox"]) == 12
    assert all(-1.0 <= v <= 1.0 for v in stats["coco_eval_bbox"])
    assert evaluator is not None and evaluator.img_ids == sorted(get_coco_api(dataset).imgs)
    assert evaluator.eval["precision"].ndim == 5
    # Without ground truth only the losses are computed.
    stats, evaluator = evaluate(model, criterion, postprocessors, loader, None, "cpu")
    assert evaluator is None and "coco_eval_bbox" not in stats
