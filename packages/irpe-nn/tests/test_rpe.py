"""iRPE / iRPE_Cross modules on their own."""

from __future__ import annotations

import pytest
import torch
from reference import CROSS_COLS, CROSS_ROWS, bucket_ids_ref

from irpe_nn import (
    METHOD,
    RPEMultiheadAttention,
    build_rpe,
    get_rpe_config,
    iRPE,
    iRPE_Cross,
    parse_rpe_spec,
)


def module(mode="contextual", method=METHOD.PRODUCT, transposed=True, heads=2, skip=0):
    cfg = get_rpe_config(2.0, method, mode, shared_head=heads == 1, skip=skip).rpe_k
    cls = iRPE_Cross if method == METHOD.CROSS else iRPE
    rpe = cls(
        head_dim=4,
        num_heads=heads,
        mode=mode,
        method=method,
        transposed=transposed,
        num_buckets=cfg.num_buckets,
        initializer=lambda p: torch.nn.init.normal_(p),
        rpe_config=cfg,
    )
    return rpe.double()


@pytest.mark.parametrize("heads", [1, 3])
def test_parameter_shapes_and_zero_init(heads):
    cfg = get_rpe_config(2.0, "product", "ctx", shared_head=heads == 1).rpe_k
    k = iRPE(4, heads, "contextual", METHOD.PRODUCT, True, 81, rpe_config=cfg)
    v = iRPE(4, heads, "contextual", METHOD.PRODUCT, False, 81, rpe_config=cfg)
    b = iRPE(4, heads, "bias", METHOD.PRODUCT, True, 81, rpe_config=cfg)
    assert k.lookup_table_weight.shape == (heads, 4, 81)
    assert v.lookup_table_weight.shape == (heads, 81, 4)
    assert b.lookup_table_bias.shape == (heads, 81)
    for rpe in (k, v, b):
        assert all((p == 0).all() for p in rpe.parameters())
        assert (rpe.num_heads, rpe.head_dim, rpe.num_buckets) == (heads, 4, 81)


@pytest.mark.parametrize("method", [METHOD.PRODUCT, METHOD.EUCLIDEAN, METHOD.CROSS])
def test_outputs_against_naive(backend_name, method):
    B, nh, h, w = 2, 3, 3, 4
    L = h * w
    x = torch.randn(B, nh, L, 4, dtype=torch.float64)
    probs = torch.softmax(torch.randn(B, nh, L, L, dtype=torch.float64), -1)
    parts = (
        [(CROSS_ROWS, "rp_rows"), (CROSS_COLS, "rp_cols")]
        if method == METHOD.CROSS
        else [(int(method), None)]
    )

    def naive(rpe, kind):
        total = 0
        for part_method, attr in parts:
            sub = getattr(rpe, attr) if attr else rpe
            ids = bucket_ids_ref(part_method, h, w, 0, 2.0)
            if kind == "bias":
                total = total + sub.lookup_table_bias[:, ids].unsqueeze(0)
            elif kind == "k":
                total = total + torch.einsum(
                    "bhid,hdij->bhij", x, sub.lookup_table_weight[:, :, ids]
                )
            else:
                total = total + torch.einsum(
                    "bhij,hijd->bhid", probs, sub.lookup_table_weight[:, ids]
                )
        return total

    bias = module("bias", method, heads=nh)
    ctx = module("contextual", method, heads=nh)
    val = module("contextual", method, transposed=False, heads=nh)
    out_bias = bias(x, h, w)
    assert out_bias.shape == (1, nh, L, L)
    torch.testing.assert_close(out_bias, naive(bias, "bias"))
    torch.testing.assert_close(ctx(x, h, w), naive(ctx, "k"))
    out_v = val(probs, h, w)
    assert out_v.shape == (B, nh, L, 4)
    torch.testing.assert_close(out_v, naive(val, "v"))


def test_shared_table_broadcasts_over_heads(backend_name):
    x = torch.randn(2, 5, 9, 4, dtype=torch.float64)
    shared = module("contextual", heads=1)
    out = shared(x, 3, 3)
    assert out.shape == (2, 5, 9, 9)
    per_head = torch.stack([shared(x[:, h : h + 1], 3, 3)[:, 0] for h in range(5)], 1)
    torch.testing.assert_close(out, per_head)
    assert module("bias", heads=1)(x, 3, 3).shape == (1, 1, 9, 9)


def test_square_fallback_without_height_and_width(backend_name):
    x = torch.randn(1, 2, 16, 4, dtype=torch.float64)
    rpe = module()
    torch.testing.assert_close(rpe(x), rpe(x, 4, 4))
    skip_rpe = module(skip=1)
    x17 = torch.randn(1, 2, 17, 4, dtype=torch.float64)
    torch.testing.assert_close(skip_rpe(x17), skip_rpe(x17, 4, 4))


