"""Smoothed metric meters and the timed, logged loop over a data loader.

* :class:`MetricLogger` keeps a :class:`SmoothedValue` per metric (window median for the
  console, global average for the epoch summary) and wraps a data loader with
  :meth:`MetricLogger.log_every`, which times data loading and whole iterations separately
  (meters ``data_time`` and ``iter_time``, seconds) so the two phases are easy to compare.
* Progress is shown with a tqdm bar (ETA, loss, lr) on rank 0 when ``progress`` is on and
  stderr is a terminal; otherwise (redirected output, CI, other ranks) a log line is written
  every ``print_freq`` iterations instead, as the original DETR does.
"""

from __future__ import annotations

import collections
import datetime
import logging
import math
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

import torch
import torch.distributed as dist
from tqdm import tqdm

from detr_irpe.utils.distributed import (
    collective_device,
    get_rank,
    is_dist_avail_and_initialized,
)

__all__ = ["MetricLogger", "SmoothedValue"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


class SmoothedValue:
    """Track a series of numbers: median/average over a window and the global average.

    ``update(value, n)`` counts ``value`` ``n`` times in the global average (for example a
    per-batch mean over ``n`` images).
    """

    def __init__(self, window_size: int = 20, fmt: str = "{median:.4f} ({global_avg:.4f})"):
        self.deque: collections.deque[float] = collections.deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt

    def update(self, value: float, n: int = 1) -> None:
        self.deque.append(float(value))
        self.count += n
        self.total += float(value) * n

    def synchronize_between_processes(self) -> None:
        """Sum ``count`` and ``total`` over ranks so :attr:`global_avg` covers every rank.

        The window stays local (it only feeds the console).
        """
        if not is_dist_avail_and_initialized():
            return
        t = torch.tensor([self.count, self.total], dtype=torch.float64, device=collective_device())
        dist.all_reduce(t)
        self.count = int(t[0].item())
        self.total = float(t[1].item())

    @property
    def median(self) -> float:
        if not self.deque:
            return math.nan
        return float(torch.tensor(list(self.deque)).median().item())

    @property
    def avg(self) -> float:
        return sum(self.deque) / len(self.deque) if self.deque else math.nan

    @property
    def global_avg(self) -> float:
        return self.total / self.count if self.count else math.nan

    @property
    def max(self) -> float:
        return max(self.deque) if self.deque else math.nan

    @property
    def value(self) -> float:
        return self.deque[-1] if self.deque else math.nan

    def __str__(self) -> str:
        return self.fmt.format(
            median=self.median,
            avg=self.avg,
            global_avg=self.global_avg,
            max=self.max,
            value=self.value,
        )


class MetricLogger:
    """A named set of :class:`SmoothedValue` meters plus a timed, logged loop over a loader.

    After :meth:`log_every` has run, :attr:`data_time` and :attr:`iter_time` hold the seconds
    spent waiting for each batch and the seconds per whole iteration (their ``global_avg`` is
    the per-iteration mean), and :attr:`elapsed` the loop's wall time.
    """

    def __init__(self, delimiter: str = "  ") -> None:
        self.meters: dict[str, SmoothedValue] = collections.defaultdict(SmoothedValue)
        self.delimiter = delimiter
        self.data_time = SmoothedValue(fmt="{avg:.4f}")
        self.iter_time = SmoothedValue(fmt="{avg:.4f}")
        self.elapsed = 0.0
        self.iterations = 0

    def update(self, **values: float | torch.Tensor) -> None:
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                value = value.item()
            self.meters[name].update(float(value))

    def add_meter(self, name: str, meter: SmoothedValue) -> None:
        self.meters[name] = meter

    def synchronize_between_processes(self) -> None:
        # Sorted so every rank issues the collectives in the same order.
        for name in sorted(self.meters):
            self.meters[name].synchronize_between_processes()

    def global_averages(self) -> dict[str, float]:
        """``{name: global average}`` of every meter (the epoch's statistics)."""
        return {name: meter.global_avg for name, meter in self.meters.items()}

    def __str__(self) -> str:
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())

    def _postfix(self) -> dict[str, str]:
        postfix = {}
        if "loss" in self.meters:
            postfix["loss"] = f"{self.meters['loss'].median:.4f}"
        if "lr" in self.meters:
            postfix["lr"] = f"{self.meters['lr'].value:.2e}"
        return postfix

    def log_every(
        self,
        iterable: Iterable[T],
        print_freq: int,
        header: str = "",
        progress: bool = True,
    ) -> Iterator[T]:
        """Yield the items of ``iterable`` while timing, logging and drawing a progress bar.

        Args:
            iterable: usually a DataLoader; ``len()`` is used for the ETA when available.
            print_freq: iterations between log lines (when no bar is shown) and bar refreshes.
            header: prefix of every line, e.g. ``"Epoch: [3]"``.
            progress: allow a tqdm bar; it is shown only on rank 0 and only when stderr is a
                terminal (tqdm's own check), so logs written to files stay line-based.
        """
        print_freq = max(1, print_freq)
        try:
            total: int | None = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
        show_bar = progress and get_rank() == 0 and sys.stderr.isatty()
        bar = tqdm(
            total=total,
            desc=header,
            disable=not show_bar,
            dynamic_ncols=True,
            leave=False,
            file=sys.stderr,
        )
        width = len(str(total)) if total else 1
        start = end = time.perf_counter()
        index = 0
        try:
            for index, item in enumerate(iterable):
                self.data_time.update(time.perf_counter() - end)
                yield item
                self.iter_time.update(time.perf_counter() - end)
                bar.update(1)
                last = total is not None and index == total - 1
                if index % print_freq == 0 or last:
                    if show_bar:
                        bar.set_postfix(self._postfix(), refresh=False)
                    else:
                        self._log_line(header, index, total, width)
                end = time.perf_counter()
            self.iterations = index + 1 if self.iter_time.count else 0
        finally:
            bar.close()
        self.elapsed = time.perf_counter() - start
        per_it = self.elapsed / max(1, self.iterations)
        logger.info(
            "%s Total time: %s (%.4f s / it; data %.4f s / it)",
            header,
            datetime.timedelta(seconds=int(self.elapsed)),
            per_it,
            self.data_time.global_avg if self.data_time.count else 0.0,
        )

    def _log_line(self, header: str, index: int, total: int | None, width: int) -> None:
        parts = [header, f"[{index:>{width}}/{total if total is not None else '?'}]"]
        if total is not None:
            eta = self.iter_time.global_avg * (total - index - 1)
            parts.append(f"eta: {datetime.timedelta(seconds=int(eta))}")
        parts.append(str(self))
        parts.append(f"time: {self.iter_time}")
        parts.append(f"data: {self.data_time}")
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            parts.append(f"max mem: {torch.cuda.max_memory_allocated() / 2**20:.0f} MB")
        logger.info(self.delimiter.join(parts))
