"""An exponential moving average (EMA) of a model's weights, for ``--ema``.

After each optimizer step ``t`` (0, 1, ...) every floating-point parameter ``p`` updates its
float32 average ``e`` as ``e = d_t * e + (1 - d_t) * p`` with the warmed-up decay
``d_t = min(decay, (1 + t) / (10 + t))``, so the first steps do not keep the random
initialisation. Buffers (batch-norm statistics, counters) are copied as they are.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["ModelEma", "ema_decay"]


def ema_decay(decay: float, updates: int) -> float:
    """The decay of update number ``updates`` (0-based): ``min(decay, (1 + t) / (10 + t))``."""
    return min(decay, (1 + updates) / (10 + updates))


def _unwrap(model: nn.Module) -> nn.Module:
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return model.module
    return model


class ModelEma:
    """A float32 copy of ``model`` (DDP unwrapped) whose weights follow the moving average.

    Attributes:
        module: the averaged model, in eval mode, without gradients; evaluate it directly.
        decay: the final decay ``D``.
        updates: the number of :meth:`update` calls so far (``t``).
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.module = copy.deepcopy(_unwrap(model)).float().eval()
        for param in self.module.parameters():
            param.requires_grad_(False)
        self.decay = float(decay)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One step of the average towards ``model``'s current weights."""
        d = ema_decay(self.decay, self.updates)
        params = dict(_unwrap(model).named_parameters())
        for name, ema in self.module.named_parameters():
            if ema.is_floating_point():
                ema.mul_(d).add_(params[name].detach().float(), alpha=1 - d)
        buffers = dict(_unwrap(model).named_buffers())
        for name, ema in self.module.named_buffers():
            ema.copy_(buffers[name])
        self.updates += 1

    def state_dict(self) -> dict[str, Tensor]:
        """The averaged weights: a state dict with the model's keys (float32)."""
        return self.module.state_dict()

    def load_state_dict(self, weights: Mapping[str, Any], updates: int) -> None:
        """Restore the averaged weights and the update count ``t``."""
        self.module.load_state_dict(dict(weights))
        self.updates = int(updates)
