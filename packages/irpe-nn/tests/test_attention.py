"""RPEMultiheadAttention against the naive float64 reference, both backends."""

from __future__ import annotations

import itertools

import pytest
import torch
from reference import attention_ref

import irpe_nn

METHODS = {"euc": 0, "quant": 1, "cross": 4, "product": 3}
CASES = [
    (method, mode, shared, rpe_on, ratio)
    for method, mode, shared, rpe_on, ratio in itertools.product(
        METHODS, ["bias", "ctx"], [0, 1], ["q", "k", "v", "qk", "kv", "qkv"], [1.9, 2.0]
    )
    if not (mode == "bias" and "v" in rpe_on)
]


def make_layer(
    spec: str, embed_dim=8, num_heads=2, skip=0, seed=0
) -> irpe_nn.RPEMultiheadAttention:
    torch.manual_seed(seed)
    layer = irpe_nn.RPEMultiheadAttention(
        embed_dim, num_heads, dropout=0.1, rpe_config=irpe_nn.parse_rpe_spec(spec, skip=skip)
    )
    with torch.no_grad():  # the tables start at zero: make every term count
        for param in layer.parameters():
            param.normal_(0, 0.5)
    return layer.double().eval()


def inputs(length, batch=2, embed_dim=8, seed=1):
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(length, batch, embed_dim, generator=gen, dtype=torch.float64)
    value = torch.randn(length, batch, embed_dim, generator=gen, dtype=torch.float64)
    mask = torch.zeros(batch, length, dtype=torch.bool)
    mask[-1, -3:] = True  # the last sample has padding
    return query, value, mask


