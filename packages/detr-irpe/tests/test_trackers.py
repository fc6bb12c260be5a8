"""Experiment trackers (``detr_irpe.utils.trackers``): ``--mlflow`` against a local file
store, ``--wandb`` through a stand-in module that records the calls (and, when ``wandb`` is
installed, the real package in offline mode), and the option checks."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest
from conftest import TINY_CLI_MODEL as MODEL
from conftest import TINY_CLI_RUN as RUN
from PIL import Image

from detr_irpe.cli.train import main as train_main
from detr_irpe.config import OptionError
from detr_irpe.evaluation.per_class_chart import save_per_class_chart
from detr_irpe.utils.trackers import WandbTracker, numeric_metrics, per_class_metrics

TABLE = {
    "circle": {"AP": 0.5, "AP50": 0.75, "AP75": 0.5, "n_gt": 2},
    "unicorn": {"AP": -1.0, "AP50": -1.0, "AP75": -1.0, "n_gt": 0},
}


class _FakeRun:
    def __init__(self, calls: list[tuple[str, Any]]) -> None:
        self.calls = calls
        self.config = types.SimpleNamespace(update=lambda d, **kw: calls.append(("config", d)))

    def log(self, data: dict[str, Any], step: int) -> None:
        self.calls.append(("log", (step, data)))

    def finish(self, exit_code: int = 0) -> None:
        self.calls.append(("finish", exit_code))


def _fake_wandb() -> types.ModuleType:
    """A module named ``wandb`` whose ``init`` returns a run that records every call."""
    module = types.ModuleType("wandb")
    module.__spec__ = importlib.machinery.ModuleSpec("wandb", None)  # found by find_spec
    module.calls = []  # type: ignore[attr-defined]

    def init(**kwargs: Any) -> _FakeRun:
        module.calls.append(("init", kwargs))  # type: ignore[attr-defined]
        return _FakeRun(module.calls)  # type: ignore[attr-defined]

    def image(data: Any, caption: str | None = None) -> tuple[str, Any]:
        # A file by its name, a PIL image by its size.
        return ("image", Path(data).name if isinstance(data, str) else data.size)

    module.init = init  # type: ignore[attr-defined]
    module.Image = image  # type: ignore[attr-defined]
    return module


def test_numeric_metrics_names_the_coco_numbers_and_drops_the_rest() -> None:
    record = {
        "train_loss": 1.5, "epoch": 3, "test_coco_eval_bbox": [0.25] * 11 + [float("nan")],
        "flag": True, "note": "text", "pair": [1.0, 2.0], "bad": float("inf"),
    }  # fmt: skip
    metrics = numeric_metrics(record)
    assert metrics["train_loss"] == 1.5 and metrics["epoch"] == 3.0
    assert metrics["test_coco_eval_bbox/AP"] == 0.25 and metrics["test_coco_eval_bbox/ARm"] == 0.25
    assert "test_coco_eval_bbox/ARl" not in metrics  # not finite
    assert metrics["pair/0"] == 1.0 and metrics["pair/1"] == 2.0
    assert not {"flag", "note", "bad"} & set(metrics)
    assert per_class_metrics(TABLE) == {"AP_per_class/circle": 0.5}


def test_one_epoch_logs_to_mlflow_wandb_and_tensorboard(
    synthetic_coco_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None
) -> None:
    mlflow = pytest.importorskip("mlflow")
    tensorboard = importlib.util.find_spec("tensorboard") is not None  # not in CI's stack
    wandb = _fake_wandb()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.chdir(tmp_path)  # --mlflow without a value: ./mlruns
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")  # set by the tracker, undone after the test
    out = tmp_path / "run"
    argv = [*MODEL, *RUN, "--coco_path", str(synthetic_coco_root), "--output_dir", str(out)]
    flags = ["--epochs", "1", "--mlflow", "--wandb", *(["--tensorboard"] if tensorboard else [])]
    assert train_main([*argv, *flags]) == 0

    record = json.loads((out / "log.txt").read_text().splitlines()[-1])
    table = json.loads((out / "ap_per_class.json").read_text())
    expected_per_class = per_class_metrics(table)
    assert expected_per_class  # the run evaluated classes with ground truth

    client = mlflow.tracking.MlflowClient(str(tmp_path / "mlruns"))
    (experiment,) = [e for e in client.search_experiments() if e.name == "detr-irpe"]
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["enc_rpe2d"] == "rpe-2.0-product-ctx-1-k"
    assert run.data.params["hidden_dim"] == "32" and run.data.params["wandb"] == "True"
    metrics = run.data.metrics
    assert metrics["train_loss"] == pytest.approx(record["train_loss"])
    assert metrics["test_coco_eval_bbox/AP"] == pytest.approx(record["test_coco_eval_bbox"][0])
    for key, value in expected_per_class.items():
        assert metrics[key] == pytest.approx(value)
    (history,) = client.get_metric_history(run.info.run_id, "train_loss")
    assert history.step == 0
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"ap_per_class.png", "ap_per_class.json", "images"} <= artifacts  # images: per step
    images = {a.path.split("+")[0] for a in client.list_artifacts(run.info.run_id, "images")}
    first_val = sorted((synthetic_coco_root / "val2017").iterdir())[0].stem
    assert {"images/ap_per_class", f"images/predictions_{first_val}"} <= images

    kinds = [kind for kind, _ in wandb.calls]  # type: ignore[attr-defined]
    assert kinds == ["init", "config", "log", "log", "log", "finish"]
    init, config, epoch, evaluation, predictions, finish = wandb.calls  # type: ignore[attr-defined]
    (step, epoch_log), (step2, eval_log), (step3, drawn) = epoch[1], evaluation[1], predictions[1]
    assert init[1]["name"] == "run" and init[1]["project"] == "detr-irpe"
    assert config[1]["lr_drop"] == "200"
    assert step == step2 == step3 == 0
    assert len(drawn["predictions"]) == 4  # the first 4 validation images, at their size
    with Image.open(synthetic_coco_root / "val2017" / f"{first_val}.png") as image:
        assert drawn["predictions"][0] == ("image", image.size)
    assert epoch_log["train_loss"] == pytest.approx(record["train_loss"])
    assert eval_log == {**expected_per_class, "ap_per_class": ("image", "ap_per_class.png")}
    assert finish[1] == 0

    if tensorboard:
        events = list((out / "tensorboard").iterdir())
        assert events and all(e.stat().st_size > 0 for e in events)


def test_wandb_offline_writes_the_run_to_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    chart = save_per_class_chart(TABLE, tmp_path / "ap_per_class.png")
    tracker = WandbTracker("offline-test", tmp_path / "unused")
    tracker.log_params({"lr": "0.0001"})
    tracker.write({"train_loss": 1.25, "test_coco_eval_bbox": [0.5] * 12}, step=0)
    tracker.log_evaluation(TABLE, chart, step=0)
    tracker.close()
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    assert list(run_dir.glob("run-*.wandb"))
    (image,) = (run_dir / "files" / "media" / "images").glob("ap_per_class_*.png")
    assert image.stat().st_size > 0
    assert not (tmp_path / "unused").exists()  # WANDB_DIR wins over the output folder


@pytest.mark.parametrize(("flag", "module"), [("--mlflow", "mlflow"), ("--wandb", "wandb")])
def test_a_tracker_without_its_package_is_a_one_line_error(
    flag: str,
    module: str,
    synthetic_coco_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # find_spec: not installed
    argv = [*MODEL, *RUN, "--coco_path", str(synthetic_coco_root), flag]
    assert train_main([*argv, "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    expected = f"{flag} needs the {module} package: pip install 'detr-irpe[{module}]'"
    assert err[-1] == f"detr-irpe-train: error: {expected}"
    assert not (tmp_path / "out" / "log.txt").exists()
    assert train_main(argv) == 2  # and the folder the charts are written to
    assert f"{flag} needs --output_dir" in capsys.readouterr().err


def test_the_option_check_refuses_before_any_work(make_args: Any, tmp_path: Path) -> None:
    from detr_irpe.config import prepare_options

    args = make_args("--mlflow", str(tmp_path / "store"))
    assert args.mlflow == str(tmp_path / "store")
    assert make_args("--mlflow", "--output_dir", "x").mlflow == "./mlruns"
    assert make_args().mlflow is None and make_args().wandb is False
    with pytest.raises(OptionError, match="--mlflow needs --output_dir"):
        prepare_options(args)
    prepare_options(make_args())  # no tracker: accepted


def test_tensorboard_gets_the_per_class_scalars_and_chart(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from detr_irpe.utils.run_log import TensorBoardLog

    chart = save_per_class_chart(TABLE, tmp_path / "ap_per_class.png")
    log = TensorBoardLog(tmp_path / "tb")
    log.write({"train_loss": 1.0}, step=0)
    log.log_evaluation(TABLE, chart, step=0)
    log.log_images("predictions", {"a.png": Image.new("RGB", (8, 6))}, step=0)
    log.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = events.Tags()
    assert sorted(tags["images"]) == ["ap_per_class", "predictions/a.png"]
    assert set(tags["scalars"]) == {"train_loss", "AP_per_class/circle"}
    assert events.Scalars("AP_per_class/circle")[0].value == 0.5


def test_a_run_that_fails_closes_its_trackers_as_failed(
    synthetic_coco_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None
) -> None:
    from detr_irpe import training

    wandb = _fake_wandb()
    monkeypatch.setitem(sys.modules, "wandb", wandb)

    def fail(*args: Any, **kwargs: Any) -> None:
        raise MemoryError("out of memory in the first epoch")

    monkeypatch.setattr(training, "train_epoch", fail)
    argv = [*MODEL, *RUN, "--coco_path", str(synthetic_coco_root), "--wandb"]
    with pytest.raises(MemoryError, match="first epoch"):  # the run's own error, unmasked
        train_main([*argv, "--output_dir", str(tmp_path / "out")])
    assert wandb.calls[-1] == ("finish", 1)  # type: ignore[attr-defined]
