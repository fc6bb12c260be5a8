"""Per-class AP (``ap_per_class.json`` and its chart ``ap_per_class.png``) of
``detr_irpe.evaluation.per_class`` and ``per_class_chart``."""

from __future__ import annotations

import collections
import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from detr_irpe.cli.evaluate import main as eval_main
from detr_irpe.evaluation import CocoEvaluator
from detr_irpe.evaluation.per_class import format_per_class, per_class_ap
from detr_irpe.evaluation.per_class_chart import per_class_figure, save_per_class_chart

VAL = "annotations/instances_val2017.json"


def _gt_counts(root: Path) -> dict[str, int]:
    data = json.loads((root / VAL).read_text())
    names = {c["id"]: c["name"] for c in data["categories"]}
    counts = collections.Counter(names[a["category_id"]] for a in data["annotations"])
    return {name: counts.get(name, 0) for name in names.values()}


def test_perfect_detections_and_a_class_without_ground_truth(synthetic_coco_root: Path) -> None:
    data = json.loads((synthetic_coco_root / VAL).read_text())
    data["categories"].append({"id": 9, "name": "unicorn"})
    gt = COCO()
    gt.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    evaluator = CocoEvaluator(gt)
    for image in data["images"]:
        anns = [a for a in data["annotations"] if a["image_id"] == image["id"]]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        evaluator.update({image["id"]: {
            "boxes": boxes, "scores": torch.ones(len(anns)),
            "labels": torch.tensor([a["category_id"] for a in anns]),
        }})  # fmt: skip
    evaluator.summarize()
    table = per_class_ap(evaluator)
    counts = _gt_counts(synthetic_coco_root)
    assert table["unicorn"] == {"AP": -1.0, "AP50": -1.0, "AP75": -1.0, "n_gt": 0}
    for name, n in counts.items():
        assert table[name]["n_gt"] == n
        expected = 1.0 if n else -1.0
        assert all(abs(table[name][k] - expected) < 1e-9 for k in ("AP", "AP50", "AP75"))
    assert "unicorn" in format_per_class(table)


def test_the_chart_has_one_bar_per_class_in_the_table_order(tmp_path: Path) -> None:
    table = {
        "circle": {"AP": 0.75, "AP50": 0.9, "AP75": 0.8, "n_gt": 3},
        "square": {"AP": 0.25, "AP50": 0.5, "AP75": 0.1, "n_gt": 2},
        "unicorn": {"AP": -1.0, "AP50": -1.0, "AP75": -1.0, "n_gt": 0},
    }
    axes = per_class_figure(table).axes[0]
    assert [bar.get_width() for bar in axes.patches] == [0.75, 0.25, 0.0]
    assert [label.get_text() for label in axes.get_yticklabels()] == list(table)
    assert axes.yaxis_inverted()  # the first class on top
    assert "no ground truth" in [text.get_text() for text in axes.texts]
    path = save_per_class_chart(table, tmp_path / "chart.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 0 and image.height > 0
    assert [p.name for p in tmp_path.iterdir()] == ["chart.png"]  # no temporary left
    with pytest.raises(ValueError, match="no classes"):
        per_class_figure({})


def _assert_chart(path: Path, num_classes: int) -> None:
    with Image.open(path) as image:
        image.verify()
        assert image.format == "PNG"
        assert image.height >= 30 * num_classes  # a row of at least 0.3 inch at 100 dpi


def test_training_and_eval_write_ap_per_class(
    one_epoch_run: Path, synthetic_coco_root: Path, tmp_path: Path, one_thread: None
) -> None:
    counts = _gt_counts(synthetic_coco_root)
    trained = json.loads((one_epoch_run / "ap_per_class.json").read_text())
    assert {name: row["n_gt"] for name, row in trained.items()} == counts
    _assert_chart(one_epoch_run / "ap_per_class.png", len(counts))
    checkpoint = tmp_path / "checkpoint.pth"
    shutil.copy(one_epoch_run / "checkpoint.pth", checkpoint)
    out = tmp_path / "eval"
    argv = [str(checkpoint), "--coco_path", str(synthetic_coco_root), "--output_dir", str(out)]
    assert eval_main([*argv, "--device", "cpu", "--num_workers", "0", "--no_progress"]) == 0
    table = json.loads((out / "ap_per_class.json").read_text())
    assert {name: row["n_gt"] for name, row in table.items()} == counts
    for row in table.values():
        for key in ("AP", "AP50", "AP75"):
            assert row[key] == -1 or 0 <= row[key] <= 1
    assert table == trained  # the same weights on the same images
    _assert_chart(out / "ap_per_class.png", len(counts))
