"""The programmes' boundary: options completed and checked once, model options taken from the
checkpoint (resume, fine-tune, eval), contradictions and impossible values refused in one
line, and a ``--help`` that does not load torch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_CLI_MODEL as MODEL
from conftest import TINY_CLI_RUN as RUN

from detr_irpe.checkpoint import model_from_checkpoint, read_checkpoint
from detr_irpe.cli.train import main as train_main

pytestmark = pytest.mark.usefixtures("one_thread")


def _train(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """``(exit status, the error line)``; fails on a traceback (log lines may come first)."""
    status = train_main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("detr-irpe-train: error: "), err
    return status, lines[-1]


def test_finetune_without_model_flags_keeps_the_checkpoint_architecture(
    one_epoch_run: Path, synthetic_coco_root: Path, tmp_path: Path
) -> None:
    out = tmp_path / "tuned"
    argv = [*RUN, "--coco_path", str(synthetic_coco_root), "--output_dir", str(out)]
    assert (
        train_main([*argv, "--finetune", str(one_epoch_run / "checkpoint.pth"), "--epochs", "1"])
        == 0
    )
    before = read_checkpoint(one_epoch_run / "checkpoint.pth")
    after = read_checkpoint(out / "checkpoint.pth")
    for name in ("backbone", "hidden_dim", "enc_layers", "dec_layers", "nheads", "enc_rpe2d"):
        assert after["args"][name] == before["args"][name], name
    assert after["model"].keys() == before["model"].keys()
    assert after["epoch"] == 0  # a new training, not a resumed one


def test_finetune_refuses_a_contradicting_model_flag(
    one_epoch_run: Path, synthetic_coco_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [*RUN, "--coco_path", str(synthetic_coco_root), "--hidden_dim", "64"]
    status, err = _train([*argv, "--finetune", str(one_epoch_run / "checkpoint.pth")], capsys)
    assert status == 2
    assert "--hidden_dim 64" in err and "32" in err


def test_finetune_may_change_the_class_count_only(
    one_epoch_run: Path, synthetic_coco_root: Path, tmp_path: Path
) -> None:
    out = tmp_path / "tuned"
    argv = [*RUN, "--coco_path", str(synthetic_coco_root), "--output_dir", str(out)]
    finetune = ["--finetune", str(one_epoch_run / "checkpoint.pth"), "--epochs", "1"]
    assert train_main([*argv, *finetune, "--num_classes", "9"]) == 0
    assert read_checkpoint(out / "checkpoint.pth")["model"]["class_embed.weight"].shape[0] == 10


def test_finetune_that_would_leave_more_than_the_class_head_untrained_is_an_error(
    one_epoch_run: Path,
    synthetic_coco_root: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    state = read_checkpoint(one_epoch_run / "checkpoint.pth")
    state["model"] = {k: v for k, v in state["model"].items() if "decoder.layers.1." not in k}
    torch.save(state, tmp_path / "partial.pth")
    argv = [
        *RUN,
        "--coco_path",
        str(synthetic_coco_root),
        "--finetune",
        str(tmp_path / "partial.pth"),
    ]
    status, err = _train(argv, capsys)
    assert status == 1 and "does not fit" in err and "decoder.layers.1." in err


def test_resume_takes_the_architecture_from_the_checkpoint(
    one_epoch_run: Path, synthetic_coco_root: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(one_epoch_run, run)
    argv = [*RUN, "--coco_path", str(synthetic_coco_root), "--output_dir", str(run)]
    assert train_main([*argv, "--resume", str(run / "checkpoint.pth"), "--epochs", "2"]) == 0
    state = read_checkpoint(run / "checkpoint.pth")
    assert state["epoch"] == 1 and state["args"]["hidden_dim"] == 32


def test_resume_restores_the_log_record_a_kill_lost(
    one_epoch_run: Path, synthetic_coco_root: Path, tmp_path: Path
) -> None:
    """Killed between the checkpoint's rename and its log line: the resumed run writes it."""
    run = tmp_path / "run"
    shutil.copytree(one_epoch_run, run)
    (run / "log.txt").write_text("")
    argv = [*RUN, "--coco_path", str(synthetic_coco_root), "--output_dir", str(run)]
    assert train_main([*argv, "--resume", str(run / "checkpoint.pth"), "--epochs", "2"]) == 0
    epochs = [json.loads(line)["epoch"] for line in (run / "log.txt").read_text().splitlines()]
    assert epochs == [0, 1]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--num_queries", "0"], "--num_queries must be at least 1"),
        (["--nheads", "0"], "--nheads must be at least 1"),
        (["--hidden_dim", "0"], "--hidden_dim must be at least 1"),
        (["--hidden_dim", "30", "--nheads", "4"], "not divisible by --nheads 4"),
        (["--device", "meta"], "--device meta"),
        (["--masks"], "--masks"),
        (["--epochs", "0"], "--epochs must be at least 1"),
    ],
)
def test_impossible_options_are_one_line_usage_errors(
    flags: list[str],
    message: str,
    synthetic_coco_root: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    status, err = _train([*MODEL, *RUN, "--coco_path", str(synthetic_coco_root), *flags], capsys)
    assert status == 2 and message in err


def test_output_dir_that_is_a_file_is_refused_before_training(
    synthetic_coco_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "a_file"
    target.write_text("x")
    argv = [*MODEL, *RUN, "--coco_path", str(synthetic_coco_root), "--output_dir", str(target)]
    status, err = _train(argv, capsys)
    assert status == 1 and "is a file, not a folder" in err and str(target) in err


def test_backbone_weights_that_are_not_a_state_dict(
    synthetic_coco_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    weights = tmp_path / "weights.pth"
    torch.save([1, 2, 3], weights)
    argv = [*MODEL, *RUN, "--coco_path", str(synthetic_coco_root)]
    status, err = _train([*argv, "--backbone_weights", str(weights)], capsys)
    assert status == 1 and "does not hold a state dict" in err


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda s: s.update(epoch=-5), "'epoch' must be a non-negative integer"),
        (lambda s: s.update(lr_scheduler="garbage"), "'lr_scheduler' is not a scheduler state"),
        (lambda s: s["lr_scheduler"].update(step_size="x"), "step_size"),
        (
            lambda s: s["optimizer"]["state"][0].update(exp_avg=torch.zeros(3, 3, 3)),
            "has shape (3, 3, 3)",
        ),
    ],
)
def test_resume_of_a_corrupt_training_state_says_what_is_wrong(
    corrupt,
    message: str,
    one_epoch_run: Path,
    synthetic_coco_root: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    state = read_checkpoint(one_epoch_run / "checkpoint.pth")
    corrupt(state)
    torch.save(state, tmp_path / "bad.pth")
    argv = [*RUN, "--coco_path", str(synthetic_coco_root), "--resume", str(tmp_path / "bad.pth")]
    status, err = _train(argv, capsys)
    assert status == 1 and message in err and "bad.pth" in err


def test_model_from_checkpoint_rebuilds_the_trained_model(one_epoch_run: Path) -> None:
    loaded = model_from_checkpoint(one_epoch_run / "checkpoint.pth", {"device": "cpu"})
    assert loaded.args.hidden_dim == 32 and loaded.args.enc_rpe2d == "rpe-2.0-product-ctx-1-k"
    assert not loaded.model.training
    state = read_checkpoint(one_epoch_run / "checkpoint.pth")["model"]
    for name, tensor in loaded.model.state_dict().items():
        assert torch.equal(tensor, state[name]), name


def test_help_does_not_import_torch() -> None:
    """``--help`` (and flag errors) answer before torch and the models are loaded."""
    probe = (
        "import sys\n"
        "from detr_irpe.cli import demo, evaluate, plot, predict, synthetic, train\n"
        "for cli in (train, evaluate, predict):\n"
        "    cli.build_parser().format_help()\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", probe], check=True, timeout=120)


