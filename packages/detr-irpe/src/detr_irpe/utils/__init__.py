"""Run-time helpers of the training programmes: process groups and metric logging."""

from detr_irpe.utils.distributed import (
    all_gather_object,
    barrier,
    cleanup_distributed,
    get_rank,
    get_world_size,
    init_distributed_mode,
    is_dist_avail_and_initialized,
    is_main_process,
    reduce_dict,
)
from detr_irpe.utils.logging import setup_logging
from detr_irpe.utils.meters import MetricLogger, SmoothedValue
from detr_irpe.utils.run_log import JsonLinesLog, TensorBoardLog

__all__ = [
    "JsonLinesLog",
    "MetricLogger",
    "SmoothedValue",
    "TensorBoardLog",
    "all_gather_object",
    "barrier",
    "cleanup_distributed",
    "get_rank",
    "get_world_size",
    "init_distributed_mode",
    "is_dist_avail_and_initialized",
    "is_main_process",
    "reduce_dict",
    "setup_logging",
]
