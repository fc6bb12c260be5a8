"""``detr-irpe-plot LOG_TXT [-o OUT_PNG]``: training curves of a ``log.txt`` as a PNG."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from detr_irpe.cli.errors import run_cli
from detr_irpe.utils.logging import setup_logging

__all__ = ["build_parser", "main"]

PROG = "detr-irpe-plot"

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Plot losses and COCO AP per epoch from the JSON-lines log.txt of "
        "detr-irpe-train (or of the original main.py).",
    )
    parser.add_argument("log_txt", type=Path, help="the log.txt in the training output_dir")
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        default=None,
        help="PNG to write (default: training_curves.png next to LOG_TXT)",
    )
    return parser


def _plot(args: argparse.Namespace) -> None:
    from detr_irpe.visualize import plot_training_curves

    output = args.output or args.log_txt.with_name("training_curves.png")
    logger.info("wrote %s", plot_training_curves(args.log_txt, output))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``detr-irpe-plot``; returns the exit status (1: unreadable log)."""
    args = build_parser().parse_args(None if argv is None else list(argv))
    setup_logging(0)
    return run_cli(PROG, lambda: _plot(args))


if __name__ == "__main__":
    sys.exit(main())