def test_cross_has_num_buckets_and_two_tables():
    cross = module("contextual", METHOD.CROSS, heads=2)
    assert cross.num_buckets == 9
    assert sorted(n for n, _ in cross.named_parameters()) == [
        "rp_cols.lookup_table_weight",
        "rp_rows.lookup_table_weight",
    ]
    assert cross.rp_rows.method == METHOD.CROSS_ROWS and cross.rp_cols.method == METHOD.CROSS_COLS


def test_build_rpe():
    assert tuple(build_rpe(None, 32, 8)) == (None, None, None)
    q, k, v = build_rpe(get_rpe_config(2.0, "cross", "ctx", False, rpe_on="qkv"), 32, 8)
    assert isinstance(q, iRPE_Cross) and q.transposed and not v.transposed
    assert q.rp_rows.lookup_table_weight.shape == (8, 32, 9)
    assert v.rp_cols.lookup_table_weight.shape == (8, 9, 32)
    q, k, v = build_rpe(get_rpe_config(1.9, "euc", "bias", True, rpe_on="k"), 32, 8)
    assert q is None and v is None and k.lookup_table_bias.shape == (1, 7)


def test_construction_errors():
    cfg = get_rpe_config().rpe_k
    with pytest.raises(ValueError, match="cannot be used on values"):
        iRPE(4, 1, "bias", METHOD.PRODUCT, transposed=False, rpe_config=cfg)
    with pytest.raises(ValueError, match="mode must be one of"):
        iRPE(4, 1, None, METHOD.PRODUCT, rpe_config=cfg)
    with pytest.raises(ValueError, match="iRPE_Cross"):
        iRPE(4, 1, "bias", METHOD.CROSS, rpe_config=cfg)
    with pytest.raises(ValueError, match="rpe_config"):
        iRPE(4, 1, "bias", METHOD.PRODUCT, num_buckets=81)
    with pytest.raises(ValueError, match=r"METHOD\.CROSS"):
        iRPE_Cross(METHOD.PRODUCT, head_dim=4, rpe_config=cfg)


def test_forward_errors():
    rpe = module()  # built for skip = 0, 2 heads, head_dim 4
    with pytest.raises(ValueError, match=r"sequence length 13 .* height=3, width=4"):
        rpe(torch.randn(1, 2, 13, 4, dtype=torch.float64), 3, 4)
    with pytest.raises(ValueError, match=r"sequence length 11 .*height\*width=12"):
        rpe(torch.randn(1, 2, 11, 4, dtype=torch.float64), 3, 4)
    with pytest.raises(ValueError, match="skip > 0"):
        module(skip=1)(torch.randn(1, 2, 12, 4, dtype=torch.float64), 3, 4)
    with pytest.raises(ValueError, match="both height and width"):
        rpe(torch.randn(1, 2, 12, 4, dtype=torch.float64), 3)
    with pytest.raises(ValueError, match="head_dim=4"):
        rpe(torch.randn(1, 2, 12, 5, dtype=torch.float64), 3, 4)
    with pytest.raises(ValueError, match="3 heads"):
        rpe(torch.randn(1, 3, 12, 4, dtype=torch.float64), 3, 4)
    with pytest.raises(ValueError, match="4-D"):
        rpe(torch.randn(2, 12, 4, dtype=torch.float64), 3, 4)
    with pytest.raises(ValueError, match="square attention weights"):
        module(transposed=False)(torch.randn(1, 2, 12, 13, dtype=torch.float64), 3, 4)


def test_build_rpe_accepts_an_rpe_string():
    from_string = build_rpe("rpe-2.0-cross-bias-0-qk", head_dim=4, num_heads=2)
    from_config = build_rpe(parse_rpe_spec("rpe-2.0-cross-bias-0-qk"), head_dim=4, num_heads=2)
    for got, want in zip(from_string, from_config, strict=True):
        assert type(got) is type(want)
        if want is not None:
            assert got.rpe_config == want.rpe_config
            assert [p.shape for p in got.parameters()] == [p.shape for p in want.parameters()]
    assert tuple(build_rpe("", head_dim=4, num_heads=2)) == (None, None, None)
    with pytest.raises(ValueError, match="method: unknown name 'prod'"):
        build_rpe("rpe-2.0-prod-ctx-1-k", head_dim=4, num_heads=2)
    with pytest.raises(TypeError, match="rpe_config: expected an RPEConfig"):
        build_rpe(2.0, head_dim=4, num_heads=2)


def test_attention_accepts_an_rpe_string():
    torch.manual_seed(0)
    from_string = RPEMultiheadAttention(8, 2, rpe_config="rpe-2.0-product-ctx-1-k")
    torch.manual_seed(0)
    from_config = RPEMultiheadAttention(8, 2, rpe_config=parse_rpe_spec("rpe-2.0-product-ctx-1-k"))
    got, want = from_string.state_dict(), from_config.state_dict()
    assert list(got) == list(want)
    assert all(torch.equal(got[key], want[key]) for key in want)
    assert from_string.rpe_k.rpe_config == parse_rpe_spec("rpe-2.0-product-ctx-1-k").rpe_k
    assert not RPEMultiheadAttention(8, 2, rpe_config="").has_rpe
