"""Saving and loading checkpoints, safely and compatibly with the original programme.

Our checkpoints are dicts ``{'format': 'detr-irpe', 'version': 1, 'model', 'optimizer',
'lr_scheduler', 'epoch', 'args'}`` with ``args`` a plain dict, so they load with
``torch.load(weights_only=True)``. Original DETR-with-iRPE checkpoints hold the same entries
but pickle ``args`` as an ``argparse.Namespace``; that one class is
allowed explicitly. Files are always read with ``weights_only=True``: a checkpoint never runs
code, and a file that would need to is refused with an error naming the offending global.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import pickle
import re
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "CheckpointError",
    "LoadedCheckpoint",
    "StateDictMismatchError",
    "UnsafeCheckpointError",
    "load_checkpoint",
    "make_checkpoint",
    "read_checkpoint",
    "save_checkpoint",
]

logger = logging.getLogger(__name__)

# Marker of checkpoints written by this package; `version` changes when the layout does.
CHECKPOINT_FORMAT = "detr-irpe"
CHECKPOINT_VERSION = 1

# The only non-primitive global an original checkpoint pickles (its `args`).
_ALLOWED_GLOBALS = [argparse.Namespace]

_DDP_PREFIX = "module."
_CLASS_HEAD_PREFIX = "class_embed."
_RPE_KEY = re.compile(r"\.self_attn\.rpe_[qkv]\.")


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read or does not hold what is expected."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint that would execute code (pickled globals other than plain data) if loaded."""


class StateDictMismatchError(CheckpointError):
    """The checkpoint's model weights do not fit the model (missing/unexpected keys, shapes)."""


@dataclass
class LoadedCheckpoint:
    """What :func:`load_checkpoint` loaded.

    Attributes:
        source: the file name, or ``'<dict>'``.
        origin: ``'detr-irpe'`` (written by this package), ``'original'`` (the original
            programme, args pickled as a Namespace) or ``'state_dict'`` (a bare state dict).
        args: the checkpoint's options as a dict, or ``None``.
        epoch: the last finished epoch, or ``None``.
        checkpoint: the whole checkpoint dict (``optimizer``, ``lr_scheduler``, ... as stored).
        missing_keys: model keys the checkpoint did not provide (left at initialisation).
        unexpected_keys: checkpoint keys the model does not have (ignored).
        skipped_keys: checkpoint keys not loaded because of a shape mismatch or
            ``drop_class_head`` (left at initialisation).
        optimizer_loaded, lr_scheduler_loaded: whether those states were restored.
    """

    source: str
    origin: str
    args: dict[str, Any] | None
    epoch: int | None
    checkpoint: dict[str, Any]
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    skipped_keys: list[str] = field(default_factory=list)
    optimizer_loaded: bool = False
    lr_scheduler_loaded: bool = False


# ------------------------------------------------------------------------------------------
# writing


def _plain(value: Any) -> Any:
    """``value`` made of types ``torch.load(weights_only=True)`` accepts."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, argparse.Namespace):
        return _plain(vars(value))
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (os.PathLike, torch.device, torch.dtype)):
        return str(value)
    logger.warning("checkpoint args: storing %r of type %s as text", value, type(value).__name__)
    return str(value)


def make_checkpoint(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    lr_scheduler: Any | None = None,
    epoch: int | None = None,
    args: argparse.Namespace | Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The checkpoint dict of this package for ``model`` (a DDP wrapper is unwrapped)."""
    model = _unwrap(model)
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "model": model.state_dict(),
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "lr_scheduler": None if lr_scheduler is None else lr_scheduler.state_dict(),
        "epoch": epoch,
        "args": None if args is None else _plain(args),
    }


