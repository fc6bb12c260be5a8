"""``--save_best`` and ``--early_stop`` of ``detr-irpe-train``, end to end on the tiny set."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from conftest import TINY_CLI_MODEL, TINY_CLI_RUN

from detr_irpe.best import BestTracker
from detr_irpe.checkpoint import read_checkpoint
from detr_irpe.cli.train import main as train_main


def test_tracker_counts_evaluations_without_improvement() -> None:
    best = BestTracker()
    assert best.update(0.1, 0) and not best.update(0.1, 1) and not best.update(0.05, 2)
    assert (best.best_ap, best.best_epoch, best.evals_since_best) == (0.1, 0, 2)
    assert best.update(0.2, 3) and best.evals_since_best == 0
    assert BestTracker.from_checkpoint(best.state_dict()) == best
    assert BestTracker.from_checkpoint({}) == BestTracker()


def test_save_best_and_early_stop(
    synthetic_coco_root: Path,
    tmp_path: Path,
    one_thread: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    out = tmp_path / "run"
    argv = [*TINY_CLI_MODEL, *TINY_CLI_RUN, "--coco_path", str(synthetic_coco_root)]
    # lr 0: the AP of epoch 0 is never beaten, so the second evaluation ends the run.
    flags = ["--lr", "0", "--epochs", "4", "--save_best", "--early_stop", "1"]
    with caplog.at_level(logging.INFO):
        assert train_main([*argv, "--output_dir", str(out), *flags]) == 0
    lines = (out / "log.txt").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1]
    best = read_checkpoint(out / "checkpoint_best.pth")
    last = read_checkpoint(out / "checkpoint.pth")
    assert best["epoch"] == 0 and best["best_epoch"] == 0 and best["evals_since_best"] == 0
    ap = json.loads(lines[0])["test_coco_eval_bbox"][0]
    assert best["best_ap"] == pytest.approx(ap) and 0 <= ap <= 1
    assert last["epoch"] == 1 and last["best_epoch"] == 0 and last["evals_since_best"] == 1
    assert "early stop after epoch 1" in caplog.text


def test_no_best_checkpoint_without_the_flag(one_epoch_run: Path) -> None:
    assert not (one_epoch_run / "checkpoint_best.pth").exists()
    state = read_checkpoint(one_epoch_run / "checkpoint.pth")
    assert state["best_epoch"] == 0 and state["evals_since_best"] == 0
