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
import logging
import os
import pickle
import re
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from detr_irpe.atomic import atomic_write
from detr_irpe.optim import keep_implementation

__all__ = [
    "ARCHITECTURE_OPTIONS",
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "MODEL_OPTIONS",
    "CheckpointError",
    "CheckpointModel",
    "CheckpointNotFoundError",
    "LoadedCheckpoint",
    "StateDictMismatchError",
    "UnsafeCheckpointError",
    "is_resumable",
    "load_checkpoint",
    "load_for_finetuning",
    "locate_checkpoint",
    "make_checkpoint",
    "model_from_checkpoint",
    "num_classes_of",
    "options_from_checkpoint",
    "read_checkpoint",
    "restore_training_state",
    "save_checkpoint",
    "save_torch",
    "stored_options",
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


class CheckpointNotFoundError(FileNotFoundError):
    """The checkpoint a flag or argument names does not exist (a usage error)."""


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
    """Write ``state`` to ``path`` atomically (:func:`detr_irpe.atomic.atomic_write`).

    ``path`` always holds either the previous or the complete new checkpoint, never a partial
    one. ``args`` given as a Namespace are stored as a plain dict, and the ``format``/``version``
    markers are added when missing.

    Raises:
        OutputWriteError: the file cannot be written (disk full, read-only folder, ...).
    """
    state = dict(state)
    if "args" in state:
        state["args"] = _plain(state["args"])
    state.setdefault("format", CHECKPOINT_FORMAT)
    state.setdefault("version", CHECKPOINT_VERSION)
    save_torch(state, path)


def save_torch(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save(obj, path)``, atomically (evaluation arrays and other torch files)."""
    with atomic_write(path, "wb") as handle:
        torch.save(obj, handle)


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
    lines = [f"checkpoint {source} does not fit the model:"]  # joined into one line
    if missing:
        lines.append(f"{len(missing)} missing keys: {_preview(missing)}")
    if unexpected:
        lines.append(f"{len(unexpected)} unexpected keys: {_preview(unexpected)}")
    if mismatched:
        shown = [f"{k} checkpoint {tuple(a)} vs model {tuple(b)}" for k, a, b in mismatched]
        lines.append(f"{len(mismatched)} shape mismatches: {_preview(shown)}")

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
    return lines[0] + " " + "; ".join(lines[1:])


def _preview(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def _compare_keys(
    weights: Mapping[str, Tensor], expected: Mapping[str, Tensor], drop_class_head: bool
) -> tuple[list[str], list[str], list[tuple[str, torch.Size, torch.Size]]]:
    """``(missing, unexpected, shape mismatches)`` of ``weights`` against the model's."""
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
    return missing, unexpected, mismatched


def load_checkpoint(
    path_or_state: str | os.PathLike[str] | Mapping[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    lr_scheduler: Any | None = None,
    *,
    strict: bool = True,
    drop_class_head: bool = False,
    map_location: str | torch.device | None = "cpu",
    source: str | None = None,
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
        source: the name of a checkpoint given as a dict, for messages (default ``<dict>``).

    Returns:
        :class:`LoadedCheckpoint` with the checkpoint's args, epoch and what was (not) loaded.
    """
    if isinstance(path_or_state, Mapping):
        source = source or "<dict>"
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

    missing, unexpected, mismatched = _compare_keys(weights, expected, drop_class_head)
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
        optimizer.load_state_dict(keep_implementation(optimizer, state["optimizer"]))
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


# ------------------------------------------------------------------------------------------
# where a checkpoint comes from


def locate_checkpoint(path_or_url: str | os.PathLike[str], what: str = "checkpoint") -> Path:
    """Local path of a checkpoint given as a path or an ``http(s)://`` URL.

    URLs are downloaded once into torch hub's checkpoint cache (as the original's
    ``--resume URL``); a cached copy is reused.

    Raises:
        CheckpointNotFoundError: the file does not exist (or is a folder).
        CheckpointError: the URL cannot be fetched.
    """
    source = os.fspath(path_or_url)
    if source.startswith(("http://", "https://")):
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        target = cache / Path(source.split("?", 1)[0]).name
        if not target.is_file():
            logger.info("downloading %s to %s", source, target)
            try:
                cache.mkdir(parents=True, exist_ok=True)
                torch.hub.download_url_to_file(source, str(target), progress=False)
            except Exception as err:  # urllib raises many types; all mean "not fetched"
                raise CheckpointError(
                    f"{what} {source}: cannot download ({_first_line(err)})"
                ) from None
        return target
    path = Path(source).expanduser()
    if not path.exists():
        raise CheckpointNotFoundError(f"{what} file not found: '{path}'")
    if not path.is_file():
        raise CheckpointNotFoundError(f"{what} '{path}' is not a file")
    return path


# ------------------------------------------------------------------------------------------
# the options a checkpoint was trained with

# Options that define the network, its losses and its input size: a checkpoint's stored
# values are used whenever one is given (resume, fine-tune, eval, predict, export).
MODEL_OPTIONS: tuple[str, ...] = (
    "backbone", "backbone_norm", "dilation", "position_embedding", "enc_layers", "dec_layers",
    "dim_feedforward", "hidden_dim", "dropout", "nheads", "num_queries", "pre_norm",
    "enc_rpe2d", "masks", "aux_loss", "set_cost_class", "set_cost_bbox", "set_cost_giou",
    "mask_loss_coef", "dice_loss_coef", "bbox_loss_coef", "giou_loss_coef", "eos_coef",
    "num_classes", "dataset_file", "val_size", "val_max_size",
)  # fmt: skip

# The subset that fixes the weights' layout: resuming or fine-tuning refuses to change it.
ARCHITECTURE_OPTIONS: frozenset[str] = frozenset(
    (
        "backbone", "dilation", "position_embedding", "enc_layers", "dec_layers",
        "dim_feedforward", "hidden_dim", "nheads", "num_queries", "pre_norm", "enc_rpe2d",
    )
)  # fmt: skip


def stored_options(state: Mapping[str, Any]) -> dict[str, Any]:
    """The options a checkpoint stores (ours and the original's ``args``; ``{}`` for none)."""
    stored = state.get("args") or {}
    if isinstance(stored, argparse.Namespace):
        stored = vars(stored)
    return dict(stored) if isinstance(stored, Mapping) else {}


def num_classes_of(state: Mapping[str, Any]) -> int | None:
    """The class count a checkpoint's classification layer implies (``None`` if it has none)."""
    weights = state.get("model") if isinstance(state.get("model"), Mapping) else state
    weight = weights.get("class_embed.weight") if isinstance(weights, Mapping) else None
    if isinstance(weight, Tensor) and weight.dim() == 2:
        return _num_classes_of(weight.shape)
    return None


def options_from_checkpoint(
    args: argparse.Namespace,
    state: Mapping[str, Any],
    given: Iterable[str] = (),
    *,
    keep_architecture: bool = False,
    source: str = "the checkpoint",
) -> argparse.Namespace:
    """``args`` with the model options of a checkpoint filled in.

    Every option of :data:`MODEL_OPTIONS` not in ``given`` (the options set on the command
    line) takes the checkpoint's stored value; ``num_classes`` defaults to what the stored
    classification layer implies. Run options (device, data, batch size, ...) stay ``args``'.

    With ``keep_architecture`` (resuming, fine-tuning) an option of
    :data:`ARCHITECTURE_OPTIONS` given with another value than the checkpoint's is refused.

    Raises:
        OptionError: such a contradiction, naming both values.
    """
    from detr_irpe.config import OptionError

    given = set(given)
    stored = stored_options(state)
    merged = argparse.Namespace(**vars(args))
    for name in MODEL_OPTIONS:
        if name not in stored:
            continue
        if name not in given:
            setattr(merged, name, stored[name])
        elif (
            keep_architecture
            and name in ARCHITECTURE_OPTIONS
            and stored[name] != getattr(args, name)
        ):
            raise OptionError(
                f"--{name} {getattr(args, name)!r} contradicts {source}, trained with --{name} "
                f"{stored[name]!r}: the architecture comes from the checkpoint (drop the flag)"
            )
    if "num_classes" not in given and num_classes_of(state) is not None:
        merged.num_classes = num_classes_of(state)
    return merged


# ------------------------------------------------------------------------------------------
# a model from a checkpoint


@dataclass
class CheckpointModel:
    """What :func:`model_from_checkpoint` built.

    Attributes:
        model: the detector with the checkpoint's weights, in eval mode, on ``args.device``.
        criterion, postprocessors: as :func:`detr_irpe.build_model` returns them.
        args: the completed options the model was built from (checkpoint's, then overrides).
        checkpoint: the checkpoint dict as read (``epoch``, ``class_names``, ...).
        path: the local file.
    """

    model: nn.Module
    criterion: nn.Module
    postprocessors: dict[str, nn.Module]
    args: argparse.Namespace
    checkpoint: dict[str, Any]
    path: Path


def model_from_checkpoint(
    path: str | os.PathLike[str],
    overrides: Mapping[str, Any] | None = None,
    *,
    base: argparse.Namespace | None = None,
) -> CheckpointModel:
    """Rebuild the detector a checkpoint holds: its options, its weights (the moving average
    ``ema`` when the checkpoint has one), ready to run.

    Args:
        path: a checkpoint of this package or of the original programme (or a URL).
        overrides: options that win over the checkpoint's, e.g. ``{"device": "cpu"}`` or the
            options given on a command line. A checkpoint without stored options (a bare state
            dict) needs the model options it was trained with here.
        base: the other options (defaults when ``None``).

    Raises:
        FileNotFoundError, CheckpointError: unreadable, or its weights do not fit the model
            built from its options (the message says which options to give).
        OptionError: the resulting options cannot build a model.
    """
    from detr_irpe.config import OptionError, complete_args, default_args
    from detr_irpe.models import build_model

    overrides = dict(overrides or {})
    local = locate_checkpoint(path)
    state = read_checkpoint(local)
    start = complete_args(base) if base is not None else default_args()
    for name, value in overrides.items():
        setattr(start, name, value)
    args = options_from_checkpoint(start, state, overrides, source=str(local))
    args = complete_args(args)
    args.backbone_weights = "none"  # the checkpoint holds the backbone
    model, criterion, postprocessors = build_model(args)
    weights = state
    if isinstance(state.get("ema"), Mapping):  # --ema: the moving average is the model to use
        weights = {**state, "model": state["ema"]}
        logger.info("%s: using the EMA weights", local)
    try:
        load_checkpoint(weights, model, source=str(local))
    except StateDictMismatchError as err:
        changed = sorted(f"--{name}" for name in set(overrides) & ARCHITECTURE_OPTIONS)
        if not changed:
            raise
        raise OptionError(
            f"{local} does not fit the model built with {', '.join(changed)} from the command "
            f"line; leave them out to use the checkpoint's options ({_first_line(err)})"
        ) from None
    model.to(args.device).eval()
    return CheckpointModel(model, criterion, postprocessors, args, state, local)


# ------------------------------------------------------------------------------------------
# resuming and fine-tuning


def _check_epoch(state: Mapping[str, Any], source: str) -> int:
    epoch = state.get("epoch")
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise CheckpointError(
            f"checkpoint {source}: 'epoch' must be a non-negative integer, got {epoch!r}"
        )
    return epoch


def _check_optimizer_state(saved: Any, optimizer: torch.optim.Optimizer, source: str) -> None:
    """Refuse an optimizer state whose groups or per-parameter tensors do not fit."""
    groups = saved.get("param_groups") if isinstance(saved, Mapping) else None
    if not isinstance(groups, list) or not isinstance(saved.get("state"), Mapping):
        raise CheckpointError(f"checkpoint {source}: 'optimizer' is not an optimizer state")
    if len(groups) != len(optimizer.param_groups):
        raise CheckpointError(
            f"checkpoint {source}: the optimizer has {len(groups)} parameter groups, this "
            f"model {len(optimizer.param_groups)}; were --lr_backbone or the model options "
            "changed?"
        )
    for g, (theirs, ours) in enumerate(zip(groups, optimizer.param_groups, strict=True)):
        ids = theirs.get("params") if isinstance(theirs, Mapping) else None
        if not isinstance(ids, list) or len(ids) != len(ours["params"]):
            raise CheckpointError(
                f"checkpoint {source}: optimizer group {g} does not hold "
                f"{len(ours['params'])} parameters as this model's"
            )
        for key, param in zip(ids, ours["params"], strict=True):
            for name, value in (saved["state"].get(key) or {}).items():
                if isinstance(value, Tensor) and value.dim() > 0 and value.shape != param.shape:
                    raise CheckpointError(
                        f"checkpoint {source}: optimizer state '{name}' of parameter {key} has "
                        f"shape {tuple(value.shape)}, the parameter {tuple(param.shape)}"
                    )


def _check_scheduler_state(saved: Any, source: str) -> None:
    fields = {"last_epoch": int, "step_size": int, "gamma": float, "base_lrs": list}
    if not isinstance(saved, Mapping):
        raise CheckpointError(f"checkpoint {source}: 'lr_scheduler' is not a scheduler state")
    for name, kind in fields.items():
        value = saved.get(name)
        if name in saved and (isinstance(value, bool) or not isinstance(value, (kind, int))):
            raise CheckpointError(
                f"checkpoint {source}: lr_scheduler '{name}' must be a {kind.__name__}, got "
                f"{value!r}"
            )
    if saved.get("step_size", 1) < 1 or saved.get("last_epoch", 0) < -1:
        raise CheckpointError(
            f"checkpoint {source}: lr_scheduler step_size {saved.get('step_size')} / "
            f"last_epoch {saved.get('last_epoch')} are out of range"
        )


def restore_training_state(
    state: Mapping[str, Any],
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    scaler: Any | None = None,
    source: str = "<dict>",
) -> int:
    """Restore what ``--resume`` continues from; return the first epoch to train.

    Everything is checked before anything is loaded: ``epoch`` a non-negative integer, the
    optimizer's groups and per-parameter state shapes those of ``optimizer``, the scheduler's
    fields of the right types and ranges.

    Raises:
        CheckpointError: the first thing that does not fit, named.
    """
    epoch = _check_epoch(state, source)
    _check_optimizer_state(state.get("optimizer"), optimizer, source)
    _check_scheduler_state(state.get("lr_scheduler"), source)
    optimizer.load_state_dict(keep_implementation(optimizer, state["optimizer"]))
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    return epoch + 1


def is_resumable(state: Mapping[str, Any]) -> bool:
    """Whether a checkpoint carries the training state (an original release may not)."""
    return all(state.get(k) is not None for k in ("optimizer", "lr_scheduler", "epoch"))


def load_for_finetuning(
    state: Mapping[str, Any], model: nn.Module, source: str, *, allow_new_rpe: bool = False
) -> LoadedCheckpoint:
    """Start ``model`` from a checkpoint's weights; only the class head may differ.

    The class head is left at its initialisation when its size differs (another number of
    classes). With ``allow_new_rpe`` (``--enc_rpe2d`` given for a checkpoint trained without
    iRPE, such as upstream DETR) the iRPE tables the checkpoint lacks are too. Anything else
    that does not load is an error: it would silently train another model.

    Raises:
        StateDictMismatchError: what does not fit, explained.
    """
    ours = _unwrap(model).state_dict().get("class_embed.weight")
    weights, _ = _split_checkpoint(state, source)
    theirs = _normalise_keys(weights, {}).get("class_embed.weight")
    drop_head = isinstance(theirs, Tensor) and ours is not None and theirs.shape != ours.shape
    has_rpe = any(_RPE_KEY.search(k) for k in weights)
    if not (allow_new_rpe and not has_rpe):
        return load_checkpoint(state, model, drop_class_head=drop_head, source=source)
    loaded = load_checkpoint(state, model, strict=False, drop_class_head=drop_head, source=source)
    others = [k for k in loaded.missing_keys if not _RPE_KEY.search(k)]
    if others or loaded.unexpected_keys:
        raise StateDictMismatchError(
            f"--finetune {source} does not fit the model besides its iRPE tables: "
            f"missing {_preview(others)}; unexpected {_preview(loaded.unexpected_keys)}"
        )
    return loaded
