"""Token-grid sizes as the layers receive them: Python ints, or sizes a tracer records.

Eager PyTorch gives ``int``; ``torch.export`` and ``torch.compile(dynamic=True)`` give
``torch.SymInt``; the legacy tracer (``torch.jit.trace``, ``torch.onnx.export(...,
dynamo=False)``) gives 0-d integer tensors, so that the graph keeps the size dynamic.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["is_size", "is_traced_size"]


def is_traced_size(value: Any) -> bool:
    """Whether ``value`` is a size recorded by the legacy tracer (a 0-d integer tensor)."""
    return (
        isinstance(value, torch.Tensor)
        and value.dim() == 0
        and not value.is_floating_point()
        and not value.is_complex()
        and value.dtype != torch.bool
    )


def is_size(value: Any) -> bool:
    """Whether ``value`` can be a grid side: an int (not a bool), a SymInt or a traced size."""
    if isinstance(value, bool):
        return False
    return isinstance(value, (int, torch.SymInt)) or is_traced_size(value)
