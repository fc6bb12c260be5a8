"""Parameter names, shapes, order and initialisation as the original (PyTorch 1.7's
nn.MultiheadAttention plus rpe_q/rpe_k/rpe_v), so its state dicts load unchanged."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from irpe_nn import RPEMultiheadAttention, parse_rpe_spec

BASE = [
    ("in_proj_weight", (256 * 3, 256)),
    ("in_proj_bias", (256 * 3,)),
    ("out_proj.weight", (256, 256)),
    ("out_proj.bias", (256,)),
]

# DETR's encoder layers: hidden 256, 8 heads, head dim D = 32.
RPE_KEYS = {
    "": [],
    "rpe-2.0-product-ctx-1-k": [("rpe_k.lookup_table_weight", (1, 32, 81))],
    "rpe-1.9-product-ctx-0-k": [("rpe_k.lookup_table_weight", (8, 32, 49))],
    "rpe-2.5-product-ctx-1-q": [("rpe_q.lookup_table_weight", (1, 32, 121))],
    "rpe-2.5-euc-ctx-0-v": [("rpe_v.lookup_table_weight", (8, 11, 32))],
    "rpe-3.0-quant-bias-0-k": [("rpe_k.lookup_table_bias", (8, 13))],
    "rpe-2.0-euc-bias-1-q": [("rpe_q.lookup_table_bias", (1, 9))],
    "rpe-2.0-product-ctx-0-qkv": [
        ("rpe_q.lookup_table_weight", (8, 32, 81)),
        ("rpe_k.lookup_table_weight", (8, 32, 81)),
        ("rpe_v.lookup_table_weight", (8, 81, 32)),
    ],
    "rpe-1.9-cross-ctx-0-qv": [
        ("rpe_q.rp_rows.lookup_table_weight", (8, 32, 7)),
        ("rpe_q.rp_cols.lookup_table_weight", (8, 32, 7)),
        ("rpe_v.rp_rows.lookup_table_weight", (8, 7, 32)),
        ("rpe_v.rp_cols.lookup_table_weight", (8, 7, 32)),
    ],
    "rpe-2.0-cross-bias-1-k": [
        ("rpe_k.rp_rows.lookup_table_bias", (1, 9)),
        ("rpe_k.rp_cols.lookup_table_bias", (1, 9)),
    ],
}


@pytest.mark.parametrize("spec", list(RPE_KEYS))
def test_keys_shapes_and_order(spec):
    layer = RPEMultiheadAttention(256, 8, dropout=0.1, rpe_config=parse_rpe_spec(spec))
    got = [(k, tuple(v.shape)) for k, v in layer.state_dict().items()]
    assert got == BASE + RPE_KEYS[spec]


@pytest.mark.parametrize("spec", list(RPE_KEYS))
def test_original_state_dict_loads_strictly(spec):
    """A state dict written with the original's names and shapes loads, and every value
    lands in the right place."""
    original = {k: torch.randn(shape) for k, shape in BASE + RPE_KEYS[spec]}
    layer = RPEMultiheadAttention(256, 8, rpe_config=parse_rpe_spec(spec))
    layer.load_state_dict(original, strict=True)
    for key, value in layer.state_dict().items():
        assert torch.equal(value, original[key])


def test_separate_projection_and_bias_kv_keys():
    layer = RPEMultiheadAttention(8, 2, add_bias_kv=True, kdim=6, vdim=4, bias=False)
    got = [(k, tuple(v.shape)) for k, v in layer.state_dict().items()]
    assert got == [
        ("q_proj_weight", (8, 8)),
        ("k_proj_weight", (8, 6)),
        ("v_proj_weight", (8, 4)),
        ("bias_k", (1, 1, 8)),
        ("bias_v", (1, 1, 8)),
        ("out_proj.weight", (8, 8)),
        ("out_proj.bias", (8,)),  # PyTorch 1.7: out_proj always has a bias
    ]


def test_initialisation_follows_pytorch_1_7_order():
    """Same RNG stream as PyTorch 1.7's MultiheadAttention: out_proj's own default init,
    then xavier-uniform in_proj_weight, zero biases, xavier-normal bias_k/bias_v."""
    torch.manual_seed(123)
    layer = RPEMultiheadAttention(
        16, 4, add_bias_kv=True, rpe_config=parse_rpe_spec("rpe-2.0-product-ctx-0-qkv")
    )
    torch.manual_seed(123)
    in_proj_weight = torch.empty(48, 16)
    out_proj = nn.Linear(16, 16)
    bias_k, bias_v = torch.empty(1, 1, 16), torch.empty(1, 1, 16)
    nn.init.xavier_uniform_(in_proj_weight)
    nn.init.xavier_normal_(bias_k)
    nn.init.xavier_normal_(bias_v)
    assert torch.equal(layer.in_proj_weight, in_proj_weight)
    assert torch.equal(layer.out_proj.weight, out_proj.weight)
    assert torch.equal(layer.bias_k, bias_k) and torch.equal(layer.bias_v, bias_v)
    assert (layer.in_proj_bias == 0).all() and (layer.out_proj.bias == 0).all()
    for name, param in layer.named_parameters():
        if name.startswith("rpe_"):
            assert (param == 0).all(), name
