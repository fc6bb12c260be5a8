"""The per-epoch records of a training run: the JSON-lines ``log.txt`` and TensorBoard.

* :class:`JsonLinesLog` appends one JSON object per epoch to ``log.txt`` with the original
  DETR's keys (``train_<k>``, ``test_<k>``, ``test_coco_eval_bbox``, ``epoch``,
  ``n_parameters``), so existing plotting scripts keep working.
* :class:`TensorBoardLog` writes the same scalars when ``tensorboard`` is installed, and
  after each evaluation the per-class AP and its chart; it is one of the
  :class:`~detr_irpe.utils.trackers.Tracker` classes.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from detr_irpe.atomic import write_text
from detr_irpe.utils.trackers import Tracker

__all__ = ["JsonLinesLog", "TensorBoardLog", "to_jsonable"]


def to_jsonable(value: Any) -> Any:
    """Plain-Python copy of ``value`` (tensors and numpy values become numbers and lists)."""
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return value


class JsonLinesLog:
    """Append-only JSON-lines file, the original's ``log.txt`` format.

    Each :meth:`write` appends one line and flushes it to disk, so a killed run loses at most
    the line being written. Non-finite floats are written as ``NaN``/``Infinity`` like
    ``json.dumps`` does by default (the original's readers use pandas, which accepts them).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def truncate_after(self, epoch: int) -> None:
        """Keep only the complete lines of epochs ``<= epoch``.

        Called when a run resumes from the checkpoint of ``epoch``: a run killed after that
        checkpoint may have left a half-written last line, which the resumed run's lines
        must not be appended to. Rewritten atomically (temporary file, then rename).
        """
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # the half-written line of a killed run
            if isinstance(record, dict) and record.get("epoch", -1) <= epoch:
                kept.append(line + "\n")
        write_text(self.path, "".join(kept))

    def write(self, record: Mapping[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(to_jsonable(record))
        with self.path.open("a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())


class TensorBoardLog(Tracker):
    """Scalars of every epoch for TensorBoard (``torch.utils.tensorboard.SummaryWriter``).

    Raises:
        RuntimeError: ``tensorboard`` is not installed (``pip install detr-irpe[tensorboard]``).
    """

    def __init__(self, log_dir: str | os.PathLike[str]) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise RuntimeError(
                "--tensorboard needs the 'tensorboard' package; install it with "
                "`pip install tensorboard` (or `pip install detr-irpe[tensorboard]`)"
            ) from err
        self._writer = SummaryWriter(log_dir=str(log_dir))

    def write(self, record: Mapping[str, Any], step: int) -> None:
        """Add every finite number of ``record`` as a scalar; list values (the COCO stats)
        become ``<key>/<index>``."""

        def is_finite_number(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        for key, value in record.items():
            if isinstance(value, (list, tuple)):
                for i, v in enumerate(value):
                    if is_finite_number(v):
                        self._writer.add_scalar(f"{key}/{i}", v, step)
            elif is_finite_number(value):
                self._writer.add_scalar(key, value, step)
        self._writer.flush()

    def log_evaluation(
        self, table: Mapping[str, Mapping[str, float | int]], chart: Path, step: int
    ) -> None:
        """The per-class AP as ``AP_per_class/<class>`` scalars and the chart as an image."""
        import numpy as np
        from PIL import Image

        super().log_evaluation(table, chart, step)
        with Image.open(chart) as image:
            pixels = np.asarray(image.convert("RGB"))  # (H, W, 3) uint8
        self._writer.add_image("ap_per_class", pixels, step, dataformats="HWC")
        self._writer.flush()

    def log_images(self, key: str, images: Mapping[str, Any], step: int) -> None:
        """Each RGB image as ``<key>/<caption>``."""
        import numpy as np

        for caption, image in images.items():
            self._writer.add_image(f"{key}/{caption}", np.asarray(image), step, dataformats="HWC")
        self._writer.flush()

    def close(self, failed: bool = False) -> None:
        self._writer.close()
