"""The AdamW of ``detr_irpe.optim``: the original's update by default, torch's fused update
with ``--fused_optimizer`` (equal up to rounding), and optimizer states that load both ways
between the two, a resumed run keeping its own update."""

from __future__ import annotations

import copy
from argparse import Namespace
from collections.abc import Callable

import pytest
import torch

from detr_irpe.checkpoint import restore_training_state
from detr_irpe.engine import train_one_epoch
from detr_irpe.optim import build_optimizer, parameter_groups

pytestmark = pytest.mark.usefixtures("one_thread")


def original_optimizer(model: torch.nn.Module, args: Namespace) -> torch.optim.AdamW:
    """The original ``main.py``'s AdamW: torch's default, the for-loop update on the CPU."""
    return torch.optim.AdamW(
        parameter_groups(model, args.lr_backbone), lr=args.lr, weight_decay=args.weight_decay
    )


def train_steps(model, criterion, optimizer, batch, steps: int = 3) -> None:
    train_one_epoch(model, criterion, [batch] * steps, optimizer, "cpu", 0, max_norm=0.1)


def assert_same_training(
    ours: torch.optim.Optimizer, theirs: torch.optim.Optimizer, atol: float = 0.0
) -> None:
    """Same parameters and AdamW states (bitwise with ``atol=0``)."""
    for group_ours, group_theirs in zip(ours.param_groups, theirs.param_groups, strict=True):
        for p, q in zip(group_ours["params"], group_theirs["params"], strict=True):
            torch.testing.assert_close(p, q, atol=atol, rtol=0)
            for key, value in ours.state[p].items():
                torch.testing.assert_close(value, theirs.state[q][key], atol=atol, rtol=0)


def implementations(optimizer: torch.optim.Optimizer) -> set[tuple]:
    return {(group["foreach"], group["fused"]) for group in optimizer.param_groups}


def test_default_update_is_the_originals_bit_for_bit(trained_backbone: tuple) -> None:
    args, model, criterion, batch = trained_backbone
    reference = copy.deepcopy(model)
    ours, _ = build_optimizer(model, args)
    theirs = original_optimizer(reference, args)
    assert implementations(ours) == implementations(theirs) == {(None, None)}
    train_steps(model, criterion, ours, batch)
    train_steps(reference, criterion, theirs, batch)
    assert_same_training(ours, theirs)


def test_fused_optimizer_matches_the_original_up_to_rounding(
    trained_backbone: tuple, make_args: Callable[..., Namespace]
) -> None:
    args, model, criterion, batch = trained_backbone
    reference = copy.deepcopy(model)
    args.fused_optimizer = True
    ours, _ = build_optimizer(model, args)
    assert implementations(ours) == {(None, True)}
    theirs = original_optimizer(reference, args)
    train_steps(model, criterion, ours, batch)
    train_steps(reference, criterion, theirs, batch)
    assert_same_training(ours, theirs, atol=1e-6)  # updates are ~lr = 1e-4 per step
    assert not make_args().fused_optimizer  # opt-in


@pytest.mark.parametrize("fused", [False, True])
def test_states_load_both_ways_and_each_run_keeps_its_update(
    trained_backbone: tuple, fused: bool
) -> None:
    args, model, criterion, batch = trained_backbone
    args.fused_optimizer = fused
    # The original's state resumed here: our update is kept.
    original = original_optimizer(model, args)
    train_steps(model, criterion, original, batch, steps=1)
    ours, ours_scheduler = build_optimizer(model, args)
    state = {
        "optimizer": original.state_dict(),
        "lr_scheduler": ours_scheduler.state_dict(),
        "epoch": 0,
    }
    restore_training_state(state, ours, ours_scheduler)
    assert implementations(ours) == {(None, True if fused else None)}
    assert len(ours.state) == len(original.state)
    # Ours resumed by the original (plain load_state_dict; deep-copied, as loading a file
    # would, since loading keeps tensors that already fit), then the same steps on both.
    model_back = copy.deepcopy(model)
    back = original_optimizer(model_back, args)
    back.load_state_dict(copy.deepcopy(ours.state_dict()))
    back_reference = copy.deepcopy(model)
    reference = original_optimizer(back_reference, args)
    reference.load_state_dict(copy.deepcopy(original.state_dict()))
    train_steps(model_back, criterion, back, batch, steps=2)
    train_steps(back_reference, criterion, reference, batch, steps=2)
    assert_same_training(back, reference, atol=1e-6 if fused else 0.0)
