"""CocoDetection and build_dataset: targets (crowd dropped, xyxy boxes clamped to the image,
empty boxes dropped), folder and zip layouts, and every bad-data case."""

from __future__ import annotations

import gc
import json
import logging
import math
import random
import shutil
import zipfile
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset

from detr_irpe.config import complete_args, prepare_options
from detr_irpe.data import (
    AnnotationError,
    CocoDetection,
    ImageLoadError,
    build_dataset,
    category_names,
    coco_annotations_to_target,
    get_coco_api,
    num_classes_from_annotations,
)
from detr_irpe.data.transforms import make_transforms

TRAIN_JSON = "annotations/instances_train2017.json"


def data_args(root: Path, **overrides) -> Namespace:
    values = {
        "coco_path": str(root),
        "dataset_file": "coco",
        "masks": False,
        "skip_bad_samples": False,
        "train_scales": [48, 64],
        "train_max_size": 96,
        "crop_aug": True,
        "val_size": 56,
        "val_max_size": 96,
    }
    values.update(overrides)
    return complete_args(Namespace(**values))  # the data code reads completed options


def copy_root(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / "coco"))


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def naive_target(records: list[dict], width: int, height: int) -> tuple[list, list, list]:
    """Drop crowd, xywh -> xyxy, clamp to the image, keep positive width and height."""
    boxes, labels, areas = [], [], []
    for ann in records:
        if ann.get("iscrowd", 0) == 1:
            continue
        x, y, w, h = ann["bbox"]
        x0, y0 = min(max(x, 0), width), min(max(y, 0), height)
        x1, y1 = min(max(x + w, 0), width), min(max(y + h, 0), height)
        if x1 > x0 and y1 > y0:
            boxes.append([x0, y0, x1, y1])
            labels.append(ann["category_id"])
            areas.append(ann["area"])
    return boxes, labels, areas


def test_target_conversion_matches_naive():
    annotations = [
        {"bbox": [10.5, 20.25, 30.0, 40.0], "category_id": 18, "area": 900.5, "iscrowd": 0},
        {"bbox": [-5.0, 10.0, 20.0, 100.0], "category_id": 1, "area": 2000.0},  # clamped
        {"bbox": [50.0, 50.0, 10.0, 10.0], "category_id": 3, "area": 100.0, "iscrowd": 1},
        {"bbox": [64.0, 10.0, 5.0, 5.0], "category_id": 4, "area": 25.0, "iscrowd": 0},  # x0 = W
        {"bbox": [5.0, 5.0, 0.0, 3.0], "category_id": 5, "area": 0.0, "iscrowd": 0},  # no width
        {"bbox": [60.0, 40.0, 30.0, 30.0], "category_id": 90, "area": 300.0, "iscrowd": 0},
    ]
    target = coco_annotations_to_target(annotations, image_id=42, width=64, height=48)
    boxes, labels, areas = naive_target(annotations, 64, 48)
    assert labels == [18, 1, 90]
    torch.testing.assert_close(target["boxes"], torch.tensor(boxes, dtype=torch.float32))
    assert target["labels"].tolist() == labels and target["labels"].dtype == torch.int64
    torch.testing.assert_close(target["area"], torch.tensor(areas, dtype=torch.float32))
    assert target["iscrowd"].tolist() == [0, 0, 0]
    assert target["image_id"].tolist() == [42]
    assert target["orig_size"].tolist() == target["size"].tolist() == [48, 64]


def test_target_conversion_without_annotations():
    target = coco_annotations_to_target([], image_id=1, width=10, height=20)
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)


@pytest.mark.parametrize("split", ["train", "val"])
def test_items_match_the_annotation_file(synthetic_coco_root, split):
    ann_file = synthetic_coco_root / f"annotations/instances_{split}2017.json"
    raw = json.loads(ann_file.read_text())
    dataset = CocoDetection(synthetic_coco_root / f"{split}2017", ann_file)
    images = {img["id"]: img for img in raw["images"]}
    assert dataset.ids == sorted(images)
    for index, image_id in enumerate(dataset.ids):
        image, target = dataset[index]
        record = images[image_id]
        assert image.mode == "RGB" and image.size == (record["width"], record["height"])
        with Image.open(synthetic_coco_root / f"{split}2017" / record["file_name"]) as png:
            assert np.array_equal(np.asarray(image), np.asarray(png.convert("RGB")))
        anns = [a for a in raw["annotations"] if a["image_id"] == image_id]
        boxes, labels, areas = naive_target(anns, record["width"], record["height"])
        assert target["image_id"].tolist() == [image_id]
        assert target["labels"].tolist() == labels
        torch.testing.assert_close(target["boxes"], torch.tensor(boxes, dtype=torch.float32))
        torch.testing.assert_close(target["area"], torch.tensor(areas, dtype=torch.float32))


