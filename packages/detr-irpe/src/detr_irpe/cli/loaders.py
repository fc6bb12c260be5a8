"""Data loaders of the programmes, with the original's sampling.

Training: a shuffling sampler (``DistributedSampler`` under ``torch.distributed``, which
shards the data between ranks and is re-seeded by ``set_epoch``; otherwise a
``RandomSampler`` whose generator :func:`set_epoch` re-seeds with ``seed + epoch`` so a
resumed run sees the same order), batched with ``drop_last=True``. Validation: in order
(``DistributedSampler(shuffle=False)``, which pads the last round with repeated images
that the COCO evaluator then ignores), ``drop_last=False``.

Workers stay alive between epochs (``persistent_workers``) when ``num_workers > 0``, so
datasets that open files lazily (zip archives) do it once per worker, not once per epoch.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    DistributedSampler,
    RandomSampler,
    Sampler,
    SequentialSampler,
)

from detr_irpe.nested_tensor import collate_fn

__all__ = ["build_train_loader", "build_val_loader", "set_epoch"]


def _loader_options(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    return {
        "collate_fn": collate_fn,
        "num_workers": args.num_workers,
        "persistent_workers": args.num_workers > 0,
        "pin_memory": device.type == "cuda",
    }


def build_train_loader(
    dataset: Dataset[Any], args: argparse.Namespace, device: torch.device
) -> DataLoader[Any]:
    """Shuffled batches of ``args.batch_size`` images per process, the last partial one dropped."""
    sampler: Sampler[int]
    if getattr(args, "distributed", False):
        sampler = DistributedSampler(dataset, shuffle=True, seed=args.seed)
    else:
        sampler = RandomSampler(dataset, generator=torch.Generator())
    batch_sampler = BatchSampler(sampler, args.batch_size, drop_last=True)
    return DataLoader(dataset, batch_sampler=batch_sampler, **_loader_options(args, device))


def build_val_loader(
    dataset: Dataset[Any], args: argparse.Namespace, device: torch.device
) -> DataLoader[Any]:
    """Batches of ``args.batch_size`` images in dataset order (sharded between ranks)."""
    sampler: Sampler[int]
    if getattr(args, "distributed", False):
        sampler = DistributedSampler(dataset, shuffle=False)
    else:
        sampler = SequentialSampler(dataset)
    return DataLoader(
        dataset,
        batch_size=args.batch_size,
        sampler=sampler,
        drop_last=False,
        **_loader_options(args, device),
    )


def set_epoch(loader: DataLoader[Any], epoch: int, seed: int) -> None:
    """Make the training order of ``epoch`` a function of ``(seed, epoch)`` only."""
    batch_sampler = loader.batch_sampler
    sampler = getattr(batch_sampler, "sampler", None)
    if isinstance(sampler, DistributedSampler):
        sampler.set_epoch(epoch)
    elif isinstance(sampler, RandomSampler) and sampler.generator is not None:
        sampler.generator.manual_seed(seed + epoch)
