"""Data loaders of the programmes, with the original's sampling.

Training: a shuffling sampler (``DistributedSampler`` under ``torch.distributed``, which
shards the data between ranks and is re-seeded by ``set_epoch``; otherwise a
``RandomSampler`` whose generator :func:`set_epoch` re-seeds with ``seed + epoch`` so a
resumed run sees the same order), batched with ``drop_last=True``. Validation: in order
(``DistributedSampler(shuffle=False)``, which pads the last round with repeated images
that the COCO evaluator then ignores), ``drop_last=False``.

Workers stay alive between epochs (``persistent_workers``) when ``num_workers > 0``, so
datasets that open files lazily (zip archives) do it once per worker, not once per epoch.

Determinism across a restart: the training sampler yields ``(epoch, index)`` keys
(:class:`EpochKeySampler`), from which the dataset seeds each sample's augmentation (see
:class:`detr_irpe.data.coco.CocoDetection`), so what an image looks like in an epoch does not
depend on the process or worker that loads it, on the number of workers, or on whether the
run was resumed. The training loader has its own generator for the workers' base seed, so
starting workers never draws from torch's global generator (dropout's), which is re-seeded
at the start of every epoch by :func:`detr_irpe.training.train_epoch`.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from functools import partial
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

__all__ = ["EpochKeySampler", "build_train_loader", "build_val_loader", "set_epoch"]


class EpochKeySampler(Sampler[tuple[int, int]]):
    """The indices of ``sampler`` as ``(epoch, index)`` keys; :func:`set_epoch` sets ``epoch``.

    Samplers run in the main process, so the keys carry the epoch to the DataLoader workers,
    which persistent workers would otherwise not see.
    """

    def __init__(self, sampler: Sampler[int]) -> None:
        self.sampler = sampler
        self.epoch = 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        return ((epoch, int(index)) for index in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)  # type: ignore[arg-type]


def _loader_options(
    args: argparse.Namespace, device: torch.device, size_multiple: int = 1
) -> dict[str, Any]:
    return {
        "collate_fn": partial(collate_fn, size_multiple=size_multiple),
        "num_workers": args.num_workers,
        "persistent_workers": args.num_workers > 0,
        "pin_memory": device.type == "cuda",
    }


def build_train_loader(
    dataset: Dataset[Any], args: argparse.Namespace, device: torch.device
) -> DataLoader[Any]:
    """Shuffled batches of ``args.batch_size`` images per process, the last partial one dropped.

    The dataset is indexed with ``(epoch, index)`` keys (:class:`EpochKeySampler`), as
    :class:`detr_irpe.data.coco.CocoDetection` accepts them. With ``--compile`` the batches are
    padded to multiples of ``--compile_pad`` pixels (see :mod:`detr_irpe.compiled`).
    """
    size_multiple = args.compile_pad if args.compile else 1
    sampler: Sampler[int]
    if getattr(args, "distributed", False):
        sampler = DistributedSampler(dataset, shuffle=True, seed=args.seed)
    else:
        sampler = RandomSampler(dataset, generator=torch.Generator())
    batch_sampler = BatchSampler(EpochKeySampler(sampler), args.batch_size, drop_last=True)
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        generator=torch.Generator().manual_seed(args.seed),  # the workers' base seed
        **_loader_options(args, device, size_multiple),
    )


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
    """Make the training order of ``epoch`` a function of ``(seed, epoch)`` only, and key the
    samples of ``epoch`` with it (:class:`EpochKeySampler`)."""
    batch_sampler = loader.batch_sampler
    sampler = getattr(batch_sampler, "sampler", None)
    if isinstance(sampler, EpochKeySampler):
        sampler.epoch = epoch
        sampler = sampler.sampler
    if isinstance(sampler, DistributedSampler):
        sampler.set_epoch(epoch)
    elif isinstance(sampler, RandomSampler) and sampler.generator is not None:
        sampler.generator.manual_seed(seed + epoch)
