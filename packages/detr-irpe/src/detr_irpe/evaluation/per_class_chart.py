"""The bar chart of per-class AP, ``ap_per_class.png``, written beside ``ap_per_class.json``.

One horizontal bar per class (names stay readable with many classes), in the table's order; a
class without ground truth (AP -1) gets an empty bar labelled "no ground truth". Rendered on
matplotlib's Agg canvas without ``pyplot``, so it never touches the global backend and works on
headless machines.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from detr_irpe.atomic import atomic_write

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["PER_CLASS_CHART", "per_class_figure", "save_per_class_chart"]

PER_CLASS_CHART = "ap_per_class.png"

# Inches: one row per class plus room for the title and the axis.
_ROW_HEIGHT = 0.3
_MARGIN_HEIGHT = 1.2


def per_class_figure(table: Mapping[str, Mapping[str, float | int]]) -> Figure:
    """A figure with one bar per class of ``table`` (:func:`~.per_class.per_class_ap`'s
    ``{class name: {"AP", ...}}``), AP on [0, 1], the first class at the top.

    Raises:
        ValueError: ``table`` is empty.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not table:
        raise ValueError("per-class AP chart: the table has no classes")
    names = list(table)
    ap = [float(row["AP"]) for row in table.values()]
    figure = Figure(figsize=(7.0, _MARGIN_HEIGHT + _ROW_HEIGHT * len(names)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    bars = axes.barh(range(len(names)), [max(v, 0.0) for v in ap], color="tab:blue")
    labels = ["no ground truth" if v < 0 else f"{v:.3f}" for v in ap]
    axes.bar_label(bars, labels=labels, padding=3, fontsize=8)
    axes.set_yticks(range(len(names)), labels=names)
    axes.invert_yaxis()  # the table's first class on top
    axes.set_xlim(0.0, 1.1)  # room for the value labels right of a bar of AP 1
    axes.set_xlabel("AP @[IoU=0.50:0.95]")
    axes.set_title("box AP per class")
    axes.grid(True, axis="x", alpha=0.3)
    return figure


def save_per_class_chart(
    table: Mapping[str, Mapping[str, float | int]], path: str | os.PathLike[str]
) -> Path:
    """Write :func:`per_class_figure` of ``table`` as a PNG to ``path`` atomically."""
    out = Path(path)
    with atomic_write(out) as handle:
        per_class_figure(table).savefig(handle, format="png", dpi=100)
    return out
