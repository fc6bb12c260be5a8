"""The programmes ``detr-irpe-train``, ``detr-irpe-eval`` and ``detr-irpe-predict`` end to end
(in-process through their ``main``), their files, and their error messages."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from detr_irpe.checkpoint import read_checkpoint
from detr_irpe.cli.evaluate import main as eval_main
from detr_irpe.cli.predict import main as predict_main
from detr_irpe.cli.train import main as train_main
from detr_irpe.config import NEW_OPTIONS, get_args_parser

# Tiny model and images; frozen backbone so that steps are fast.
TINY_CLI = [
    "--backbone", "resnet18", "--backbone_weights", "none", "--lr_backbone", "0",
    "--hidden_dim", "32", "--dim_feedforward", "64", "--enc_layers", "1", "--dec_layers", "2",
    "--nheads", "2", "--num_queries", "5", "--enc_rpe2d", "rpe-2.0-product-ctx-1-k",
    "--batch_size", "2", "--num_workers", "0", "--device", "cpu", "--no_progress",
    "--train_scales", "64", "80", "--train_max_size", "128",
    "--val_size", "80", "--val_max_size", "128",
]  # fmt: skip
# Options of the run, not of the model: what eval/predict take from the command line.
RUN_OPTIONS = ["--device", "cpu", "--num_workers", "0", "--no_progress", "--batch_size", "2"]


def original_train_keys(num_aux: int) -> set[str]:
    """``train_*`` keys of the original's log.txt."""
    suffixes = ["", *[f"_{i}" for i in range(num_aux)]]
    weighted = {f"{k}{s}" for k in ("loss_ce", "loss_bbox", "loss_giou") for s in suffixes}
    raw = weighted | {f"cardinality_error{s}" for s in suffixes} | {"class_error"}
    return {"lr", "class_error", "loss"} | weighted | {f"{k}_unscaled" for k in raw}


# One intra-op thread (the conftest fixture): much faster on a shared, busy machine.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained_run(synthetic_coco_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Output folder of a one-epoch training run (``--lr_drop 1``: numbered checkpoint too)."""
    out = tmp_path_factory.mktemp("trained_run")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    argv = [*TINY_CLI, "--coco_path", str(synthetic_coco_root), "--output_dir", str(out)]
    status = train_main([*argv, "--epochs", "1", "--lr_drop", "1"])
    torch.set_num_threads(threads)
    assert status == 0
    return out


def test_training_writes_the_original_files(trained_run: Path) -> None:
    assert (trained_run / "checkpoint.pth").is_file()
    assert (trained_run / "checkpoint0000.pth").is_file()  # (epoch + 1) % lr_drop == 0
    assert (trained_run / "eval" / "latest.pth").is_file()
    assert (trained_run / "eval" / "000.pth").is_file()
    assert not list(trained_run.glob("*.tmp")) and not list(trained_run.glob(".*.tmp"))

    lines = (trained_run / "log.txt").read_text().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    train_keys = original_train_keys(num_aux=1)
    test_keys = train_keys - {"lr"}
    expected = (
        {f"train_{k}" for k in train_keys}
        | {f"test_{k}" for k in test_keys}
        | {"test_coco_eval_bbox", "epoch", "n_parameters"}
    )
    assert expected <= set(record)
    assert record["epoch"] == 0 and len(record["test_coco_eval_bbox"]) == 12
    # Timing of the phases, for throughput work.
    assert record["train_iter_time"] >= record["train_data_time"] >= 0

    state = read_checkpoint(trained_run / "checkpoint.pth")  # weights_only=True
    assert state["epoch"] == 0
    assert {"model", "optimizer", "lr_scheduler", "args", "class_names"} <= set(state)
    assert state["args"]["enc_rpe2d"] == "rpe-2.0-product-ctx-1-k"
    assert state["args"]["num_classes"] == 5  # categories 1..4 of the synthetic data
    assert state["class_names"] == {1: "circle", 2: "square", 3: "triangle", 4: "cross"}
    assert state["lr_scheduler"]["last_epoch"] == 1  # stepped after the epoch, as the original
    eval_state = torch.load(trained_run / "eval" / "latest.pth", weights_only=False)
    assert eval_state["precision"].shape[0] == 10  # IoU thresholds 0.50:0.05:0.95


