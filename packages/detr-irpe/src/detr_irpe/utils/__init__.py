"""Run-time helpers of the training programmes: process groups and metric logging.

Imported on first use, so that the programmes' ``--help`` does not load torch.
"""

from __future__ import annotations

from detr_irpe._lazy import lazy_attributes

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


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, globals())
