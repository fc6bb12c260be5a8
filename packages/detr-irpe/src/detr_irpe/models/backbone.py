"""The ResNet feature extractor and its pairing with the position encoding.

State-dict keys are the original's: the ResNet lives at ``backbone.0.body.*`` and a learned
position encoding at ``backbone.1.*``, so original checkpoints load unchanged.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from collections.abc import Mapping

import torch
import torchvision
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.models._utils import IntermediateLayerGetter

from detr_irpe.models.frozen_batch_norm import FrozenBatchNorm2d
from detr_irpe.models.position_encoding import build_position_encoding
from detr_irpe.nested_tensor import NestedTensor

__all__ = [
    "SUPPORTED_BACKBONES",
    "Backbone",
    "BackboneWeightsError",
    "Joiner",
    "build_backbone",
    "feature_map_size",
    "load_backbone_weights",
]

logger = logging.getLogger(__name__)

# torchvision ResNet-family constructors accepted by --backbone, with the channel count of layer4.
SUPPORTED_BACKBONES: dict[str, int] = {
    "resnet18": 512,
    "resnet34": 512,
    "resnet50": 2048,
    "resnet101": 2048,
    "resnet152": 2048,
    "resnext50_32x4d": 2048,
    "resnext101_32x8d": 2048,
    "resnext101_64x4d": 2048,
    "wide_resnet50_2": 2048,
    "wide_resnet101_2": 2048,
}

# layer4 width of the basic-block ResNets (resnet18/34).
BASIC_BLOCK_CHANNELS = 512

# Only these stages are fine-tuned when the backbone is trained (conv1 and layer1 stay frozen).
TRAINED_STAGES = ("layer2", "layer3", "layer4")

# --backbone_norm: the original's frozen batch norm, or trainable batch norm (from scratch).
BACKBONE_NORMS = ("frozen", "batch")

# Output stride of layer4: 32, or 16 when layer4 uses dilation instead of stride ("DC5").
STRIDE = 32
DILATED_STRIDE = 16

# Value of --backbone_weights that selects torchvision's ImageNet weights (the original's choice).
IMAGENET_WEIGHTS = "imagenet"
NO_WEIGHTS = "none"


class BackboneWeightsError(RuntimeError, ValueError):
    """``--backbone_weights`` cannot be obtained, read or loaded (a user error, shown as one
    line; a ``ValueError`` for what is wrong with the file, a ``RuntimeError`` for the rest)."""


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def feature_map_size(height: int, width: int, dilation: bool = False) -> tuple[int, int]:
    """``(h, w)`` of the backbone output for a padded input of ``height x width`` pixels.

    Every stride-2 stage of a torchvision ResNet maps ``n`` to ``ceil(n / 2)``, hence
    ``ceil(n / 32)`` (``ceil(n / 16)`` with dilation).
    """
    stride = DILATED_STRIDE if dilation else STRIDE
    return math.ceil(height / stride), math.ceil(width / stride)


def _imagenet_state_dict(name: str) -> dict[str, Tensor]:
    """torchvision's IMAGENET1K_V1 weights for ``name`` (from the torch hub cache or downloaded)."""
    weights = torchvision.models.get_model_weights(name)["IMAGENET1K_V1"]
    try:
        # torch.hub caches the file under $TORCH_HOME; the hash in the file name is checked.
        return torch.hub.load_state_dict_from_url(
            weights.url, map_location="cpu", progress=False, check_hash=True, weights_only=True
        )
    except Exception as error:
        raise BackboneWeightsError(
            f"could not obtain the ImageNet weights of {name} from {weights.url} "
            f"(cache: {torch.hub.get_dir()}): {_first_line(error)}. Without network access, "
            f"train from scratch with --backbone_weights {NO_WEIGHTS}, or pass the path of a "
            "local torchvision-format state dict with --backbone_weights PATH"
        ) from None


def _read_state_dict_file(path: str) -> dict[str, Tensor]:
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"--backbone_weights {path!r} is neither {IMAGENET_WEIGHTS!r}, {NO_WEIGHTS!r} nor an "
            "existing file"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise BackboneWeightsError(
            f"--backbone_weights {path}: not a readable PyTorch state dict ({_first_line(error)})"
        ) from None
    # Accept the common wrappers around a bare state dict.
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise BackboneWeightsError(
            f"--backbone_weights {path} does not hold a state dict of tensors"
        )
    if state and all(key.startswith("module.") for key in state):
        state = {key[len("module.") :]: value for key, value in state.items()}
    return dict(state)


def load_backbone_weights(resnet: nn.Module, state: Mapping[str, Tensor], source: str) -> None:
    """Load a torchvision-format ResNet state dict into ``resnet`` (before the classifier is
    dropped). ``fc.*`` may be absent or present; ``num_batches_tracked`` entries are ignored by
    FrozenBatchNorm2d. Any other missing/unexpected key or shape mismatch raises ``ValueError``
    naming ``source``."""
    expected = resnet.state_dict()
    given = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    missing = [k for k in expected if k not in given and not k.startswith("fc.")]
    unexpected = [k for k in given if k not in expected]
    mismatched = [
        f"{k}: file {tuple(given[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in given and given[k].shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        raise BackboneWeightsError(
            f"backbone weights {source} do not fit the ResNet: "
            f"{len(missing)} missing keys {missing[:8]}, {len(unexpected)} unexpected keys "
            f"{unexpected[:8]}, {len(mismatched)} shape mismatches {mismatched[:8]}"
        )
    # strict=False only tolerates the classifier (fc.*), which DETR drops; everything else
    # was checked above.
    resnet.load_state_dict({k: v for k, v in given.items() if k in expected}, strict=False)


