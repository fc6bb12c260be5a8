"""``detr_irpe.Detector``: a checkpoint's detector from Python, on every kind of image input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detr_irpe import Detector
from detr_irpe.checkpoint import read_checkpoint
from detr_irpe.detector import write_coco_results

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def detector(one_epoch_run: Path) -> Detector:
    # Threshold 0: a one-epoch model scores low; every query is returned, best first.
    return Detector.from_checkpoint(one_epoch_run / "checkpoint.pth", device="cpu", threshold=0.0)


@pytest.fixture(scope="module")
def photo(synthetic_coco_root: Path) -> Path:
    return sorted((synthetic_coco_root / "val2017").iterdir())[0]


def test_the_checkpoint_gives_the_model_and_the_class_names(
    detector: Detector, one_epoch_run: Path
) -> None:
    state = read_checkpoint(one_epoch_run / "checkpoint.pth")
    assert detector.model.transformer.enc_rpe2d == state["args"]["enc_rpe2d"]
    assert set(detector.class_names.values()) == {"circle", "square", "triangle", "cross"}


def test_a_path_a_pil_image_an_array_and_a_tensor_give_the_same_detections(
    detector: Detector, photo: Path
) -> None:
    image = Image.open(photo).convert("RGB")
    array = np.array(image)
    tensor = torch.from_numpy(array).permute(2, 0, 1).float() / 255
    results = [detector(x) for x in (photo, str(photo), image, array, tensor)]
    first = results[0]
    assert len(first) == 5 and first.image_size == (image.height, image.width)  # 5 queries
    for other in results[1:]:
        assert torch.equal(other.boxes, first.boxes) and torch.equal(other.scores, first.scores)
        assert torch.equal(other.labels, first.labels) and other.names == first.names


def test_boxes_are_in_the_input_images_pixels_best_first(detector: Detector, photo: Path) -> None:
    result = detector(photo)
    height, width = result.image_size
    assert torch.all(result.boxes[:, 0] >= -1) and torch.all(result.boxes[:, 2] <= width + 1)
    assert torch.all(result.boxes[:, 1] >= -1) and torch.all(result.boxes[:, 3] <= height + 1)
    assert torch.all(result.scores[:-1] >= result.scores[1:])
    assert result.names == [detector.class_names[int(label)] for label in result.labels]


def test_a_list_gives_one_result_per_image_as_each_alone(
    detector: Detector, synthetic_coco_root: Path
) -> None:
    paths = sorted((synthetic_coco_root / "val2017").iterdir())[:3]
    together = detector(paths)
    assert len(together) == 3
    for path, result in zip(paths, together, strict=True):
        alone = detector(path)
        torch.testing.assert_close(result.boxes, alone.boxes)
        torch.testing.assert_close(result.scores, alone.scores)


def test_the_threshold_filters(one_epoch_run: Path, photo: Path) -> None:
    strict = Detector.from_checkpoint(one_epoch_run / "checkpoint.pth", "cpu", threshold=1.0)
    assert len(strict(photo)) == 0


def test_coco_results_json(detector: Detector, photo: Path, tmp_path: Path) -> None:
    result = detector(photo)
    write_coco_results([result], [7], tmp_path / "results.json")
    records = json.loads((tmp_path / "results.json").read_text())
    assert len(records) == len(result) and records[0]["image_id"] == 7
    x0, y0, x1, y1 = result.boxes[0].tolist()
    assert records[0]["bbox"] == pytest.approx([x0, y0, x1 - x0, y1 - y0])


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (np.zeros((8, 8), dtype=np.uint8), "must be \\(H, W, 3\\)"),
        (torch.zeros(8, 8, 3), "must be \\(3, H, W\\)"),
        (42, "expected a path"),
        ("does/not/exist.png", "does/not/exist.png"),
    ],
)
def test_bad_inputs_are_named(detector: Detector, bad: object, message: str) -> None:
    with pytest.raises((ValueError, TypeError, OSError), match=message):
        detector(bad)


def test_a_threshold_per_call_replaces_the_detectors(detector: Detector, photo: Path) -> None:
    every = detector(photo)
    cut = float(every.scores[1])  # keeps the two best (and any tie with the second)
    kept = detector(photo, threshold=cut)
    assert len(kept) >= 2 and torch.all(kept.scores >= cut)
    assert torch.equal(kept.boxes, every.boxes[: len(kept)])
    assert detector.threshold == 0.0
    with pytest.raises(ValueError, match="threshold must lie in \\[0, 1\\], got 2"):
        detector(photo, threshold=2)


def test_a_normalised_batch_gives_what_the_images_give(detector: Detector, photo: Path) -> None:
    """forward + detections, as evaluation runs them on its data loader's batches."""
    from detr_irpe.nested_tensor import nested_tensor_from_tensor_list

    image = Image.open(photo).convert("RGB")
    samples = nested_tensor_from_tensor_list([detector.transform(image, None)[0]])
    outputs = detector.forward(samples)
    assert outputs["pred_logits"].shape[:2] == (1, 5)
    (found,) = detector.detections(outputs, torch.tensor([[image.height, image.width]]))
    expected = detector(image)
    assert torch.equal(found.boxes, expected.boxes) and found.names == expected.names


def test_options_given_win_over_the_checkpoints(one_epoch_run: Path, photo: Path) -> None:
    small = Detector.from_checkpoint(
        one_epoch_run / "checkpoint.pth", "cpu", overrides={"val_size": 48, "val_max_size": 64}
    )
    assert small.args.val_size == 48
    image = Image.open(photo).convert("RGB")
    assert max(small.transform(image, None)[0].shape[1:]) <= 64


def test_a_model_without_a_transform_says_how_to_run_it(detector: Detector, photo: Path) -> None:
    bare = Detector(detector.model, detector.postprocess)
    assert bare.device == torch.device("cpu")
    with pytest.raises(ValueError, match="no transform: run forward"):
        bare(photo)
