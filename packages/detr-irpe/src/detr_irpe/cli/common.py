"""What the command-line programmes share: error reporting, argument checks, seeding,
device selection, checkpoint locations and model options taken from a checkpoint.

Every programme's ``main`` goes through :func:`run_cli`, which turns the errors a user can
cause (bad flags, missing files, malformed data, a diverged run) into one ``error:`` line
and a non-zero exit status instead of a traceback. Set ``DETR_IRPE_TRACEBACK=1`` to see
the traceback as well.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from detr_irpe.utils.distributed import DistributedSetupError, cleanup_distributed

__all__ = [
    "MODEL_OPTIONS",
    "CLIError",
    "check_model_options",
    "checkpoint_parser",
    "explicit_options",
    "locate_checkpoint",
    "merge_checkpoint_args",
    "resolve_device",
    "run_cli",
    "save_torch_atomic",
    "seed_everything",
    "write_json",
]

logger = logging.getLogger("detr_irpe.cli")

TRACEBACK_ENV = "DETR_IRPE_TRACEBACK"

# Exit statuses: 1 for a failed run (data, divergence), 2 for bad usage (as argparse does).
EXIT_FAILURE = 1
EXIT_USAGE = 2

# Options that define the network and its losses: taken from a checkpoint's stored ``args``
# by detr-irpe-eval and detr-irpe-predict unless given on the command line.
MODEL_OPTIONS: tuple[str, ...] = (
    "backbone",
    "backbone_norm",
    "dilation",
    "position_embedding",
    "enc_layers",
    "dec_layers",
    "dim_feedforward",
    "hidden_dim",
    "dropout",
    "nheads",
    "num_queries",
    "pre_norm",
    "enc_rpe2d",
    "masks",
    "aux_loss",
    "set_cost_class",
    "set_cost_bbox",
    "set_cost_giou",
    "mask_loss_coef",
    "dice_loss_coef",
    "bbox_loss_coef",
    "giou_loss_coef",
    "eos_coef",
    "num_classes",
    "dataset_file",
    "val_size",
    "val_max_size",
)


class CLIError(Exception):
    """A usage error: the message is shown to the user as is (exit status 2)."""


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions reported as one line: problems of the input, not bugs of the program."""
    from detr_irpe.checkpoint import CheckpointError
    from detr_irpe.data.coco import AnnotationError, ImageLoadError
    from detr_irpe.engine import NonFiniteLossError

    return (
        CheckpointError,
        AnnotationError,
        ImageLoadError,
        NonFiniteLossError,
        DistributedSetupError,
        FileNotFoundError,
        NotImplementedError,
        ValueError,
    )


def _short_message(err: BaseException) -> str:
    """The message of ``err``; for errors re-raised from a DataLoader worker, whose message
    embeds the worker's traceback, only its last line."""
    message = str(err)
    if "Original Traceback" in message:
        lines = [line for line in message.splitlines() if line.strip()]
        message = lines[-1] if lines else message
    return message or type(err).__name__


def run_cli(prog: str, body: Callable[[], None]) -> int:
    """Run ``body`` and map its failures to exit statuses, leaving any process group.

    Returns 0 on success, 2 for :class:`CLIError`, 1 for the other user errors (missing files,
    malformed data, a non-finite loss, ...), 130 on Ctrl-C. Other exceptions propagate with
    their traceback: they are bugs.
    """
    show_traceback = os.environ.get(TRACEBACK_ENV, "") not in ("", "0")
    try:
        body()
        return 0
    except CLIError as err:
        if show_traceback:
            logger.exception("%s: error", prog)
        _report(prog, str(err))
        return EXIT_USAGE
    except KeyboardInterrupt:
        _report(prog, "interrupted")
        return 130
    except _user_errors() as err:
        if show_traceback:
            logger.exception("%s: error", prog)
        _report(prog, _short_message(err))
        return EXIT_FAILURE
    finally:
        cleanup_distributed()


def _report(prog: str, message: str) -> None:
    # Straight to stderr as well as through logging: logging may not be configured yet (an
    # error while parsing options) or may be silenced on ranks other than 0.
    logger.debug("%s: error: %s", prog, message)
    sys.stderr.write(f"{prog}: error: {message}\n")
    sys.stderr.flush()


def resolve_device(args: argparse.Namespace) -> torch.device:
    """The device of ``args.device`` (default: CUDA when available), checked to exist, and the
    ``--amp`` mode checked against it.

    Raises:
        CLIError: CUDA requested but unavailable, an unknown device, or ``--amp fp16`` off CUDA.
    """
    name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise CLIError(f"--device {name!r} is not a valid torch device: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name} was requested but CUDA is not available; use --device cpu")
    amp = getattr(args, "amp", "off")
    if amp == "fp16" and device.type != "cuda":
        raise CLIError(
            f"--amp fp16 needs a CUDA device (got {device}); use --amp bf16 or --amp off on CPU"
        )
    args.device = name
    return device