def save_checkpoint(path: str | os.PathLike[str], state: Mapping[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically.

    The data goes to a temporary file in the same directory, is flushed and fsync'ed, then
    renamed over ``path`` (``os.replace``), so ``path`` always holds either the previous or the
    complete new checkpoint, never a partial one. ``args`` given as a Namespace are stored as a
    plain dict, and the ``format``/``version`` markers are added when missing.
    """
    path = Path(path)
    state = dict(state)
    if "args" in state:
        state["args"] = _plain(state["args"])
    state.setdefault("format", CHECKPOINT_FORMAT)
    state.setdefault("version", CHECKPOINT_VERSION)
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable; not possible on every platform/file system.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------
# reading


def _unsafe_globals(path: str) -> list[str]:
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:
        return []
    allowed = {f"{cls.__module__}.{cls.__qualname__}" for cls in _ALLOWED_GLOBALS}
    return [name for name in found if name not in allowed]


def read_checkpoint(
    path: str | os.PathLike[str], map_location: str | torch.device | None = "cpu"
) -> dict[str, Any]:
    """Load a checkpoint file with ``torch.load(weights_only=True)``.

    ``argparse.Namespace`` (the original's pickled ``args``) is the only class allowed besides
    PyTorch's plain data; it is converted to a dict. An ``http(s)://`` address is fetched
    through the torch hub cache (as the original's ``--resume URL``).

    Raises:
        FileNotFoundError: no such file.
        UnsafeCheckpointError: the file pickles other globals (it would run code).
        CheckpointError: the file is truncated, corrupted or not a dict.
    """
    source = os.fspath(path)
    is_url = source.startswith(("http://", "https://"))
    if not is_url and not os.path.isfile(source):
        raise FileNotFoundError(f"checkpoint {source} does not exist")
    try:
        with torch.serialization.safe_globals(_ALLOWED_GLOBALS):
            if is_url:
                state = torch.hub.load_state_dict_from_url(
                    source, map_location=map_location, check_hash=True, weights_only=True
                )
            else:
                state = torch.load(source, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        names = [] if is_url else _unsafe_globals(source)
        if not names:
            names = re.findall(r"GLOBAL ([\w.]+)", str(error))
        if names:
            raise UnsafeCheckpointError(
                f"refusing to load checkpoint {source}: it pickles {', '.join(sorted(set(names)))},"
                " which only loads by running code (weights_only=False); detr-irpe never runs "
                "code from a checkpoint. Re-save the weights as plain tensors/dicts if you trust "
                "the file"
            ) from error
        raise CheckpointError(
            f"checkpoint {source} is not a readable PyTorch file (truncated or corrupted?): "
            f"{_first_line(error)}"
        ) from error
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as error:
        raise CheckpointError(
            f"checkpoint {source} is not a readable PyTorch file (truncated or corrupted?): "
            f"{_first_line(error)}"
        ) from error
    if not isinstance(state, dict):
        raise CheckpointError(
            f"checkpoint {source} holds a {type(state).__name__}, expected a dict"
        )
    if isinstance(state.get("args"), argparse.Namespace):
        state = {**state, "args": vars(state["args"])}
    return state


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# ------------------------------------------------------------------------------------------
# loading into a model


def _unwrap(model: nn.Module) -> nn.Module:
    # DistributedDataParallel / DataParallel keep the real model in `.module`.
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return model.module
    return model


def _split_checkpoint(state: Mapping[str, Any], source: str) -> tuple[dict[str, Tensor], str]:
    """``(model state dict, origin)`` of a full checkpoint or a bare state dict."""
    if "model" in state:
        weights = state["model"]
        if not isinstance(weights, Mapping) or not all(
            isinstance(v, Tensor) for v in weights.values()
        ):
            raise CheckpointError(f"checkpoint {source}: the 'model' entry is not a state dict")
        origin = "detr-irpe" if state.get("format") == CHECKPOINT_FORMAT else "original"
        return dict(weights), origin
    if state and all(isinstance(v, Tensor) for v in state.values()):
        return dict(state), "state_dict"
    raise CheckpointError(
        f"checkpoint {source} has no 'model' entry and is not a state dict (top-level keys: "
        f"{sorted(map(str, state))[:10]})"
    )


def _normalise_keys(
    weights: dict[str, Tensor], expected: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    if weights and all(k.startswith(_DDP_PREFIX) for k in weights):
        weights = {k[len(_DDP_PREFIX) :]: v for k, v in weights.items()}
    # FrozenBatchNorm2d has no batch counter; torchvision/BatchNorm state dicts may carry one.
    return {
        k: v
        for k, v in weights.items()
        if not (k.endswith("num_batches_tracked") and k not in expected)
    }


def _num_classes_of(shape: torch.Size) -> int:
    return int(shape[0]) - 1  # the last logit is "no object"


def _mismatch_message(
    source: str,
    missing: list[str],
    unexpected: list[str],
    mismatched: list[tuple[str, torch.Size, torch.Size]],
    args: Mapping[str, Any] | None,
    model: nn.Module,
) -> str:
    lines = [f"checkpoint {source} does not fit the model:"]
    if missing:
        lines.append(f"  {len(missing)} missing keys: {_preview(missing)}")
    if unexpected:
        lines.append(f"  {len(unexpected)} unexpected keys: {_preview(unexpected)}")
    if mismatched:
        shown = [f"{k} checkpoint {tuple(a)} vs model {tuple(b)}" for k, a, b in mismatched]
        lines.append(f"  {len(mismatched)} shape mismatches: {_preview(shown)}")

    head = [m for m in mismatched if m[0].startswith(_CLASS_HEAD_PREFIX)]
    if head:
        _, ckpt_shape, model_shape = head[0]
        lines.append(
            f"The class head differs: the checkpoint has {_num_classes_of(ckpt_shape)} classes, "
            f"the model {_num_classes_of(model_shape)} (each plus 'no object'). To fine-tune on "
            "the model's classes, load with drop_class_head=True (training CLI: --finetune), "
            "which keeps the new class head at its initialisation and loads everything else."
        )
    model_rpe = getattr(getattr(model, "transformer", None), "enc_rpe2d", None)
    ckpt_rpe = None if args is None else args.get("enc_rpe2d")
    missing_rpe = [k for k in missing if _RPE_KEY.search(k)]
    unexpected_rpe = [k for k in unexpected if _RPE_KEY.search(k)]
    if missing_rpe and len(missing_rpe) == len(missing) and not unexpected_rpe:
        uses = f", while the model uses --enc_rpe2d {model_rpe!r}" if model_rpe else ""
        lines.append(
            "The checkpoint has no iRPE tables: it was trained without iRPE (upstream DETR or "
            f"--enc_rpe2d ''){uses}."
            " Either build the model with --enc_rpe2d '' to use it as is, or load with "
            "strict=False to start from its weights with freshly initialised iRPE tables."
        )
    elif unexpected_rpe and not missing_rpe:
        lines.append(
            "The checkpoint has iRPE tables the model lacks: build the model with the "
            f"checkpoint's --enc_rpe2d{f' {ckpt_rpe!r}' if ckpt_rpe else ''}."
        )
    elif (missing_rpe or unexpected_rpe or any(_RPE_KEY.search(m[0]) for m in mismatched)) and (
        ckpt_rpe is not None and ckpt_rpe != model_rpe
    ):
        lines.append(
            f"The checkpoint was trained with --enc_rpe2d {ckpt_rpe!r}, the model is built "
            f"with {model_rpe!r}: build it with the checkpoint's setting."
        )
    return "\n".join(lines)


def _preview(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def load_checkpoint(
    path_or_state: str | os.PathLike[str] | Mapping[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    lr_scheduler: Any | None = None,
    *,
    strict: bool = True,
    drop_class_head: bool = False,
    map_location: str | torch.device | None = "cpu",
) -> LoadedCheckpoint:
    """Load model weights (and optionally optimizer/scheduler state) from a checkpoint.

    Args:
        path_or_state: a checkpoint file (ours or the original's), a checkpoint dict with a
            ``'model'`` entry, or a bare model state dict.
        model: the model (a DDP/DataParallel wrapper is unwrapped). A ``module.`` prefix on every
            key is removed; FrozenBatchNorm ``num_batches_tracked`` entries are ignored.
        optimizer, lr_scheduler: restored from the checkpoint's ``optimizer``/``lr_scheduler``
            entries when given and present.
        strict: when ``True`` any missing/unexpected key or shape mismatch raises
            :class:`StateDictMismatchError` explaining it (class-count difference, checkpoint
            without iRPE, ...). When ``False`` matching tensors are loaded, the rest is reported
            in the result and logged.
        drop_class_head: do not load ``class_embed.*`` (fine-tuning on another class count).

    Returns:
        :class:`LoadedCheckpoint` with the checkpoint's args, epoch and what was (not) loaded.
    """
    if isinstance(path_or_state, Mapping):
        source = "<dict>"
        state = dict(path_or_state)
        if isinstance(state.get("args"), argparse.Namespace):
            state["args"] = vars(state["args"])
    else:
        source = os.fspath(path_or_state)
        state = read_checkpoint(source, map_location=map_location)
    weights, origin = _split_checkpoint(state, source)
    args = state.get("args") if isinstance(state.get("args"), Mapping) else None

    target = _unwrap(model)
    expected = target.state_dict()
    weights = _normalise_keys(weights, expected)
    skipped: list[str] = []
    if drop_class_head:
        skipped = [k for k in weights if k.startswith(_CLASS_HEAD_PREFIX)]
        weights = {k: v for k, v in weights.items() if not k.startswith(_CLASS_HEAD_PREFIX)}

    missing = [
        k
        for k in expected
        if k not in weights and not (drop_class_head and k.startswith(_CLASS_HEAD_PREFIX))
    ]
    unexpected = [k for k in weights if k not in expected]
    mismatched = [
        (k, v.shape, expected[k].shape)
        for k, v in weights.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        message = _mismatch_message(source, missing, unexpected, mismatched, args, target)
        if strict:
            raise StateDictMismatchError(message)
        logger.warning("%s\nLoading the matching tensors only (strict=False).", message)
    skipped += [k for k, _, _ in mismatched]
    loadable = {k: v for k, v in weights.items() if k in expected and k not in skipped}
    result = target.load_state_dict(loadable, strict=False)
    if result.unexpected_keys:  # pragma: no cover - filtered above
        raise StateDictMismatchError(f"unexpected keys {result.unexpected_keys}")

    loaded = LoadedCheckpoint(
        source=source,
        origin=origin,
        args=dict(args) if args is not None else None,
        epoch=state.get("epoch") if isinstance(state.get("epoch"), int) else None,
        checkpoint=state,
        missing_keys=missing,
        unexpected_keys=unexpected,
        skipped_keys=skipped,
    )
    if optimizer is not None and state.get("optimizer") is not None:
        optimizer.load_state_dict(state["optimizer"])
        loaded.optimizer_loaded = True
    if lr_scheduler is not None and state.get("lr_scheduler") is not None:
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        loaded.lr_scheduler_loaded = True
    logger.info(
        "loaded %s checkpoint %s (epoch %s): %d tensors, %d left at initialisation",
        origin,
        source,
        loaded.epoch,
        len(loadable),
        len(missing) + len(skipped),
    )
    return loaded
