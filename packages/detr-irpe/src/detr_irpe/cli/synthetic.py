"""``detr-irpe-synthetic OUT_DIR``: write the synthetic shapes dataset in the COCO layout.

Options are spelled with underscores like every other programme's (``--num_train``); the
hyphenated spellings (``--num-train``) are accepted as aliases.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from detr_irpe.cli.errors import CLIError, run_cli
from detr_irpe.data.synthetic import SYNTHETIC_CATEGORIES, SyntheticConfig, generate_synthetic_coco
from detr_irpe.utils.logging import setup_logging

__all__ = ["build_parser", "main"]

PROG = "detr-irpe-synthetic"

logger = logging.getLogger(__name__)


def _add_option(parser: argparse.ArgumentParser) -> Callable[..., argparse.Action]:
    """``option(name, **kwargs)``: add ``--name`` with its hyphenated spelling as an alias.

    Every programme of the package spells options with underscores (``--num_train``); the
    hyphenated spellings (``--num-train``) were this programme's first ones and still work.
    """

    def option(name: str, **kwargs: Any) -> argparse.Action:
        kwargs.setdefault("dest", name)
        return parser.add_argument(f"--{name}", f"--{name.replace('_', '-')}", **kwargs)

    return option


def build_parser() -> argparse.ArgumentParser:
    defaults = SyntheticConfig()
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=f"Write a synthetic detection dataset ({', '.join(SYNTHETIC_CATEGORIES)}) "
        "as annotations/instances_{train,val}2017.json plus train2017/, val2017/ "
        "(or .zip archives); train on it with --coco_path OUT_DIR.",
    )
    parser.add_argument("out_dir", help="dataset root to create")
    option = _add_option(parser)
    option("num_train", type=int, default=defaults.num_train, help="train images")
    option("num_val", type=int, default=defaults.num_val, help="val images")
    option("image_size", type=int, default=defaults.image_size, help="longest image side (px)")
    option(
        "min_image_size",
        type=int,
        default=None,
        help="shortest image side (px; default 3/4 of --image_size)",
    )
    option("max_objects", type=int, default=defaults.max_objects, help="objects per image, at most")
    parser.add_argument(
        "--difficulty",
        type=float,
        default=defaults.difficulty,
        help="0 (large objects, clean backgrounds) to 1 (small objects, clutter)",
    )
    option(
        "class_colors",
        action="store_true",
        help="draw each class in its own hue (a colour cue besides the shape)",
    )
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--zip", action="store_true", help="write train2017.zip/val2017.zip instead of folders"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
    option("no_progress", dest="progress", action="store_false", help="no progress bar")
    return parser


def _generate(args: argparse.Namespace) -> None:
    try:
        config = SyntheticConfig(
            num_train=args.num_train,
            num_val=args.num_val,
            image_size=args.image_size,
            min_image_size=args.min_image_size,
            max_objects=args.max_objects,
            difficulty=args.difficulty,
            seed=args.seed,
            as_zip=args.zip,
            class_colors=args.class_colors,
        )
    except ValueError as err:
        raise CLIError(str(err)) from None
    try:
        root = generate_synthetic_coco(
            args.out_dir, config, overwrite=args.overwrite, progress=args.progress
        )
    except FileExistsError as err:
        raise CLIError(str(err)) from None
    logger.info("dataset written to %s (train with --coco_path %s)", root, root)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``detr-irpe-synthetic``; returns the exit status (2: bad options)."""
    args = build_parser().parse_args(None if argv is None else list(argv))
    setup_logging(0)
    return run_cli(PROG, lambda: _generate(args))


if __name__ == "__main__":
    sys.exit(main())
