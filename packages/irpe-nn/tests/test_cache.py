"""The bucket-id table cache: hits on alternating sizes, bounded, correct values."""

from __future__ import annotations

import torch
from reference import bucket_ids_ref

import irpe_nn
from irpe_nn import METHOD, bucket_ids, bucket_ids_cache_info, clear_bucket_ids_cache
from irpe_nn.bucket_cache import BUCKET_IDS_CACHE_SIZE

COEF = (2.0, 4.0, 16.0)
CPU = torch.device("cpu")


def test_alternating_sizes_hit_the_cache():
    clear_bucket_ids_cache()
    for height, width in [(10, 5), (5, 10), (10, 5), (5, 10)]:
        ids, num = bucket_ids(METHOD.PRODUCT, *COEF, height, width, 0, torch.long, CPU)
        assert num == 81
        assert torch.equal(ids, bucket_ids_ref(METHOD.PRODUCT, height, width, 0, 2.0))
    info = bucket_ids_cache_info()
    assert (info.misses, info.hits, info.currsize) == (2, 2, 2)


def test_key_includes_skip_dtype_and_method():
    clear_bucket_ids_cache()
    a, _ = bucket_ids(METHOD.PRODUCT, *COEF, 3, 3, 0, torch.long, CPU)
    b, num_b = bucket_ids(METHOD.PRODUCT, *COEF, 3, 3, 1, torch.long, CPU)
    c, _ = bucket_ids(METHOD.PRODUCT, *COEF, 3, 3, 0, torch.int32, CPU)
    d, _ = bucket_ids(METHOD.QUANT, *COEF, 3, 3, 0, torch.long, CPU)
    assert a.shape == (9, 9) and b.shape == (10, 10) and num_b == 82
    assert c.dtype == torch.int32 and torch.equal(c.long(), a)
    assert torch.equal(d, bucket_ids_ref(METHOD.QUANT, 3, 3, 0, 2.0))
    assert bucket_ids_cache_info().currsize == 4


def test_cache_is_bounded():
    clear_bucket_ids_cache()
    for width in range(1, BUCKET_IDS_CACHE_SIZE + 6):
        bucket_ids(METHOD.PRODUCT, *COEF, 2, width, 0, torch.long, CPU)
    assert bucket_ids_cache_info().currsize == BUCKET_IDS_CACHE_SIZE
    # The most recent entries survive, the oldest were evicted.
    misses = bucket_ids_cache_info().misses
    bucket_ids(METHOD.PRODUCT, *COEF, 2, BUCKET_IDS_CACHE_SIZE + 5, 0, torch.long, CPU)
    assert bucket_ids_cache_info().misses == misses
    bucket_ids(METHOD.PRODUCT, *COEF, 2, 1, 0, torch.long, CPU)
    assert bucket_ids_cache_info().misses == misses + 1


def test_layers_share_one_table_across_sizes():
    """Six layers, two image sizes in turn: one build per size."""
    clear_bucket_ids_cache()
    layers = [
        irpe_nn.RPEMultiheadAttention(
            8, 2, rpe_config=irpe_nn.parse_rpe_spec("rpe-2.0-product-ctx-1-k")
        )
        for _ in range(6)
    ]
    for hw in [(3, 4), (4, 3), (3, 4), (4, 3)]:
        x = torch.randn(12, 1, 8)
        for layer in layers:
            x = layer(x, x, x, hw=hw)[0]
    assert bucket_ids_cache_info().misses == 2
