"""Logging set-up of the command-line programmes: one handler that writes through tqdm.

The meters and the progress loop live in :mod:`detr_irpe.utils.meters`, the run's
``log.txt`` and TensorBoard records in :mod:`detr_irpe.utils.run_log`; their names are
re-exported here so that ``from detr_irpe.utils.logging import MetricLogger`` keeps working.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from tqdm import tqdm

from detr_irpe.utils.distributed import get_rank
from detr_irpe.utils.meters import MetricLogger, SmoothedValue
from detr_irpe.utils.run_log import JsonLinesLog, TensorBoardLog, to_jsonable

__all__ = [
    "JsonLinesLog",
    "MetricLogger",
    "SmoothedValue",
    "TensorBoardLog",
    "setup_logging",
    "to_jsonable",
]

_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _TqdmHandler(logging.StreamHandler):
    """Writes records through ``tqdm.write`` so log lines do not tear an active progress bar,
    to whatever ``sys.stderr`` is at the time (a redirection after set-up is followed)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass  # always the current sys.stderr

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except Exception:  # logging must never raise into the training loop
            self.handleError(record)


def setup_logging(rank: int | None = None, level: int = logging.INFO) -> None:
    """Configure the root logger of a command-line programme.

    Rank 0 logs at ``level``; the other ranks only log warnings and errors, each line prefixed
    with the rank, so a multi-process run prints one copy of the progress messages.
    """
    rank = get_rank() if rank is None else rank
    handler = _TqdmHandler()
    prefix = "" if rank == 0 else f"[rank {rank}] "
    handler.setFormatter(logging.Formatter(prefix + _LOG_FORMAT, datefmt="%H:%M:%S"))
    root = logging.getLogger()
    for old in list(root.handlers):
        if isinstance(old, _TqdmHandler):  # ours from an earlier call; keep foreign handlers
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level if rank == 0 else logging.WARNING)
