"""Checkpoints: atomic saving, safe reading, original-format compatibility, clear errors."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest
import torch

from detr_irpe.checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    StateDictMismatchError,
    UnsafeCheckpointError,
    load_checkpoint,
    make_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from detr_irpe.config import default_args
from detr_irpe.models import DETR, build_model

TINY = [
    "--backbone", "resnet18", "--backbone_weights", "none", "--hidden_dim", "32", "--nheads", "2",
    "--enc_layers", "1", "--dec_layers", "2", "--dim_feedforward", "32", "--num_queries", "4",
    "--num_classes", "5", "--device", "cpu",
]  # fmt: skip


def tiny_model(seed: int, *extra: str) -> DETR:
    torch.manual_seed(seed)
    args = ["--enc_rpe2d", "rpe-2.0-product-ctx-1-k", *TINY, *extra]
    return build_model(default_args(args))[0].eval()


def outputs_of(model: DETR) -> dict:
    torch.manual_seed(123)
    images = [torch.rand(3, 48, 64), torch.rand(3, 40, 40)]
    with torch.no_grad():
        return model(images)


def original_checkpoint(model: DETR, epoch: int = 3) -> dict:
    """The dict the original main.py saves, args pickled as an argparse.Namespace."""
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=1e-4
    )
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=200)
    namespace = argparse.Namespace(**vars(default_args(TINY)))
    namespace.enc_rpe2d = "rpe-2.0-product-ctx-1-k"
    namespace.distributed = False
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": scheduler.state_dict(),
        "epoch": epoch,
        "args": namespace,
    }


def assert_same_outputs(a: dict, b: dict) -> None:
    torch.testing.assert_close(a["pred_logits"], b["pred_logits"], rtol=0, atol=0)
    torch.testing.assert_close(a["pred_boxes"], b["pred_boxes"], rtol=0, atol=0)


def test_original_checkpoint_loads_and_reproduces_outputs(tmp_path: Path) -> None:
    trained = tiny_model(0)
    path = tmp_path / "checkpoint.pth"
    torch.save(original_checkpoint(trained), path)
    # The original's file cannot be read with PyTorch's safe default alone (pickled Namespace) ...
    with pytest.raises(Exception, match=r"argparse.Namespace"):
        torch.load(path, weights_only=True)
    # ... but it loads through load_checkpoint, which allows exactly that class.
    fresh = tiny_model(1)
    assert not torch.equal(fresh.query_embed.weight, trained.query_embed.weight)
    loaded = load_checkpoint(path, fresh)
    assert loaded.origin == "original" and loaded.epoch == 3
    assert isinstance(loaded.args, dict) and loaded.args["enc_rpe2d"] == "rpe-2.0-product-ctx-1-k"
    assert loaded.missing_keys == [] and loaded.unexpected_keys == [] and loaded.skipped_keys == []
    assert_same_outputs(outputs_of(fresh), outputs_of(trained))


def test_optimizer_and_scheduler_are_restored(tmp_path: Path) -> None:
    model = tiny_model(0)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2)
    sum(p.sum() for p in params).backward()
    optimizer.step()
    scheduler.step()
    scheduler.step()
    path = tmp_path / "ours.pth"
    save_checkpoint(
        path, make_checkpoint(model, optimizer, scheduler, epoch=1, args=default_args(TINY))
    )

    raw = torch.load(path, weights_only=True)  # plain data only: safe default load works
    assert raw["format"] == CHECKPOINT_FORMAT and isinstance(raw["args"], dict)

    other = tiny_model(1)
    other_params = [p for p in other.parameters() if p.requires_grad]
    other_optimizer = torch.optim.AdamW(other_params, lr=1e-4)
    other_scheduler = torch.optim.lr_scheduler.StepLR(other_optimizer, step_size=2)
    loaded = load_checkpoint(path, other, other_optimizer, other_scheduler)
    assert loaded.origin == "detr-irpe" and loaded.epoch == 1
    assert loaded.optimizer_loaded and loaded.lr_scheduler_loaded
    assert other_scheduler.last_epoch == 2
    assert other_optimizer.param_groups[0]["lr"] == pytest.approx(1e-5)
    first = next(iter(optimizer.state.values()))["exp_avg"]
    assert torch.equal(next(iter(other_optimizer.state.values()))["exp_avg"], first)


def test_save_converts_a_namespace_and_marks_the_format(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "c.pth"
    save_checkpoint(path, {"model": {}, "args": argparse.Namespace(a=1, out=Path("x"))})
    state = read_checkpoint(path)
    assert state["args"] == {"a": 1, "out": "x"}
    assert state["format"] == CHECKPOINT_FORMAT and state["version"] == 1


def test_bare_state_dict_ddp_prefix_and_batch_counters_load() -> None:
    trained = tiny_model(0)
    state = {f"module.{k}": v for k, v in trained.state_dict().items()}
    # A batch counter per FrozenBN, as a BatchNorm2d-trained backbone would carry.
    for key in list(state):
        if key.endswith(".bn1.running_var"):
            state[key.replace("running_var", "num_batches_tracked")] = torch.tensor(5)
    fresh = tiny_model(1)
    loaded = load_checkpoint(state, fresh)
    assert loaded.origin == "state_dict" and loaded.args is None and loaded.epoch is None
    assert_same_outputs(outputs_of(fresh), outputs_of(trained))


def test_arbitrary_pickled_objects_are_refused_without_running_them(tmp_path: Path) -> None:
    marker = tmp_path / "code_ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "extra": Payload()}, path)
    with pytest.raises(
        UnsafeCheckpointError, match=r"refusing to load checkpoint .*evil\.pth: .*pathlib\.Path"
    ):
        load_checkpoint(path, tiny_model(0))
    assert not marker.exists()


def test_missing_keys_are_listed(tmp_path: Path) -> None:
    state = tiny_model(0).state_dict()
    del state["query_embed.weight"]
    del state["bbox_embed.layers.2.bias"]
    with pytest.raises(StateDictMismatchError, match=r"2 missing keys: .*bbox_embed.layers.2.bias"):
        load_checkpoint({"model": state}, tiny_model(1))


def test_class_count_mismatch_is_explained_and_can_be_dropped() -> None:
    source = tiny_model(0, "--num_classes", "9")
    target = tiny_model(1)
    with pytest.raises(StateDictMismatchError) as info:
        load_checkpoint({"model": source.state_dict()}, target)
    message = str(info.value)
    assert "class_embed.weight checkpoint (10, 32) vs model (6, 32)" in message
    assert "checkpoint has 9 classes, the model 5" in message and "drop_class_head=True" in message

    initial_head = target.class_embed.weight.detach().clone()
    loaded = load_checkpoint({"model": source.state_dict()}, target, drop_class_head=True)
    assert sorted(loaded.skipped_keys) == ["class_embed.bias", "class_embed.weight"]
    assert torch.equal(target.class_embed.weight, initial_head)
    assert torch.equal(target.query_embed.weight, source.query_embed.weight)


def test_checkpoint_without_irpe_is_explained_and_loads_non_strictly() -> None:
    torch.manual_seed(0)
    upstream = build_model(default_args(["--enc_rpe2d", "", *TINY]))[0]
    target = tiny_model(1)
    with pytest.raises(StateDictMismatchError, match=r"trained without iRPE .*strict=False"):
        load_checkpoint({"model": upstream.state_dict()}, target)
    loaded = load_checkpoint({"model": upstream.state_dict()}, target, strict=False)
    assert loaded.missing_keys == [
        "transformer.encoder.layers.0.self_attn.rpe_k.lookup_table_weight"
    ]
    assert torch.equal(
        target.transformer.encoder.layers[0].linear1.weight,
        upstream.transformer.encoder.layers[0].linear1.weight,
    )


def test_checkpoint_with_irpe_into_a_plain_model_is_explained() -> None:
    torch.manual_seed(0)
    plain = build_model(default_args(["--enc_rpe2d", "", *TINY]))[0]
    checkpoint = original_checkpoint(tiny_model(0))
    with pytest.raises(StateDictMismatchError, match=r"--enc_rpe2d 'rpe-2.0-product-ctx-1-k'"):
        load_checkpoint(checkpoint, plain)


def test_truncated_empty_and_missing_files(tmp_path: Path) -> None:
    path = tmp_path / "c.pth"
    save_checkpoint(path, make_checkpoint(tiny_model(0)))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"c\.pth is not a readable .*truncated"):
        read_checkpoint(path)
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load_checkpoint(path, tiny_model(0))
    with pytest.raises(FileNotFoundError, match=r"nothing.pth"):
        read_checkpoint(tmp_path / "nothing.pth")
    torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError, match="holds a list"):
        read_checkpoint(path)
    torch.save({"epoch": 3}, path)
    with pytest.raises(CheckpointError, match="no 'model' entry"):
        load_checkpoint(path, tiny_model(0))


def test_atomic_save_never_leaves_a_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "checkpoint.pth"
    save_checkpoint(path, {"model": {"w": torch.ones(3)}, "epoch": 1})
    before = path.read_bytes()
    real_save = torch.save

    def failing_save(obj, handle, *args, **kwargs):
        real_save(obj, handle, *args, **kwargs)
        handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"model": {"w": torch.zeros(1000)}, "epoch": 2})
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pth"]
    assert read_checkpoint(path)["epoch"] == 1
