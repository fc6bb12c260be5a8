"""Frozen batch norm in place: bitwise the original's values and gradients, and safe fallbacks."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torchvision.ops import misc

from detr_irpe.models.frozen_batch_norm import FrozenBatchNorm2d


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def randomise(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Non-trivial frozen statistics and affines (the defaults make the layer an identity)."""
    for module in model.modules():
        if isinstance(module, misc.FrozenBatchNorm2d):
            for name in ("weight", "bias", "running_mean", "running_var"):
                buffer = getattr(module, name)
                low = 0.5 if name in ("weight", "running_var") else -0.2
                buffer.copy_(torch.rand(buffer.shape, generator=generator) * 0.5 + low)


def frozen_resnet18(norm: type, generator: torch.Generator) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(norm_layer=norm)
    randomise(model, generator)
    model.conv1.requires_grad_(False)
    return model


def test_resnet_values_and_gradients_are_bitwise_the_originals(
    generator: torch.Generator,
) -> None:
    ours = frozen_resnet18(FrozenBatchNorm2d, generator)
    original = frozen_resnet18(misc.FrozenBatchNorm2d, torch.Generator().manual_seed(0))
    original.load_state_dict(ours.state_dict())
    images = torch.randn(2, 3, 64, 80, generator=generator)
    outputs = [model(images) for model in (ours, original)]
    assert torch.equal(outputs[0], outputs[1])
    grad = torch.randn(outputs[0].shape, generator=generator)
    for out in outputs:
        out.backward(grad)
    for (name, a), b in zip(ours.named_parameters(), original.parameters(), strict=True):
        assert (a.grad is None) == (b.grad is None), name
        assert a.grad is None or torch.equal(a.grad, b.grad), name


def test_overwrites_a_convolution_output_but_not_a_leaf(generator: torch.Generator) -> None:
    layer = FrozenBatchNorm2d(3)
    randomise(layer, generator)
    conv_out = torch.randn(1, 3, 4, 4, generator=generator).requires_grad_() * 1.0  # non-leaf
    expected = misc.FrozenBatchNorm2d.forward(layer, conv_out.detach())
    assert layer(conv_out).data_ptr() == conv_out.data_ptr()
    assert torch.equal(conv_out, expected)
    leaf = torch.randn(1, 3, 4, 4, generator=generator, requires_grad=True)
    before = leaf.detach().clone()
    out = layer(leaf)
    assert out.data_ptr() != leaf.data_ptr() and torch.equal(leaf.detach(), before)
    out.sum().backward()
    assert leaf.grad is not None


def test_bfloat16_input_is_promoted_as_out_of_place(generator: torch.Generator) -> None:
    layer = FrozenBatchNorm2d(3)
    randomise(layer, generator)
    x = torch.randn(1, 3, 4, 4, generator=generator).bfloat16()
    before = x.clone()
    out = layer(x)
    assert out.dtype == torch.float32 and torch.equal(x, before)
    assert torch.equal(out, misc.FrozenBatchNorm2d.forward(layer, x))
