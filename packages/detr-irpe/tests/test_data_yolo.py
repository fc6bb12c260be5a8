"""``--data DIR``: YOLO/Ultralytics datasets converted to COCO (``detr_irpe.data.yolo``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import TINY_CLI_MODEL, TINY_CLI_RUN

from detr_irpe.cli.evaluate import main as eval_main
from detr_irpe.cli.train import main as train_main
from detr_irpe.data.coco_annotations import AnnotationError
from detr_irpe.data.yolo import convert_yolo, read_names


def _yolo_from_coco(coco_root: Path, root: Path) -> dict[str, dict]:
    """The synthetic COCO set rewritten as YOLO (class k = category id k); its COCO dicts."""
    originals = {}
    for split in ("train", "val"):
        data = json.loads((coco_root / f"annotations/instances_{split}2017.json").read_text())
        originals[split] = data
        (root / "labels" / split).mkdir(parents=True)
        shutil.copytree(coco_root / f"{split}2017", root / "images" / split)
        for image in data["images"]:
            lines = []
            for a in data["annotations"]:
                if a["image_id"] == image["id"]:
                    x, y, w, h = a["bbox"]
                    W, H = image["width"], image["height"]
                    lines.append(f"{a['category_id']} {(x + w / 2) / W} {(y + h / 2) / H} "
                                 f"{w / W} {h / H}")  # fmt: skip
            stem = Path(image["file_name"]).stem
            (root / "labels" / split / f"{stem}.txt").write_text("\n".join(lines) + "\n")
    cats = {c["id"]: c["name"] for c in originals["train"]["categories"]}
    names = {k: cats.get(k, f"unused{k}") for k in range(max(cats) + 1)}
    (root / "data.yaml").write_text(json.dumps({"names": names}))  # JSON is YAML
    return originals


def test_conversion_matches_the_original_annotations(
    synthetic_coco_root: Path, tmp_path: Path
) -> None:
    originals = _yolo_from_coco(synthetic_coco_root, tmp_path / "yolo")
    out = convert_yolo(tmp_path / "yolo", tmp_path / "coco")
    for split, original in originals.items():
        data = json.loads((out / f"annotations/instances_{split}2017.json").read_text())
        assert len(data["images"]) == len(original["images"])
        by_file = {i["file_name"]: i["id"] for i in data["images"]}
        got = sorted((next(i["file_name"] for i in data["images"] if i["id"] == a["image_id"]),
                      a["category_id"], *[round(v, 3) for v in a["bbox"]])
                     for a in data["annotations"])  # fmt: skip
        file_of = {i["id"]: i["file_name"] for i in original["images"]}
        want = sorted((file_of[a["image_id"]], a["category_id"], *[round(v, 3) for v in a["bbox"]])
                      for a in original["annotations"])  # fmt: skip
        assert got == want and by_file
        assert (out / f"{split}2017").resolve() == (tmp_path / "yolo/images" / split).resolve()


def test_names_as_a_list_and_bad_lines(tmp_path: Path) -> None:
    (tmp_path / "data.yaml").write_text("names: [cat, dog]\n")
    assert read_names(tmp_path / "data.yaml") == ["cat", "dog"]
    from PIL import Image

    for split in ("train", "val"):
        (tmp_path / "images" / split).mkdir(parents=True)
        (tmp_path / "labels" / split).mkdir(parents=True)
        Image.new("RGB", (40, 20)).save(tmp_path / "images" / split / "a.png")
    label = tmp_path / "labels/train/a.txt"
    for text, problem in [
        ("0 0.5 0.5 0.2\n", "5 fields"),
        ("2 0.5 0.5 0.2 0.2\n", "class 2 is not in 0..1"),
        ("0 0.5 0.5 1.5 0.2\n", "not normalised"),
        ("x 0.5 0.5 0.2 0.2\n", "not numbers"),
    ]:
        label.write_text("1 0.5 0.5 0.5 0.5\n" + text)
        with pytest.raises(AnnotationError, match=rf"a\.txt:2: .*{problem}"):
            convert_yolo(tmp_path, tmp_path / "coco")
    out = convert_yolo(tmp_path, tmp_path / "coco", skip_bad=True)
    data = json.loads((out / "annotations/instances_train2017.json").read_text())
    assert [a["bbox"] for a in data["annotations"]] == [[10.0, 5.0, 20.0, 10.0]]


def test_training_on_a_yolo_dataset(
    synthetic_coco_root: Path, tmp_path: Path, one_thread: None
) -> None:
    _yolo_from_coco(synthetic_coco_root, tmp_path / "yolo")
    out = tmp_path / "run"
    argv = [*TINY_CLI_MODEL, *TINY_CLI_RUN, "--data", str(tmp_path / "yolo")]
    assert train_main([*argv, "--output_dir", str(out), "--epochs", "1"]) == 0
    assert (out / "checkpoint.pth").is_file() and (out / "ap_per_class.json").is_file()
    assert "coco_path: null" in (out / "config.yaml").read_text()

    # detr-irpe-eval takes the same --data: converted again, scored with the same class names.
    report = tmp_path / "eval"
    argv = ["--data", str(tmp_path / "yolo"), "--output_dir", str(report), "--num_workers", "0"]
    assert eval_main([str(out / "checkpoint.pth"), *argv, "--no_progress"]) == 0
    trained = json.loads((out / "ap_per_class.json").read_text())
    evaluated = json.loads((report / "ap_per_class.json").read_text())
    assert set(evaluated) == set(trained) and (report / "yolo_as_coco").is_dir()
    assert {c["n_gt"] for c in evaluated.values()} == {c["n_gt"] for c in trained.values()}
