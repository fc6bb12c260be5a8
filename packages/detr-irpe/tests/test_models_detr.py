"""The assembled detector: the original's state dict and outputs, build rules."""

from __future__ import annotations

import argparse

import pytest
import torch

from detr_irpe.config import NEW_OPTIONS, default_args, get_args_parser
from detr_irpe.models import (
    COCO_NUM_CLASSES,
    DETR,
    PostProcess,
    SetCriterion,
    build_model,
    default_num_classes,
)
from detr_irpe.nested_tensor import nested_tensor_from_tensor_list

TINY = [
    "--backbone", "resnet18", "--backbone_weights", "none", "--hidden_dim", "32", "--nheads", "2",
    "--enc_layers", "2", "--dec_layers", "3", "--dim_feedforward", "48", "--num_queries", "6",
    "--num_classes", "5", "--enc_rpe2d", "rpe-2.0-product-ctx-1-k", "--device", "cpu",
]  # fmt: skip


# ---- expected state dict: the original's keys, shapes and order ------------------------------


def expected_backbone_keys() -> list[tuple[str, tuple]]:
    keys: list[tuple[str, tuple]] = []

    def bn(prefix: str, channels: int) -> None:
        for name in ("weight", "bias", "running_mean", "running_var"):
            keys.append((f"{prefix}.{name}", (channels,)))

    base = "backbone.0.body"
    keys.append((f"{base}.conv1.weight", (64, 3, 7, 7)))
    bn(f"{base}.bn1", 64)
    in_channels = 64
    for stage, (blocks, width) in enumerate([(3, 64), (4, 128), (6, 256), (3, 512)], start=1):
        for block in range(blocks):
            p = f"{base}.layer{stage}.{block}"
            keys.append((f"{p}.conv1.weight", (width, in_channels, 1, 1)))
            bn(f"{p}.bn1", width)
            keys.append((f"{p}.conv2.weight", (width, width, 3, 3)))
            bn(f"{p}.bn2", width)
            keys.append((f"{p}.conv3.weight", (4 * width, width, 1, 1)))
            bn(f"{p}.bn3", 4 * width)
            if block == 0:
                keys.append((f"{p}.downsample.0.weight", (4 * width, in_channels, 1, 1)))
                bn(f"{p}.downsample.1", 4 * width)
            in_channels = 4 * width
    return keys


def expected_keys(rpe: dict[str, tuple], pre_norm: bool = False) -> list[tuple[str, tuple]]:
    keys: list[tuple[str, tuple]] = []
    for i in range(6):
        p = f"transformer.encoder.layers.{i}"
        keys += [
            (f"{p}.self_attn.in_proj_weight", (768, 256)),
            (f"{p}.self_attn.in_proj_bias", (768,)),
            (f"{p}.self_attn.out_proj.weight", (256, 256)),
            (f"{p}.self_attn.out_proj.bias", (256,)),
        ]
        keys += [(f"{p}.self_attn.{name}", shape) for name, shape in rpe.items()]
        keys += [
            (f"{p}.linear1.weight", (2048, 256)), (f"{p}.linear1.bias", (2048,)),
            (f"{p}.linear2.weight", (256, 2048)), (f"{p}.linear2.bias", (256,)),
            (f"{p}.norm1.weight", (256,)), (f"{p}.norm1.bias", (256,)),
            (f"{p}.norm2.weight", (256,)), (f"{p}.norm2.bias", (256,)),
        ]  # fmt: skip
    if pre_norm:
        keys += [
            ("transformer.encoder.norm.weight", (256,)),
            ("transformer.encoder.norm.bias", (256,)),
        ]
    for i in range(6):
        p = f"transformer.decoder.layers.{i}"
        for attn in ("self_attn", "multihead_attn"):
            keys += [
                (f"{p}.{attn}.in_proj_weight", (768, 256)), (f"{p}.{attn}.in_proj_bias", (768,)),
                (f"{p}.{attn}.out_proj.weight", (256, 256)), (f"{p}.{attn}.out_proj.bias", (256,)),
            ]  # fmt: skip
        keys += [
            (f"{p}.linear1.weight", (2048, 256)), (f"{p}.linear1.bias", (2048,)),
            (f"{p}.linear2.weight", (256, 2048)), (f"{p}.linear2.bias", (256,)),
        ]  # fmt: skip
        for norm in ("norm1", "norm2", "norm3"):
            keys += [(f"{p}.{norm}.weight", (256,)), (f"{p}.{norm}.bias", (256,))]
    keys += [
        ("transformer.decoder.norm.weight", (256,)), ("transformer.decoder.norm.bias", (256,)),
        ("class_embed.weight", (92, 256)), ("class_embed.bias", (92,)),
        ("bbox_embed.layers.0.weight", (256, 256)), ("bbox_embed.layers.0.bias", (256,)),
        ("bbox_embed.layers.1.weight", (256, 256)), ("bbox_embed.layers.1.bias", (256,)),
        ("bbox_embed.layers.2.weight", (4, 256)), ("bbox_embed.layers.2.bias", (4,)),
        ("query_embed.weight", (100, 256)),
        ("input_proj.weight", (256, 2048, 1, 1)), ("input_proj.bias", (256,)),
    ]  # fmt: skip
    return keys + expected_backbone_keys()


