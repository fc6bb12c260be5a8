"""Hostile or broken datasets are refused up front, each with one line naming the culprit:
paths leaving the image folder, huge category ids, empty splits, truncated zip archives."""

from __future__ import annotations

import json
import logging
import shutil
import zipfile
from argparse import Namespace
from pathlib import Path

import pytest

from detr_irpe.cli.errors import run_cli
from detr_irpe.config import complete_args
from detr_irpe.data import AnnotationError, ImageLoadError, build_dataset
from detr_irpe.data.coco import num_classes_from_annotations
from detr_irpe.data.coco_annotations import MAX_CATEGORY_ID
from detr_irpe.data.zip_reader import ArchiveError, ImageFileReader, unsafe_path_reason

TRAIN_JSON = "annotations/instances_train2017.json"
VAL_JSON = "annotations/instances_val2017.json"


def data_args(root: Path, **overrides) -> Namespace:
    values = {"coco_path": str(root), "skip_bad_samples": False, "val_size": 56}
    values.update({"val_max_size": 96, "train_scales": [48], "train_max_size": 96})
    values.update(overrides)
    return complete_args(Namespace(**values))  # the data code reads completed options


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def cli_error(body, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Exit status and stderr of ``body`` run as a programme: must be one ``error:`` line."""
    status = run_cli("prog", body)
    err = capsys.readouterr().err
    assert err.startswith("prog: error: ") and err.count("\n") == 1, err
    return status, err


HOSTILE_NAMES = [
    "../../../etc/passwd",
    "sub/../../outside.png",
    "/etc/passwd",
    "C:\\Windows\\win.ini",
    "..\\..\\outside.png",
]


@pytest.mark.parametrize("layout", ["folder", "zip"])
@pytest.mark.parametrize("file_name", HOSTILE_NAMES)
def test_file_name_leaving_the_image_folder_is_refused(
    synthetic_coco_root, synthetic_coco_zip_root, tmp_path, layout, file_name, capsys
):
    source = synthetic_coco_root if layout == "folder" else synthetic_coco_zip_root
    root = Path(shutil.copytree(source, tmp_path / "coco"))
    edit_json(root / TRAIN_JSON, lambda d: d["images"][2].__setitem__("file_name", file_name))
    with pytest.raises(AnnotationError) as info:
        build_dataset("train", data_args(root))
    message = str(info.value)
    assert "instances_train2017.json" in message and "image id 3" in message
    assert repr(file_name) in message
    status, err = cli_error(lambda: build_dataset("train", data_args(root)), capsys)
    assert status == 1 and "image id 3" in err


def test_skip_bad_samples_drops_the_hostile_record(synthetic_coco_root, tmp_path, caplog):
    root = Path(shutil.copytree(synthetic_coco_root, tmp_path / "coco"))
    edit_json(root / TRAIN_JSON, lambda d: d["images"][2].__setitem__("file_name", "/etc/passwd"))
    with caplog.at_level(logging.WARNING, logger="detr_irpe"):
        dataset = build_dataset("train", data_args(root, skip_bad_samples=True))
    assert 3 not in dataset.ids and len(dataset) == 7
    assert "image id 3" in caplog.text


@pytest.mark.parametrize("layout", ["folder", "zip"])
def test_the_reader_itself_refuses_to_leave_its_folder(tmp_path, layout):
    (tmp_path / "secret.png").write_bytes(b"secret")
    folder = tmp_path / "data" / "train2017"
    if layout == "folder":
        folder.mkdir(parents=True)
    else:
        folder.parent.mkdir()
        with zipfile.ZipFile(f"{folder}.zip", "w") as archive:
            archive.writestr("train2017/a.png", b"a")
    reader = ImageFileReader(folder)
    for name in ("../../secret.png", str(tmp_path / "secret.png")):
        with pytest.raises(ImageLoadError, match="refusing to read image"):
            reader.read(name)
    reader.close()


@pytest.mark.parametrize(
    ("file_name", "safe"),
    [
        ("000000000009.jpg", True),
        ("sub/dir/a.png", True),
        ("a..b.png", True),
        ("..a.png", True),
        ("./a.png", True),
        ("..", False),
        ("a/..", False),
        ("/abs.png", False),
        ("\\\\server\\share\\a.png", False),
        ("D:a.png", False),
        ("a\0.png", False),
    ],
)
def test_unsafe_path_reason(file_name, safe):
    assert (unsafe_path_reason(file_name) is None) == safe


@pytest.mark.parametrize("category_id", [2**40, MAX_CATEGORY_ID + 1, -1])
def test_category_id_out_of_bounds(synthetic_coco_root, tmp_path, category_id, capsys):
    root = Path(shutil.copytree(synthetic_coco_root, tmp_path / "coco"))
    edit_json(root / TRAIN_JSON, lambda d: d["categories"][3].__setitem__("id", category_id))
    with pytest.raises(AnnotationError) as info:
        num_classes_from_annotations(root / TRAIN_JSON)
    message = str(info.value)
    assert "instances_train2017.json" in message
    assert f"category id {category_id} ('cross')" in message and str(MAX_CATEGORY_ID) in message
    status, _ = cli_error(lambda: build_dataset("train", data_args(root)), capsys)
    assert status == 1


def test_largest_category_id_is_accepted(tmp_path):
    ann_file = tmp_path / "a.json"
    categories = [{"id": MAX_CATEGORY_ID, "name": "last"}]
    ann_file.write_text(json.dumps({"images": [], "categories": categories}))
    assert num_classes_from_annotations(ann_file) == MAX_CATEGORY_ID + 1


def test_image_id_beyond_64_bits(synthetic_coco_root, tmp_path):
    root = Path(shutil.copytree(synthetic_coco_root, tmp_path / "coco"))
    edit_json(root / TRAIN_JSON, lambda d: d["images"][0].__setitem__("id", 2**70))
    with pytest.raises(AnnotationError, match="64 bits"):
        build_dataset("train", data_args(root))


@pytest.mark.parametrize("split", ["val", "train"])
def test_empty_split_is_refused_when_built(synthetic_coco_root, tmp_path, split, capsys):
    root = Path(shutil.copytree(synthetic_coco_root, tmp_path / "coco"))
    ann_file = root / (VAL_JSON if split == "val" else TRAIN_JSON)
    edit_json(ann_file, lambda d: d.update(images=[], annotations=[]))
    status, err = cli_error(lambda: build_dataset(split, data_args(root)), capsys)
    assert status == 1
    assert f"{ann_file}: the {split} split has no images" in err


def test_split_emptied_by_skip_bad_samples(synthetic_coco_root, tmp_path):
    root = Path(shutil.copytree(synthetic_coco_root, tmp_path / "coco"))
    edit_json(root / VAL_JSON, lambda d: [a.__setitem__("bbox", [1]) for a in d["annotations"]])
    with pytest.raises(AnnotationError, match="no images once the bad records were skipped"):
        build_dataset("val", data_args(root, skip_bad_samples=True))


def test_truncated_zip_archive_is_named(synthetic_coco_zip_root, tmp_path, capsys):
    root = Path(shutil.copytree(synthetic_coco_zip_root, tmp_path / "coco"))
    archive = root / "train2017.zip"
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArchiveError) as info:
        build_dataset("train", data_args(root))
    assert isinstance(info.value, ImageLoadError) and isinstance(info.value, zipfile.BadZipFile)
    assert str(archive) in str(info.value) and "truncated" in str(info.value)
    status, err = cli_error(lambda: build_dataset("train", data_args(root)), capsys)
    assert status == 1 and str(archive) in err


def test_training_with_an_empty_val_split_stops_before_the_first_epoch(
    synthetic_coco_root, tmp_path, capsys
):
    from detr_irpe.cli.train import main as train_main

    root = Path(shutil.copytree(synthetic_coco_root, tmp_path / "coco"))
    edit_json(root / VAL_JSON, lambda d: d.update(images=[], annotations=[]))
    argv = ["--coco_path", str(root), "--output_dir", str(tmp_path / "out"), "--device", "cpu"]
    tiny = ["--backbone", "resnet18", "--backbone_weights", "none", "--hidden_dim", "16"]
    tiny += ["--dim_feedforward", "16", "--enc_layers", "1", "--dec_layers", "1", "--nheads", "2"]
    assert train_main([*argv, *tiny, "--num_workers", "0", "--no_progress"]) == 1
    err = capsys.readouterr().err
    assert err.endswith(f"error: {root / VAL_JSON}: the val split has no images\n")
    assert "Traceback" not in err and not (tmp_path / "out" / "log.txt").exists()
