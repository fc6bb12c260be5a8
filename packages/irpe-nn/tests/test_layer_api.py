"""The layer API next to PyTorch's and timm's: batch_first, the SDPA-style functional form, the
bias helper, the timm-style ViT attention, and torch.compile across grid sizes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import irpe_nn
from irpe_nn import RPEAttention, RPEMultiheadAttention, build_rpe, parse_rpe_spec
from irpe_nn.functional import rpe_attention, rpe_bias

SPEC = "rpe-2.0-product-ctx-1-qkv"


def _layer(spec: str = SPEC, **kwargs: object) -> RPEMultiheadAttention:
    torch.manual_seed(0)
    layer = RPEMultiheadAttention(32, 4, rpe_config=spec, **kwargs)
    for module in (layer.rpe_q, layer.rpe_k, layer.rpe_v):
        if module is not None:  # tables start at zero; make the test see them
            torch.nn.init.normal_(module.table, std=0.5)
    return layer


def test_batch_first_equals_sequence_first() -> None:
    seq_first = _layer()
    batch_first = _layer(batch_first=True)
    batch_first.load_state_dict(seq_first.state_dict())
    x = torch.randn(12, 3, 32)  # (L, N, E) for a 3x4 grid
    mask = torch.zeros(3, 12, dtype=torch.bool)
    mask[1, -2:] = True
    out, weights = seq_first(x, x, x, key_padding_mask=mask, hw=(3, 4))
    out_bf, weights_bf = batch_first(*(x.transpose(0, 1),) * 3, key_padding_mask=mask, hw=(3, 4))
    torch.testing.assert_close(out_bf, out.transpose(0, 1))
    torch.testing.assert_close(weights_bf, weights)


def test_a_batch_first_input_to_a_sequence_first_layer_is_named() -> None:
    x = torch.randn(2, 12, 32)  # (N, L, E) given to a (L, N, E) layer
    with pytest.raises(ValueError, match=r"sequence-first \(L, N, E\) expected.*batch_first=True"):
        _layer()(x, x, x, hw=(3, 4))
    with pytest.raises(ValueError, match=r"batch-first \(N, L, E\) expected"):
        y = x.transpose(0, 1)
        _layer(batch_first=True)(y, y, y, hw=(3, 4))


def _heads(x: torch.Tensor, nh: int) -> torch.Tensor:
    L, N, E = x.shape
    return x.view(L, N, nh, E // nh).permute(1, 2, 0, 3)


def test_functional_equals_the_layer() -> None:
    layer = _layer().eval()
    x = torch.randn(12, 2, 32)
    q, k, v = (_heads(t, 4) for t in layer._project(x, x, x))
    out = rpe_attention(q, k, v, (layer.rpe_q, layer.rpe_k, layer.rpe_v), (3, 4))
    expected, _ = layer(x, x, x, need_weights=False, hw=(3, 4))
    merged = layer.out_proj(out.permute(2, 0, 1, 3).reshape(12, 2, 32))
    torch.testing.assert_close(merged, expected)


def test_functional_masks_follow_sdpa() -> None:
    """Without iRPE the functional form is SDPA, bool mask (True = takes part) included."""
    q, k, v = torch.randn(3, 2, 4, 5, 8).unbind(0)
    keep = torch.rand(5, 5) > 0.3
    keep[:, 0] = True
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    torch.testing.assert_close(rpe_attention(q, k, v, None, None, attn_mask=keep), expected)


def test_bias_helper_with_sdpa_equals_rpe_attention() -> None:
    rpe = build_rpe(parse_rpe_spec("rpe-2.0-product-ctx-1-qk"), head_dim=8, num_heads=4)
    for module in rpe[:2]:
        torch.nn.init.normal_(module.table, std=0.5)
    q, k, v = torch.randn(3, 2, 4, 12, 8, requires_grad=True).unbind(0)
    bias = rpe_bias(q, k, rpe, (3, 4))
    assert bias.shape == (2, 4, 12, 12)
    with_sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    torch.testing.assert_close(with_sdpa, rpe_attention(q, k, v, rpe, (3, 4)))
    with_sdpa.sum().backward()
    assert rpe[1].table.grad is not None and rpe[1].table.grad.abs().sum() > 0


def test_bias_helper_refuses_the_value_encoding() -> None:
    rpe = build_rpe(parse_rpe_spec("rpe-2.0-product-ctx-1-v"), head_dim=8, num_heads=4)
    q = torch.randn(1, 4, 12, 8)
    with pytest.raises(ValueError, match="rpe_v"):
        rpe_bias(q, q, rpe, (3, 4))


class TinyViT(torch.nn.Module):
    """The docs' example: patch embedding, class token, blocks whose attention is iRPE."""

    def __init__(self, dim: int = 32, depth: int = 2, heads: int = 4, classes: int = 10):
        super().__init__()
        self.patch = torch.nn.Conv2d(3, dim, kernel_size=8, stride=8)
        self.cls = torch.nn.Parameter(torch.zeros(1, 1, dim))
        self.norms = torch.nn.ModuleList(torch.nn.LayerNorm(dim) for _ in range(depth))
        self.attns = torch.nn.ModuleList(
            RPEAttention(dim, heads, qkv_bias=True, rpe_config="rpe-2.0-product-ctx-1-k", skip=1)
            for _ in range(depth)
        )
        self.head = torch.nn.Linear(dim, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch(images)  # (B, C, h, w)
        hw = x.shape[-2:]
        x = torch.cat([self.cls.expand(len(x), -1, -1), x.flatten(2).transpose(1, 2)], dim=1)
        for norm, attn in zip(self.norms, self.attns, strict=True):
            x = x + attn(norm(x), hw=hw)
        return self.head(x[:, 0])


def test_a_small_vit_with_rpe_attention_trains() -> None:
    torch.manual_seed(0)
    model = TinyViT()
    images = torch.randn(2, 3, 32, 48)  # a 4x6 patch grid plus the class token
    loss = model(images).logsumexp(-1).mean()
    loss.backward()
    table = model.attns[0].rpe_k.table
    assert table.grad is not None and table.grad.abs().sum() > 0
    assert model.attns[0].rpe_k.num_buckets == 82  # 9x9 product buckets + the class token's


def test_rpe_attention_without_encoding_is_plain_attention() -> None:
    torch.manual_seed(0)
    attn = RPEAttention(32, 4, qkv_bias=True).eval()
    x = torch.randn(2, 17, 32)
    q, k, v = attn.qkv(x).reshape(2, 17, 3, 4, 8).permute(2, 0, 3, 1, 4)
    expected = attn.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 17, 32))
    torch.testing.assert_close(attn(x), expected)


@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_fullgraph_survives_a_change_of_grid(dynamic: bool) -> None:
    torch._dynamo.reset()
    layer = _layer("rpe-2.0-product-ctx-1-k").eval()
    compiled = torch.compile(layer, fullgraph=True, dynamic=dynamic)
    for hw in ((3, 4), (4, 5), (2, 6)):
        x = torch.randn(hw[0] * hw[1], 2, 32)
        out, _ = compiled(x, x, x, need_weights=False, hw=hw)
        expected, _ = layer(x, x, x, need_weights=False, hw=hw)
        torch.testing.assert_close(out, expected)
    assert irpe_nn.backend() in ("irpe_ops", "torch")
