"""Configs and the rpe-... string (docs/layers.md, 'The rpe-… string'), with our stricter
errors."""

from __future__ import annotations

import pytest

from irpe_nn import (
    METHOD,
    RPE_HELP,
    RPEConfig,
    get_rpe_config,
    get_single_rpe_config,
    parse_rpe_spec,
)

# ratio -> (product buckets S², per-axis buckets S), S = 2*int(2*ratio) + 1.
BUCKETS = {1.9: (49, 7), 2.0: (81, 9), 2.5: (121, 11), 3.0: (169, 13)}


@pytest.mark.parametrize("ratio", sorted(BUCKETS))
def test_bucket_counts(ratio):
    product, side = BUCKETS[ratio]
    for method, expected in (("product", product), ("euc", side), ("quant", side), ("cross", side)):
        assert get_single_rpe_config(ratio, method).num_buckets == expected
        assert get_single_rpe_config(ratio, method, skip=3).num_buckets == expected + 1


def test_single_config_fields():
    cfg = get_single_rpe_config(2.5, METHOD.EUCLIDEAN, "bias", False, skip=1)
    assert (cfg.shared_head, cfg.mode, cfg.method) == (False, "bias", METHOD.EUCLIDEAN)
    assert (cfg.alpha, cfg.beta, cfg.gamma) == (2.5, 5.0, 20.0)
    assert cfg.num_buckets == 12
    assert cfg.method == 0  # ids are plain ints


def test_get_rpe_config_rpe_on_and_ctx_alias():
    cfg = get_rpe_config(ratio=2.0, method="Product", mode="ctx", rpe_on="kq")
    assert cfg.rpe_v is None
    assert cfg.rpe_q is cfg.rpe_k
    assert cfg.rpe_k.mode == "contextual" and cfg.rpe_k.method == METHOD.PRODUCT
    assert get_rpe_config(method=METHOD.CROSS).rpe_k.method == METHOD.CROSS


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("rpe-2.0-product-ctx-1-k", dict(k=True, method=METHOD.PRODUCT, shared=True, K=81)),
        ("rpe-1.9-product-ctx-1-k", dict(k=True, method=METHOD.PRODUCT, shared=True, K=49)),
        (
            "rpe-2-Product-contextual-2-kq",
            dict(q=True, k=True, method=METHOD.PRODUCT, shared=True, K=81),
        ),
        (
            "rpe-2.0-product-ctx-0-qkv",
            dict(q=True, k=True, v=True, method=METHOD.PRODUCT, shared=False, K=81),
        ),
        ("rpe-2.5-euc-ctx-0-v", dict(v=True, method=METHOD.EUCLIDEAN, shared=False, K=11)),
        ("rpe-3.0-quant-bias-0-k", dict(k=True, method=METHOD.QUANT, shared=False, K=13)),
        ("rpe-1.9-cross-bias-1-q", dict(q=True, method=METHOD.CROSS, shared=True, K=7)),
    ],
)
def test_parse_valid(spec, expected):
    cfg = parse_rpe_spec(spec)
    assert isinstance(cfg, RPEConfig)
    present = [getattr(cfg, f"rpe_{x}") for x in "qkv" if expected.get(x)]
    for x in "qkv":
        assert (getattr(cfg, f"rpe_{x}") is not None) == bool(expected.get(x))
    for single in present:
        assert single.method == expected["method"]
        assert single.shared_head == expected["shared"]
        assert single.num_buckets == expected["K"]


def test_parse_empty_and_skip():
    assert parse_rpe_spec("") is None
    assert parse_rpe_spec(None) is None
    assert parse_rpe_spec("rpe-2.0-product-ctx-1-k", skip=1).rpe_k.num_buckets == 82


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ("RPE-2.0-product-ctx-1-k", "prefix"),
        ("rpe-2.0-product-ctx-1", "6 fields"),
        ("rpe-2.0-product-ctx-1-k-x", "6 fields"),
        ("rpe-abc-product-ctx-1-k", "ratio"),
        ("rpe-0-product-ctx-1-k", "ratio"),
        ("rpe-nan-product-ctx-1-k", "ratio"),
        ("rpe-2.0-foo-ctx-1-k", "method"),
        ("rpe-2.0-product-xx-1-k", "mode"),
        ("rpe-2.0-product-CTX-1-k", "mode"),
        ("rpe-2.0-product-ctx-yes-k", "shared_head"),
        ("rpe-2.0-product-ctx-1-z", "rpe_on"),
        ("rpe-2.0-product-ctx-1-kx", "rpe_on"),
        ("rpe-2.0-product-bias-1-v", "mode"),
    ],
)
def test_parse_errors_name_the_field_and_help(spec, field):
    with pytest.raises(ValueError, match=field) as info:
        parse_rpe_spec(spec)
    message = str(info.value)
    assert spec in message
    assert RPE_HELP in message
    for ratio, buckets in (("1.9", "49"), ("2.0", "81"), ("2.5", "121"), ("3.0", "169")):
        assert ratio in RPE_HELP and buckets in RPE_HELP


def test_method_errors_list_choices():
    with pytest.raises(ValueError, match="euc, quant, cross, product"):
        get_rpe_config(method="foo")
    with pytest.raises(ValueError, match="internal"):
        get_rpe_config(method=METHOD.CROSS_ROWS)
    with pytest.raises(ValueError, match="skip"):
        get_single_rpe_config(skip=-1)
    with pytest.raises(ValueError, match="expected a string"):
        parse_rpe_spec(2.0)
