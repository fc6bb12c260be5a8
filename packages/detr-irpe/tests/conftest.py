"""Shared fixtures of the detr-irpe tests.

Datasets (session-scoped, generated once, **read-only**: copy before corrupting them, e.g.
``shutil.copytree(synthetic_coco_root, tmp_path / "coco")``):

* ``synthetic_coco_root`` -> ``Path``: a tiny synthetic COCO dataset in the folder layout
  (``annotations/instances_{train,val}2017.json``, ``train2017/``, ``val2017/``):
  :data:`TINY_DATASET` = 8 train and 4 val PNG images with sides of 64-96 pixels, 1-3 shapes
  each; categories 1..4 (``circle, square, triangle, cross``), so ``num_classes`` is 5.
* ``synthetic_coco_zip_root`` -> ``Path``: the same images (same seed) as ``train2017.zip``
  and ``val2017.zip``.

Options (function-scoped, a fresh ``argparse.Namespace`` per test, mutate freely):

* ``tiny_args``: ``config.default_args(TINY_ARGV + ["--coco_path", synthetic_coco_root])``: a
  ResNet-18 DETR without pretrained weights, ``hidden_dim 32``, ``dim_feedforward 64``, one
  encoder and one decoder layer, 2 heads, 5 queries, iRPE ``rpe-2.0-product-ctx-1-k``, batch
  size 2, no DataLoader workers, CPU, no progress bars, and small images (train scales
  64/80/96 with max size 128, val size 80 with max size 128).
* ``make_args``: a factory, ``make_args("--epochs", "2", ...)`` -> the same namespace with
  extra flags appended (later flags win; list options such as ``--train_scales`` are
  replaced).

``config`` imports ``irpe_nn``; the two ``*_args`` fixtures need it installed.
"""

from __future__ import annotations

import dataclasses
from argparse import Namespace
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from detr_irpe.data.synthetic import SyntheticConfig, generate_synthetic_coco

TINY_DATASET = SyntheticConfig(
    num_train=8, num_val=4, image_size=96, min_image_size=64, max_objects=3, seed=0
)

TINY_ARGV: list[str] = [
    "--backbone", "resnet18",
    "--backbone_weights", "none",
    "--hidden_dim", "32",
    "--dim_feedforward", "64",
    "--enc_layers", "1",
    "--dec_layers", "1",
    "--nheads", "2",
    "--num_queries", "5",
    "--enc_rpe2d", "rpe-2.0-product-ctx-1-k",
    "--batch_size", "2",
    "--num_workers", "0",
    "--device", "cpu",
    "--train_scales", "64", "80", "96",
    "--train_max_size", "128",
    "--val_size", "80",
    "--val_max_size", "128",
    "--no_progress",
]  # fmt: skip


@pytest.fixture(scope="session")
def synthetic_coco_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny synthetic COCO dataset, folder layout (read-only)."""
    return generate_synthetic_coco(tmp_path_factory.mktemp("synthetic_coco"), TINY_DATASET)


@pytest.fixture(scope="session")
def synthetic_coco_zip_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same dataset as ``synthetic_coco_root`` with zipped image folders (read-only)."""
    config = dataclasses.replace(TINY_DATASET, as_zip=True)
    return generate_synthetic_coco(tmp_path_factory.mktemp("synthetic_coco_zip"), config)


@pytest.fixture
def make_args(synthetic_coco_root: Path) -> Callable[..., Namespace]:
    """``make_args(*extra_argv)``: tiny options on the synthetic dataset plus ``extra_argv``."""
    from detr_irpe import config

    def make(*extra_argv: str) -> Namespace:
        argv = [*TINY_ARGV, "--coco_path", str(synthetic_coco_root), *extra_argv]
        return config.default_args(argv)

    return make


@pytest.fixture
def tiny_args(make_args: Callable[..., Namespace]) -> Namespace:
    """Tiny model and image options on ``synthetic_coco_root``."""
    return make_args()


# Command-line flags of the programme tests: a model unlike the defaults (so that "took the
# defaults" cannot pass for "took the checkpoint's") and a fast CPU run on small images.
TINY_CLI_MODEL: list[str] = [
    "--backbone", "resnet18", "--hidden_dim", "32", "--dim_feedforward", "64",
    "--enc_layers", "1", "--dec_layers", "2", "--nheads", "2", "--num_queries", "5",
    "--enc_rpe2d", "rpe-2.0-product-ctx-1-k",
]  # fmt: skip
TINY_CLI_RUN: list[str] = [
    "--backbone_weights", "none", "--lr_backbone", "0", "--batch_size", "2",
    "--num_workers", "0", "--device", "cpu", "--no_progress",
    "--train_scales", "64", "80", "--train_max_size", "128",
    "--val_size", "80", "--val_max_size", "128",
]  # fmt: skip


@pytest.fixture
def tiny_cli() -> tuple[list[str], list[str]]:
    """``(model flags, run flags)`` of the programme tests (copies: mutate freely)."""
    return list(TINY_CLI_MODEL), list(TINY_CLI_RUN)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread: several test processes share few cores, and OpenMP threads that
    spin-wait on a busy machine make each step many times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def one_epoch_run(synthetic_coco_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Output folder (read-only: copy it) of ``detr-irpe-train`` with the tiny CLI flags for
    one epoch: ``checkpoint.pth`` and ``log.txt``."""
    import torch

    from detr_irpe.cli.train import main as train_main

    out = tmp_path_factory.mktemp("one_epoch_run")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    argv = [*TINY_CLI_MODEL, *TINY_CLI_RUN, "--coco_path", str(synthetic_coco_root)]
    status = train_main([*argv, "--output_dir", str(out), "--epochs", "1"])
    torch.set_num_threads(threads)
    assert status == 0
    return out


@pytest.fixture
def trained_backbone(make_args: Callable[..., Namespace]) -> tuple:
    """``(args, model, criterion, batch)``: a tiny model with both parameter groups trained
    (backbone too), no dropout, and one fixed batch of two validation images."""
    import torch

    from detr_irpe.data import build_dataset
    from detr_irpe.models import build_model
    from detr_irpe.nested_tensor import collate_fn

    torch.manual_seed(0)
    args = make_args("--dropout", "0", "--num_classes", "5", "--lr_backbone", "1e-4")
    model, criterion, _ = build_model(args)
    dataset = build_dataset("val", args)
    return args, model, criterion, collate_fn([dataset[0], dataset[1]])
