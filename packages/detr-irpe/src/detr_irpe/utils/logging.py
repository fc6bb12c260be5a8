"""Logging set-up of the command-line programmes: one handler that writes through tqdm.

The meters and the progress loop live in :mod:`detr_irpe.utils.meters`, the run's
``log.txt`` and TensorBoard records in :mod:`detr_irpe.utils.run_log`; their names are
re-exported here so that ``from detr_irpe.utils.logging import MetricLogger`` keeps working.
"""

from __future__ import annotations

import importlib
import logging
import sys
from typing import Any

from tqdm import tqdm

_REEXPORTED = {
    "JsonLinesLog": "detr_irpe.utils.run_log",
    "MetricLogger": "detr_irpe.utils.meters",
    "SmoothedValue": "detr_irpe.utils.meters",
    "TensorBoardLog": "detr_irpe.utils.run_log",
    "to_jsonable": "detr_irpe.utils.run_log",
}


def __getattr__(name: str) -> Any:
    # The re-exported names load torch; setting up logging must not.
    module = _REEXPORTED.get(name)
    if module is None:
        raise AttributeError(f"module 'detr_irpe.utils.logging' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = ["setup_logging", *sorted(_REEXPORTED)]

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
    if rank is None:
        from detr_irpe.utils.distributed import get_rank

        rank = get_rank()
    handler = _TqdmHandler()
    prefix = "" if rank == 0 else f"[rank {rank}] "
    handler.setFormatter(logging.Formatter(prefix + _LOG_FORMAT, datefmt="%H:%M:%S"))
    root = logging.getLogger()
    for old in list(root.handlers):
        if isinstance(old, _TqdmHandler):  # ours from an earlier call; keep foreign handlers
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level if rank == 0 else logging.WARNING)