@pytest.fixture(scope="module")
def eval_resume_report(
    trained_run: Path, synthetic_coco_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict:
    """``detr-irpe-train --eval --resume checkpoint.pth``, the README's evaluation command."""
    out = tmp_path_factory.mktemp("eval_resume")
    checkpoint = str(trained_run / "checkpoint.pth")
    argv = [*TINY_CLI, "--coco_path", str(synthetic_coco_root), "--output_dir", str(out)]
    assert train_main([*argv, "--eval", "--resume", checkpoint]) == 0
    assert (out / "eval.pth").is_file()
    assert not (out / "checkpoint.pth").exists()
    return json.loads((out / "eval_stats.json").read_text())


def test_eval_resume_writes_eval_files(eval_resume_report: dict, trained_run: Path) -> None:
    assert len(eval_resume_report["coco_eval_bbox"]) == 12
    assert set(eval_resume_report["metrics"]) >= {"AP", "AP50", "AR100"}
    assert eval_resume_report["epoch"] == 0
    # The same weights on the same images as the training run's evaluation.
    logged = json.loads((trained_run / "log.txt").read_text().splitlines()[-1])
    assert eval_resume_report["coco_eval_bbox"] == pytest.approx(logged["test_coco_eval_bbox"])
    assert eval_resume_report["losses"]["loss"] == pytest.approx(logged["test_loss"], rel=1e-5)


def test_eval_cli_takes_the_model_from_the_checkpoint(
    trained_run: Path,
    synthetic_coco_root: Path,
    eval_resume_report: dict,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    output = tmp_path / "stats.json"
    argv = [str(trained_run / "checkpoint.pth"), "--coco_path", str(synthetic_coco_root)]
    assert eval_main([*argv, *RUN_OPTIONS, "--output", str(output)]) == 0
    table = capsys.readouterr().out
    assert "AP50" in table and "AR100" in table and len(table.splitlines()) == 13
    report = json.loads(output.read_text())
    assert report["coco_eval_bbox"] == pytest.approx(eval_resume_report["coco_eval_bbox"])
    assert report["checkpoint"].endswith("checkpoint.pth")


def test_eval_cli_reads_an_original_checkpoint(
    trained_run: Path, synthetic_coco_root: Path, eval_resume_report: dict, tmp_path: Path
) -> None:
    """A checkpoint as the original main.py writes it: ``args`` is a pickled Namespace with
    only the original's options (no num_classes, no image-size options)."""
    state = read_checkpoint(trained_run / "checkpoint.pth")
    original_names = set(vars(get_args_parser().parse_args([]))) - set(NEW_OPTIONS)
    original_names |= {"rank", "world_size", "gpu", "distributed"}
    args = argparse.Namespace(**{k: v for k, v in state["args"].items() if k in original_names})
    original = {k: state[k] for k in ("model", "optimizer", "lr_scheduler", "epoch")}
    original["args"] = args
    path = tmp_path / "rpe-original.pth"
    torch.save(original, path)

    output = tmp_path / "stats.json"
    # Image sizes are this package's options (the original always used 800/1333).
    sizes = ["--val_size", "80", "--val_max_size", "128"]
    argv = [str(path), "--coco_path", str(synthetic_coco_root), "--output", str(output)]
    assert eval_main([*argv, *RUN_OPTIONS, *sizes]) == 0
    report = json.loads(output.read_text())
    assert report["coco_eval_bbox"] == pytest.approx(eval_resume_report["coco_eval_bbox"])


def test_predict_cli_draws_pngs(
    trained_run: Path, synthetic_coco_root: Path, tmp_path: Path
) -> None:
    images = sorted((synthetic_coco_root / "val2017").iterdir())[:2]
    out = tmp_path / "pred"
    argv = [str(trained_run / "checkpoint.pth"), *map(str, images), "--output_dir", str(out)]
    assert predict_main([*argv, "--threshold", "0", "--device", "cpu"]) == 0
    listing = json.loads((out / "detections.json").read_text())
    assert [Path(entry["image"]).name for entry in listing] == [p.name for p in images]
    for image, entry in zip(images, listing, strict=True):
        with Image.open(entry["output"]) as drawn, Image.open(image) as source:
            assert drawn.format == "PNG" and drawn.size == source.size
        assert len(entry["detections"]) == 5  # every query passes threshold 0
        names = {d["name"] for d in entry["detections"]}
        assert names <= {"circle", "square", "triangle", "cross"}  # from the checkpoint
        w, h = Image.open(image).size
        for det in entry["detections"]:
            x0, y0, x1, y1 = det["box"]
            assert -1e-3 <= x0 <= x1 <= w + 1e-3 and -1e-3 <= y0 <= y1 <= h + 1e-3


def _train_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    status = train_main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return status, err


def test_missing_coco_path_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    status, err = _train_error([*TINY_CLI], capsys)
    assert status == 2 and "detr-irpe-train: error: --coco_path is required" in err


def test_missing_resume_file(synthetic_coco_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [*TINY_CLI, "--coco_path", str(synthetic_coco_root), "--resume", "nowhere/ck.pth"]
    status, err = _train_error(argv, capsys)
    assert status == 2 and "--resume file not found: 'nowhere/ck.pth'" in err


def test_bad_enc_rpe2d_names_the_field(
    synthetic_coco_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        *TINY_CLI,
        "--coco_path",
        str(synthetic_coco_root),
        "--enc_rpe2d",
        "rpe-2.0-prod-ctx-1-k",
    ]
    status, err = _train_error(argv, capsys)
    assert status == 2 and "--enc_rpe2d" in err and "method" in err


def test_fp16_on_cpu_is_refused(
    synthetic_coco_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [*TINY_CLI, "--coco_path", str(synthetic_coco_root), "--amp", "fp16"]
    status, err = _train_error(argv, capsys)
    assert status == 2 and "--amp fp16 needs a CUDA device" in err


def test_unknown_flag_exits_with_usage() -> None:
    with pytest.raises(SystemExit) as info:
        train_main(["--no_such_flag"])
    assert info.value.code == 2


def test_malformed_annotations_are_reported(
    synthetic_coco_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "coco"
    shutil.copytree(synthetic_coco_root, root)
    (root / "annotations" / "instances_val2017.json").write_text('{"images": [')
    argv = [*TINY_CLI, "--coco_path", str(root), "--num_classes", "5", "--epochs", "1"]
    status, err = _train_error(argv, capsys)
    assert status == 1 and "instances_val2017.json" in err and "not valid JSON" in err


def test_truncated_checkpoint_is_reported(
    trained_run: Path, synthetic_coco_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "broken.pth"
    broken.write_bytes((trained_run / "checkpoint.pth").read_bytes()[:5000])
    status = eval_main([str(broken), "--coco_path", str(synthetic_coco_root), *RUN_OPTIONS])
    err = capsys.readouterr().err
    assert status == 1 and "broken.pth" in err and "Traceback" not in err


def test_eval_with_the_wrong_model_options(
    trained_run: Path, synthetic_coco_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [str(trained_run / "checkpoint.pth"), "--coco_path", str(synthetic_coco_root)]
    status = eval_main([*argv, *RUN_OPTIONS, "--enc_rpe2d", ""])  # the checkpoint has iRPE
    err = capsys.readouterr().err
    assert status == 2 and "does not fit" in err and "--enc_rpe2d" in err


def test_predict_missing_image(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [str(trained_run / "checkpoint.pth"), "missing.jpg", "--output_dir", str(tmp_path)]
    assert predict_main(argv) == 2
    assert "image file(s) not found: missing.jpg" in capsys.readouterr().err


def test_console_script_exit_status(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "detr-irpe-train"
    if not script.exists():
        pytest.skip("console scripts not installed in this environment")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [str(script), "--coco_path", str(tmp_path / "absent"), "--device", "cpu"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 2
    assert "is not a directory" in result.stderr and "Traceback" not in result.stderr
