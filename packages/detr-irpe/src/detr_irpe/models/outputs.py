"""The detector's outputs in float32, for the losses, the matching and the post-processing.

Under ``--amp`` the model returns bfloat16/float16 tensors. The Hungarian matching, the box
losses and the score/box decoding are sensitive to rounding and cost little, so the three
consumers of the outputs (:class:`SetCriterion`, :class:`HungarianMatcher` when called on its
own, :class:`PostProcess`) take them through :func:`as_float32` at their entry. On float32
tensors it returns the same tensors (no copy), so each tensor is converted once per step.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["as_float32"]


def as_float32(value: Any) -> Any:
    """``value`` with floating tensors as float32 (dicts, lists and tuples walked)."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, Mapping):
        return {k: as_float32(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(as_float32(v) for v in value)
    return value
