"""``CocoEvaluator`` against pycocotools run directly on the same detections."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detr_irpe.data.coco import load_coco_annotations
from detr_irpe.evaluation import coco_eval
from detr_irpe.evaluation.coco_eval import (
    COCO_STAT_NAMES,
    CocoEvaluator,
    evaluation_report,
    format_stats,
)

Predictions = dict[int, dict[str, torch.Tensor]]


@pytest.fixture(scope="module")
def coco_gt(synthetic_coco_root: Path) -> COCO:
    return load_coco_annotations(synthetic_coco_root / "annotations" / "instances_val2017.json")


def perfect_predictions(coco: COCO) -> Predictions:
    """Every ground-truth box as a detection with score 1 (boxes xyxy, as PostProcess gives)."""
    predictions = {}
    for image_id in coco.getImgIds():
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        predictions[image_id] = {
            "boxes": torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1),
            "labels": torch.tensor([a["category_id"] for a in anns]),
            "scores": torch.ones(len(anns)),
        }
    return predictions


def noisy_predictions(coco: COCO, seed: int = 0, per_image: int = 6) -> Predictions:
    """Jittered ground truth plus random boxes, random scores and some wrong labels."""
    rng = np.random.default_rng(seed)
    predictions = {}
    for image_id, perfect in perfect_predictions(coco).items():
        info = coco.imgs[image_id]
        size = np.array([info["width"], info["height"]] * 2, dtype=np.float32)
        jittered = perfect["boxes"].numpy() + rng.normal(0, 3, perfect["boxes"].shape)
        x0y0 = rng.uniform(0, 0.6, (per_image, 2)) * size[:2]
        wh = rng.uniform(0.1, 0.4, (per_image, 2)) * size[:2]
        boxes = np.concatenate([jittered, np.concatenate([x0y0, x0y0 + wh], 1)])
        labels = np.concatenate([perfect["labels"].numpy(), rng.integers(1, 5, per_image)])
        flip = rng.random(len(labels)) < 0.2
        labels[flip] = rng.integers(1, 5, int(flip.sum()))
        predictions[image_id] = {
            "boxes": torch.from_numpy(boxes.astype(np.float32)),
            "labels": torch.from_numpy(labels),
            "scores": torch.from_numpy(rng.random(len(labels)).astype(np.float32)),
        }
    return predictions


def pycocotools_stats(coco: COCO, predictions: Predictions) -> list[float]:
    """The reference: loadRes + COCOeval on the same detections, written out by hand."""
    records: list[dict[str, Any]] = []
    for image_id, p in predictions.items():
        for box, label, score in zip(
            p["boxes"].tolist(), p["labels"].tolist(), p["scores"].tolist(), strict=True
        ):
            x0, y0, x1, y1 = box
            records.append(
                {
                    "image_id": image_id,
                    "category_id": label,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "score": score,
                }
            )
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(coco, coco.loadRes(records), iouType="bbox")
        evaluator.params.imgIds = sorted(predictions)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return [float(v) for v in evaluator.stats]


def run(coco: COCO, *batches: Predictions) -> list[float]:
    evaluator = CocoEvaluator(coco)
    for batch in batches:
        evaluator.update(batch)
    evaluator.synchronize_between_processes()
    return evaluator.summarize()


def test_perfect_detections_score_one(coco_gt: COCO) -> None:
    stats = run(coco_gt, perfect_predictions(coco_gt))
    assert stats[0] == pytest.approx(1.0)  # AP
    assert stats[1] == pytest.approx(1.0)  # AP50
    assert stats[8] == pytest.approx(1.0)  # AR100
    assert stats == pytest.approx(pycocotools_stats(coco_gt, perfect_predictions(coco_gt)))


def test_no_detections_score_zero(coco_gt: COCO) -> None:
    empty = {
        image_id: {
            "boxes": torch.zeros(0, 4),
            "labels": torch.zeros(0, dtype=torch.int64),
            "scores": torch.zeros(0),
        }
        for image_id in coco_gt.getImgIds()
    }
    stats = run(coco_gt, empty)
    assert stats[0] == 0.0 and stats[1] == 0.0 and stats[8] == 0.0
    assert len(stats) == 12


def test_noisy_detections_match_pycocotools(coco_gt: COCO) -> None:
    predictions = noisy_predictions(coco_gt)
    expected = pycocotools_stats(coco_gt, predictions)
    assert 0.0 < expected[0] < 1.0  # a non-trivial case
    assert run(coco_gt, predictions) == pytest.approx(expected, abs=1e-12)


def test_batches_and_repeated_images_do_not_change_the_result(coco_gt: COCO) -> None:
    predictions = noisy_predictions(coco_gt, seed=1)
    ids = sorted(predictions)
    first = {i: predictions[i] for i in ids[:2]}
    rest = {i: predictions[i] for i in ids[2:]}
    # DistributedSampler pads with images seen before: the repeat must be ignored.
    repeat = {ids[0]: predictions[ids[0]]}
    assert run(coco_gt, first, rest, repeat) == pytest.approx(run(coco_gt, predictions), abs=1e-12)


def test_ranks_are_merged_without_duplicates(
    coco_gt: COCO, monkeypatch: pytest.MonkeyPatch
) -> None:
    predictions = noisy_predictions(coco_gt, seed=2)
    ids = sorted(predictions)
    rank0 = {i: predictions[i] for i in ids[0::2]}
    rank1 = {i: predictions[i] for i in ids[1::2]} | {ids[0]: predictions[ids[0]]}  # padding
    evaluator = CocoEvaluator(coco_gt)
    evaluator.update(rank0)
    other = CocoEvaluator(coco_gt)
    other.update(rank1)
    # What all_gather_object returns with two ranks.
    monkeypatch.setattr(coco_eval, "all_gather_object", lambda obj: [obj, other._by_image])
    evaluator.synchronize_between_processes()
    assert evaluator.img_ids == ids
    assert evaluator.summarize() == pytest.approx(
        pycocotools_stats(coco_gt, predictions), abs=1e-12
    )


def test_report_and_table_name_the_twelve_metrics() -> None:
    stats = {"loss": 1.5, "coco_eval_bbox": [0.5] * 12}
    report = evaluation_report(stats, checkpoint="x.pth", epoch=3)
    assert list(report["metrics"]) == list(COCO_STAT_NAMES)
    assert report["losses"] == {"loss": 1.5} and report["epoch"] == 3
    table = format_stats(stats["coco_eval_bbox"]).splitlines()
    assert len(table) == 12 and table[1].strip().startswith("AP50")
