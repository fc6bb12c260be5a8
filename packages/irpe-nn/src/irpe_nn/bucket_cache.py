"""Bounded cache of bucket-id tables shared by all iRPE modules of the process.

The original kept one unbounded, never-evicted table per coefficient set and rebuilt it
whenever the aspect ratio changed (see docs/layers.md, 'Where we differ from the original').
Here a table is cached per exact request ``(method, alpha, beta, gamma, height, width, skip,
dtype, device)`` in a small LRU, so alternating image sizes hit the cache, the six encoder
layers of DETR share one table, and memory stays bounded.
"""

from __future__ import annotations

import functools

import torch

from .buckets import get_bucket_ids_2d, get_bucket_ids_2d_traceable

__all__ = [
    "BUCKET_IDS_CACHE_SIZE",
    "bucket_ids",
    "bucket_ids_cache_info",
    "clear_bucket_ids_cache",
]

BUCKET_IDS_CACHE_SIZE = 16
"""Most tables kept at once (a 42x42 grid costs 12 MB in int32, 25 MB in int64)."""


@functools.lru_cache(maxsize=BUCKET_IDS_CACHE_SIZE)
def _cached_bucket_ids(
    method: int,
    alpha: float,
    beta: float,
    gamma: float,
    height: int,
    width: int,
    skip: int,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[torch.Tensor, int]:
    return get_bucket_ids_2d(method, height, width, skip, alpha, beta, gamma, dtype, device)


def bucket_ids(
    method: int,
    alpha: float,
    beta: float,
    gamma: float,
    height: int,
    width: int,
    skip: int,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[torch.Tensor, int]:
    """Cached :func:`~irpe_nn.get_bucket_ids_2d`: ``(ids (L, L), num_buckets)``.

    The returned table is shared: never modify it in place. Inside ``torch.compile`` the
    table is built by traced tensor code instead (the graph then carries it, and no Python
    cache state leaks into the compiled program). With symbolic sizes (``torch.export``
    with dynamic shapes, ONNX export) it is computed in the graph by
    :func:`~irpe_nn.buckets.get_bucket_ids_2d_traceable`.
    """
    symbolic = not (type(height) is int and type(width) is int)
    if torch.compiler.is_exporting() or (symbolic and not torch.compiler.is_compiling()):
        ids, num_buckets = get_bucket_ids_2d_traceable(
            method, height, width, skip, alpha, beta, gamma, device
        )
        return ids.to(dtype), num_buckets
    if torch.compiler.is_compiling():
        return get_bucket_ids_2d(method, height, width, skip, alpha, beta, gamma, dtype, device)
    return _cached_bucket_ids(
        int(method),
        float(alpha),
        float(beta),
        float(gamma),
        height,
        width,
        skip,
        dtype,
        torch.device(device),
    )


def bucket_ids_cache_info() -> functools._CacheInfo:
    """Hits, misses, ``maxsize`` and current size of the table cache."""
    return _cached_bucket_ids.cache_info()


def clear_bucket_ids_cache() -> None:
    """Drop every cached table (e.g. to free device memory)."""
    _cached_bucket_ids.cache_clear()
