"""RPEMultiheadAttention's input errors name the problem."""

from __future__ import annotations

import pytest
import torch

import irpe_nn


def layer(spec="rpe-2.0-product-ctx-1-qk", **kwargs):
    return irpe_nn.RPEMultiheadAttention(8, 2, rpe_config=irpe_nn.parse_rpe_spec(spec), **kwargs)


def test_missing_hw_says_how_to_pass_it():
    x = torch.randn(12, 1, 8)
    with pytest.raises(ValueError, match=r"hw=\(height, width\)"):
        layer()(x, x, x)


def test_length_mismatch_names_the_numbers():
    x = torch.randn(13, 1, 8)
    with pytest.raises(
        ValueError, match=r"sequence length 13 .*height=3, width=4 .*height\*width=12"
    ):
        layer()(x, x, x, hw=(3, 4))


def test_cross_attention_lengths_explain_self_attention():
    q, kv = torch.randn(12, 1, 8), torch.randn(6, 1, 8)
    with pytest.raises(ValueError, match=r"self-attention.*Lq=12, Lk=6"):
        layer()(q, kv, kv, hw=(3, 4))


@pytest.mark.parametrize("hw", [(3,), (3.0, 4), "34", (0, 12)])
def test_bad_hw(hw):
    x = torch.randn(12, 1, 8)
    with pytest.raises(ValueError, match="hw must be"):
        layer()(x, x, x, hw=hw)


def test_shape_errors():
    x = torch.randn(12, 1, 8)
    with pytest.raises(ValueError, match=r"query must be \(L, N, 8\)"):
        layer()(torch.randn(12, 8), x, x, hw=(3, 4))
    with pytest.raises(ValueError, match="share the batch size"):
        layer()(x, torch.randn(12, 2, 8), torch.randn(12, 2, 8), hw=(3, 4))
    with pytest.raises(ValueError, match=r"key_padding_mask must be \(N, Lk\)"):
        layer()(x, x, x, key_padding_mask=torch.zeros(12, 1, dtype=torch.bool), hw=(3, 4))
    with pytest.raises(ValueError, match="attn_mask must be"):
        layer()(x, x, x, attn_mask=torch.zeros(12, 11), hw=(3, 4))
    with pytest.raises(ValueError, match="float or bool"):
        layer()(x, x, x, attn_mask=torch.zeros(12, 12, dtype=torch.int32), hw=(3, 4))


def test_constructor_errors():
    with pytest.raises(ValueError, match="divisible"):
        irpe_nn.RPEMultiheadAttention(10, 3)
    with pytest.raises(ValueError, match="add_bias_kv"):
        x = torch.randn(12, 1, 8)
        layer(add_bias_kv=True)(x, x, x, hw=(3, 4))


def test_byte_masks_are_converted_with_a_warning():
    x = torch.randn(12, 1, 8)
    bool_mask = torch.rand(12, 12) > 0.7
    bool_mask.fill_diagonal_(False)
    with pytest.warns(UserWarning, match="Byte tensor"):
        out_byte, _ = layer().eval()(x, x, x, attn_mask=bool_mask.to(torch.uint8), hw=(3, 4))
    torch.manual_seed(0)
    m = layer().eval()
    torch.manual_seed(0)
    m2 = layer().eval()
    with pytest.warns(UserWarning):
        a = m(x, x, x, attn_mask=bool_mask.to(torch.uint8), hw=(3, 4))[0]
    b = m2(x, x, x, attn_mask=bool_mask, hw=(3, 4))[0]
    torch.testing.assert_close(a, b)
    assert out_byte.shape == (12, 1, 8)
