"""Nothing lost, nothing silent: a full disk, a read-only folder, divergence, an unreachable
URL, stale temporary files, and random command lines all end in one ``error:`` line, with
what was written before left intact."""

from __future__ import annotations

import errno
import os
import random
import shutil
from pathlib import Path

import pytest
from conftest import TINY_CLI_MODEL as MODEL
from conftest import TINY_CLI_RUN as RUN

from detr_irpe import atomic
from detr_irpe.checkpoint import read_checkpoint, save_checkpoint
from detr_irpe.cli.train import main as train_main

pytestmark = pytest.mark.usefixtures("one_thread")


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("detr-irpe-train: error: "), err
    return last


def test_a_full_disk_is_one_line_and_keeps_the_previous_checkpoint(
    one_epoch_run: Path,
    synthetic_coco_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = tmp_path / "run"
    shutil.copytree(one_epoch_run, run)
    before = (run / "checkpoint.pth").read_bytes()

    real_fsync = os.fsync

    def disk_full(fd: int) -> None:  # the data does not fit: the write's flush fails
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(".checkpoint.pth."):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(atomic.os, "fsync", disk_full)
    argv = [*RUN, "--coco_path", str(synthetic_coco_root), "--output_dir", str(run)]
    status = train_main([*argv, "--resume", str(run / "checkpoint.pth"), "--epochs", "2"])
    line = _error_line(capsys)
    assert status == 1 and "no space left" in line and "checkpoint.pth" in line
    assert (run / "checkpoint.pth").read_bytes() == before
    assert not list(run.glob(".*.tmp"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders")
def test_a_read_only_output_folder_is_refused_before_training(
    synthetic_coco_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        argv = [*MODEL, *RUN, "--coco_path", str(synthetic_coco_root), "--output_dir", str(out)]
        status = train_main(argv)
    finally:
        out.chmod(0o700)
    assert status == 1 and "is not writable" in _error_line(capsys)


def test_an_unwritable_output_folder_is_refused_before_training(
    synthetic_coco_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same check as a read-only folder (which root, running CI, may write to): a folder
    that cannot be created is found before any training."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = blocker / "sub"
    argv = [*MODEL, *RUN, "--coco_path", str(synthetic_coco_root), "--output_dir", str(out)]
    assert train_main(argv) == 1
    assert "is not writable" in _error_line(capsys)


def test_divergence_never_overwrites_the_good_checkpoint(
    one_epoch_run: Path,
    synthetic_coco_root: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A good checkpoint whose optimizer carries a learning rate of 1e30: the run stops with
    one line naming the epoch, and the good file stays as it was."""
    run = tmp_path / "run"
    shutil.copytree(one_epoch_run, run)
    state = read_checkpoint(run / "checkpoint.pth")
    for group in state["optimizer"]["param_groups"]:
        group["lr"] = 1e30
    save_checkpoint(run / "hot.pth", state)
    before = (run / "checkpoint.pth").read_bytes()
    argv = [*RUN, "--coco_path", str(synthetic_coco_root), "--output_dir", str(run)]
    status = train_main([*argv, "--resume", str(run / "hot.pth"), "--epochs", "2"])
    line = _error_line(capsys)
    assert status == 1 and "epoch 1" in line and "--lr" in line
    assert (run / "checkpoint.pth").read_bytes() == before


def test_an_unreachable_resume_url_is_one_line(
    synthetic_coco_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [*MODEL, *RUN, "--coco_path", str(synthetic_coco_root)]
    status = train_main([*argv, "--resume", "http://127.0.0.1:9/nowhere-4f2a.pth"])
    assert status == 1 and "cannot download" in _error_line(capsys)


def test_stale_temporaries_of_killed_writes_are_removed(
    one_epoch_run: Path, synthetic_coco_root: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(one_epoch_run, run)
    stale = run / ".checkpoint.pth.k1llED.tmp"
    stale.write_bytes(b"\0" * 1024)
    argv = [*RUN, "--coco_path", str(synthetic_coco_root), "--output_dir", str(run)]
    assert train_main([*argv, "--resume", str(run / "checkpoint.pth"), "--epochs", "1"]) == 0
    assert not stale.exists()


def _mutate(argv: list[str], rng: random.Random) -> list[str]:
    """One random edit of a command line: a value replaced, a token dropped or duplicated."""
    junk = ["0", "-1", "1e9", "nan", "", "x", "rpe-", "rpe-2.0-product", "--", "-3.5", "999999"]
    argv = list(argv)
    position = rng.randrange(len(argv))
    action = rng.choice(("replace", "drop", "duplicate", "insert"))
    if action == "replace":
        argv[position] = rng.choice(junk)
    elif action == "drop":
        del argv[position]
    elif action == "duplicate":
        argv.insert(position, argv[position])
    else:
        argv.insert(position, rng.choice(junk))
    return argv


def test_random_command_lines_parse_or_fail_in_one_line(
    synthetic_coco_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Mutated command lines (stopped before any training: --epochs 0 or a parse error) end
    in a parsed configuration or a one-line error, never a traceback."""
    from detr_irpe.cli.train import build_parser
    from detr_irpe.config import OptionError, parse_options, prepare_options

    base = [*MODEL, *RUN, "--coco_path", str(synthetic_coco_root), "--lr_drop", "3"]
    rng = random.Random(1234)
    outcomes = {"parsed": 0, "refused": 0}
    for _ in range(300):
        argv = _mutate(base, rng)
        try:
            args, _ = parse_options(build_parser(), argv)
        except SystemExit as exit_:
            assert exit_.code == 2
            err = capsys.readouterr().err
            assert "Traceback" not in err and "error:" in err.strip().splitlines()[-1]
            outcomes["refused"] += 1
            continue
        try:
            prepare_options(args)
            outcomes["parsed"] += 1
        except OptionError as err:
            assert "\n" not in str(err) and str(err)
            outcomes["refused"] += 1
    assert outcomes["parsed"] > 20 and outcomes["refused"] > 20, outcomes
