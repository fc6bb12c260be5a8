"""Synthetic dataset: determinism, exact boxes, COCO layout, and its console script."""

from __future__ import annotations

import colorsys
import dataclasses
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detr_irpe.cli import synthetic as synthetic_cli
from detr_irpe.data.synthetic import (
    SYNTHETIC_CATEGORIES,
    SyntheticConfig,
    generate_synthetic_coco,
    render_sample,
)

SMALL = SyntheticConfig(num_train=5, num_val=3, image_size=80, min_image_size=48, seed=3)


def all_files(root: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


@pytest.mark.parametrize("as_zip", [False, True])
def test_same_seed_gives_byte_identical_files(tmp_path, as_zip):
    config = dataclasses.replace(SMALL, as_zip=as_zip)
    first = all_files(generate_synthetic_coco(tmp_path / "a", config))
    second = all_files(generate_synthetic_coco(tmp_path / "b", config))
    assert first == second
    expected = {"annotations/instances_train2017.json", "annotations/instances_val2017.json"}
    expected |= {"train2017.zip", "val2017.zip"} if as_zip else set()
    assert expected <= set(first)
    other = all_files(generate_synthetic_coco(tmp_path / "c", dataclasses.replace(config, seed=4)))
    assert other.keys() == first.keys() and other != first


def test_samples_do_not_depend_on_the_split_sizes():
    a = render_sample(SMALL, "train", 2)
    b = render_sample(dataclasses.replace(SMALL, num_train=100), "train", 2)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert not np.array_equal(np.asarray(a.image), np.asarray(render_sample(SMALL, "val", 2).image))


@pytest.mark.parametrize("difficulty", [0.0, 0.3, 1.0])
def test_boxes_are_tight_around_the_drawn_shapes(difficulty):
    config = dataclasses.replace(SMALL, difficulty=difficulty, max_objects=4)
    for index in range(15):
        sample = render_sample(config, "train", index)
        pixels = np.asarray(sample.image)
        height, width = pixels.shape[:2]
        assert 48 <= width <= 80 and 48 <= height <= 80
        assert 1 <= len(sample.objects) <= 4
        boxes = []
        for obj in sample.objects:
            x, y, w, h = obj.bbox
            assert x >= 0 and y >= 0 and x + w <= width and y + h <= height
            assert obj.mask.shape == (h, w)
            # Every pixel of the shape has the shape's colour ...
            region = pixels[y : y + h, x : x + w]
            assert (region[obj.mask] == obj.color).all()
            # ... and the shape reaches all four sides of its box (tight box).
            assert obj.mask[0].any() and obj.mask[-1].any()
            assert obj.mask[:, 0].any() and obj.mask[:, -1].any()
            assert obj.area == int(obj.mask.sum())
            assert 1 <= obj.category_id <= len(SYNTHETIC_CATEGORIES)
            boxes.append((x, y, x + w, y + h))
        for i, (ax0, ay0, ax1, ay1) in enumerate(boxes):  # no occlusion
            for bx0, by0, bx1, by1 in boxes[i + 1 :]:
                assert ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0


def test_class_colors_give_each_class_its_hue():
    config = dataclasses.replace(SMALL, class_colors=True, max_objects=4)
    hues: dict[int, list[float]] = {}
    for index in range(40):
        sample = render_sample(config, "train", index)
        pixels = np.asarray(sample.image)
        for obj in sample.objects:
            x, y, w, h = obj.bbox
            assert (pixels[y : y + h, x : x + w][obj.mask] == obj.color).all()
            hue, saturation, _ = colorsys.rgb_to_hsv(*(c / 255 for c in obj.color))
            assert saturation > 0.5
            hues.setdefault(obj.category_id, []).append(hue)
    assert set(hues) == set(range(1, len(SYNTHETIC_CATEGORIES) + 1))
    expected = {1: 0.0, 2: 1 / 3, 3: 2 / 3, 4: 1 / 6}  # red, green, blue, yellow
    for category_id, values in hues.items():
        assert max(_hue_distance(hue, expected[category_id]) for hue in values) < 0.05
    # Without the option, hues ignore the class.
    plain = dataclasses.replace(config, class_colors=False)
    off_hue = sum(
        _hue_distance(
            colorsys.rgb_to_hsv(*(c / 255 for c in obj.color))[0], expected[obj.category_id]
        )
        > 0.05
        for index in range(40)
        for obj in render_sample(plain, "train", index).objects
    )
    assert off_hue > 10


def _hue_distance(a: float, b: float) -> float:
    return min(abs(a - b), 1 - abs(a - b))


def test_written_files_agree_with_their_annotations(synthetic_coco_root):
    """Box edges in the written PNGs carry the annotated colour; json is valid COCO."""
    for split, count in (("train", 8), ("val", 4)):
        data = json.loads(
            (synthetic_coco_root / f"annotations/instances_{split}2017.json").read_text()
        )
        assert [c["id"] for c in data["categories"]] == [1, 2, 3, 4]
        assert [c["name"] for c in data["categories"]] == list(SYNTHETIC_CATEGORIES)
        assert len(data["images"]) == count
        assert len({a["id"] for a in data["annotations"]}) == len(data["annotations"])
        files = {img["id"]: img for img in data["images"]}
        for ann in data["annotations"]:
            record = files[ann["image_id"]]
            with Image.open(synthetic_coco_root / f"{split}2017" / record["file_name"]) as png:
                pixels = np.asarray(png.convert("RGB"))
            assert pixels.shape[:2] == (record["height"], record["width"])
            x, y, w, h = ann["bbox"]
            is_color = (pixels[y : y + h, x : x + w] == ann["color"]).all(axis=-1)
            assert is_color[0].any() and is_color[-1].any()
            assert is_color[:, 0].any() and is_color[:, -1].any()
            assert is_color.sum() >= ann["area"] and ann["iscrowd"] == 0


def test_zip_layout_members(synthetic_coco_zip_root):
    with zipfile.ZipFile(synthetic_coco_zip_root / "val2017.zip") as archive:
        names = archive.namelist()
    assert names == [f"val2017/{i:012d}.png" for i in range(1, 5)]
    assert not (synthetic_coco_zip_root / "val2017").exists()


def test_existing_dataset_is_not_overwritten_silently(tmp_path):
    generate_synthetic_coco(tmp_path, SMALL)
    with pytest.raises(FileExistsError, match="overwrite"):
        generate_synthetic_coco(tmp_path, SMALL)
    generate_synthetic_coco(tmp_path, dataclasses.replace(SMALL, as_zip=True), overwrite=True)
    assert not (tmp_path / "train2017").exists() and (tmp_path / "train2017.zip").is_file()


@pytest.mark.parametrize(
    ("field", "value"),
    [("difficulty", 1.5), ("max_objects", 0), ("image_size", 8), ("min_image_size", 200)],
)
def test_invalid_configuration(field, value):
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(SMALL, **{field: value})


def test_console_script_writes_a_zip_dataset(tmp_path, capsys):
    out = tmp_path / "shapes"
    argv = [str(out), "--num-train", "3", "--num-val", "2", "--image-size", "64", "--zip"]
    assert synthetic_cli.main([*argv, "--seed", "5", "--no-progress"]) == 0
    data = json.loads((out / "annotations/instances_train2017.json").read_text())
    assert len(data["images"]) == 3 and data["info"]["seed"] == 5
    assert (out / "val2017.zip").is_file()
    assert synthetic_cli.main([*argv, "--no-progress"]) == 2, "refuses to overwrite"
    assert "--overwrite" in capsys.readouterr().err
    assert synthetic_cli.main([str(tmp_path / "x"), "--difficulty", "3", "--no-progress"]) == 2
    assert "difficulty" in capsys.readouterr().err


SPELLINGS = {
    "underscores": ["--num_train", "2", "--num_val", "1", "--image_size", "48"],
    "hyphens": ["--num-train", "2", "--num-val", "1", "--image-size", "48"],
}


@pytest.mark.parametrize("spelling", sorted(SPELLINGS))
def test_console_script_takes_underscores_and_hyphens(tmp_path, spelling):
    extra = {
        "underscores": ["--min_image_size", "40", "--max_objects", "2", "--class_colors"],
        "hyphens": ["--min-image-size", "40", "--max-objects", "2", "--class-colors"],
    }[spelling]
    parsed = synthetic_cli.build_parser().parse_args(["out", *SPELLINGS[spelling], *extra])
    assert (parsed.num_train, parsed.num_val, parsed.image_size) == (2, 1, 48)
    assert (parsed.min_image_size, parsed.max_objects, parsed.class_colors) == (40, 2, True)
    no_progress = "--no_progress" if spelling == "underscores" else "--no-progress"
    out = tmp_path / "shapes"
    assert synthetic_cli.main([str(out), *SPELLINGS[spelling], no_progress]) == 0
    data = json.loads((out / "annotations/instances_train2017.json").read_text())
    assert len(data["images"]) == 2