SPEC_CASES = [
    ("rpe-2.0-product-ctx-1-k", {"rpe_k.lookup_table_weight": (1, 32, 81)}, 464, 41_317_920),
    ("", {}, 458, 41_302_368),
    (
        "rpe-2.0-product-ctx-0-qkv",
        {
            "rpe_q.lookup_table_weight": (8, 32, 81),
            "rpe_k.lookup_table_weight": (8, 32, 81),
            "rpe_v.lookup_table_weight": (8, 81, 32),
        },
        476,
        None,
    ),
]


@pytest.mark.parametrize(("enc_rpe2d", "rpe", "num_keys", "trainable"), SPEC_CASES)
def test_default_state_dict_matches_the_spec(enc_rpe2d, rpe, num_keys, trainable) -> None:
    args = default_args(["--enc_rpe2d", enc_rpe2d, "--backbone_weights", "none", "--device", "cpu"])
    model, _, _ = build_model(args)
    state = model.state_dict()
    assert len(state) == num_keys
    assert [(k, tuple(v.shape)) for k, v in state.items()] == expected_keys(rpe)
    assert all(v.dtype == torch.float32 for v in state.values())
    if trainable is not None:
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == trainable
    frozen = sum(p.numel() for p in model.backbone.parameters() if not p.requires_grad)
    assert frozen == 222_400


def test_pre_norm_adds_the_encoder_norm() -> None:
    args = default_args(["--pre_norm", "--backbone_weights", "none", "--device", "cpu"])
    model, _, _ = build_model(args)
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == expected_keys(
        {}, pre_norm=True
    )


def test_optimizer_groups_sizes_per_spec() -> None:
    args = default_args(["--enc_rpe2d", "rpe-2.0-product-ctx-1-k", "--backbone_weights", "none"])
    model, _, _ = build_model(args)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    group0 = [p for n, p in named if "backbone" not in n]
    group1 = [p for n, p in named if "backbone" in n]
    assert (len(group0), sum(p.numel() for p in group0)) == (199, 18_085_408)
    assert (len(group1), sum(p.numel() for p in group1)) == (42, 23_232_512)


# ---- behaviour of the tiny model -------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny() -> tuple[DETR, SetCriterion, dict]:
    torch.manual_seed(0)
    return build_model(default_args(TINY))


def test_outputs_have_the_documented_keys_and_shapes(tiny) -> None:
    model, _, _ = tiny
    model.eval()
    images = [torch.rand(3, 64, 80), torch.rand(3, 50, 96)]
    with torch.no_grad():
        out = model(nested_tensor_from_tensor_list(images))
    assert set(out) == {"pred_logits", "pred_boxes", "aux_outputs"}
    assert out["pred_logits"].shape == (2, 6, 6)
    assert out["pred_boxes"].shape == (2, 6, 4)
    assert float(out["pred_boxes"].min()) > 0 and float(out["pred_boxes"].max()) < 1  # sigmoid
    assert len(out["aux_outputs"]) == 2
    for aux in out["aux_outputs"]:
        assert set(aux) == {"pred_logits", "pred_boxes"} and aux["pred_logits"].shape == (2, 6, 6)
    # A plain list of images is padded the same way.
    with torch.no_grad():
        again = model(images)
    torch.testing.assert_close(again["pred_logits"], out["pred_logits"])
    assert model.feature_map_size(64, 96) == (2, 3)


