"""The AdamW of ``detr_irpe.optim``: the foreach update is the original's for-loop update, bit
for bit, and optimizer states load both ways between the two."""

from __future__ import annotations

import copy
from argparse import Namespace
from collections.abc import Callable

import pytest
import torch

from detr_irpe.checkpoint import restore_training_state
from detr_irpe.data.coco import build_dataset
from detr_irpe.engine import train_one_epoch
from detr_irpe.models import build_model
from detr_irpe.nested_tensor import collate_fn
from detr_irpe.optim import build_optimizer, parameter_groups

pytestmark = pytest.mark.usefixtures("one_thread")


def original_optimizer(model: torch.nn.Module, args: Namespace) -> torch.optim.AdamW:
    """The original ``main.py``'s AdamW: torch's default, the for-loop update on the CPU."""
    return torch.optim.AdamW(
        parameter_groups(model, args.lr_backbone), lr=args.lr, weight_decay=args.weight_decay
    )


@pytest.fixture
def trained_backbone(make_args: Callable[..., Namespace]) -> tuple:
    """A tiny model with both parameter groups trained, no dropout, and one fixed batch."""
    torch.manual_seed(0)
    args = make_args("--dropout", "0", "--num_classes", "5", "--lr_backbone", "1e-4")
    model, criterion, _ = build_model(args)
    dataset = build_dataset("val", args)
    return args, model, criterion, collate_fn([dataset[0], dataset[1]])


def train_steps(model, criterion, optimizer, batch, steps: int = 3) -> None:
    train_one_epoch(model, criterion, [batch] * steps, optimizer, "cpu", 0, max_norm=0.1)


def assert_bitwise_equal(ours: torch.optim.Optimizer, theirs: torch.optim.Optimizer) -> None:
    for group_ours, group_theirs in zip(ours.param_groups, theirs.param_groups, strict=True):
        for p, q in zip(group_ours["params"], group_theirs["params"], strict=True):
            assert torch.equal(p, q)
            for key, value in ours.state[p].items():
                assert torch.equal(value, theirs.state[q][key]), key


def test_the_optimizer_uses_the_foreach_update(trained_backbone: tuple) -> None:
    args, model, _, _ = trained_backbone
    optimizer, _ = build_optimizer(model, args)
    assert all(group["foreach"] is True for group in optimizer.param_groups)
    assert all(not group["fused"] for group in optimizer.param_groups)


def test_foreach_steps_are_bitwise_the_for_loop_steps(trained_backbone: tuple) -> None:
    args, model, criterion, batch = trained_backbone
    reference = copy.deepcopy(model)
    ours, _ = build_optimizer(model, args)
    theirs = original_optimizer(reference, args)
    assert theirs.param_groups[0]["foreach"] is None  # the for-loop on the CPU
    train_steps(model, criterion, ours, batch)
    train_steps(reference, criterion, theirs, batch)
    assert_bitwise_equal(ours, theirs)


def test_states_load_both_ways_and_the_update_stays_foreach(trained_backbone: tuple) -> None:
    args, model, criterion, batch = trained_backbone
    # The original's state (foreach=None in its groups) resumed here: our update is kept.
    original = original_optimizer(model, args)
    train_steps(model, criterion, original, batch, steps=1)
    ours, ours_scheduler = build_optimizer(model, args)
    state = {
        "optimizer": original.state_dict(),
        "lr_scheduler": ours_scheduler.state_dict(),
        "epoch": 0,
    }
    restore_training_state(state, ours, ours_scheduler)
    assert all(group["foreach"] is True for group in ours.param_groups)
    # Ours resumed by the original (plain load_state_dict; deep-copied, as loading a file
    # would, since loading keeps tensors that already fit), then the same steps on both.
    model_back = copy.deepcopy(model)
    back = original_optimizer(model_back, args)
    back.load_state_dict(copy.deepcopy(ours.state_dict()))
    assert back.param_groups[0]["foreach"] is True  # theirs follows the file: same update
    train_steps(model, criterion, ours, batch, steps=2)
    train_steps(model_back, criterion, back, batch, steps=2)
    assert_bitwise_equal(ours, back)
