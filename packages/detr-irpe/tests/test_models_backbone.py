"""The ResNet backbone: output size, mask resizing, frozen parts and weight loading."""

from __future__ import annotations

import argparse
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from detr_irpe.config import complete_args
from detr_irpe.models.backbone import Backbone, Joiner, build_backbone, feature_map_size
from detr_irpe.models.position_encoding import PositionEmbeddingSine
from detr_irpe.nested_tensor import nested_tensor_from_tensor_list


def backbone_args(**overrides: object) -> argparse.Namespace:
    """Completed options (the models read completed options only) with these values."""
    values = {
        "hidden_dim": 32,
        "position_embedding": "sine",
        "lr_backbone": 1e-5,
        "backbone": "resnet18",
        "masks": False,
        "dilation": False,
        "backbone_weights": "none",
    }
    values.update(overrides)
    return complete_args(argparse.Namespace(**values))


def naive_nearest(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Source index floor(o * H / h) per output index o."""
    _, src_h, src_w = mask.shape
    out = torch.zeros(mask.shape[0], height, width, dtype=torch.bool)
    for r in range(height):
        for c in range(width):
            out[:, r, c] = mask[:, (r * src_h) // height, (c * src_w) // width]
    return out


@pytest.mark.parametrize("dilation", [False, True])
def test_feature_map_size_and_resized_mask(dilation: bool) -> None:
    torch.manual_seed(0)
    name = "resnet50" if dilation else "resnet18"  # basic-block ResNets cannot be dilated
    backbone = Backbone(name, train_backbone=True, return_interm_layers=False, dilation=dilation)
    backbone.eval()
    batch = nested_tensor_from_tensor_list([torch.rand(3, 70, 45), torch.rand(3, 33, 97)])
    with torch.no_grad():
        out = backbone(batch)
    assert list(out) == ["0"]
    features, mask = out["0"].decompose()
    h, w = feature_map_size(70, 97, dilation=dilation)
    stride = 16 if dilation else 32
    assert (h, w) == (-(-70 // stride), -(-97 // stride))
    assert features.shape == (2, backbone.num_channels, h, w)
    assert torch.equal(mask, naive_nearest(batch.mask, h, w))


def test_frozen_parts_follow_lr_backbone() -> None:
    trained = Backbone("resnet18", train_backbone=True, return_interm_layers=False, dilation=False)
    for name, parameter in trained.named_parameters():
        stage_trained = any(stage in name for stage in ("layer2", "layer3", "layer4"))
        assert parameter.requires_grad is stage_trained, name
    frozen = build_backbone(backbone_args(lr_backbone=0.0))
    assert not any(p.requires_grad for p in frozen.parameters())
    # FrozenBatchNorm2d statistics and affines are buffers, not parameters.
    assert not any("bn" in name for name, _ in trained.named_parameters())


def test_batch_norm_for_training_from_scratch() -> None:
    """--backbone_norm batch: trainable BatchNorm2d with running statistics, every stage
    trained; still frozen as a whole by lr_backbone <= 0."""
    joiner = build_backbone(backbone_args(backbone_norm="batch"))
    body = joiner[0].body
    assert isinstance(body.bn1, nn.BatchNorm2d) and not isinstance(body.bn1, FrozenBatchNorm2d)
    assert all(p.requires_grad for p in joiner.parameters())
    assert "0.body.layer1.0.bn1.running_mean" in joiner.state_dict()
    joiner.train()
    before = body.bn1.running_mean.clone()
    joiner(nested_tensor_from_tensor_list([torch.rand(3, 64, 64), torch.rand(3, 64, 64)]))
    assert not torch.equal(body.bn1.running_mean, before)
    frozen = build_backbone(backbone_args(backbone_norm="batch", lr_backbone=0.0))
    assert not any(p.requires_grad for p in frozen.parameters())
    with pytest.raises(ValueError, match="backbone norm 'group'"):
        Backbone("resnet18", True, False, False, norm="group")


def test_joiner_keys_and_outputs() -> None:
    joiner = build_backbone(backbone_args(position_embedding="learned"))
    assert isinstance(joiner, Joiner) and joiner.num_channels == 512
    keys = list(joiner.state_dict())
    assert keys[0] == "0.body.conv1.weight"
    assert {k for k in keys if k.startswith("1.")} == {"1.row_embed.weight", "1.col_embed.weight"}
    assert not any(k.startswith("0.body.fc") or k.endswith("num_batches_tracked") for k in keys)
    batch = nested_tensor_from_tensor_list([torch.rand(3, 64, 64)])
    with torch.no_grad():
        features, pos = joiner(batch)
    assert len(features) == 1 and len(pos) == 1
    assert pos[0].shape == (1, 32, 2, 2)


def test_position_encoding_is_cast_to_the_feature_dtype() -> None:
    backbone = Backbone(
        "resnet18", train_backbone=False, return_interm_layers=False, dilation=False
    )
    joiner = Joiner(backbone, PositionEmbeddingSine(16, normalize=True)).double()
    batch = nested_tensor_from_tensor_list([torch.rand(3, 40, 40, dtype=torch.float64)])
    with torch.no_grad():
        features, pos = joiner(batch)
    assert features[0].tensors.dtype == torch.float64 and pos[0].dtype == torch.float64


def test_weights_from_a_file_load_and_ignore_num_batches_tracked(tmp_path: Path) -> None:
    torch.manual_seed(1)
    reference = torchvision.models.resnet18()  # ordinary BatchNorm2d: has num_batches_tracked
    state = reference.state_dict()
    assert any(k.endswith("num_batches_tracked") for k in state)
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    backbone = Backbone("resnet18", True, False, False, weights=str(path))
    loaded = backbone.body.state_dict()
    for key, value in loaded.items():
        assert torch.equal(value, state[key]), key
    reference.eval()
    batch = nested_tensor_from_tensor_list([torch.rand(3, 64, 64)])
    with torch.no_grad():
        expected = torch.nn.Sequential(*list(reference.children())[:-2])(batch.tensors)
        assert torch.allclose(backbone(batch)["0"].tensors, expected, atol=1e-5)


def test_weight_file_errors_name_the_file(tmp_path: Path) -> None:
    state = torchvision.models.resnet18().state_dict()
    bad_shape = dict(state)
    bad_shape["layer1.0.conv1.weight"] = torch.zeros(3, 3, 3, 3)
    path = tmp_path / "wrong.pth"
    torch.save(bad_shape, path)
    with pytest.raises(ValueError, match=r"wrong\.pth .* 1 shape mismatches .*layer1\.0\.conv1"):
        Backbone("resnet18", True, False, False, weights=str(path))
    missing = {k: v for k, v in state.items() if not k.startswith("layer4.")}
    torch.save(missing, path)
    with pytest.raises(ValueError, match=r"wrong\.pth .* missing keys .*layer4"):
        Backbone("resnet18", True, False, False, weights=str(path))
    with pytest.raises(FileNotFoundError, match=r"nope.pth"):
        Backbone("resnet18", True, False, False, weights=str(tmp_path / "nope.pth"))


def test_imagenet_weights_come_from_the_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(2)
    state = torchvision.models.resnet18().state_dict()
    requested: list[str] = []

    def fake_hub(url: str, **kwargs: object) -> dict:
        requested.append(url)
        return state

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_hub)
    backbone = Backbone("resnet18", True, False, False, weights="imagenet")
    assert requested == [torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url]
    assert torch.equal(backbone.body.conv1.weight, state["conv1.weight"])


def test_offline_imagenet_download_gives_a_helpful_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(url: str, **kwargs: object) -> dict:
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(RuntimeError, match="--backbone_weights none"):
        Backbone("resnet18", True, False, False, weights="imagenet")


def test_unknown_backbone_and_impossible_dilation_are_rejected() -> None:
    with pytest.raises(ValueError, match="unsupported --backbone 'vgg16'"):
        Backbone("vgg16", True, False, False)
    with pytest.raises(ValueError, match="--dilation needs a bottleneck ResNet"):
        Backbone("resnet34", True, False, True)
