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

The update is torch's default: the for-loop implementation on the CPU (the original's), the
``foreach`` one on CUDA. ``--fused_optimizer`` opts in to torch's fused AdamW, one kernel over
all parameters: on the 2-core AVX512 Xeon of docs/benchmarks.md a DETR-R50 step (41.3M
parameters) takes 31 ms instead of 90 ms (for-loop; ``foreach`` is slower there, 120-140 ms),
but its rounding differs (a few hundred ulp after 5 steps), so it is not the default. The
optimizer states are the same tensors for every implementation, so states load both ways
between the original and this package; a resumed run keeps its own implementation whatever the
checkpoint's groups say (:func:`keep_implementation`).
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
        args: needs ``lr``, ``lr_backbone``, ``weight_decay`` and ``lr_drop``; reads
            ``fused_optimizer`` when present (off otherwise).
    """
    # fused=None, not False: torch then picks its default (for-loop on the CPU, foreach on
    # CUDA), as the original's AdamW(params, lr, weight_decay) does.
    fused = True if getattr(args, "fused_optimizer", False) else None
    optimizer = torch.optim.AdamW(
        parameter_groups(model, args.lr_backbone),
        lr=args.lr,
        weight_decay=args.weight_decay,
        fused=fused,
    )
    lr_scheduler = torch.optim.lr_scheduler.StepLR(optimizer, args.lr_drop)
    return optimizer, lr_scheduler


def keep_implementation(
    optimizer: torch.optim.Optimizer, state_dict: dict[str, object]
) -> dict[str, object]:
    """``state_dict`` with each group's implementation flags (:data:`IMPLEMENTATION_KEYS`)
    replaced by ``optimizer``'s, for ``optimizer.load_state_dict``.

    ``load_state_dict`` takes every group setting from the file, so a checkpoint of a
    ``--fused_optimizer`` run would otherwise make a resumed run fused without the flag, and
    an original checkpoint would turn the flag off. The groups are copied; ``state_dict`` is
    left as it is.
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