def check_model_options(args: argparse.Namespace) -> None:
    """Validate options that would otherwise fail deep inside model construction.

    Raises:
        CLIError: a malformed ``--enc_rpe2d`` string (the message names the bad field), or
            options of the segmentation variant, which this package does not implement.
    """
    from irpe_nn import parse_rpe_spec

    try:
        parse_rpe_spec(args.enc_rpe2d)
    except ValueError as err:
        raise CLIError(f"--enc_rpe2d: {err}") from None
    if getattr(args, "masks", False):
        raise CLIError("--masks (panoptic segmentation) is not supported by detr-irpe")
    if getattr(args, "frozen_weights", None):
        raise CLIError("--frozen_weights only serves --masks, which detr-irpe does not support")
    if args.num_classes is not None and args.num_classes < 1:
        raise CLIError(f"--num_classes must be at least 1, got {args.num_classes}")


def checkpoint_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """Parser of a programme that runs a checkpoint: every ``detr-irpe-train`` option (model
    options default to those stored in the checkpoint) plus the positional ``checkpoint``."""
    from detr_irpe.config import get_args_parser

    parser = argparse.ArgumentParser(
        prog=prog,
        description=f"{description} Model options default to those stored in the checkpoint.",
        parents=[get_args_parser(add_help=False)],
        formatter_class=argparse.RawTextHelpFormatter,
    )
    parser.add_argument("checkpoint", help="checkpoint file (or https URL)")
    return parser


def seed_everything(seed: int) -> None:
    """Seed ``torch``, ``numpy`` and ``random`` (callers add the rank, as the original)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def locate_checkpoint(path_or_url: str, what: str = "checkpoint") -> Path:
    """Local path of a checkpoint given as a path or an ``http(s)://`` URL.

    URLs are downloaded once into torch hub's checkpoint cache (as the original's
    ``--resume URL``); a cached copy is reused.

    Raises:
        CLIError: the file does not exist (or is a folder).
    """
    if path_or_url.startswith(("http://", "https://")):
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        target = cache / Path(path_or_url.split("?", 1)[0]).name
        if not target.is_file():
            cache.mkdir(parents=True, exist_ok=True)
            logger.info("downloading %s to %s", path_or_url, target)
            torch.hub.download_url_to_file(path_or_url, str(target))
        return target
    path = Path(path_or_url).expanduser()
    if not path.exists():
        raise CLIError(f"{what} file not found: '{path}'")
    if not path.is_file():
        raise CLIError(f"{what} '{path}' is not a file")
    return path


def explicit_options(
    make_parser: Callable[[], argparse.ArgumentParser],
    argv: Iterable[str] | None,
    names: Iterable[str],
) -> set[str]:
    """Which of ``names`` the command line ``argv`` sets explicitly (as opposed to defaults).

    A fresh parser from ``make_parser`` parses ``argv`` again with the defaults of ``names``
    suppressed, so only options present on the command line appear in the namespace.
    """
    names = set(names)
    probe = make_parser()
    # argparse has no public way to suppress existing defaults (set_defaults(x=SUPPRESS)
    # stores the marker as a value and then type-converts it), hence the actions directly.
    for action in probe._actions:
        if action.dest in names:
            action.default = argparse.SUPPRESS
    given, _ = probe.parse_known_args(None if argv is None else list(argv))
    return {name for name in names if hasattr(given, name)}


def _num_classes_of_weights(model_state: Mapping[str, Any]) -> int | None:
    weight = model_state.get("class_embed.weight")
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return int(weight.shape[0]) - 1  # the last logit is "no object"
    return None


def merge_checkpoint_args(
    args: argparse.Namespace, state: Mapping[str, Any], explicit: set[str]
) -> argparse.Namespace:
    """``args`` with the model options of a checkpoint filled in.

    Every option of :data:`MODEL_OPTIONS` not in ``explicit`` takes the checkpoint's stored
    value (our checkpoints and the original's ``args``); ``num_classes`` defaults to what the
    stored classification layer implies. Run options (device, data, batch size, ...) always
    come from ``args``.
    """
    stored = state.get("args") or {}
    if isinstance(stored, argparse.Namespace):
        stored = vars(stored)
    merged = argparse.Namespace(**vars(args))
    for name in MODEL_OPTIONS:
        if name not in explicit and name in stored:
            setattr(merged, name, stored[name])
    if "num_classes" not in explicit:
        from_weights = _num_classes_of_weights(state.get("model") or {})
        if from_weights is not None:
            merged.num_classes = from_weights
    return merged


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_torch_atomic(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save(obj, path)`` through a temporary file and a rename, so ``path`` is never
    seen half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
