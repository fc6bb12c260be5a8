"""Metric meters, the timed logging loop, ``log.txt`` lines and the one-process collectives."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
from pathlib import Path

import pytest
import torch

from detr_irpe.utils.distributed import all_gather_object, get_world_size, reduce_dict
from detr_irpe.utils.meters import MetricLogger, SmoothedValue
from detr_irpe.utils.run_log import JsonLinesLog, TensorBoardLog


def test_smoothed_value_window_and_global_average() -> None:
    meter = SmoothedValue(window_size=3)
    for value in [1.0, 2.0, 10.0, 4.0]:
        meter.update(value)
    assert meter.median == 4.0  # window [2, 10, 4]
    assert meter.avg == pytest.approx(16 / 3)
    assert meter.global_avg == pytest.approx(17 / 4)
    assert meter.max == 10.0 and meter.value == 4.0
    meter.update(0.0, n=4)  # a batch mean over 4 items weighs 4
    assert meter.global_avg == pytest.approx(17 / 8)
    assert math.isnan(SmoothedValue().global_avg)


def test_log_every_yields_everything_and_times_the_phases(
    caplog: pytest.LogCaptureFixture,
) -> None:
    metrics = MetricLogger()
    seen = []
    with caplog.at_level(logging.INFO, logger="detr_irpe.utils.meters"):
        for item in metrics.log_every(range(7), print_freq=3, header="Epoch: [0]"):
            metrics.update(loss=float(item), lr=0.1)
            seen.append(item)
    assert seen == list(range(7))
    assert metrics.data_time.count == 7 and metrics.iter_time.count == 7
    assert metrics.iterations == 7
    assert metrics.global_averages() == {"loss": 3.0, "lr": pytest.approx(0.1)}
    lines = [r.getMessage() for r in caplog.records]
    # stderr is not a terminal under pytest: line logging at 0, 3, 6 and a summary.
    progress = [line for line in lines if line.startswith("Epoch: [0]  [")]
    assert [line.split("]  [")[1].split("/")[0].strip() for line in progress] == ["0", "3", "6"]
    assert all("eta:" in line and "data:" in line for line in progress)
    assert any("Total time" in line for line in lines)


def test_json_lines_log_appends_plain_json(tmp_path: Path) -> None:
    log = JsonLinesLog(tmp_path / "out" / "log.txt")
    log.write({"epoch": 0, "train_loss": torch.tensor(1.5), "test_coco_eval_bbox": [0.1] * 12})
    log.write({"epoch": 1, "train_loss": 1.25})
    lines = (tmp_path / "out" / "log.txt").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1]
    assert json.loads(lines[0])["train_loss"] == 1.5


def test_tensorboard_log_needs_tensorboard(tmp_path: Path) -> None:
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(RuntimeError, match="pip install"):
            TensorBoardLog(tmp_path)
    else:
        log = TensorBoardLog(tmp_path)
        log.write({"train_loss": 1.0, "test_coco_eval_bbox": [0.5] * 12}, step=0)
        log.close()
        assert any(tmp_path.iterdir())


def test_collectives_without_a_process_group() -> None:
    values = {"a": torch.tensor(1.0), "b": torch.tensor(2.0)}
    assert get_world_size() == 1
    assert reduce_dict(values) is values
    assert all_gather_object({"x": 1}) == [{"x": 1}]


def test_old_import_path_re_exports_the_split_modules() -> None:
    from detr_irpe.utils import logging as old
    from detr_irpe.utils import meters, run_log

    assert old.MetricLogger is meters.MetricLogger and old.SmoothedValue is meters.SmoothedValue
    assert old.JsonLinesLog is run_log.JsonLinesLog
    assert old.TensorBoardLog is run_log.TensorBoardLog
    assert old.to_jsonable is run_log.to_jsonable