@pytest.mark.parametrize(("method", "mode", "shared", "rpe_on", "ratio"), CASES)
def test_matches_reference(backend_name, method, mode, shared, rpe_on, ratio):
    spec = f"rpe-{ratio}-{method}-{mode}-{shared}-{rpe_on}"
    layer = make_layer(spec)
    hw = (3, 4)
    query, value, mask = inputs(12)
    # DETR's encoder: query is key, value differs.
    out, weights = layer(query, query, value, key_padding_mask=mask, hw=hw)
    ref_out, ref_weights = attention_ref(
        layer, query, query, value, mask, hw, METHODS[method], ratio
    )
    torch.testing.assert_close(out, ref_out, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(weights, ref_weights, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("spec", ["rpe-2.0-product-ctx-0-qkv", "rpe-1.9-cross-bias-1-qk"])
def test_skip_tokens_match_reference(backend_name, spec):
    layer = make_layer(spec, skip=2)
    hw = (2, 3)
    query, value, mask = inputs(2 + 6)
    out, weights = layer(query, query, value, key_padding_mask=mask, hw=hw)
    method = 3 if "product" in spec else 4
    ratio = float(spec.split("-")[1])
    ref_out, ref_weights = attention_ref(layer, query, query, value, mask, hw, method, ratio)
    torch.testing.assert_close(out, ref_out, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(weights, ref_weights, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(
    "spec", ["rpe-2.0-product-ctx-0-qkv", "rpe-2.0-euc-bias-1-qk", "rpe-1.9-cross-ctx-0-qkv"]
)
def test_gradients_match_reference(backend_name, spec):
    layer = make_layer(spec)
    hw = (3, 4)
    query, value, mask = inputs(12)
    query.requires_grad_(True)
    value.requires_grad_(True)
    method = {"product": 3, "euc": 0, "cross": 4}[spec.split("-")[2]]
    ratio = float(spec.split("-")[1])
    grad_out = torch.randn(12, 2, 8, dtype=torch.float64)

    out, _ = layer(query, query, value, key_padding_mask=mask, hw=hw)
    grads = torch.autograd.grad(out, [query, value, *layer.parameters()], grad_out)
    ref_out, _ = attention_ref(layer, query, query, value, mask, hw, method, ratio)
    ref_grads = torch.autograd.grad(ref_out, [query, value, *layer.parameters()], grad_out)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("spec", ["rpe-2.0-product-ctx-0-qkv", "rpe-1.9-quant-bias-0-qk"])
def test_gradcheck(backend_name, spec):
    """Finite differences through the whole layer, tables and inputs included."""
    layer = make_layer(spec, embed_dim=4, num_heads=2)
    hw = (2, 2)
    query, value, _ = inputs(4, batch=1, embed_dim=4)
    names = [n for n, _ in layer.named_parameters() if "rpe_" in n]
    tables = [layer.get_parameter(n).detach().clone().requires_grad_(True) for n in names]

    def fn(q, v, *tabs):
        params = dict(zip(names, tabs, strict=True))
        return torch.func.functional_call(layer, params, (q, q, v), {"hw": hw})[0]

    assert torch.autograd.gradcheck(
        fn, (query.requires_grad_(True), value.requires_grad_(True), *tables)
    )


def test_backends_agree_forward_and_backward(monkeypatch):
    pytest.importorskip("irpe_ops")
    layer = make_layer("rpe-2.0-product-ctx-0-qkv", embed_dim=16, num_heads=4).float()
    query, value, mask = (
        t.float() if t.is_floating_point() else t for t in inputs(20, embed_dim=16)
    )
    results = {}
    for name in ("torch", "irpe_ops"):
        monkeypatch.setenv(irpe_nn.BACKEND_ENV, name)
        q = query.clone().requires_grad_(True)
        out, weights = layer(q, q, value, key_padding_mask=mask, hw=(4, 5))
        grads = torch.autograd.grad(out.square().sum(), [q, *layer.parameters()])
        results[name] = (out, weights, *grads)
    for a, b in zip(results["torch"], results["irpe_ops"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_projection_paths_agree(backend_name):
    """Fused and split projections (chosen by identity) give the same result."""
    layer = make_layer("rpe-2.0-product-ctx-1-k")
    query, _, _ = inputs(12)
    split = layer(query, query.clone(), query.clone(), hw=(3, 4))[0]
    for key, val in ((query, query), (query, query.clone()), (query.clone(), None)):
        val = key if val is None else val
        out = layer(query, key, val, hw=(3, 4))[0]
        torch.testing.assert_close(out, split, rtol=1e-12, atol=1e-12)


def test_no_rpe_equals_torch_multihead_attention():
    """Without iRPE the layer is plain multi-head attention (same parameter names)."""
    torch.manual_seed(0)
    ours = irpe_nn.RPEMultiheadAttention(16, 4).double().eval()
    theirs = torch.nn.MultiheadAttention(16, 4).double().eval()
    theirs.load_state_dict(ours.state_dict())
    query, value, mask = inputs(10, embed_dim=16)
    key = query + 1
    out, weights = ours(query, key, value, key_padding_mask=mask)
    ref_out, ref_weights = theirs(query, key, value, key_padding_mask=mask)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(weights, ref_weights)


def test_attn_mask_bool_and_float_match_torch():
    torch.manual_seed(0)
    ours = irpe_nn.RPEMultiheadAttention(16, 4).double().eval()
    theirs = torch.nn.MultiheadAttention(16, 4).double().eval()
    theirs.load_state_dict(ours.state_dict())
    query, value, _ = inputs(6, embed_dim=16)
    bool_mask = torch.triu(torch.ones(6, 6, dtype=torch.bool), diagonal=1)
    float_mask = torch.randn(2 * 4, 6, 6, dtype=torch.float64)
    for mask in (bool_mask, float_mask):
        out, weights = ours(query, query, value, attn_mask=mask)
        ref_out, ref_weights = theirs(query, query, value, attn_mask=mask)
        torch.testing.assert_close(out, ref_out)
        torch.testing.assert_close(weights, ref_weights)


def test_kdim_vdim_bias_kv_zero_attn_match_torch():
    torch.manual_seed(0)
    kwargs = dict(kdim=6, vdim=5, add_bias_kv=True, add_zero_attn=True)
    ours = irpe_nn.RPEMultiheadAttention(8, 2, **kwargs).double().eval()
    theirs = torch.nn.MultiheadAttention(8, 2, **kwargs).double().eval()
    theirs.load_state_dict(ours.state_dict())
    gen = torch.Generator().manual_seed(3)
    query = torch.randn(4, 2, 8, generator=gen, dtype=torch.float64)
    key = torch.randn(7, 2, 6, generator=gen, dtype=torch.float64)
    value = torch.randn(7, 2, 5, generator=gen, dtype=torch.float64)
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[0, 5:] = True
    out, weights = ours(query, key, value, key_padding_mask=mask)
    ref_out, ref_weights = theirs(query, key, value, key_padding_mask=mask)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(weights, ref_weights)


def test_dropout_feeds_rpe_v_and_weights(backend_name):
    """In training, rpe_v and the returned weights see the same post-dropout probabilities:
    with the value projection zeroed, out = rpe_v(P_dropped) W_o^T + b_o."""
    layer = make_layer("rpe-2.0-product-ctx-1-v").train()
    layer.dropout = 0.5
    with torch.no_grad():
        layer.in_proj_weight[16:].zero_()
        layer.in_proj_bias[16:].zero_()
        layer.out_proj.weight.copy_(torch.eye(8))
        layer.out_proj.bias.zero_()
    query, value, _ = inputs(12)
    torch.manual_seed(5)
    out, weights = layer(query, query, value, need_weights=True, hw=(3, 4))
    assert (weights == 0).any()  # dropout happened
    table = layer.rpe_v.lookup_table_weight[0]  # (K, D)
    ids, _ = irpe_nn.get_bucket_ids_2d(3, 3, 4, 0, 2.0, 4.0, 16.0)
    # One shared table: the head average of rpe_v(P_h) is rpe_v of the averaged weights.
    per_head = out.reshape(12, 2, 2, 4).mean(dim=2).permute(1, 0, 2)  # (N, L, D)
    expected = torch.einsum("nij,ijd->nid", weights, table[ids])
    torch.testing.assert_close(per_head, expected, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize(
    "spec", ["rpe-2.0-product-ctx-1-qkv", "rpe-2.0-euc-bias-0-qk", "rpe-1.9-cross-ctx-0-qkv", ""]
)
def test_empty_batch_like_torch_multihead_attention(backend_name, spec):
    """N = 0: empty outputs of the right shapes and a working backward, as nn.MultiheadAttention."""
    layer = make_layer(spec, skip=1).train()  # dropout on: every path of the forward
    ref = torch.nn.MultiheadAttention(8, 2, dropout=0.1).double()
    query = torch.randn(13, 0, 8, dtype=torch.float64, requires_grad=True)
    value = torch.randn(13, 0, 8, dtype=torch.float64, requires_grad=True)
    mask = torch.zeros(0, 13, dtype=torch.bool)
    attn_mask = torch.zeros(0, 13, 13, dtype=torch.bool)  # (N*nh, L, L)
    out, weights = layer(query, query, value, key_padding_mask=mask, attn_mask=attn_mask, hw=(3, 4))
    ref_out, ref_weights = ref(query, query, value, key_padding_mask=mask, attn_mask=attn_mask)
    assert out.shape == ref_out.shape == (13, 0, 8)
    assert weights.shape == ref_weights.shape == (0, 13, 13)
    assert layer(query, query, value, need_weights=False, hw=(3, 4))[1] is None
    (out.sum() + weights.sum()).backward()
    assert query.grad.shape == query.shape and value.grad.shape == value.shape
    for name, param in layer.named_parameters():
        assert param.grad is not None and not param.grad.any(), name