def test_custom_annotation_and_image_names(
    synthetic_coco_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A set that does not follow the instances_{train,val}2017.json naming trains with
    --train_ann/--val_ann/--train_images/--val_images (relative to --coco_path)."""
    root = tmp_path / "custom"
    (root / "labels").mkdir(parents=True)
    shutil.copy(
        synthetic_coco_root / "annotations/instances_train2017.json", root / "labels/tr.json"
    )
    shutil.copy(synthetic_coco_root / "annotations/instances_val2017.json", root / "labels/va.json")
    shutil.copytree(synthetic_coco_root / "train2017", root / "pics_train")
    shutil.copytree(synthetic_coco_root / "val2017", root / "pics_val")
    names = ["--train_ann", "labels/tr.json", "--val_ann", "labels/va.json"]
    names += ["--train_images", "pics_train", "--val_images", "pics_val"]
    out = tmp_path / "run"
    argv = [*MODEL, *RUN, "--coco_path", str(root), *names, "--output_dir", str(out)]
    assert train_main([*argv, "--epochs", "1"]) == 0
    assert read_checkpoint(out / "checkpoint.pth")["class_names"]
    status, err = _train([*MODEL, *RUN, "--coco_path", str(root), "--epochs", "1"], capsys)
    assert status == 1 and "instances_train2017.json" in err  # the default names are absent