def test_images_without_annotations_are_kept(synthetic_coco_root, tmp_path):
    root = copy_root(synthetic_coco_root, tmp_path)
    shutil.copy(root / "train2017/000000000001.png", root / "train2017/empty.png")
    edit_json(
        root / TRAIN_JSON,
        lambda d: d["images"].append(
            {"id": 1000, "file_name": "empty.png", "width": 1, "height": 1}
        ),
    )
    dataset = CocoDetection(root / "train2017", root / TRAIN_JSON)
    assert len(dataset) == 9 and dataset.ids[-1] == 1000
    _, target = dataset[8]
    assert target["boxes"].shape == (0, 4) and target["image_id"].tolist() == [1000]


@pytest.mark.parametrize("image_set", ["train", "val"])
def test_zip_and_folder_layouts_give_identical_samples(
    synthetic_coco_root, synthetic_coco_zip_root, image_set
):
    assert not (synthetic_coco_zip_root / f"{image_set}2017").exists()
    from_folder = build_dataset(image_set, data_args(synthetic_coco_root))
    from_zip = build_dataset(image_set, data_args(synthetic_coco_zip_root))
    assert from_folder.reader.mode == "folder" and from_zip.reader.mode == "zip"
    assert len(from_folder) == len(from_zip) > 0
    for index in range(len(from_folder)):
        samples = []
        for dataset in (from_folder, from_zip):
            random.seed(index)  # same augmentation draws for both layouts
            torch.manual_seed(index)
            samples.append(dataset[index])
        (image_a, target_a), (image_b, target_b) = samples
        assert torch.equal(image_a, image_b)
        assert target_a.keys() == target_b.keys()
        for key in target_a:
            assert torch.equal(target_a[key], target_b[key]), key
    from_zip.close()


@pytest.mark.slow
def test_zip_dataset_in_two_dataloader_workers_matches_the_folder(
    synthetic_coco_root, synthetic_coco_zip_root
):
    from_folder = build_dataset("train", data_args(synthetic_coco_root))
    from_zip = build_dataset("train", data_args(synthetic_coco_zip_root))
    # The val transform is deterministic, so worker order and RNG do not matter.
    from_folder._transforms = from_zip._transforms = make_transforms("val", data_args(Path()))
    loader = DataLoader(from_zip, batch_size=3, num_workers=2, collate_fn=lambda batch: batch)
    seen = 0
    for batch in loader:
        for image, target in batch:
            index = from_folder.ids.index(int(target["image_id"]))
            expected_image, expected_target = from_folder[index]
            assert torch.equal(image, expected_image)
            assert torch.equal(target["boxes"], expected_target["boxes"])
            seen += 1
    assert seen == len(from_folder) == 8
    from_zip.close()


def test_build_dataset_applies_the_val_transform(synthetic_coco_root):
    dataset = build_dataset("val", data_args(synthetic_coco_root, val_size=56))
    image, target = dataset[0]
    assert image.dtype == torch.float32 and image.shape[0] == 3
    assert min(image.shape[1:]) == 56 or max(image.shape[1:]) == 96
    assert target["size"].tolist() == list(image.shape[1:])
    assert ((target["boxes"] >= 0) & (target["boxes"] <= 1)).all()


def test_build_dataset_with_the_shared_tiny_args(tiny_args):
    dataset = build_dataset("train", tiny_args)
    assert len(dataset) == 8
    image, _ = dataset[0]
    assert image.shape[0] == 3


def test_get_coco_api_unwraps_subsets(synthetic_coco_root):
    dataset = build_dataset("val", data_args(synthetic_coco_root))
    assert get_coco_api(Subset(Subset(dataset, [0, 1]), [0])) is dataset.coco
    with pytest.raises(TypeError, match="coco"):
        get_coco_api([1, 2, 3])


def test_num_classes_and_category_names(synthetic_coco_root):
    ann_file = synthetic_coco_root / TRAIN_JSON
    dataset = CocoDetection(synthetic_coco_root / "train2017", ann_file)
    expected = {1: "circle", 2: "square", 3: "triangle", 4: "cross"}
    for source in (ann_file, str(ann_file), dataset.coco, dataset):
        assert num_classes_from_annotations(source) == 5
        assert category_names(source) == expected


def test_num_classes_is_max_id_plus_one_not_count(tmp_path):
    ann_file = tmp_path / "a.json"
    categories = [{"id": 1, "name": "person"}, {"id": 90, "name": "toothbrush"}]
    ann_file.write_text(json.dumps({"images": [], "categories": categories}))
    assert num_classes_from_annotations(ann_file) == 91


# ----------------------------------------------------------------------------------------------
# Layout and option errors.