def test_last_aux_output_is_not_the_final_layer(tiny) -> None:
    model, _, _ = tiny
    model.eval()
    with torch.no_grad():
        out = model([torch.rand(3, 64, 64)])
    assert not torch.allclose(out["aux_outputs"][-1]["pred_logits"], out["pred_logits"])


def test_training_step_gives_gradients_everywhere_trainable(tiny) -> None:
    model, criterion, _ = tiny
    model.train()
    boxes = torch.tensor([[0.5, 0.5, 0.3, 0.2], [0.2, 0.3, 0.1, 0.1]])
    targets = [
        {"labels": torch.tensor([1, 4]), "boxes": boxes},
        {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.6, 0.4, 0.5, 0.5]])},
    ]
    model.zero_grad()
    losses = criterion(model([torch.rand(3, 64, 64), torch.rand(3, 32, 70)]), targets)
    total = sum(losses[k] * w for k, w in criterion.weight_dict.items())
    total.backward()
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            assert parameter.grad is not None, name
    rpe = model.transformer.encoder.layers[0].self_attn.rpe_k.lookup_table_weight
    assert float(rpe.grad.abs().sum()) > 0


def test_bf16_autocast_forward_and_loss(tiny) -> None:
    model, criterion, postprocessors = tiny
    model.train()
    targets = [{"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model([torch.rand(3, 64, 64)])
        losses = criterion(out, targets)
        results = postprocessors["bbox"](out, torch.tensor([[480, 640]]))
    assert out["pred_logits"].dtype == torch.bfloat16
    assert all(v.dtype == torch.float32 for v in losses.values())
    assert all(torch.isfinite(v) for v in losses.values())
    assert results[0]["boxes"].dtype == torch.float32
    sum(losses[k] * w for k, w in criterion.weight_dict.items()).backward()


def test_seeded_builds_are_identical() -> None:
    def build() -> dict:
        torch.manual_seed(3)
        return build_model(default_args([*TINY, "--position_embedding", "learned"]))[0].state_dict()

    first, second = build(), build()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_build_returns_criterion_and_postprocessor(tiny) -> None:
    model, criterion, postprocessors = tiny
    assert set(postprocessors) == {"bbox"} and isinstance(postprocessors["bbox"], PostProcess)
    assert criterion.num_classes == 5 and model.class_embed.out_features == 6
    assert float(criterion.empty_weight[-1]) == pytest.approx(0.1)
    assert len(criterion.weight_dict) == 3 * 3  # final + 2 aux layers


def test_num_classes_rule() -> None:
    assert default_num_classes("coco") == COCO_NUM_CLASSES == 91
    assert default_num_classes("coco_panoptic") == 250
    assert default_num_classes("voc") == 20
    args = default_args([*TINY[: TINY.index("--num_classes")], "--device", "cpu"])
    model, criterion, _ = build_model(args)
    assert model.class_embed.out_features == 92 and criterion.num_classes == 91


def test_original_namespace_builds(monkeypatch: pytest.MonkeyPatch) -> None:
    """A namespace with only the original main.py attributes (no backbone_weights: ImageNet)."""
    values = vars(get_args_parser().parse_args([]))
    for name in NEW_OPTIONS:
        values.pop(name)
    values.update(
        backbone="resnet18", hidden_dim=32, nheads=2, enc_layers=1, dec_layers=1,
        dim_feedforward=32, num_queries=4, device="cuda", enc_rpe2d="rpe-1.9-product-ctx-1-k",
    )  # fmt: skip
    import torchvision

    fetched: list[str] = []

    def fake_hub(url: str, **kwargs: object) -> dict:
        fetched.append(url)
        return torchvision.models.resnet18().state_dict()

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_hub)
    model, _, _ = build_model(argparse.Namespace(**values))
    assert fetched == [torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url]
    assert model.class_embed.out_features == 92
    with torch.no_grad():
        out = model.eval()([torch.rand(3, 32, 32)])
    assert out["pred_logits"].shape == (1, 4, 92)
    assert out["aux_outputs"] == []  # aux loss on (original default), but one decoder layer


def test_masks_are_not_supported() -> None:
    with pytest.raises(NotImplementedError, match="--masks"):
        build_model(default_args([*TINY, "--masks"]))


def test_bad_num_classes() -> None:
    with pytest.raises(ValueError, match="--num_classes must be at least 1"):
        build_model(default_args([*TINY, "--num_classes", "0"]))
