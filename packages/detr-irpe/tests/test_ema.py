"""``--ema``: the moving average of ``detr_irpe.ema``, its checkpoint entry, resuming and
evaluation with it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY_CLI_MODEL, TINY_CLI_RUN
from torch import nn

from detr_irpe.checkpoint import model_from_checkpoint, read_checkpoint
from detr_irpe.cli.train import build_parser
from detr_irpe.cli.train import main as train_main
from detr_irpe.config import parse_options
from detr_irpe.ema import ModelEma, ema_decay


def test_ema_follows_the_warmed_up_formula() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)).double()
    ema = ModelEma(model, decay=0.5)
    expected = {
        k: v.clone().float() if v.is_floating_point() else v.clone()
        for k, v in model.state_dict().items()
    }
    for t in range(12):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
            model[1].running_mean.add_(1.0)
        ema.update(model)
        d = min(0.5, (1 + t) / (10 + t))
        assert ema_decay(0.5, t) == d
        params = dict(model.named_parameters())
        for name, value in model.state_dict().items():
            if name in params:
                expected[name] = d * expected[name] + (1 - d) * value.float()
            else:  # buffers are copied
                expected[name] = value.float() if value.is_floating_point() else value.clone()
    assert ema.updates == 12
    for name, value in ema.state_dict().items():
        assert value.dtype == expected[name].dtype
        torch.testing.assert_close(value, expected[name], msg=name)
    assert not any(p.requires_grad for p in ema.module.parameters())


@pytest.fixture(scope="module")
def ema_run(synthetic_coco_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ema_run")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    argv = [*TINY_CLI_MODEL, *TINY_CLI_RUN, "--coco_path", str(synthetic_coco_root)]
    status = train_main([*argv, "--output_dir", str(out), "--epochs", "1", "--ema"])
    torch.set_num_threads(threads)
    assert status == 0
    return out


def _set_up(argv: list[str]):
    from detr_irpe import training

    args, given = parse_options(build_parser(), argv)
    return training.set_up(args, given)


def test_checkpoint_holds_the_ema_and_resume_restores_it(
    ema_run: Path, synthetic_coco_root: Path, one_thread: None
) -> None:
    state = read_checkpoint(ema_run / "checkpoint.pth")
    assert state["ema_updates"] == 4  # 8 images, batch 2
    assert state["ema"].keys() == state["model"].keys()
    differs = [k for k, v in state["ema"].items() if not torch.equal(v, state["model"][k])]
    assert differs  # the average lags behind the weights
    argv = [*TINY_CLI_RUN, "--coco_path", str(synthetic_coco_root)]
    run = _set_up([*argv, "--resume", str(ema_run / "checkpoint.pth"), "--ema", "--epochs", "2"])
    assert run.start_epoch == 1 and run.ema is not None and run.ema.updates == 4
    for name, value in run.ema.state_dict().items():
        torch.testing.assert_close(value, state["ema"][name], msg=name)


def test_evaluation_uses_the_ema(ema_run: Path, synthetic_coco_root: Path, one_thread: None):
    from detr_irpe import training

    state = read_checkpoint(ema_run / "checkpoint.pth")
    argv = [*TINY_CLI_RUN, "--coco_path", str(synthetic_coco_root), "--eval"]
    run = _set_up([*argv, "--resume", str(ema_run / "checkpoint.pth")])
    assert run.ema is not None and training.eval_model(run) is run.ema.module
    loaded = model_from_checkpoint(ema_run / "checkpoint.pth", {"device": "cpu"})
    for name, value in loaded.model.state_dict().items():
        torch.testing.assert_close(value, state["ema"][name], msg=name)
