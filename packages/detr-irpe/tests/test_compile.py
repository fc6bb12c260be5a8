"""``--compile``: the compiled model trains with the eager model's losses, each batch shape is
compiled (and logged) once, and the training batches are padded to ``--compile_pad``."""

from __future__ import annotations

import copy
import logging
from argparse import Namespace
from collections.abc import Callable

import pytest
import torch

from detr_irpe.compiled import CompileTimes, compile_for_training
from detr_irpe.config import OptionError, prepare_options
from detr_irpe.data.coco import build_dataset
from detr_irpe.engine import train_one_epoch
from detr_irpe.models import build_model
from detr_irpe.nested_tensor import collate_fn
from detr_irpe.optim import build_optimizer
from detr_irpe.training import build_train_data, set_up

pytestmark = pytest.mark.usefixtures("one_thread")


def test_compile_pads_training_batches_and_compiles_lazily(
    make_args: Callable[..., Namespace],
) -> None:
    run = set_up(make_args("--compile", "--compile_pad", "64", "--num_classes", "5"))
    assert run.compiled is not None and run.compile_times is not None
    assert run.compiled is not run.model
    # The compiled module shares the model's parameters (checkpoints and AdamW see them).
    assert {id(p) for p in run.compiled.parameters()} == {id(p) for p in run.model.parameters()}
    samples, _ = next(iter(build_train_data(run)))  # train images are 64..96 px, max 128
    assert all(side % 64 == 0 for side in samples.tensors.shape[-2:])
    assert set_up(make_args("--num_classes", "5")).compiled is None


def test_compile_pad_must_be_positive(make_args: Callable[..., Namespace]) -> None:
    with pytest.raises(OptionError, match="--compile_pad must be at least 1, got 0"):
        prepare_options(make_args("--compile", "--compile_pad", "0"))


def test_compile_times_logs_each_new_shape_once(caplog: pytest.LogCaptureFixture) -> None:
    times = CompileTimes()
    batch = collate_fn([(torch.rand(3, 50, 70), {})], size_multiple=32)[0]
    with caplog.at_level(logging.INFO, logger="detr_irpe.compiled"):
        for _ in range(2):
            with times.step(batch):
                pass
    assert [r.getMessage().split(" in ")[0] for r in caplog.records] == [
        "compiled for 64x96 (batch 1)"
    ]
    assert list(times.seconds) == [(1, 3, 64, 96)]


@pytest.mark.slow  # one inductor compilation of the tiny model: a minute or more on a CPU
def test_compiled_training_steps_give_the_eager_losses(
    make_args: Callable[..., Namespace], caplog: pytest.LogCaptureFixture
) -> None:
    torch.manual_seed(0)
    args = make_args("--dropout", "0", "--num_classes", "5", "--lr_backbone", "0")
    model, criterion, _ = build_model(args)
    dataset = build_dataset("val", args)
    batch = collate_fn([dataset[0], dataset[1]], size_multiple=128)
    eager = copy.deepcopy(model)
    losses = {}
    with caplog.at_level(logging.INFO, logger="detr_irpe.compiled"):
        for name, trained, compiled in (
            ("eager", eager, None),
            ("compiled", model, compile_for_training(model)),
        ):
            optimizer, _ = build_optimizer(trained, args)
            step_model, times = (trained, None) if compiled is None else (compiled, CompileTimes())
            losses[name] = [
                train_one_epoch(step_model, criterion, [batch], optimizer, "cpu", epoch, 0.1,
                                compile_times=times)["loss"]
                for epoch in range(2)
            ]  # fmt: skip
    # The loss before and after one AdamW step: forward, backward and update all agree.
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-4)
    assert losses["compiled"][1] < losses["compiled"][0]
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("compiled")]
    assert len(logged) == 1 and logged[0].startswith("compiled for 128x128 (batch 2) in ")
