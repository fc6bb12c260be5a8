"""SetCriterion against a naive re-computation of the original's losses."""

from __future__ import annotations

import argparse
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from detr_irpe.models.criterion import (
    SetCriterion,
    _average_num_boxes,
    build_weight_dict,
    top1_error,
)
from detr_irpe.models.matcher import HungarianMatcher

NUM_CLASSES = 4
EOS_COEF = 0.1


def naive_giou_cxcywh(a: list[float], b: list[float]) -> float:
    def xyxy(box: list[float]) -> list[float]:
        cx, cy, w, h = box
        return [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]

    a, b = xyxy(a), xyxy(b)
    area_a = (a[2] - a[0]) * (a[3] - a[1])
    area_b = (b[2] - b[0]) * (b[3] - b[1])
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(
        0.0, min(a[3], b[3]) - max(a[1], b[1])
    )
    union = area_a + area_b - inter
    area_c = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / union - (area_c - union) / area_c


def naive_losses(logits, boxes, targets, indices, num_boxes: float) -> dict[str, float]:
    """The original's losses, element by element in Python floats."""
    batch, queries, num_logits = logits.shape
    no_object = num_logits - 1
    target_class = [[no_object] * queries for _ in range(batch)]
    for b, (src, tgt) in enumerate(indices):
        for q, t in zip(src.tolist(), tgt.tolist(), strict=True):
            target_class[b][q] = int(targets[b]["labels"][t])
    weighted, weights = 0.0, 0.0
    for b in range(batch):
        for q in range(queries):
            row = logits[b, q].tolist()
            top = max(row)
            log_z = top + math.log(sum(math.exp(v - top) for v in row))
            cls = target_class[b][q]
            w = EOS_COEF if cls == no_object else 1.0
            weighted += w * (log_z - row[cls])
            weights += w
    l1 = giou = 0.0
    correct = matched = 0
    for b, (src, tgt) in enumerate(indices):
        for q, t in zip(src.tolist(), tgt.tolist(), strict=True):
            pred, gt = boxes[b, q].tolist(), targets[b]["boxes"][t].tolist()
            l1 += sum(abs(p - g) for p, g in zip(pred, gt, strict=True))
            giou += 1 - naive_giou_cxcywh(pred, gt)
            matched += 1
            row = logits[b, q].tolist()
            correct += int(row.index(max(row)) == int(targets[b]["labels"][t]))
    card = 0.0
    for b in range(batch):
        predicted = sum(
            1
            for q in range(queries)
            if logits[b, q].tolist().index(max(logits[b, q].tolist())) != no_object
        )
        card += abs(predicted - len(targets[b]["labels"]))
    return {
        "loss_ce": weighted / weights,
        "loss_bbox": l1 / num_boxes,
        "loss_giou": giou / num_boxes,
        "cardinality_error": card / batch,
        "class_error": 100.0 - (100.0 * correct / matched if matched else 0.0),
    }


def make_outputs(generator: torch.Generator, batch: int, queries: int, aux: int) -> dict:
    def one() -> dict:
        logits = torch.randn(batch, queries, NUM_CLASSES + 1, generator=generator)
        # Push some queries to "no object" so cardinality is not trivially the query count.
        logits[:, ::2, -1] += 3.0
        boxes = torch.cat(
            [
                0.2 + 0.6 * torch.rand(batch, queries, 2, generator=generator),
                0.05 + 0.3 * torch.rand(batch, queries, 2, generator=generator),
            ],
            dim=-1,
        )
        return {"pred_logits": logits.requires_grad_(), "pred_boxes": boxes.requires_grad_()}

    outputs = one()
    if aux:
        outputs["aux_outputs"] = [one() for _ in range(aux)]
    return outputs


def make_targets(generator: torch.Generator, sizes: list[int]) -> list[dict]:
    targets = []
    for n in sizes:
        boxes = torch.cat(
            [
                0.2 + 0.6 * torch.rand(n, 2, generator=generator),
                0.05 + 0.3 * torch.rand(n, 2, generator=generator),
            ],
            dim=-1,
        )
        targets.append(
            {"labels": torch.randint(0, NUM_CLASSES, (n,), generator=generator), "boxes": boxes}
        )
    return targets


def tiny_args(**overrides: object) -> argparse.Namespace:
    values = {"bbox_loss_coef": 5.0, "giou_loss_coef": 2.0, "aux_loss": True, "dec_layers": 6}
    values.update(overrides)
    return argparse.Namespace(**values)


def make_criterion(aux_layers: int = 2) -> SetCriterion:
    weight_dict = build_weight_dict(tiny_args(dec_layers=aux_layers + 1))
    return SetCriterion(NUM_CLASSES, HungarianMatcher(1, 5, 2), weight_dict, EOS_COEF)


@pytest.mark.parametrize("sizes", [[2, 3, 1], [0, 4, 0]])
def test_losses_match_the_naive_computation(sizes: list[int]) -> None:
    generator = torch.Generator().manual_seed(sum(sizes))
    outputs = make_outputs(generator, batch=3, queries=6, aux=2)
    targets = make_targets(generator, sizes)
    criterion = make_criterion(aux_layers=2)
    losses = criterion(outputs, targets)
    num_boxes = max(1.0, float(sum(sizes)))

    matcher = HungarianMatcher(1, 5, 2)
    layers = [("", outputs), ("_0", outputs["aux_outputs"][0]), ("_1", outputs["aux_outputs"][1])]
    for suffix, layer_outputs in layers:
        indices = matcher(layer_outputs, targets)
        expected = naive_losses(
            layer_outputs["pred_logits"].detach(),
            layer_outputs["pred_boxes"].detach(),
            targets,
            indices,
            num_boxes,
        )
        for key, value in expected.items():
            if key == "class_error" and suffix:
                continue
            assert float(losses[key + suffix].detach()) == pytest.approx(
                value, rel=1e-5, abs=1e-6
            ), key
    assert "class_error_0" not in losses

    expected_keys = {"loss_ce", "loss_bbox", "loss_giou", "cardinality_error", "class_error"}
    for k in range(2):
        expected_keys |= {
            f"loss_ce_{k}",
            f"loss_bbox_{k}",
            f"loss_giou_{k}",
            f"cardinality_error_{k}",
        }
    assert set(losses) == expected_keys

    total = sum(losses[k] * w for k, w in criterion.weight_dict.items())
    total.backward()
    assert outputs["pred_logits"].grad is not None
    assert outputs["aux_outputs"][1]["pred_boxes"].grad is not None


