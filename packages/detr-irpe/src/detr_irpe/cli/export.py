"""``detr-irpe-export``: a checkpoint's detector as an ONNX file or a ``torch.export`` program.

::

    detr-irpe-export checkpoint.pth --format onnx --output detr.onnx [--opset 18]
    detr-irpe-export checkpoint.pth --format pt2 --output detr.pt2

The exported graph takes ``images (N, 3, H, W)`` float32 normalised with the ImageNet mean
and std (a batch of same-size images, sides of 33 pixels or more) and returns
``pred_logits`` and ``pred_boxes``; batch, height and width are dynamic. The file is checked
against eager PyTorch on two input sizes before the programme succeeds
(:func:`detr_irpe.export.export_model`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from detr_irpe.cli.errors import CLIError, run_cli

__all__ = ["build_parser", "main"]

PROG = "detr-irpe-export"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Export a DETR-with-iRPE checkpoint to ONNX or to a torch.export program.",
    )
    parser.add_argument("checkpoint", help="checkpoint file (or https URL)")
    parser.add_argument("--format", choices=("onnx", "pt2"), default="onnx", help="(default: onnx)")
    parser.add_argument("--output", required=True, help="file to write")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: exporter's)")
    return parser


def _export(args: argparse.Namespace) -> None:
    from detr_irpe.export import ExportMismatchError, export_model

    if args.opset is not None and args.format != "onnx":
        raise CLIError("--opset only applies to --format onnx")
    try:
        path = export_model(args.checkpoint, args.format, args.output, args.opset)
    except ImportError as err:
        raise CLIError(str(err).splitlines()[0]) from None
    except ExportMismatchError as err:
        raise ValueError(str(err)) from None
    sys.stdout.write(f"{PROG}: wrote {path}\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``detr-irpe-export``; returns the exit status."""
    args = build_parser().parse_args(None if argv is None else list(argv))
    return run_cli(PROG, lambda: _export(args))


if __name__ == "__main__":
    sys.exit(main())
