"""Configs and the rpe-... string (docs/layers.md, 'The rpe-… string'), with our stricter
errors."""

from __future__ import annotations

import math
import random

import pytest

from irpe_nn import (
    METHOD,
    RPE_HELP,
    RPEConfig,
    get_rpe_config,
    get_single_rpe_config,
    parse_rpe_spec,
)
from irpe_nn.config import MAX_BUCKETS_PER_AXIS

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


@pytest.mark.parametrize(
    ("ratio", "method", "count"),
    [
        (64, "product", "66049"),
        (1e4, "product", "1600080001"),
        (1e4, "euc", "40001"),
        (1e9, "cross", "4000000001"),
        (1e300, "quant", "4e+300"),
    ],
)
def test_huge_ratios_name_the_bucket_count_and_the_maximum(ratio, method, count):
    for build in (
        lambda: get_single_rpe_config(ratio, method),
        lambda: get_rpe_config(ratio, method),
        lambda: parse_rpe_spec(f"rpe-{ratio!r}-{method}-ctx-1-k"),
    ):
        with pytest.raises(ValueError, match="ratio") as info:
            build()
        message = str(info.value)
        assert f"gives {count} buckets" in message
        assert "at most 255 per axis" in message and "ratio < 64" in message


def test_the_largest_ratio_allowed():
    assert MAX_BUCKETS_PER_AXIS == 255
    assert get_single_rpe_config(63.99, "product").num_buckets == 255 * 255
    assert get_single_rpe_config(63.99, "euc", skip=1).num_buckets == 255 + 1


@pytest.mark.parametrize("ratio", [math.nan, math.inf, -math.inf, 0.0, -1.0, -1e-300])
def test_non_finite_and_non_positive_ratios(ratio):
    with pytest.raises(ValueError, match="ratio: must be a finite number > 0"):
        get_single_rpe_config(ratio)
    # A negative ratio cannot even be written in the string: its '-' adds a field.
    match = "ratio: must be a finite number > 0" if not ratio < 0 else "expected 6 fields"
    with pytest.raises(ValueError, match=match):
        parse_rpe_spec(f"rpe-{ratio!r}-product-ctx-1-k")


_VALID = [
    "rpe-2.0-product-ctx-1-k",
    "rpe-1.9-euc-bias-0-qk",
    "rpe-2.5-quant-contextual-1-qkv",
    "rpe-3.0-cross-ctx-0-v",
]
_ALPHABET = "rpe-.0123456789eE+_ xqkvbiasctxproducteucquantcross\x00\u0661\u00e9-"
_RATIOS = ["1e4", "1e9", "1e999", "-1", "0", "nan", "inf", "63.99", "64", "1e-320", "1_0", "0x1"]


def _mutate(spec: str, rng: random.Random) -> str:
    fields = spec.split("-")
    kind = rng.randrange(7)
    if kind == 0 and spec:  # delete a character
        i = rng.randrange(len(spec))
        return spec[:i] + spec[i + 1 :]
    if kind == 1:  # insert a character
        i = rng.randrange(len(spec) + 1)
        return spec[:i] + rng.choice(_ALPHABET) + spec[i:]
    if kind == 2 and spec:  # replace a character
        i = rng.randrange(len(spec))
        return spec[:i] + rng.choice(_ALPHABET) + spec[i + 1 :]
    if kind == 3:  # another ratio
        fields[1 % len(fields)] = rng.choice(_RATIOS)
    elif kind == 4 and len(fields) > 1:  # swap two fields
        i, j = rng.sample(range(len(fields)), 2)
        fields[i], fields[j] = fields[j], fields[i]
    elif kind == 5:  # drop or duplicate a field
        i = rng.randrange(len(fields))
        drop = rng.random() < 0.5
        fields = fields[:i] + fields[i + 1 :] if drop else fields[: i + 1] + fields[i:]
    else:  # change the case
        return spec.upper() if rng.random() < 0.5 else spec.swapcase()
    return "-".join(fields)


def test_fuzzed_specs_parse_or_raise_value_error():
    """Random mutations of valid strings: a config or ValueError, never another exception."""
    rng = random.Random(20240601)
    parsed = 0
    for case in range(400):
        spec = rng.choice(_VALID)
        for _ in range(rng.randint(1, 3)):
            spec = _mutate(spec, rng)
        try:
            config = parse_rpe_spec(spec, skip=rng.choice([0, 2]))
        except ValueError:
            continue
        except Exception as exc:  # pragma: no cover - the failure report
            pytest.fail(f"case {case}: {spec!r} raised {type(exc).__name__}: {exc}")
        parsed += 1
        assert config is None or isinstance(config, RPEConfig)
        for single in (config.rpe_q, config.rpe_k, config.rpe_v) if config else ():
            if single is not None:
                assert 1 <= single.num_buckets <= MAX_BUCKETS_PER_AXIS**2 + 1
    assert 0 < parsed < 400  # both outcomes were exercised
