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
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

__all__ = ["build_optimizer", "parameter_groups"]


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
        parameter_groups(model, args.lr_backbone), lr=args.lr, weight_decay=args.weight_decay
    )
    lr_scheduler = torch.optim.lr_scheduler.StepLR(optimizer, args.lr_drop)
    return optimizer, lr_scheduler
