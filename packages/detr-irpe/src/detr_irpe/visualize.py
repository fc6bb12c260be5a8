"""Pictures for people: detections drawn on images, training curves from ``log.txt``.

Everything renders off-screen (PIL drawing; matplotlib's Agg canvas without ``pyplot``), so it
works on headless machines and never changes matplotlib's global backend.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from detr_irpe.atomic import atomic_write
from detr_irpe.data.images import load_rgb, to_rgb

__all__ = ["draw_detections", "plot_training_curves", "read_training_log"]

ArrayLike = torch.Tensor | np.ndarray | Sequence[Any]

# Distinct, colour-blind-friendly colours (matplotlib's tab10), picked by label.
_PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
)


def _as_array(values: ArrayLike) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


def _class_name(label: int, class_names: Mapping[int, str] | Sequence[str] | None) -> str:
    if class_names is None:
        return str(label)
    if isinstance(class_names, Mapping):
        return class_names.get(label, str(label))
    return class_names[label] if 0 <= label < len(class_names) else str(label)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: fixed-size bitmap font
        return ImageFont.load_default()


def draw_detections(
    image: Image.Image | str | os.PathLike[str],
    boxes: ArrayLike,
    labels: ArrayLike,
    scores: ArrayLike | None = None,
    class_names: Mapping[int, str] | Sequence[str] | None = None,
    score_threshold: float = 0.5,
    path: str | os.PathLike[str] | None = None,
) -> Image.Image:
    """Draw boxes with ``"name score"`` captions on a copy of ``image``.

    Args:
        image: a PIL image or the path of an image file.
        boxes: ``(N, 4)`` absolute ``[x0, y0, x1, y1]`` pixels of ``image``.
        labels: ``(N,)`` integer class ids.
        scores: ``(N,)`` confidences; ``None`` draws every box without a score (ground truth).
        class_names: ``{id: name}`` or a sequence indexed by id; unknown ids print as numbers.
        score_threshold: boxes with ``score < score_threshold`` are not drawn.
        path: where to write the drawing as PNG (parent folders are created).

    Returns:
        The drawn RGB image.

    Raises:
        ValueError: ``boxes`` is not ``(N, 4)`` or ``labels``/``scores`` do not have N entries.
        ImageLoadError: ``image`` is a path that cannot be decoded.
    """
    if isinstance(image, (str, os.PathLike)):
        canvas = load_rgb(image)
    else:
        # Always a copy, so the caller's image stays as it was.
        canvas = to_rgb(image) if image.mode != "RGB" else image.copy()
    box_array = _as_array(boxes).astype(np.float64)
    if box_array.size == 0:
        box_array = box_array.reshape(0, 4)
    if box_array.ndim != 2 or box_array.shape[1] != 4:
        raise ValueError(f"boxes must have shape (N, 4), got {tuple(box_array.shape)}")
    label_array = _as_array(labels).reshape(-1)
    if len(label_array) != len(box_array):
        raise ValueError(f"got {len(box_array)} boxes but {len(label_array)} labels")
    score_array = None
    if scores is not None:
        score_array = _as_array(scores).reshape(-1).astype(np.float64)
        if len(score_array) != len(box_array):
            raise ValueError(f"got {len(box_array)} boxes but {len(score_array)} scores")

    draw = ImageDraw.Draw(canvas)
    shorter = min(canvas.size)
    line_width = max(1, round(shorter / 200))
    font = _font(max(10, round(shorter / 40)))
    order = range(len(box_array)) if score_array is None else np.argsort(score_array, kind="stable")
    # Lowest scores first, so the most confident boxes and captions end up on top.
    for index in order:
        if score_array is not None and score_array[index] < score_threshold:
            continue
        label = int(label_array[index])
        color = _PALETTE[label % len(_PALETTE)]
        x0, y0, x1, y1 = (float(v) for v in box_array[index])
        draw.rectangle([x0, y0, x1, y1], outline=color, width=line_width)
        caption = _class_name(label, class_names)
        if score_array is not None:
            caption += f" {score_array[index]:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), caption, font=font)
        text_w, text_h = right - left, bottom - top
        # Caption above the box, or inside it when the box touches the top edge.
        ty = y0 - text_h - 2 if y0 - text_h - 2 >= 0 else y0
        draw.rectangle([x0, ty, x0 + text_w + 4, ty + text_h + 2], fill=color)
        draw.text((x0 + 2 - left, ty + 1 - top), caption, fill=(255, 255, 255), font=font)
    if path is not None:
        with atomic_write(path) as handle:
            canvas.save(handle, format="PNG")
    return canvas


def read_training_log(log_txt_path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a JSON-lines ``log.txt`` (one JSON object per epoch).

    Raises:
        FileNotFoundError: no such file.
        ValueError: an empty or malformed line (named ``file:line``), or no record at all.
    """
    path = Path(log_txt_path)
    if not path.is_file():
        raise FileNotFoundError(f"training log not found: '{path}'")
    records: list[dict[str, Any]] = []
    # A final newline is normal; any other empty line is not.
    lines = path.read_text(encoding="utf-8").rstrip("\n").split("\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            if len(lines) == 1:
                break
            raise ValueError(f"{path}:{number}: empty line; expected one JSON object per line")
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise ValueError(
                f"{path}:{number}: expected a JSON object, got {type(record).__name__}"
            )
        records.append(record)
    if not records:
        raise ValueError(f"{path}: no records; the log is empty")
    return records


# (panel title, [(log key, legend label)]) of the loss panels.
_LOSS_PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("total loss", ("loss",)),
    ("classification loss", ("loss_ce",)),
    ("box L1 loss", ("loss_bbox",)),
    ("GIoU loss", ("loss_giou",)),
    ("class error (%)", ("class_error",)),
)
# Positions of AP, AP50, AP75 in ``test_coco_eval_bbox`` (pycocotools summary order).
_AP_CURVES = ((0, "AP"), (1, "AP50"), (2, "AP75"))


