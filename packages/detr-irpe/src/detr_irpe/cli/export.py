"""``detr-irpe-export``: a checkpoint's detector as an ONNX file or a ``torch.export`` program.

::

    detr-irpe-export checkpoint.pth --format onnx --output detr.onnx [--opset 18]
    detr-irpe-export checkpoint.pth --format pt2 --output detr.pt2
    detr-irpe-export checkpoint.pth --postprocess --output detections.onnx

The exported graph takes ``images (N, 3, H, W)`` float32 normalised with the ImageNet mean
and std (a batch of same-size images, sides of 33 pixels or more) and returns
``pred_logits`` and ``pred_boxes``; batch, height and width are dynamic. With
``--postprocess`` it also takes ``orig_sizes (N, 2)`` int64 ``(height, width)`` and returns
the post-processed ``boxes (N, Q, 4)`` (``[x0, y0, x1, y1]`` pixels), ``scores (N, Q)`` and
``labels (N, Q)``. The file is checked against eager PyTorch on two input sizes before the
programme succeeds (:func:`detr_irpe.export.export_model`).
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
    parser.add_argument(
        "--postprocess",
        action="store_true",
        help="also take orig_sizes (N, 2) and output boxes in pixels, scores and labels",
    )
    return parser


def _export(args: argparse.Namespace) -> None:
    from detr_irpe.export import ExportMismatchError, export_model

    if args.opset is not None and args.format != "onnx":
        raise CLIError("--opset only applies to --format onnx")
    try:
        path = export_model(
            args.checkpoint, args.format, args.output, args.opset, postprocess=args.postprocess
        )
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
