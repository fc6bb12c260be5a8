"""Per-class AP (``ap_per_class.json``) of ``detr_irpe.evaluation.per_class``."""

from __future__ import annotations

import collections
import contextlib
import io
import json
import shutil
from pathlib import Path

import torch
from pycocotools.coco import COCO

from detr_irpe.cli.evaluate import main as eval_main
from detr_irpe.evaluation import CocoEvaluator
from detr_irpe.evaluation.per_class import format_per_class, per_class_ap

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


def test_training_and_eval_write_ap_per_class(
    one_epoch_run: Path, synthetic_coco_root: Path, tmp_path: Path, one_thread: None
) -> None:
    counts = _gt_counts(synthetic_coco_root)
    trained = json.loads((one_epoch_run / "ap_per_class.json").read_text())
    assert {name: row["n_gt"] for name, row in trained.items()} == counts
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
