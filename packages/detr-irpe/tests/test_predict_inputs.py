"""detr-irpe-predict's image arguments (files, folders, globs) and its batched inference."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from detr_irpe.checkpoint import make_checkpoint, save_checkpoint
from detr_irpe.cli.errors import CLIError
from detr_irpe.cli.predict import collect_images, detect_in_batches
from detr_irpe.cli.predict import main as predict_main

# A tiny untrained model: predict only needs weights that fit the stored options.
MODEL_ARGV = [
    "--backbone", "resnet18", "--backbone_weights", "none", "--hidden_dim", "32",
    "--dim_feedforward", "64", "--enc_layers", "1", "--dec_layers", "1", "--nheads", "2",
    "--num_queries", "5", "--enc_rpe2d", "rpe-2.0-product-ctx-1-k", "--num_classes", "5",
    "--val_size", "80", "--val_max_size", "128", "--device", "cpu",
]  # fmt: skip
RUN = ["--device", "cpu", "--no_progress", "--threshold", "0"]


@pytest.fixture(scope="module")
def model_and_checkpoint(tmp_path_factory: pytest.TempPathFactory):
    from detr_irpe import config
    from detr_irpe.models import build_model

    torch.manual_seed(0)
    args = config.default_args(MODEL_ARGV)
    model, _, postprocessors = build_model(args)
    model.eval()
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    state = make_checkpoint(model, args=args)
    state["class_names"] = {1: "circle", 2: "square", 3: "triangle", 4: "cross"}
    save_checkpoint(path, state)
    return model, postprocessors, args, path


@pytest.fixture
def photos(synthetic_coco_root: Path, tmp_path: Path) -> Path:
    """A folder with 4 PNGs, one JPEG copy, a text file and a sub-folder with an image."""
    folder = tmp_path / "photos"
    shutil.copytree(synthetic_coco_root / "val2017", folder)
    with Image.open(folder / "000000000001.png") as image:
        image.convert("RGB").save(folder / "copy.JPG")
    (folder / "notes.txt").write_text("not an image")
    (folder / "sub").mkdir()
    shutil.copy(folder / "copy.JPG", folder / "sub" / "deep.jpg")
    return folder


def names(paths: list[Path]) -> list[str]:
    return [p.name for p in paths]


def test_collect_folder_is_sorted_filtered_and_not_recursive(photos: Path):
    expected = [f"00000000000{i}.png" for i in (1, 2, 3, 4)] + ["copy.JPG"]
    assert names(collect_images([str(photos)])) == sorted(expected)


def test_collect_glob_files_and_duplicates(photos: Path):
    found = collect_images([str(photos / "*.png"), str(photos / "copy.JPG")])
    assert len(found) == 5 and found[-1].name == "copy.JPG"
    assert names(collect_images([str(photos / "**" / "*.jpg")])) == ["deep.jpg"]
    twice = collect_images([str(photos / "copy.JPG"), str(photos)])
    assert names(twice).count("copy.JPG") == 1, "each image once"


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("nowhere.jpg", "image file(s) not found: nowhere.jpg"),
        ("nowhere/*.jpg", "no file matches the pattern 'nowhere/*.jpg'"),
    ],
)
def test_collect_reports_what_matched_nothing(pattern: str, message: str):
    with pytest.raises(CLIError) as info:
        collect_images([pattern])
    assert str(info.value) == message


def test_collect_empty_folder(tmp_path: Path):
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(CLIError, match=r"no image files \(.jpg .* .tiff\) in folder"):
        collect_images([str(tmp_path)])


@pytest.mark.parametrize("how", ["folder", "glob"])
def test_predict_on_a_folder_and_on_a_glob(model_and_checkpoint, photos, tmp_path, how):
    *_, checkpoint = model_and_checkpoint
    source = str(photos) + ("/" if how == "folder" else "/0*.png")
    out = tmp_path / "out"
    argv = [str(checkpoint), source, "--output_dir", str(out), "--batch_size", "3", *RUN]
    assert predict_main(argv) == 0
    listing = json.loads((out / "detections.json").read_text())
    expected = collect_images([source])
    assert [entry["image"] for entry in listing] == [str(p) for p in expected]
    assert len(listing) == (5 if how == "folder" else 4)
    for entry in listing:
        assert Path(entry["output"]).is_file() and len(entry["detections"]) == 5


def test_predict_nonexistent_path_is_one_line(model_and_checkpoint, tmp_path, capsys):
    *_, checkpoint = model_and_checkpoint
    argv = [str(checkpoint), str(tmp_path / "absent"), "--output_dir", str(tmp_path), *RUN]
    assert predict_main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"detr-irpe-predict: error: image file(s) not found: {tmp_path / 'absent'}\n"
    assert not (tmp_path / "detections.json").exists()


def test_predict_unreadable_image_is_one_line(model_and_checkpoint, tmp_path, capsys):
    *_, checkpoint = model_and_checkpoint
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    argv = [str(checkpoint), str(broken), "--output_dir", str(tmp_path / "o"), *RUN]
    assert predict_main(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1
    assert errors[0].startswith(f"detr-irpe-predict: error: cannot decode '{broken}'")


def run_detection(model_and_checkpoint, paths: list[Path], batch_size: int):
    from detr_irpe.data.transforms import make_transforms
    from detr_irpe.detector import Detector

    model, postprocessors, args, _ = model_and_checkpoint
    transform = make_transforms("val", args)
    detector = Detector(model, postprocessors["bbox"], transform, {}, "cpu", 0.0, batch_size)
    detections = detect_in_batches(detector, paths)
    return {index: result for index, _, result in detections}


def test_batches_give_the_detections_of_one_image_at_a_time(model_and_checkpoint, photos):
    # Three sizes: two copies of one image, two of another, and a third image.
    for name in ("000000000001.png", "000000000002.png"):
        shutil.copy(photos / name, photos / f"again_{name}")
    paths = collect_images([str(photos / "*.png")])
    assert len(paths) == 6
    single = run_detection(model_and_checkpoint, paths, batch_size=1)
    batched = run_detection(model_and_checkpoint, paths, batch_size=4)
    assert sorted(single) == sorted(batched) == list(range(len(paths)))
    for index in range(len(paths)):
        one, many = single[index], batched[index]
        assert torch.equal(one.labels, many.labels), paths[index]
        torch.testing.assert_close(one.scores, many.scores, atol=1e-5, rtol=0)
        torch.testing.assert_close(one.boxes, many.boxes, atol=1e-3, rtol=0)


def test_same_size_images_share_a_batch(model_and_checkpoint, photos, monkeypatch):

    for copy in range(5):
        shutil.copy(photos / "000000000001.png", photos / f"same_{copy}.png")
    paths = collect_images([str(photos / "same_*.png"), str(photos / "000000000002.png")])
    batch_sizes = []
    import detr_irpe.nested_tensor as nested_module

    real = nested_module.nested_tensor_from_tensor_list

    def spy(tensors):
        batch_sizes.append(len(tensors))
        return real(tensors)

    monkeypatch.setattr(nested_module, "nested_tensor_from_tensor_list", spy)
    run_detection(model_and_checkpoint, paths, batch_size=3)
    assert batch_sizes == [3, 2, 1]
