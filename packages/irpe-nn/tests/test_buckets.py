"""get_bucket_ids_2d against worked examples of the rules in docs/layers.md ('Bucket ids':
centre query of a 13x13 grid, a full 3x3 table, skip tokens) and a naive per-pair reference."""

from __future__ import annotations

import pytest
import torch
from reference import CROSS_COLS, CROSS_ROWS, EUC, PRODUCT, QUANT, bucket_ids_ref, coefficients

from irpe_nn import METHOD, get_bucket_ids_2d, num_base_buckets

PRODUCT_13X13_CENTRE = """
70 70 70 69 69 68 67 66 65 65 64 64 64
70 70 70 69 69 68 67 66 65 65 64 64 64
70 70 70 69 69 68 67 66 65 65 64 64 64
61 61 61 60 60 59 58 57 56 56 55 55 55
61 61 61 60 60 59 58 57 56 56 55 55 55
52 52 52 51 51 50 49 48 47 47 46 46 46
43 43 43 42 42 41 40 39 38 38 37 37 37
34 34 34 33 33 32 31 30 29 29 28 28 28
25 25 25 24 24 23 22 21 20 20 19 19 19
25 25 25 24 24 23 22 21 20 20 19 19 19
16 16 16 15 15 14 13 12 11 11 10 10 10
16 16 16 15 15 14 13 12 11 11 10 10 10
16 16 16 15 15 14 13 12 11 11 10 10 10
"""

PRODUCT_3X3 = """
40 39 38 31 30 29 22 21 20
41 40 39 32 31 30 23 22 21
42 41 40 33 32 31 24 23 22
49 48 47 40 39 38 31 30 29
50 49 48 41 40 39 32 31 30
51 50 49 42 41 40 33 32 31
58 57 56 49 48 47 40 39 38
59 58 57 50 49 48 41 40 39
60 59 58 51 50 49 42 41 40
"""

PRODUCT_SKIP2_2X2 = """
81 81 81 81 81 81
81 81 81 81 81 81
81 81 40 39 31 30
81 81 41 40 32 31
81 81 49 48 40 39
81 81 50 49 41 40
"""

# Level g (id - int(beta)) for euc and quant as a function of d² = Δr² + Δc².
D2 = [0, 1, 2, 4, 5, 8, 9, 10, 13, 16, 17, 18, 20, 25, 26, 29, 32, 34, 36, 37, 40, 41, 45, 49, 50]
LEVELS = {
    ("euc", 1.9): "0 1 1 2 2 2 2 2 3 3 3 3 3 3 3 3 3 3 3 3 3 3 3 3 3",
    ("euc", 2.0): "0 1 1 2 2 2 2 2 3 3 3 3 3 3 3 3 3 3 3 3 3 3 3 3 3",
    ("euc", 2.5): "0 1 1 2 2 3 3 3 3 3 3 3 3 3 3 3 4 4 4 4 4 4 4 4 4",
    ("euc", 3.0): "0 1 1 2 2 3 3 3 3 3 3 3 3 4 4 4 4 4 4 4 4 4 4 4 4",
    ("quant", 1.9): "0 1 2 3 3 3 3 3 3 3 3 3 3 3 3 3 3 3 3 3 3 3 3 3 3",
    ("quant", 2.0): "0 1 2 3 3 3 3 4 4 4 4 4 4 4 4 4 4 4 4 4 4 4 4 4 4",
    ("quant", 2.5): "0 1 2 3 3 4 4 4 4 5 5 5 5 5 5 5 5 5 5 5 5 5 5 5 5",
    ("quant", 3.0): "0 1 2 3 4 4 5 5 5 5 6 6 6 6 6 6 6 6 6 6 6 6 6 6 6",
}


def matrix(text: str) -> torch.Tensor:
    return torch.tensor([[int(v) for v in line.split()] for line in text.strip().splitlines()])


def test_product_13x13_centre_query():
    ids, num = get_bucket_ids_2d(METHOD.PRODUCT, 13, 13, 0, *coefficients(2.0))
    assert num == 81
    centre = 6 * 13 + 6
    assert torch.equal(ids[centre].view(13, 13), matrix(PRODUCT_13X13_CENTRE))


def test_13x13_centre_query_other_methods():
    centre = 6 * 13 + 6
    r, c = torch.meshgrid(torch.arange(13), torch.arange(13), indexing="ij")
    d2 = (6 - r) ** 2 + (6 - c) ** 2
    euc, _ = get_bucket_ids_2d(METHOD.EUCLIDEAN, 13, 13, 0, *coefficients(2.0))
    want = torch.full((13, 13), 7)
    want[d2 == 0] = 4
    want[(d2 == 1) | (d2 == 2)] = 5
    want[(d2 >= 4) & (d2 <= 10)] = 6
    assert torch.equal(euc[centre].view(13, 13), want)
    quant, _ = get_bucket_ids_2d(METHOD.QUANT, 13, 13, 0, *coefficients(2.0))
    want = torch.full((13, 13), 8)
    want[d2 == 0], want[d2 == 1], want[d2 == 2] = 4, 5, 6
    want[(d2 >= 4) & (d2 <= 9)] = 7
    assert torch.equal(quant[centre].view(13, 13), want)
    sequence = torch.tensor([7, 7, 7, 6, 6, 5, 4, 3, 2, 2, 1, 1, 1])
    rows, _ = get_bucket_ids_2d(METHOD.CROSS_ROWS, 13, 13, 0, *coefficients(2.0))
    cols, _ = get_bucket_ids_2d(METHOD.CROSS_COLS, 13, 13, 0, *coefficients(2.0))
    assert torch.equal(rows[centre].view(13, 13), sequence.view(13, 1).expand(13, 13))
    assert torch.equal(cols[centre].view(13, 13), sequence.view(1, 13).expand(13, 13))