def _number(value: Any, path: Path, number: int, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{path}:{number}: '{key}' must be a number, got {value!r}")
    return float(value)


def _series(
    records: list[dict[str, Any]], key: str, path: Path
) -> tuple[list[float], list[float]] | None:
    xs, ys = [], []
    for number, record in enumerate(records, start=1):
        if key in record:
            xs.append(_epoch(record, number, path))
            ys.append(_number(record[key], path, number, key))
    return (xs, ys) if xs else None


def _epoch(record: dict[str, Any], number: int, path: Path) -> float:
    if "epoch" in record:
        return _number(record["epoch"], path, number, "epoch")
    return float(number - 1)


def plot_training_curves(
    log_txt_path: str | os.PathLike[str], out_png: str | os.PathLike[str]
) -> Path:
    """Plot losses and COCO AP per epoch from the training ``log.txt`` into a PNG.

    Reads ``train_<k>``/``test_<k>`` for ``k`` in ``loss``, ``loss_ce``, ``loss_bbox``,
    ``loss_giou``, ``class_error``, and AP/AP50/AP75 from ``test_coco_eval_bbox`` (the 12
    pycocotools summary numbers); the x axis is ``epoch`` (the line index when absent).

    Returns:
        ``out_png`` as a ``Path``.

    Raises:
        ValueError: an empty or malformed line or value (named ``file:line``), or a log with
            none of these keys.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    path = Path(log_txt_path)
    records = read_training_log(path)

    panels: list[tuple[str, list[tuple[str, str, tuple[list[float], list[float]]]]]] = []
    for title, keys in _LOSS_PANELS:
        curves = []
        for key in keys:
            for split, style in (("train", "-"), ("test", "--")):
                series = _series(records, f"{split}_{key}", path)
                if series is not None:
                    curves.append((split, style, series))
        if curves:
            panels.append((title, curves))

    ap_curves = []
    ap_points: dict[int, tuple[list[float], list[float]]] = {i: ([], []) for i, _ in _AP_CURVES}
    for number, record in enumerate(records, start=1):
        if "test_coco_eval_bbox" not in record:
            continue
        stats = record["test_coco_eval_bbox"]
        if not isinstance(stats, list) or len(stats) < len(_AP_CURVES):
            raise ValueError(
                f"{path}:{number}: 'test_coco_eval_bbox' must be a list of 12 numbers, "
                f"got {stats!r}"
            )
        for index, _ in _AP_CURVES:
            ap_points[index][0].append(_epoch(record, number, path))
            ap_points[index][1].append(_number(stats[index], path, number, "test_coco_eval_bbox"))
    for index, name in _AP_CURVES:
        if ap_points[index][0]:
            ap_curves.append((name, "-", ap_points[index]))
    if ap_curves:
        panels.append(("COCO box AP (val)", ap_curves))
    if not panels:
        raise ValueError(
            f"{path}: no plottable keys (train_loss, test_loss, test_coco_eval_bbox, ...)"
        )

    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(5 * columns, 3.6 * rows))
    FigureCanvasAgg(figure)
    # Fixed margins: a layout engine would double the drawing time for no visible gain here.
    figure.subplots_adjust(left=0.07, right=0.98, bottom=0.12, top=0.92, wspace=0.25, hspace=0.5)
    for slot, (title, curves) in enumerate(panels):
        axes = figure.add_subplot(rows, columns, slot + 1)
        for label, style, (xs, ys) in curves:
            axes.plot(xs, ys, style, marker="." if len(xs) < 30 else None, label=label)
        axes.set_title(title)
        axes.set_xlabel("epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(True, alpha=0.3)
        axes.legend()
    out = Path(out_png)
    with atomic_write(out) as handle:
        figure.savefig(handle, format="png", dpi=100)
    return out
