"""Run-time helpers of the training programmes: process groups and metric logging.

Imported on first use, so that the programmes' ``--help`` does not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "all_gather_object": "detr_irpe.utils.distributed",
    "barrier": "detr_irpe.utils.distributed",
    "cleanup_distributed": "detr_irpe.utils.distributed",
    "get_rank": "detr_irpe.utils.distributed",
    "get_world_size": "detr_irpe.utils.distributed",
    "init_distributed_mode": "detr_irpe.utils.distributed",
    "is_dist_avail_and_initialized": "detr_irpe.utils.distributed",
    "is_main_process": "detr_irpe.utils.distributed",
    "reduce_dict": "detr_irpe.utils.distributed",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'detr_irpe.utils' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return list(__all__)