def test_neither_folder_nor_zip(synthetic_coco_root, tmp_path):
    root = tmp_path / "coco"
    shutil.copytree(synthetic_coco_root / "annotations", root / "annotations")
    with pytest.raises(FileNotFoundError) as info:
        build_dataset("train", data_args(root))
    assert str(root / "train2017") in str(info.value)
    assert str(root / "train2017.zip") in str(info.value)


def test_missing_annotation_file(synthetic_coco_root, tmp_path):
    root = copy_root(synthetic_coco_root, tmp_path)
    (root / "annotations/instances_val2017.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"instances_val2017\.json"):
        build_dataset("val", data_args(root))


@pytest.mark.parametrize(
    ("overrides", "error", "pattern"),
    [
        ({"masks": True}, NotImplementedError, "masks"),
        ({"dataset_file": "coco_panoptic"}, ValueError, "coco_panoptic"),
        ({"coco_path": None}, ValueError, "coco_path"),
        ({"coco_path": "/does/not/exist"}, ValueError, "/does/not/exist"),
    ],
)
def test_unsupported_options(synthetic_coco_root, overrides, error, pattern):
    """Refused at the programmes' one boundary, before any dataset is built."""
    with pytest.raises(error, match=pattern):
        prepare_options(data_args(synthetic_coco_root, **overrides))


def test_unknown_image_set(synthetic_coco_root):
    with pytest.raises(ValueError, match="image_set"):
        build_dataset("test", data_args(synthetic_coco_root))


# ----------------------------------------------------------------------------------------------
# Malformed annotations.


def first_annotation(data: dict) -> dict:
    return data["annotations"][0]


BAD_ANNOTATIONS = {
    "three numbers": lambda a: a.__setitem__("bbox", [1, 2, 3]),
    "not finite": lambda a: a.__setitem__("bbox", [1, 2, math.nan, 4]),
    "infinite": lambda a: a.__setitem__("bbox", [1, 2, 3, math.inf]),
    "a string": lambda a: a.__setitem__("bbox", [1, "2", 3, 4]),
    "negative width": lambda a: a.__setitem__("bbox", [1, 2, -3, 4]),
    "negative height": lambda a: a.__setitem__("bbox", [1, 2, 3, -0.5]),
    "missing": lambda a: a.pop("bbox"),
    "unknown category": lambda a: a.__setitem__("category_id", 77),
    "bad iscrowd": lambda a: a.__setitem__("iscrowd", 2),
}


@pytest.mark.parametrize("case", sorted(BAD_ANNOTATIONS))
def test_malformed_annotation_names_file_and_record(synthetic_coco_root, tmp_path, case):
    root = copy_root(synthetic_coco_root, tmp_path)
    edit_json(root / TRAIN_JSON, lambda d: BAD_ANNOTATIONS[case](first_annotation(d)))
    ann = first_annotation(json.loads((root / TRAIN_JSON).read_text()))
    with pytest.raises(AnnotationError) as info:
        build_dataset("train", data_args(root))
    message = str(info.value)
    assert "instances_train2017.json" in message
    assert f"annotation id {ann['id']}" in message
    assert f"image id {ann['image_id']}" in message


@pytest.mark.parametrize("case", ["three numbers", "unknown category"])
def test_skip_bad_samples_drops_the_image_with_a_warning(
    synthetic_coco_root, tmp_path, case, caplog
):
    root = copy_root(synthetic_coco_root, tmp_path)
    edit_json(root / TRAIN_JSON, lambda d: BAD_ANNOTATIONS[case](first_annotation(d)))
    ann = first_annotation(json.loads((root / TRAIN_JSON).read_text()))
    with caplog.at_level(logging.WARNING, logger="detr_irpe"):
        dataset = build_dataset("train", data_args(root, skip_bad_samples=True))
    assert f"annotation id {ann['id']}" in caplog.text
    assert len(dataset) == 7
    assert ann["image_id"] not in dataset.ids
    assert ann["image_id"] not in get_coco_api(dataset).imgs
    assert not get_coco_api(dataset).getAnnIds(imgIds=[ann["image_id"]])
    for index in range(len(dataset)):
        dataset[index]


@pytest.mark.parametrize(
    ("edit", "pattern"),
    [
        (lambda d: d["annotations"][1].__setitem__("image_id", 555), "'image_id' 555"),
        (lambda d: d["annotations"][1].__setitem__("id", d["annotations"][0]["id"]), "twice"),
        (lambda d: d["images"][0].pop("file_name"), "file_name"),
        (lambda d: d["images"][1].__setitem__("id", d["images"][0]["id"]), "twice"),
        (lambda d: d.pop("categories"), "categories"),
        (lambda d: d.__setitem__("images", {}), "images"),
    ],
)
def test_other_malformed_records(synthetic_coco_root, tmp_path, edit, pattern):
    root = copy_root(synthetic_coco_root, tmp_path)
    edit_json(root / TRAIN_JSON, edit)
    with pytest.raises(AnnotationError, match=pattern) as info:
        build_dataset("train", data_args(root))
    assert "instances_train2017.json" in str(info.value)


def test_invalid_json_names_file_and_line(synthetic_coco_root, tmp_path):
    root = copy_root(synthetic_coco_root, tmp_path)
    (root / TRAIN_JSON).write_text('{"images": [],\n "categories": [}\n')
    with pytest.raises(AnnotationError, match=r"instances_train2017\.json.*line 2"):
        build_dataset("train", data_args(root))


# ----------------------------------------------------------------------------------------------
# Missing and unreadable images.


def break_image(root: Path, how: str, file_name: str = "000000000003.png") -> None:
    path = root / "train2017" / file_name
    if how == "missing":
        path.unlink()
    elif how == "garbage":
        path.write_bytes(b"\x00not an image at all" * 50)
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[:200])


