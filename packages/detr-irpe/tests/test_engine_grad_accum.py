"""Gradient accumulation of ``detr_irpe.engine.train_one_epoch``: N accumulated micro-batches
give the update of one N times larger batch."""

from __future__ import annotations

import copy
from argparse import Namespace
from collections.abc import Callable, Iterator

import pytest
import torch

from detr_irpe.engine import train_one_epoch
from detr_irpe.models import build_model
from detr_irpe.nested_tensor import collate_fn


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _samples(n: int) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """``n`` same-size images (3, 64, 64), one box each, so every micro-batch holds as many
    boxes per image as the whole batch (DETR normalises its losses by the box count)."""
    gen = torch.Generator().manual_seed(0)
    samples = []
    for i in range(n):
        image = torch.rand(3, 64, 64, generator=gen)
        box = torch.tensor([[0.3 + 0.1 * i, 0.5, 0.2 + 0.05 * i, 0.3]])
        samples.append((image, {"labels": torch.tensor([i % 3 + 1]), "boxes": box}))
    return samples


def _trained(model: torch.nn.Module, criterion: torch.nn.Module, batches: list, steps: int):
    model = copy.deepcopy(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    calls: list[int] = []
    train_one_epoch(
        model, criterion, batches, optimizer, "cpu", 0, max_norm=0.1,
        grad_accum_steps=steps, on_step=lambda: calls.append(1), progress=False,
    )  # fmt: skip
    return model, len(calls)


@pytest.fixture
def tiny_model(make_args: Callable[..., Namespace]) -> tuple:
    torch.manual_seed(0)
    args = make_args("--dropout", "0", "--num_classes", "5", "--lr_backbone", "0")
    model, criterion, _ = build_model(args)
    return model, criterion


def test_two_accumulated_micro_batches_equal_one_double_batch(tiny_model: tuple) -> None:
    model, criterion = tiny_model
    samples = _samples(4)
    whole, whole_steps = _trained(model, criterion, [collate_fn(samples)], 1)
    halves = [collate_fn(samples[:2]), collate_fn(samples[2:])]
    accumulated, accum_steps = _trained(model, criterion, halves, 2)
    assert whole_steps == accum_steps == 1
    unaccumulated, _ = _trained(model, criterion, halves, 1)
    moved = 0.0
    for (name, a), b, c, p in zip(
        whole.state_dict().items(),
        accumulated.state_dict().values(),
        unaccumulated.state_dict().values(),
        model.state_dict().values(),
        strict=True,
    ):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=name)
        moved = max(moved, float((c - a).abs().max()), float((a - p).abs().max()))
    assert moved > 1e-4  # the weights moved, and two plain steps differ from one


def test_an_incomplete_last_group_still_steps(tiny_model: tuple) -> None:
    model, criterion = tiny_model
    batches = [collate_fn(_samples(2))] * 3
    _, steps = _trained(model, criterion, batches, 2)
    assert steps == 2
    _, steps = _trained(model, criterion, iter(batches), 2)  # no length: stepped at the end
    assert steps == 2
