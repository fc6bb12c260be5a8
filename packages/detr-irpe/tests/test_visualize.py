"""draw_detections and plot_training_curves write valid PNGs; bad logs give clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detr_irpe.cli import plot as plot_cli
from detr_irpe.visualize import draw_detections, plot_training_curves, read_training_log

GREY = (128, 128, 128)


def grey_image(width: int = 120, height: int = 90) -> Image.Image:
    return Image.new("RGB", (width, height), GREY)


def changed(a: Image.Image, b: Image.Image) -> np.ndarray:
    """(H, W) mask of pixels that differ."""
    return (np.asarray(a) != np.asarray(b)).any(axis=-1)


def test_draw_detections_writes_a_png_with_the_boxes(tmp_path):
    image = grey_image()
    out = tmp_path / "sub" / "det.png"
    drawn = draw_detections(
        image,
        boxes=torch.tensor([[60.0, 40.0, 110.0, 85.0], [5.0, 5.0, 20.0, 20.0]]),
        labels=torch.tensor([1, 2]),
        scores=torch.tensor([0.9, 0.1]),
        class_names={1: "circle", 2: "square"},
        score_threshold=0.5,
        path=out,
    )
    with Image.open(out) as written:
        assert written.format == "PNG" and written.size == image.size
        assert np.array_equal(np.asarray(written.convert("RGB")), np.asarray(drawn))
    diff = changed(image, drawn)
    # The kept box's bottom edge and right edge are drawn ...
    assert diff[85, 70:100].all() and diff[50:80, 110].all()
    # ... the box under the threshold is not, and the box's interior is untouched.
    assert not diff[6:20, 6:20].any()
    assert not diff[60:80, 80:100].any()
    assert np.asarray(image).tolist() == np.asarray(grey_image()).tolist(), "input modified"


def test_draw_detections_without_scores_draws_every_box(tmp_path):
    path = tmp_path / "image.png"
    grey_image().save(path)
    drawn = draw_detections(path, [[5, 30, 40, 60]], [7], class_names=["a"] * 3)
    assert changed(grey_image(), drawn)[60, 10:35].all()


def test_draw_detections_with_no_detections_is_the_image():
    drawn = draw_detections(grey_image(), np.zeros((0, 4)), np.zeros(0), np.zeros(0))
    assert not changed(grey_image(), drawn).any()


@pytest.mark.parametrize(
    ("boxes", "labels", "scores", "pattern"),
    [
        ([[1, 2, 3]], [1], None, r"\(N, 4\)"),
        ([[1, 2, 3, 4]], [1, 2], None, "labels"),
        ([[1, 2, 3, 4]], [1], [0.5, 0.6], "scores"),
    ],
)
def test_draw_detections_rejects_mismatched_inputs(boxes, labels, scores, pattern):
    with pytest.raises(ValueError, match=pattern):
        draw_detections(grey_image(), boxes, labels, scores)


def log_record(epoch: int) -> dict:
    record = {"epoch": epoch, "n_parameters": 1000}
    for split in ("train", "test"):
        for key in ("loss", "loss_ce", "loss_bbox", "loss_giou", "class_error"):
            record[f"{split}_{key}"] = 1.0 / (epoch + 1) + (0.1 if split == "test" else 0.0)
    record["test_coco_eval_bbox"] = [0.01 * epoch * (k + 1) for k in range(12)]
    return record


def write_log(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


def test_plot_training_curves_writes_a_png(tmp_path):
    log = write_log(tmp_path / "log.txt", [json.dumps(log_record(e)) for e in range(4)])
    out = plot_training_curves(log, tmp_path / "plots" / "curves.png")
    with Image.open(out) as png:
        assert png.format == "PNG"
        width, height = png.size
        assert width > 300 and height > 200
        assert len(np.unique(np.asarray(png.convert("L")))) > 10, "something is drawn"


def test_plot_training_curves_with_losses_only(tmp_path):
    lines = [json.dumps({"train_loss": 2.0 - e, "epoch": e}) for e in range(2)]
    out = plot_training_curves(write_log(tmp_path / "log.txt", lines), tmp_path / "c.png")
    with Image.open(out) as png:
        assert png.format == "PNG"


def test_read_training_log_returns_the_records(tmp_path):
    records = [log_record(e) for e in range(3)]
    log = write_log(tmp_path / "log.txt", [json.dumps(r) for r in records])
    assert read_training_log(log) == records


@pytest.mark.parametrize(
    ("lines", "pattern"),
    [
        ([json.dumps(log_record(0)), "{not json", json.dumps(log_record(2))], r"log\.txt:2: "),
        ([json.dumps(log_record(0)), "", json.dumps(log_record(2))], r"log\.txt:2: empty line"),
        ([json.dumps(log_record(0)), "[1, 2]"], r"log\.txt:2: expected a JSON object"),
        ([], "empty"),
        ([json.dumps({"epoch": 0, "test_coco_eval_bbox": "x"})], r"log\.txt:1: .*coco_eval"),
        ([json.dumps({"epoch": 0, "train_loss": None})], r"log\.txt:1: 'train_loss'"),
        ([json.dumps({"epoch": 0, "lr": 0.1})], "no plottable"),
    ],
)
def test_malformed_logs_name_the_line(tmp_path, lines, pattern):
    log = write_log(tmp_path / "log.txt", lines)
    with pytest.raises(ValueError, match=pattern):
        plot_training_curves(log, tmp_path / "out.png")
    assert not (tmp_path / "out.png").exists()


def test_missing_log_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothing\.txt"):
        plot_training_curves(tmp_path / "nothing.txt", tmp_path / "out.png")


def test_plot_console_script(tmp_path, capsys):
    log = write_log(tmp_path / "log.txt", [json.dumps(log_record(e)) for e in range(3)])
    assert plot_cli.main([str(log)]) == 0
    assert (tmp_path / "training_curves.png").is_file()
    losses_only = write_log(tmp_path / "l.txt", ['{"train_loss": 1.0}'])
    assert plot_cli.main([str(losses_only), "-o", str(tmp_path / "x.png")]) == 0
    assert (tmp_path / "x.png").is_file()
    bad = write_log(tmp_path / "bad.txt", ["{}", "oops"])
    assert plot_cli.main([str(bad)]) == 1
    assert "detr-irpe-plot: error:" in capsys.readouterr().err
    assert plot_cli.main([str(bad)]) == 1
    assert "bad.txt:2" in capsys.readouterr().err
