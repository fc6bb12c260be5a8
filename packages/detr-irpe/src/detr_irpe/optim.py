"""Optimizer and learning-rate schedule of DETR.

The parameter groups and their order are those of the original ``main.py``, so optimizer
states saved by the original (or by this package) load into the optimizer built here:

* group 0: every trainable parameter whose name does not contain ``"backbone"``, in
  ``named_parameters()`` order, learning rate ``args.lr``;
* group 1: the trainable backbone parameters (ResNet ``layer2``–``layer4`` unless the
  backbone is frozen), learning rate ``args.lr_backbone``.

AdamW (betas 0.9/0.999, eps 1e-8) with ``args.weight_decay`` on every parameter, and a
``StepLR`` that divides both learning rates by 10 every ``args.lr_drop`` epochs (stepped
once per epoch).

The update runs torch's ``foreach`` implementation (a few multi-tensor kernels instead of a
dozen small ones per parameter). torch picks it by default on CUDA only; on the CPU it would
run the for-loop one, which gives bitwise the same parameters and states (tested) but takes
several times longer on DETR-R50's ~41M parameters. The states are the same tensors either
way, so optimizer states of the original load here and ours load into the original; a resumed
run keeps its own implementation whatever the checkpoint's groups say
(:func:`keep_implementation`).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

__all__ = ["IMPLEMENTATION_KEYS", "build_optimizer", "keep_implementation", "parameter_groups"]

# Per-group flags of torch optimizers that choose how the update is computed, not what it is.
IMPLEMENTATION_KEYS = ("foreach", "fused")


def _unwrap(model: nn.Module) -> nn.Module:
    # Group on the bare model's names so a DDP wrapper ("module." prefix) changes nothing.
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def parameter_groups(model: nn.Module, lr_backbone: float) -> list[dict[str, object]]:
    """The two AdamW parameter groups of the original (see the module docstring)."""
    named = list(_unwrap(model).named_parameters())
    return [
        {"params": [p for n, p in named if "backbone" not in n and p.requires_grad]},
        {
            "params": [p for n, p in named if "backbone" in n and p.requires_grad],
            "lr": lr_backbone,
        },
    ]


def build_optimizer(
    model: nn.Module, args: argparse.Namespace
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.StepLR]:
    """``(optimizer, lr_scheduler)`` exactly as the original ``main.py`` builds them.

    Args:
        model: the detector (optionally wrapped in ``DistributedDataParallel``).
        args: needs ``lr``, ``lr_backbone``, ``weight_decay`` and ``lr_drop``.
    """
    optimizer = torch.optim.AdamW(
        parameter_groups(model, args.lr_backbone),
        lr=args.lr,
        weight_decay=args.weight_decay,
        foreach=True,  # same numbers as the for-loop torch uses on the CPU, much faster
    )
    lr_scheduler = torch.optim.lr_scheduler.StepLR(optimizer, args.lr_drop)
    return optimizer, lr_scheduler


def keep_implementation(
    optimizer: torch.optim.Optimizer, state_dict: dict[str, object]
) -> dict[str, object]:
    """``state_dict`` with each group's implementation flags (:data:`IMPLEMENTATION_KEYS`)
    replaced by ``optimizer``'s, for ``optimizer.load_state_dict``.

    ``load_state_dict`` takes every group setting from the file, so an original checkpoint
    (``foreach=None``: the for-loop on the CPU) would otherwise switch the resumed run back to
    the slow update. The groups are copied; ``state_dict`` is left as it is.
    """
    groups = state_dict.get("param_groups")
    if not isinstance(groups, list):
        return state_dict
    ours = optimizer.param_groups
    merged = [
        {**theirs, **{k: mine[k] for k in IMPLEMENTATION_KEYS if k in mine}}
        for theirs, mine in zip(groups, ours, strict=False)
    ]
    return {**state_dict, "param_groups": merged + groups[len(merged) :]}
