"""The Hungarian matcher against brute-force assignment with a naive cost."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from detr_irpe.models.matcher import HungarianMatcher


def naive_xyxy(box: list[float]) -> list[float]:
    cx, cy, w, h = box
    return [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]


def naive_giou(a: list[float], b: list[float]) -> float:
    area_a = (a[2] - a[0]) * (a[3] - a[1])
    area_b = (b[2] - b[0]) * (b[3] - b[1])
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(
        0.0, min(a[3], b[3]) - max(a[1], b[1])
    )
    union = area_a + area_b - inter
    area_c = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / union - (area_c - union) / area_c


def naive_cost(
    logits: list[float], box: list[float], label: int, gt_box: list[float], weights: tuple
) -> float:
    """cost_bbox * L1 - cost_class * softmax(logits)[label] - cost_giou * GIoU."""
    w_class, w_bbox, w_giou = weights
    top = max(logits)
    exps = [math.exp(v - top) for v in logits]
    prob = exps[label] / sum(exps)
    l1 = sum(abs(p - g) for p, g in zip(box, gt_box, strict=True))
    return w_bbox * l1 - w_class * prob - w_giou * naive_giou(naive_xyxy(box), naive_xyxy(gt_box))


def brute_force(
    logits: torch.Tensor,
    boxes: torch.Tensor,
    labels: torch.Tensor,
    gt: torch.Tensor,
    weights: tuple,
) -> tuple[float, list[tuple[int, int]]]:
    """Minimum total cost over every injective map of targets to queries."""
    num_queries, num_targets = logits.shape[0], labels.shape[0]
    cost = [
        [
            naive_cost(
                logits[q].tolist(), boxes[q].tolist(), int(labels[t]), gt[t].tolist(), weights
            )
            for t in range(num_targets)
        ]
        for q in range(num_queries)
    ]
    if num_targets <= num_queries:
        best = min(
            itertools.permutations(range(num_queries), num_targets),
            key=lambda qs: sum(cost[q][t] for t, q in enumerate(qs)),
        )
        pairs = sorted((q, t) for t, q in enumerate(best))
    else:
        best = min(
            itertools.permutations(range(num_targets), num_queries),
            key=lambda ts: sum(cost[q][t] for q, t in enumerate(ts)),
        )
        pairs = [(q, t) for q, t in enumerate(best)]
    return sum(cost[q][t] for q, t in pairs), pairs


def random_problem(generator: torch.Generator, batch: int, queries: int, classes: int, sizes: list):
    logits = torch.randn(batch, queries, classes + 1, generator=generator, dtype=torch.float64)
    boxes = torch.cat(
        [
            0.2 + 0.6 * torch.rand(batch, queries, 2, generator=generator, dtype=torch.float64),
            0.05 + 0.3 * torch.rand(batch, queries, 2, generator=generator, dtype=torch.float64),
        ],
        dim=-1,
    )
    targets = []
    for n in sizes:
        gt = torch.cat(
            [
                0.2 + 0.6 * torch.rand(n, 2, generator=generator, dtype=torch.float64),
                0.05 + 0.3 * torch.rand(n, 2, generator=generator, dtype=torch.float64),
            ],
            dim=-1,
        )
        targets.append(
            {"labels": torch.randint(0, classes, (n,), generator=generator), "boxes": gt}
        )
    return {"pred_logits": logits, "pred_boxes": boxes}, targets


@pytest.mark.parametrize("weights", [(1.0, 5.0, 2.0), (2.0, 1.0, 0.0), (0.0, 0.0, 1.0)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force(weights: tuple, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    outputs, targets = random_problem(generator, batch=3, queries=5, classes=4, sizes=[3, 0, 5])
    matcher = HungarianMatcher(*weights)
    indices = matcher(outputs, targets)
    assert len(indices) == 3
    for b, (pred_idx, gt_idx) in enumerate(indices):
        labels, gt = targets[b]["labels"], targets[b]["boxes"]
        assert pred_idx.dtype == torch.int64 and gt_idx.dtype == torch.int64
        assert len(pred_idx) == len(gt_idx) == min(5, len(labels))
        assert torch.equal(pred_idx, pred_idx.sort().values)
        if len(labels) == 0:
            continue
        best_cost, best_pairs = brute_force(
            outputs["pred_logits"][b], outputs["pred_boxes"][b], labels, gt, weights
        )
        got_pairs = list(zip(pred_idx.tolist(), gt_idx.tolist(), strict=True))
        got_cost = sum(
            naive_cost(
                outputs["pred_logits"][b, q].tolist(),
                outputs["pred_boxes"][b, q].tolist(),
                int(labels[t]),
                gt[t].tolist(),
                weights,
            )
            for q, t in got_pairs
        )
        assert got_cost == pytest.approx(best_cost, abs=1e-5)
        assert got_pairs == best_pairs  # random costs: the optimum is unique


def test_more_targets_than_queries_matches_every_query() -> None:
    generator = torch.Generator().manual_seed(3)
    outputs, targets = random_problem(generator, batch=1, queries=3, classes=2, sizes=[5])
    pred_idx, gt_idx = HungarianMatcher(1, 5, 2)(outputs, targets)[0]
    _, best_pairs = brute_force(
        outputs["pred_logits"][0],
        outputs["pred_boxes"][0],
        targets[0]["labels"],
        targets[0]["boxes"],
        (1, 5, 2),
    )
    assert list(zip(pred_idx.tolist(), gt_idx.tolist(), strict=True)) == best_pairs


def test_no_targets_anywhere() -> None:
    generator = torch.Generator().manual_seed(4)
    outputs, targets = random_problem(generator, batch=2, queries=4, classes=3, sizes=[0, 0])
    for pred_idx, gt_idx in HungarianMatcher(1, 5, 2)(outputs, targets):
        assert pred_idx.numel() == 0 and gt_idx.numel() == 0
        assert pred_idx.dtype == torch.int64


def test_bfloat16_outputs_are_matched_in_float32() -> None:
    generator = torch.Generator().manual_seed(5)
    outputs, targets = random_problem(generator, batch=2, queries=5, classes=3, sizes=[2, 3])
    low = {k: v.to(torch.bfloat16) for k, v in outputs.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        indices = HungarianMatcher(1, 5, 2)(low, targets)
    reference = HungarianMatcher(1, 5, 2)({k: v.float() for k, v in low.items()}, targets)
    for (p, g), (rp, rg) in zip(indices, reference, strict=True):
        assert torch.equal(p, rp) and torch.equal(g, rg)


def test_degenerate_target_box_is_named() -> None:
    generator = torch.Generator().manual_seed(6)
    outputs, targets = random_problem(generator, batch=2, queries=4, classes=3, sizes=[1, 2])
    targets[1]["boxes"][1, 2] = -0.1  # negative width
    with pytest.raises(ValueError, match=r"targets\[1\]\['boxes'\]"):
        HungarianMatcher(1, 5, 2)(outputs, targets)


def test_pixel_boxes_are_rejected() -> None:
    generator = torch.Generator().manual_seed(7)
    outputs, targets = random_problem(generator, batch=1, queries=4, classes=3, sizes=[2])
    targets[0]["boxes"] = targets[0]["boxes"] * 640
    with pytest.raises(ValueError, match=r"targets\[0\]\['boxes'\] must be normalised"):
        HungarianMatcher(1, 5, 2)(outputs, targets)


def test_out_of_range_label_is_named() -> None:
    generator = torch.Generator().manual_seed(8)
    outputs, targets = random_problem(generator, batch=2, queries=4, classes=3, sizes=[1, 2])
    targets[0]["labels"][0] = 3  # == num_classes, the no-object index
    with pytest.raises(ValueError, match=r"targets\[0\]\['labels'\] .* 3 classes"):
        HungarianMatcher(1, 5, 2)(outputs, targets)


def test_nan_predictions_give_a_clear_error() -> None:
    generator = torch.Generator().manual_seed(9)
    outputs, targets = random_problem(generator, batch=1, queries=4, classes=3, sizes=[2])
    outputs["pred_boxes"][0, 1, 0] = float("nan")
    with pytest.raises(ValueError, match=r"outputs\['pred_boxes'\]"):
        HungarianMatcher(1, 5, 2)(outputs, targets)
    outputs, targets = random_problem(generator, batch=1, queries=4, classes=3, sizes=[2])
    outputs["pred_logits"][0, 1, 0] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        HungarianMatcher(1, 5, 2)(outputs, targets)


def test_shape_and_count_errors() -> None:
    generator = torch.Generator().manual_seed(10)
    outputs, targets = random_problem(generator, batch=2, queries=4, classes=3, sizes=[1, 2])
    with pytest.raises(ValueError, match="1 target dicts for 2 images"):
        HungarianMatcher(1, 5, 2)(outputs, targets[:1])
    targets[1]["boxes"] = targets[1]["boxes"][:1]
    with pytest.raises(ValueError, match=r"targets\[1\]: labels \(2,\) and boxes \(1, 4\)"):
        HungarianMatcher(1, 5, 2)(outputs, targets)
    with pytest.raises(ValueError, match="all costs are 0"):
        HungarianMatcher(0, 0, 0)
