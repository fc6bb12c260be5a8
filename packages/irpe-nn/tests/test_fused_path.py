"""The fused attention path of the layers (``irpe_ops.rpe_attention``): taken whenever it
applies, equal to the materialised path without dropout, reproducible with dropout."""

from __future__ import annotations

import pytest
import torch

import irpe_nn
from irpe_nn import RPEMultiheadAttention, build_rpe, parse_rpe_spec
from irpe_nn.functional import rpe_attention

needs_fused = pytest.mark.skipif(
    irpe_nn.attention_path() != "fused", reason="irpe_ops without the fused kernel"
)


def _layer(spec: str, skip: int = 0, dropout: float = 0.0) -> RPEMultiheadAttention:
    torch.manual_seed(0)
    layer = RPEMultiheadAttention(
        32, 4, dropout=dropout, rpe_config=parse_rpe_spec(spec, skip=skip)
    )
    for module in (layer.rpe_q, layer.rpe_k, layer.rpe_v):
        if module is not None:  # tables start at zero; make the test see them
            for table in module.parameters():
                torch.nn.init.normal_(table, std=0.5)
    return layer


def _both_paths(layer, x, hw, **kwargs):
    """``(out without weights, out with weights)`` and their input gradients."""
    results = []
    for need_weights in (False, True):
        x = x.detach().requires_grad_(True)
        out, _ = layer(x, x, x, need_weights=need_weights, hw=hw, **kwargs)
        (grad,) = torch.autograd.grad(out.square().sum(), x)
        results.append((out, grad))
    return results


@pytest.mark.parametrize(
    ("spec", "skip", "hw"),
    [
        ("rpe-2.0-product-ctx-1-k", 0, (5, 7)),
        ("rpe-2.0-product-ctx-1-qkv", 0, (4, 4)),
        ("rpe-2.0-product-ctx-0-qkv", 1, (3, 6)),
        ("rpe-1.9-euc-ctx-1-kv", 0, (6, 2)),
        ("rpe-1.9-quant-ctx-0-q", 2, (2, 5)),
        ("rpe-2.0-cross-ctx-1-k", 0, (3, 4)),  # not fused: two tables
        ("rpe-2.0-product-bias-1-qk", 0, (3, 4)),  # not fused: bias mode
    ],
)
def test_without_weights_equals_the_materialised_path(spec: str, skip: int, hw) -> None:
    layer = _layer(spec, skip).eval()
    x = torch.randn(skip + hw[0] * hw[1], 3, 32)
    mask = torch.zeros(3, x.shape[0], dtype=torch.bool)
    mask[1, -2:] = True
    (fused, fused_grad), (materialised, materialised_grad) = _both_paths(
        layer, x, hw, key_padding_mask=mask
    )
    torch.testing.assert_close(fused, materialised, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused_grad, materialised_grad, rtol=1e-4, atol=1e-4)


@needs_fused
def test_the_path_is_reported() -> None:
    assert irpe_nn.attention_path("cpu", torch.float32) == "fused"
    assert irpe_nn.attention_path("cpu", torch.float32, need_weights=True) == "irpe_ops"
    assert irpe_nn.attention_path("cpu", torch.float32, attn_mask=True) == "irpe_ops"
    assert irpe_nn.attention_path("cpu", torch.float16) == "irpe_ops"


@needs_fused
def test_irpe_fused_0_turns_the_fused_path_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(irpe_nn.FUSED_ENV, "0")
    assert irpe_nn.attention_path() == "irpe_ops"


@needs_fused
def test_a_seed_reproduces_the_dropout_bit_for_bit() -> None:
    layer = _layer("rpe-2.0-product-ctx-1-k", dropout=0.3).train()
    x = torch.randn(20, 2, 32)
    outs = []
    for _ in range(2):
        torch.manual_seed(7)
        outs.append(layer(x, x, x, need_weights=False, hw=(4, 5))[0])
    torch.manual_seed(8)
    other = layer(x, x, x, need_weights=False, hw=(4, 5))[0]
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], other)


@needs_fused
def test_dropout_keeps_the_right_fraction_with_the_right_scale() -> None:
    """Uniform attention (zero queries and table) over 400 keys with values of one: each
    output is (kept keys) / (400 (1 - p)), a binomial thinning with mean 1."""
    p = 0.25
    rpe = build_rpe(parse_rpe_spec("rpe-2.0-product-ctx-1-k"), head_dim=8, num_heads=2)
    q = torch.zeros(4, 2, 400, 8)
    k = torch.randn(4, 2, 400, 8)
    v = torch.ones(4, 2, 400, 8)
    torch.manual_seed(0)
    out = rpe_attention(q, k, v, rpe, (20, 20), dropout_p=p)[..., 0]
    row_sd = (400 * p * (1 - p)) ** 0.5 / (400 * (1 - p))  # 0.029
    assert abs(out.mean().item() - 1.0) < 6 * row_sd / out.numel() ** 0.5
    assert abs(out.std().item() - row_sd) < 0.15 * row_sd
    kept = out * 400 * (1 - p)  # whole numbers of kept keys
    torch.testing.assert_close(kept, kept.round(), rtol=0, atol=1e-3)
