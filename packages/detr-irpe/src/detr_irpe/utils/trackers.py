"""Experiment trackers of a training run: MLflow (``--mlflow``) and Weights & Biases (``--wandb``).

Every tracker is one :class:`Tracker` subclass with the same four calls, which rank 0's
:class:`~detr_irpe.training.RunLogs` makes (``TensorBoardLog`` in ``run_log`` is one too):

* :meth:`Tracker.log_params` once, with the run's options;
* :meth:`Tracker.write` every epoch, with the ``log.txt`` record;
* :meth:`Tracker.log_evaluation` after each evaluation, with the per-class AP table and its
  chart ``ap_per_class.png``;
* :meth:`Tracker.log_images` after each evaluation, with the detections drawn on the first
  validation images (:mod:`detr_irpe.preview`);
* :meth:`Tracker.close` at the end (``failed=True`` when the run stopped on an error).

The tracker packages are optional extras (``detr-irpe[mlflow]``, ``detr-irpe[wandb]``),
imported only when their flag is given; ``config.check_run_options`` refuses a flag whose
package is missing before anything starts.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from detr_irpe.evaluation.coco_eval import COCO_STAT_NAMES

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "MlflowTracker",
    "Tracker",
    "WandbTracker",
    "numeric_metrics",
    "open_trackers",
    "option_params",
    "per_class_metrics",
]

PROJECT = "detr-irpe"  # MLflow experiment and W&B project unless the environment names one
PER_CLASS_PREFIX = "AP_per_class"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def numeric_metrics(record: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of a ``log.txt`` record; the 12 COCO numbers of a list such as
    ``test_coco_eval_bbox`` become ``<key>/AP``, ``<key>/AP50``, ... (``<key>/<i>`` for a
    list of another length)."""
    metrics: dict[str, float] = {}
    for key, value in record.items():
        if isinstance(value, (list, tuple)):
            names = COCO_STAT_NAMES if len(value) == len(COCO_STAT_NAMES) else range(len(value))
            for name, v in zip(names, value, strict=True):
                if _is_number(v):
                    metrics[f"{key}/{name}"] = float(v)
        elif _is_number(value):
            metrics[key] = float(value)
    return metrics


def per_class_metrics(table: Mapping[str, Mapping[str, float | int]]) -> dict[str, float]:
    """``{"AP_per_class/<class>": AP}`` of a per-class table; classes without ground truth
    (AP -1) are left out, as they have no AP to plot."""
    return {
        f"{PER_CLASS_PREFIX}/{name}": float(row["AP"])
        for name, row in table.items()
        if float(row["AP"]) >= 0
    }


def option_params(options: argparse.Namespace | Mapping[str, Any]) -> dict[str, str]:
    """The run's options as text parameters, sorted by name (lists and ``None`` as written by
    ``str``), which every tracker accepts."""
    values = vars(options) if isinstance(options, argparse.Namespace) else dict(options)
    return {name: str(values[name]) for name in sorted(values)}


class Tracker:
    """The calls a run makes on a tracker; the defaults do nothing but :meth:`log_evaluation`,
    which writes the per-class AP through :meth:`write`."""

    def log_params(self, params: Mapping[str, str]) -> None:
        """Record the run's options (:func:`option_params`) once, at the start."""

    def write(self, record: Mapping[str, Any], step: int) -> None:
        """Record the numbers of an epoch's ``log.txt`` ``record`` at ``step`` (the epoch)."""
        raise NotImplementedError

    def log_evaluation(
        self, table: Mapping[str, Mapping[str, float | int]], chart: Path, step: int
    ) -> None:
        """Record an evaluation's per-class AP ``table`` and its ``chart`` PNG at ``step``."""
        self.write(per_class_metrics(table), step)

    def log_images(self, key: str, images: Mapping[str, Image.Image], step: int) -> None:
        """Record ``{caption: RGB image}`` (the drawn predictions) under ``key`` at ``step``."""

    def close(self, failed: bool = False) -> None:
        """Finish the record; ``failed``: the run stopped on an error."""


# ------------------------------------------------------------------------------------------
# MLflow


def _mlflow_key(name: str) -> str:
    # MLflow accepts letters, digits, '_', '-', '.', ' ' and '/' in metric names.
    return re.sub(r"[^\w\-. /]", "_", name)


def _tracking_uri(uri: str) -> str:
    """``uri`` for MLflow: a plain folder becomes absolute, so the store does not depend on
    where later commands run; other URIs (``sqlite:///``, ``http://``, ...) are kept."""
    return uri if "://" in uri or uri.startswith("file:") else str(Path(uri).absolute())