class Backbone(nn.Module):
    """A torchvision ResNet with frozen batch norm, returning ``{'0': layer4}`` (or layer1..4
    as ``'0'..'3'`` with ``return_interm_layers``).

    ``norm="frozen"`` (the original) fixes every batch norm to its loaded statistics and trains
    only layer2..4. ``norm="batch"`` is for training from scratch, where frozen statistics are
    the identity and a deep ResNet then trains poorly: ordinary ``BatchNorm2d`` layers, and
    every stage trained.

    Attributes: ``body`` (IntermediateLayerGetter), ``num_channels`` (channels of layer4),
    ``strides``, ``dilation``.
    """

    def __init__(
        self,
        name: str,
        train_backbone: bool,
        return_interm_layers: bool,
        dilation: bool,
        weights: str = NO_WEIGHTS,
        norm: str = "frozen",
    ) -> None:
        super().__init__()
        if norm not in BACKBONE_NORMS:
            raise ValueError(f"unsupported backbone norm {norm!r}; choose one of {BACKBONE_NORMS}")
        if name not in SUPPORTED_BACKBONES:
            raise ValueError(
                f"unsupported --backbone {name!r}; choose one of {sorted(SUPPORTED_BACKBONES)}"
            )
        if dilation and SUPPORTED_BACKBONES[name] == BASIC_BLOCK_CHANNELS:
            raise ValueError(
                f"--dilation needs a bottleneck ResNet (resnet50 or larger); {name} is built from "
                "basic blocks, which torchvision cannot dilate"
            )
        resnet = getattr(torchvision.models, name)(
            weights=None,
            replace_stride_with_dilation=[False, False, dilation],
            norm_layer=FrozenBatchNorm2d if norm == "frozen" else nn.BatchNorm2d,
        )
        if weights == IMAGENET_WEIGHTS:
            # detr-irpe-train asks for this on rank 0 only (as the original), so one process
            # downloads; DDP's initial broadcast then copies the weights to the other ranks.
            load_backbone_weights(resnet, _imagenet_state_dict(name), f"ImageNet {name}")
            logger.info("backbone %s: torchvision ImageNet weights loaded", name)
        elif weights == NO_WEIGHTS:
            logger.info("backbone %s: random initialisation (--backbone_weights none)", name)
        else:
            load_backbone_weights(resnet, _read_state_dict_file(weights), weights)
            logger.info("backbone %s: weights loaded from %s", name, weights)

        for param_name, parameter in resnet.named_parameters():
            trained_stage = norm == "batch" or any(stage in param_name for stage in TRAINED_STAGES)
            if not train_backbone or not trained_stage:
                parameter.requires_grad_(False)
        if return_interm_layers:
            return_layers = {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"}
            self.strides = [4, 8, 16, 32]
        else:
            return_layers = {"layer4": "0"}
            self.strides = [DILATED_STRIDE if dilation else STRIDE]
        self.body = IntermediateLayerGetter(resnet, return_layers=return_layers)
        self.num_channels = SUPPORTED_BACKBONES[name]
        self.dilation = dilation
        # channels_last under mixed precision where it pays (detr_irpe.memory_format).
        self.memory_format = torch.contiguous_format

    def forward(self, tensor_list: NestedTensor) -> dict[str, NestedTensor]:
        """``tensors (N, 3, Hp, Wp)``, ``mask (N, Hp, Wp)`` -> ``{'0': NestedTensor(features
        (N, num_channels, h, w), mask (N, h, w))}``, mask resized with nearest interpolation."""
        images, mask = tensor_list.decompose()
        if mask is None:
            raise ValueError("the backbone needs the padding mask of the batch")
        images = images.contiguous(memory_format=self.memory_format)  # no copy if already so
        out: dict[str, NestedTensor] = {}
        for name, features in self.body(images).items():
            resized = F.interpolate(mask[None].float(), size=features.shape[-2:]).to(torch.bool)[0]
            out[name] = NestedTensor(features, resized)
        return out


class Joiner(nn.Sequential):
    """``(backbone, position_embedding)`` as an ``nn.Sequential`` so the state-dict keys are
    ``backbone.0.*`` and ``backbone.1.*`` as in the original."""

    def __init__(self, backbone: Backbone, position_embedding: nn.Module) -> None:
        super().__init__(backbone, position_embedding)
        self.num_channels = backbone.num_channels

    def forward(self, tensor_list: NestedTensor) -> tuple[list[NestedTensor], list[Tensor]]:  # type: ignore[override]
        """-> ``(features, pos)``: per returned layer a ``NestedTensor(features, mask)`` and
        ``pos (N, hidden_dim, h, w)`` in the features' dtype."""
        features = list(self[0](tensor_list).values())
        pos = [self[1](x).to(x.tensors.dtype) for x in features]
        return features, pos


def build_backbone(args: argparse.Namespace) -> Joiner:
    """Position encoding, then the ResNet (the original's order, which fixes the RNG stream)."""
    position_embedding = build_position_encoding(args)
    train_backbone = args.lr_backbone > 0
    backbone = Backbone(
        args.backbone,
        train_backbone,
        return_interm_layers=bool(args.masks),
        dilation=bool(args.dilation),
        weights=args.backbone_weights,
        norm=args.backbone_norm,
    )
    return Joiner(backbone, position_embedding)
