"""``--config FILE.yaml`` of ``detr-irpe-train`` and the ``config.yaml`` each run writes."""

from __future__ import annotations

from pathlib import Path

import pytest

from detr_irpe.checkpoint import read_checkpoint
from detr_irpe.cli.train import build_parser
from detr_irpe.cli.train import main as train_main
from detr_irpe.config import parse_options


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "options.yaml"
    path.write_text(text)
    return path


def test_file_values_are_defaults_and_the_command_line_wins(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "lr: 1.0e-3\nepochs: 7\nno_flip_aug: true\ntrain_scales: [64, 80]\n"
        "amp: bf16\nema_decay: 0.99\nbatch_size: '3'\n",
    )
    args, given = parse_options(build_parser(), ["--config", str(path), "--epochs", "9"])
    assert args.lr == 1e-3 and args.epochs == 9 and args.flip_aug is False
    assert args.train_scales == [64, 80] and args.amp == "bf16" and args.ema_decay == 0.99
    assert args.batch_size == 3 and args.crop_aug is True
    assert given == {"config", "epochs"}
    # The parser's own defaults are untouched for the next parse.
    assert parse_options(build_parser(), [])[0].epochs == 300


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("lr: 0.1\nlearning_rate: 0.1\n", "unknown option 'learning_rate'"),
        ("amp: fp8\n", "'amp' must be one of off, bf16, fp16"),
        ("epochs: many\n", "'epochs' has a bad value 'many'"),
        ("ema: 3\n", "'ema' must be true or false"),
        ("- lr\n", "expected a mapping"),
        ("lr: [1\n", "not valid YAML"),
    ],
)
def test_bad_files_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, expected: str
) -> None:
    path = _write(tmp_path, text)
    assert train_main(["--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("detr-irpe-train: error: "), err
    assert expected in err[0] and str(path) in err[0]


def test_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert train_main(["--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml: cannot read it" in capsys.readouterr().err


def test_a_run_writes_a_config_that_repeats_it(one_epoch_run: Path) -> None:
    path = one_epoch_run / "config.yaml"
    args, _ = parse_options(build_parser(), ["--config", str(path)])
    stored = read_checkpoint(one_epoch_run / "checkpoint.pth")["args"]
    for name, value in vars(args).items():
        if name != "config":
            assert value == stored[name], name
