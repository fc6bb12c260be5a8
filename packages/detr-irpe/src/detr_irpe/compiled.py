"""``--compile``: the model compiled with ``torch.compile`` for training, one graph per size.

DETR's batches vary in size (multi-scale training). The model is compiled with
``dynamic=False``: every new padded batch shape compiles a graph specialised to it, once, and
later batches of that shape reuse it. Training batches are padded to multiples of
``--compile_pad`` pixels (:func:`detr_irpe.nested_tensor.collate_fn`) so that few shapes
occur; :data:`RECOMPILE_LIMIT` raises torch's limit of graphs per function (8), past which it
would silently run the rest eagerly.

Only training uses the compiled model: evaluation (other sizes, no gradients, eval mode) stays
eager, where compiling would cost more than it saves. The compiled module shares its parameters
with the model, so checkpoints, the optimizer and the moving average see the same tensors.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator

import torch
from torch import nn

from detr_irpe.nested_tensor import NestedTensor

__all__ = ["RECOMPILE_LIMIT", "CompileTimes", "compile_for_training"]

logger = logging.getLogger(__name__)

# Graphs per compiled function: the padded sizes of COCO's multi-scale training at
# --compile_pad 32 stay below it.
RECOMPILE_LIMIT = 256


def compile_for_training(model: nn.Module) -> nn.Module:
    """``model`` (bare or DDP-wrapped) compiled with static shapes; nothing is compiled until
    the first call."""
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
    return torch.compile(model, dynamic=False)


class CompileTimes:
    """Logs the first training step (forward + backward) of each batch shape, which is where
    the compilation happens: ``compiled for 800x1088 (batch 2) in 41.2 s``."""

    def __init__(self) -> None:
        self.seconds: dict[tuple[int, ...], float] = {}

    @contextlib.contextmanager
    def step(self, samples: NestedTensor) -> Iterator[None]:
        """Wrap one step on ``samples``; times and logs it when its shape is new."""
        shape = tuple(samples.tensors.shape)
        if shape in self.seconds:
            yield
            return
        start = time.perf_counter()
        yield
        self.seconds[shape] = time.perf_counter() - start
        height, width = shape[-2:]
        logger.info(
            "compiled for %dx%d (batch %d) in %.1f s", height, width, shape[0], self.seconds[shape]
        )