def test_product_3x3_full_table():
    ids, _ = get_bucket_ids_2d(METHOD.PRODUCT, 3, 3, 0, *coefficients(2.0))
    assert torch.equal(ids, matrix(PRODUCT_3X3))


def test_skip_example():
    ids, num = get_bucket_ids_2d(METHOD.PRODUCT, 2, 2, 2, *coefficients(2.0))
    assert num == 82
    assert torch.equal(ids, matrix(PRODUCT_SKIP2_2X2))


@pytest.mark.parametrize(("name", "ratio"), list(LEVELS))
def test_level_by_squared_distance(name, ratio):
    method = METHOD.EUCLIDEAN if name == "euc" else METHOD.QUANT
    beta_int = int(2 * ratio)
    ids, _ = get_bucket_ids_2d(method, 8, 8, 0, *coefficients(ratio))
    # Query 0 at (0, 0); key (r, c) has d² = r² + c².
    d2 = (torch.arange(8).view(8, 1) ** 2 + torch.arange(8).view(1, 8) ** 2).view(-1)
    for value, level in zip(D2, LEVELS[(name, ratio)].split(), strict=True):
        keys = (d2 == value).nonzero().flatten()
        assert keys.numel() > 0
        assert (ids[0, keys] == int(level) + beta_int).all(), (value, level)


@pytest.mark.parametrize("method", [EUC, QUANT, PRODUCT, CROSS_ROWS, CROSS_COLS])
@pytest.mark.parametrize("ratio", [1.9, 2.0, 2.5, 3.0])
@pytest.mark.parametrize(("height", "width", "skip"), [(7, 9, 0), (9, 7, 1), (13, 11, 2)])
def test_matches_naive_reference(method, ratio, height, width, skip):
    ids, num = get_bucket_ids_2d(method, height, width, skip, *coefficients(ratio))
    want = bucket_ids_ref(method, height, width, skip, ratio)
    assert torch.equal(ids, want)
    assert ids.is_contiguous()
    assert num == num_base_buckets(method, 2 * ratio) + (skip > 0)


@pytest.mark.parametrize("dtype", [torch.int16, torch.int32, torch.int64])
@pytest.mark.parametrize("method", [EUC, QUANT, PRODUCT, CROSS_ROWS])
def test_every_index_dtype(method, dtype):
    """quant with int32 ids fails in the original (docs/layers.md, 'Where we differ from the
    original'); here every dtype works."""
    ids, _ = get_bucket_ids_2d(method, 6, 5, 1, *coefficients(2.0), dtype=dtype)
    assert ids.dtype == dtype
    assert torch.equal(ids.long(), bucket_ids_ref(method, 6, 5, 1, 2.0))


USED_IDS_20X20 = {  # (lowest, highest) id used; 20x20 reaches every level
    1.9: {EUC: (3, 6), QUANT: (3, 6), CROSS_ROWS: (0, 6), PRODUCT: (0, 48)},
    2.0: {EUC: (4, 8), QUANT: (4, 8), CROSS_ROWS: (0, 8), PRODUCT: (0, 80)},
    2.5: {EUC: (5, 10), QUANT: (5, 10), CROSS_ROWS: (0, 10), PRODUCT: (0, 120)},
    3.0: {EUC: (6, 12), QUANT: (6, 12), CROSS_ROWS: (0, 12), PRODUCT: (0, 168)},
}


@pytest.mark.parametrize("ratio", sorted(USED_IDS_20X20))
def test_used_ids_on_a_large_grid(ratio):
    for method, (low, high) in USED_IDS_20X20[ratio].items():
        ids, _ = get_bucket_ids_2d(method, 20, 20, 0, *coefficients(ratio))
        assert ids.unique().tolist() == list(range(low, high + 1))


def test_device_argument():
    ids, _ = get_bucket_ids_2d(METHOD.PRODUCT, 2, 2, 0, 2.0, 4.0, 16.0, device="cpu")
    assert ids.device.type == "cpu"


def test_bad_arguments():
    with pytest.raises(ValueError, match="CROSS_ROWS"):
        get_bucket_ids_2d(METHOD.CROSS, 3, 3, 0, 2.0, 4.0, 16.0)
    with pytest.raises(ValueError, match="unknown method 7"):
        get_bucket_ids_2d(7, 3, 3, 0, 2.0, 4.0, 16.0)
    with pytest.raises(ValueError, match="height must be an int >= 1"):
        get_bucket_ids_2d(METHOD.PRODUCT, 0, 3, 0, 2.0, 4.0, 16.0)
    with pytest.raises(ValueError, match="skip must be an int >= 0"):
        get_bucket_ids_2d(METHOD.PRODUCT, 3, 3, -1, 2.0, 4.0, 16.0)
    with pytest.raises(ValueError, match="integer dtype"):
        get_bucket_ids_2d(METHOD.PRODUCT, 3, 3, 0, 2.0, 4.0, 16.0, dtype=torch.float32)