def test_no_targets_gives_class_error_100_and_zero_box_losses() -> None:
    generator = torch.Generator().manual_seed(0)
    outputs = make_outputs(generator, batch=2, queries=5, aux=0)
    losses = make_criterion(aux_layers=0)(outputs, make_targets(generator, [0, 0]))
    assert float(losses["class_error"]) == 100.0
    assert float(losses["loss_bbox"].detach()) == 0.0 and float(losses["loss_giou"].detach()) == 0.0
    # Every query targets "no object": the eos weight cancels in the weighted mean.
    logits = outputs["pred_logits"].detach()
    expected = -torch.log_softmax(logits, -1)[..., -1].mean()
    assert float(losses["loss_ce"].detach()) == pytest.approx(float(expected), rel=1e-6)


def test_eos_weight_changes_the_cross_entropy() -> None:
    generator = torch.Generator().manual_seed(1)
    outputs = make_outputs(generator, batch=2, queries=5, aux=0)
    targets = make_targets(generator, [2, 1])
    one = SetCriterion(NUM_CLASSES, HungarianMatcher(1, 5, 2), {}, eos_coef=1.0)(outputs, targets)
    tenth = SetCriterion(NUM_CLASSES, HungarianMatcher(1, 5, 2), {}, eos_coef=0.1)(outputs, targets)
    assert float(one["loss_ce"].detach()) != pytest.approx(float(tenth["loss_ce"].detach()))
    assert float(one["loss_bbox"].detach()) == pytest.approx(float(tenth["loss_bbox"].detach()))


def test_weight_dict_per_spec() -> None:
    weights = build_weight_dict(tiny_args())
    assert len(weights) == 18
    assert weights["loss_ce"] == 1 and weights["loss_bbox"] == 5 and weights["loss_giou"] == 2
    assert weights["loss_giou_4"] == 2 and "loss_ce_5" not in weights
    assert set(build_weight_dict(tiny_args(aux_loss=False))) == {
        "loss_ce",
        "loss_bbox",
        "loss_giou",
    }


def test_top1_error() -> None:
    logits = torch.tensor([[0.0, 1.0], [2.0, 0.0], [0.0, 3.0]])
    assert float(top1_error(logits, torch.tensor([1, 1, 1]))) == pytest.approx(100 / 3)
    assert float(top1_error(logits[:0], torch.tensor([], dtype=torch.long))) == 100.0


def test_losses_are_float32_under_bf16_autocast() -> None:
    generator = torch.Generator().manual_seed(2)
    outputs = make_outputs(generator, batch=2, queries=5, aux=1)
    low = {
        "pred_logits": outputs["pred_logits"].detach().bfloat16(),
        "pred_boxes": outputs["pred_boxes"].detach().bfloat16(),
        "aux_outputs": [{k: v.detach().bfloat16() for k, v in outputs["aux_outputs"][0].items()}],
    }
    targets = make_targets(generator, [1, 2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = make_criterion(aux_layers=1)(low, targets)
    reference = make_criterion(aux_layers=1)(
        {
            "pred_logits": low["pred_logits"].float(),
            "pred_boxes": low["pred_boxes"].float(),
            "aux_outputs": [{k: v.float() for k, v in low["aux_outputs"][0].items()}],
        },
        targets,
    )
    for key, value in losses.items():
        assert value.dtype == torch.float32, key
        torch.testing.assert_close(value, reference[key])


def test_masks_loss_is_refused() -> None:
    with pytest.raises(ValueError, match="masks"):
        SetCriterion(
            NUM_CLASSES, HungarianMatcher(1, 5, 2), {}, EOS_COEF, losses=["labels", "masks"]
        )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _num_boxes_worker(rank: int, world_size: int, port: int, count: int, queue) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        targets = [{"labels": torch.zeros(count, dtype=torch.long)}]
        queue.put((rank, float(_average_num_boxes(targets, torch.device("cpu")))))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*multi-threaded.*fork:DeprecationWarning")
def test_num_boxes_is_averaged_over_gloo_processes() -> None:
    # Fork keeps this fast (no re-import of torch); the two ranks hold 3 and 0 boxes.
    context = mp.get_context("fork")
    queue = context.Queue()
    port = _free_port()
    workers = [
        context.Process(target=_num_boxes_worker, args=(rank, 2, port, count, queue))
        for rank, count in enumerate([3, 0])
    ]
    for worker in workers:
        worker.start()
    results = dict(queue.get(timeout=120) for _ in workers)
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    assert results == {0: pytest.approx(1.5), 1: pytest.approx(1.5)}


def test_num_boxes_without_distributed_is_at_least_one() -> None:
    assert float(_average_num_boxes([{"labels": torch.zeros(0)}], torch.device("cpu"))) == 1.0
    assert float(_average_num_boxes([{"labels": torch.zeros(3)}] * 2, torch.device("cpu"))) == 6.0