class MlflowTracker(Tracker):
    """One MLflow run in the experiment ``$MLFLOW_EXPERIMENT_NAME`` (default ``detr-irpe``) of
    the tracking store ``uri``: a folder (MLflow's file store, no server needed), or any URI
    MLflow takes. The per-class chart of each evaluation is logged as an image with its step
    and, the latest one, as the artifact ``ap_per_class.png`` beside ``ap_per_class.json``."""

    # MLflow's limits per log_batch call.
    _PARAMS_PER_CALL = 100
    _METRICS_PER_CALL = 1000

    def __init__(self, uri: str, run_name: str) -> None:
        from mlflow.tracking import MlflowClient

        uri = _tracking_uri(uri)
        if "://" not in uri:
            # MLflow 3 keeps the file store only on request; a local folder is what --mlflow
            # promises (a user who set the variable to false gets MLflow's own error).
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self._client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT)
        experiment = self._client.get_experiment_by_name(name)
        experiment_id = (
            experiment.experiment_id if experiment else self._client.create_experiment(name)
        )
        self.run_id: str = self._client.create_run(experiment_id, run_name=run_name).info.run_id

    def log_params(self, params: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(_mlflow_key(k), v) for k, v in params.items()]
        for start in range(0, len(items), self._PARAMS_PER_CALL):
            chunk = items[start : start + self._PARAMS_PER_CALL]
            self._client.log_batch(self.run_id, params=chunk)

    def write(self, record: Mapping[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(_mlflow_key(k), v, now, step) for k, v in numeric_metrics(record).items()]
        for start in range(0, len(items), self._METRICS_PER_CALL):
            chunk = items[start : start + self._METRICS_PER_CALL]
            self._client.log_batch(self.run_id, metrics=chunk)

    def log_evaluation(
        self, table: Mapping[str, Mapping[str, float | int]], chart: Path, step: int
    ) -> None:
        from PIL import Image

        super().log_evaluation(table, chart, step)
        with Image.open(chart) as image:
            self._client.log_image(self.run_id, image.convert("RGB"), key="ap_per_class", step=step)
        self._client.log_artifact(self.run_id, str(chart))
        json_table = chart.with_suffix(".json")
        if json_table.is_file():
            self._client.log_artifact(self.run_id, str(json_table))

    def log_images(self, key: str, images: Mapping[str, Image.Image], step: int) -> None:
        for caption, image in images.items():
            name = _mlflow_key(f"{key}_{Path(caption).stem}").replace("/", "_")
            self._client.log_image(self.run_id, image, key=name, step=step)

    def close(self, failed: bool = False) -> None:
        self._client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


# ------------------------------------------------------------------------------------------
# Weights & Biases


class WandbTracker(Tracker):
    """One W&B run in the project ``$WANDB_PROJECT`` (default ``detr-irpe``), its files under
    ``$WANDB_DIR`` (default: the output folder). ``WANDB_MODE=offline`` keeps it on disk for a
    later ``wandb sync``. The per-class chart of each evaluation is logged as an image."""

    def __init__(self, run_name: str, directory: Path) -> None:
        import wandb

        self._wandb = wandb
        self._run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", PROJECT),
            name=run_name,
            dir=os.environ.get("WANDB_DIR", str(directory)),
        )

    def log_params(self, params: Mapping[str, str]) -> None:
        self._run.config.update(dict(params), allow_val_change=True)

    def write(self, record: Mapping[str, Any], step: int) -> None:
        self._run.log(numeric_metrics(record), step=step)

    def log_evaluation(
        self, table: Mapping[str, Mapping[str, float | int]], chart: Path, step: int
    ) -> None:
        image = self._wandb.Image(str(chart), caption=f"AP per class, epoch {step}")
        self._run.log({**per_class_metrics(table), "ap_per_class": image}, step=step)

    def log_images(self, key: str, images: Mapping[str, Image.Image], step: int) -> None:
        drawn = [self._wandb.Image(image, caption=caption) for caption, image in images.items()]
        self._run.log({key: drawn}, step=step)

    def close(self, failed: bool = False) -> None:
        self._run.finish(exit_code=1 if failed else 0)


def open_trackers(args: argparse.Namespace, output_dir: Path) -> list[Tracker]:
    """The trackers ``args`` asks for (``--mlflow [URI]``, ``--wandb``), each named after
    ``output_dir``, with the options logged."""
    trackers: list[Tracker] = []
    run_name = output_dir.absolute().name
    if args.mlflow:
        trackers.append(MlflowTracker(args.mlflow, run_name))
    if args.wandb:
        trackers.append(WandbTracker(run_name, output_dir))
    params = option_params(args)
    for tracker in trackers:
        tracker.log_params(params)
    return trackers