@pytest.mark.parametrize("how", ["missing", "garbage", "truncated"])
def test_bad_image_names_file_and_image_id(synthetic_coco_root, tmp_path, how):
    root = copy_root(synthetic_coco_root, tmp_path)
    break_image(root, how)
    dataset = build_dataset("train", data_args(root))
    with pytest.raises(ImageLoadError) as info:
        dataset[2]
    assert "000000000003.png" in str(info.value) and "image id 3" in str(info.value)
    dataset[3]  # the others still load


@pytest.mark.slow
def test_dataloader_worker_error_keeps_the_message(synthetic_coco_root, tmp_path):
    root = copy_root(synthetic_coco_root, tmp_path)
    break_image(root, "garbage")
    dataset = build_dataset("train", data_args(root, crop_aug=False))
    loader = DataLoader(dataset, batch_size=1, num_workers=1, collate_fn=lambda batch: batch)
    with pytest.raises(ImageLoadError) as info:
        for _ in loader:
            pass
    message = str(info.value)
    # The traceback holds the loader's iterator; dropping it now shuts the worker down here
    # rather than at interpreter exit, where the shutdown waits for a timeout.
    del info
    gc.collect()
    assert "DataLoader worker" in message
    assert "000000000003.png" in message and "image id 3" in message


def test_skip_bad_samples_returns_the_next_readable_image(synthetic_coco_root, tmp_path, caplog):
    root = copy_root(synthetic_coco_root, tmp_path)
    break_image(root, "garbage")
    dataset = CocoDetection(root / "train2017", root / TRAIN_JSON, skip_bad_samples=True)
    with caplog.at_level(logging.WARNING, logger="detr_irpe"):
        _, target = dataset[2]
    assert target["image_id"].tolist() == [4]
    assert "000000000003.png" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="detr_irpe"):
        _, target = dataset[2]
    assert target["image_id"].tolist() == [4] and not caplog.text, "known bad: no retry"


def test_skip_bad_samples_fails_when_nothing_is_readable(synthetic_coco_root, tmp_path):
    root = copy_root(synthetic_coco_root, tmp_path)
    for path in (root / "val2017").iterdir():
        path.write_bytes(b"broken")
    dataset = CocoDetection(
        root / "val2017", root / "annotations/instances_val2017.json", skip_bad_samples=True
    )
    with pytest.raises(ImageLoadError, match="no readable image"):
        dataset[0]


def test_missing_zip_member_names_archive_and_member(synthetic_coco_zip_root, tmp_path):
    root = copy_root(synthetic_coco_zip_root, tmp_path)
    archive = root / "train2017.zip"
    with zipfile.ZipFile(archive) as source:
        members = {info.filename: source.read(info) for info in source.infolist()}
    with zipfile.ZipFile(archive, "w") as rewritten:
        for name, data in members.items():
            if not name.endswith("000000000002.png"):
                rewritten.writestr(name, data)
    dataset = build_dataset("train", data_args(root))
    with pytest.raises(ImageLoadError) as info:
        dataset[1]
    message = str(info.value)
    assert "train2017/000000000002.png" in message and str(archive) in message
    assert "image id 2" in message
    dataset.close()


def test_corrupt_zip_archive_is_named(synthetic_coco_zip_root, tmp_path):
    root = copy_root(synthetic_coco_zip_root, tmp_path)
    (root / "val2017.zip").write_bytes(b"garbage" * 100)
    with pytest.raises(zipfile.BadZipFile, match=r"val2017\.zip"):
        build_dataset("val", data_args(root))


def test_annotation_names_stay_importable_from_the_dataset_module():
    from detr_irpe.data import coco, coco_annotations

    assert coco.AnnotationError is coco_annotations.AnnotationError
    assert coco.load_coco_annotations is coco_annotations.load_coco_annotations
