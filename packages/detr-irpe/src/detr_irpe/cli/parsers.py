"""The parser of the programmes that run a checkpoint (eval, predict; export to come)."""

from __future__ import annotations

import argparse

from detr_irpe.config import get_args_parser

__all__ = ["checkpoint_parser"]


def checkpoint_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """Every ``detr-irpe-train`` option (model options default to those stored in the
    checkpoint) plus the positional ``checkpoint``."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=f"{description} Model options default to those stored in the checkpoint.",
        parents=[get_args_parser(add_help=False)],
        formatter_class=argparse.RawTextHelpFormatter,
    )
    parser.add_argument("checkpoint", help="checkpoint file (or https URL)")
    return parser
