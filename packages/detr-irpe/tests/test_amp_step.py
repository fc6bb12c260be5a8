"""A whole training step under ``--amp bf16``: the weights and AdamW's states stay float32,
and the backbone's memory format (channels_last where it pays) changes the layout only."""

from __future__ import annotations

from argparse import Namespace
from collections.abc import Callable

import pytest
import torch

from detr_irpe.engine import train_one_epoch
from detr_irpe.memory_format import (
    CPU_CHANNELS_LAST,
    backbone_memory_format,
    use_backbone_memory_format,
)
from detr_irpe.optim import build_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")


def float32_everywhere(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Names of the parameters or AdamW states that are not float32 (empty when all are)."""
    names = {id(p): n for n, p in model.named_parameters()}
    bad = [n for n, p in model.named_parameters() if p.dtype != torch.float32]
    for p, state in optimizer.state.items():
        bad += [f"{names[id(p)]}:{k}" for k, v in state.items()
                if k != "step" and v.dtype != torch.float32]  # fmt: skip
    return bad


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_bf16_step_keeps_weights_and_adamw_states_float32(
    trained_backbone: tuple, memory_format: torch.memory_format
) -> None:
    args, model, criterion, batch = trained_backbone
    use_backbone_memory_format(model, memory_format)
    optimizer, _ = build_optimizer(model, args)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    train_one_epoch(model, criterion, [batch, batch], optimizer, "cpu", 0, 0.1, amp="bf16")
    assert float32_everywhere(model, optimizer) == []
    assert len(optimizer.state) == len(before)  # every trained parameter has AdamW states
    changed = [n for n, p in model.named_parameters() if n in before and not p.equal(before[n])]
    assert "backbone.0.body.layer4.0.conv1.weight" in changed and "class_embed.weight" in changed


def test_channels_last_changes_the_layout_not_the_outputs(trained_backbone: tuple) -> None:
    _, model, _, batch = trained_backbone
    model.eval()
    # In float32, so that only the summation order of the convolutions can differ.
    with torch.no_grad():
        reference = model(batch[0])
        use_backbone_memory_format(model, torch.channels_last)
        outputs = model(batch[0])
    conv = model.backbone[0].body.layer4[0].conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(outputs[key], reference[key], atol=1e-4, rtol=1e-4)


def test_memory_format_only_changes_under_amp() -> None:
    for device in ("cpu", "cuda"):
        assert backbone_memory_format(device, "off") is torch.contiguous_format
    for amp in ("bf16", "fp16"):
        assert backbone_memory_format("cuda", amp) is torch.channels_last
    cpu = torch.channels_last if CPU_CHANNELS_LAST else torch.contiguous_format
    assert backbone_memory_format("cpu", "bf16") is cpu


@pytest.mark.parametrize("amp", ["off", "bf16"])
def test_training_run_sets_the_backbone_format_of_its_amp(
    make_args: Callable[..., Namespace], amp: str
) -> None:
    from detr_irpe.training import set_up

    run = set_up(make_args("--amp", amp, "--num_classes", "5"))
    conv = run.model_without_ddp.backbone[0].body.conv1.weight
    expected = backbone_memory_format("cpu", amp)
    assert run.model_without_ddp.backbone[0].memory_format is expected
    assert conv.is_contiguous(memory_format=expected)
    if amp == "off":  # float32 stays the original's layout (and numerics)
        assert conv.is_contiguous()


def test_bf16_run_checkpoint_resumes_and_loads_into_a_float32_model(
    synthetic_coco_root, tiny_cli: tuple, tmp_path
) -> None:
    from detr_irpe.checkpoint import model_from_checkpoint, read_checkpoint
    from detr_irpe.cli.train import main as train_main

    model_flags, run_flags = tiny_cli
    argv = [*model_flags, *run_flags, "--coco_path", str(synthetic_coco_root),
            "--output_dir", str(tmp_path), "--amp", "bf16"]  # fmt: skip
    assert train_main([*argv, "--epochs", "1"]) == 0
    state = read_checkpoint(tmp_path / "checkpoint.pth")
    assert all(t.dtype == torch.float32 for t in state["model"].values() if t.is_floating_point())
    # Resumed under bf16 (channels_last backbone on load), then loaded for float32 inference.
    resume = ["--resume", str(tmp_path / "checkpoint.pth")]
    assert train_main([*argv, *resume, "--epochs", "2"]) == 0
    loaded = model_from_checkpoint(tmp_path / "checkpoint.pth", {"device": "cpu"})
    weights = loaded.model.state_dict()
    saved = read_checkpoint(tmp_path / "checkpoint.pth")["model"]
    assert all(torch.equal(weights[k], v) for k, v in saved.items())
