"""Command-line options of the detector, compatible with the original ``main.py``.

The parser of :func:`get_args_parser` is the only place an option's default lives. Every
original flag keeps its name and default (docs/detector.md, 'Original flags'), so existing
commands and pickled ``argparse.Namespace`` objects stay valid; the options this package added
are the parser's group "added by detr-irpe", named in :data:`NEW_OPTIONS`.
:func:`complete_args` fills in, from the parser, whatever an older namespace (for example one
stored in an original checkpoint) lacks.

This module imports neither torch nor the models, so ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
from collections.abc import Sequence

__all__ = [
    "NEW_OPTIONS",
    "OptionError",
    "UnsupportedOptionError",
    "check_device",
    "check_model_options",
    "check_run_options",
    "complete_args",
    "default_args",
    "get_args_parser",
    "is_complete",
    "parse_options",
    "prepare_options",
]

logger = logging.getLogger(__name__)

_NEW_GROUP = "added by detr-irpe"

# The iRPE string in brief; docs/layers.md, 'The `rpe-…` string', has the full table (and
# irpe_nn.RPE_HELP, which needs torch to import).
_RPE_HELP = """\
iRPE of the encoder: rpe-{ratio}-{method}-{mode}-{shared_head}-{rpe_on},
e.g. rpe-2.0-product-ctx-1-k (ratio > 0; method euc|quant|cross|product;
mode bias|ctx; shared_head 0|1; rpe_on a combination of q, k, v);
'' (the default) for plain DETR"""


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """The parser of ``detr-irpe-train`` (original flags first, then the new ones)."""
    parser = argparse.ArgumentParser(
        "DETR with iRPE", add_help=add_help, formatter_class=argparse.RawTextHelpFormatter
    )
    _add_optimisation_options(parser)
    _add_model_options(parser)
    _add_loss_options(parser)
    _add_data_options(parser)
    _add_run_options(parser)
    _add_new_options(parser)
    return parser


def _add_optimisation_options(parser: argparse.ArgumentParser) -> None:
    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--lr", default=1e-4, type=float)
    opt.add_argument("--lr_backbone", default=1e-5, type=float)
    opt.add_argument("--batch_size", default=2, type=int, help="images per process")
    opt.add_argument("--weight_decay", default=1e-4, type=float)
    opt.add_argument("--epochs", default=300, type=int)
    opt.add_argument("--lr_drop", default=200, type=int)
    opt.add_argument(
        "--clip_max_norm", default=0.1, type=float, help="gradient clipping max norm (0: off)"
    )


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model")
    model.add_argument(
        "--frozen_weights",
        type=str,
        default=None,
        help="path to a pretrained model; only the mask head is trained (needs --masks)",
    )
    model.add_argument("--backbone", default="resnet50", type=str, help="torchvision ResNet name")
    model.add_argument(
        "--dilation", action="store_true", help="dilation instead of stride in the last block"
    )
    model.add_argument(
        "--position_embedding", default="sine", type=str, choices=("sine", "learned")
    )
    model.add_argument("--enc_layers", default=6, type=int)
    model.add_argument("--dec_layers", default=6, type=int)
    model.add_argument("--dim_feedforward", default=2048, type=int)
    model.add_argument("--hidden_dim", default=256, type=int)
    model.add_argument("--dropout", default=0.1, type=float)
    model.add_argument("--nheads", default=8, type=int)
    model.add_argument("--num_queries", default=100, type=int)
    model.add_argument("--pre_norm", action="store_true")
    model.add_argument("--enc_rpe2d", default="", type=str, help=_RPE_HELP)
    model.add_argument("--masks", action="store_true", help="train the segmentation head")


def _add_loss_options(parser: argparse.ArgumentParser) -> None:
    loss = parser.add_argument_group("loss")
    loss.add_argument(
        "--no_aux_loss",
        dest="aux_loss",
        action="store_false",
        help="disable the auxiliary decoding losses",
    )
    loss.add_argument("--set_cost_class", default=1, type=float)
    loss.add_argument("--set_cost_bbox", default=5, type=float)
    loss.add_argument("--set_cost_giou", default=2, type=float)
    loss.add_argument("--mask_loss_coef", default=1, type=float)
    loss.add_argument("--dice_loss_coef", default=1, type=float)
    loss.add_argument("--bbox_loss_coef", default=5, type=float)
    loss.add_argument("--giou_loss_coef", default=2, type=float)
    loss.add_argument("--eos_coef", default=0.1, type=float, help="weight of the no-object class")


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data")
    data.add_argument("--dataset_file", default="coco")
    data.add_argument("--coco_path", type=str)
    data.add_argument("--coco_panoptic_path", type=str)
    data.add_argument("--remove_difficult", action="store_true")


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    run = parser.add_argument_group("run")
    run.add_argument("--output_dir", default="", help="where to save; empty for no saving")
    run.add_argument(
        "--device",
        default=None,
        help="device for training and testing (default: cuda when available, else cpu)",
    )
    run.add_argument("--seed", default=42, type=int)
    run.add_argument("--resume", default="", help="resume from checkpoint")
    run.add_argument("--start_epoch", default=0, type=int, metavar="N")
    run.add_argument("--eval", action="store_true")
    run.add_argument("--num_workers", default=4, type=int)
    run.add_argument("--world_size", default=1, type=int, help="number of distributed processes")
    run.add_argument("--dist_url", default="env://", help="url used to set up distributed training")


def _add_new_options(parser: argparse.ArgumentParser) -> None:
    new = parser.add_argument_group(_NEW_GROUP)
    new.add_argument(
        "--amp",
        default="off",
        choices=("off", "bf16", "fp16"),
        help="automatic mixed precision (fp16 uses a gradient scaler; CUDA only)",
    )
    new.add_argument(
        "--num_classes",
        default=None,
        type=int,
        help="number of class logits before 'no object' (default: max category id + 1 "
        "of the training annotations; 91 for COCO)",
    )
    new.add_argument(
        "--backbone_weights",
        default="imagenet",
        help="'imagenet' (torchvision's weights; downloaded once), 'none' (train from scratch) "
        "or the path of a torchvision-format state dict",
    )
    new.add_argument(
        "--backbone_norm",
        default="frozen",
        choices=("frozen", "batch"),
        help="'frozen': the original's frozen batch norm, layer2-4 trained (for pretrained "
        "weights); 'batch': trainable batch norm and every stage trained (from scratch)",
    )
    new.add_argument(
        "--skip_bad_samples",
        action="store_true",
        help="skip unreadable images and malformed annotations with a warning instead of stopping",
    )
    new.add_argument(
        "--eval_every", default=1, type=int, help="evaluate every N epochs (and after the last)"
    )
    new.add_argument(
        "--val_max_size",
        default=1333,
        type=int,
        help="longest side of validation images (the original uses 1333 with shorter side 800)",
    )
    new.add_argument("--val_size", default=800, type=int, help="shorter side of validation images")
    new.add_argument(
        "--train_scales",
        default=None,
        type=int,
        nargs="+",
        help="shorter-side scales of multi-scale training (default: the original 480..800)",
    )
    new.add_argument(
        "--train_max_size", default=1333, type=int, help="longest side of training images"
    )
    new.add_argument(
        "--no_crop_aug",
        dest="crop_aug",
        action="store_false",
        help="disable the random resize-crop branch of the training augmentation",
    )
    new.add_argument(
        "--no_flip_aug",
        dest="flip_aug",
        action="store_false",
        help="disable the random horizontal flip of the training augmentation",
    )
    new.add_argument(
        "--tensorboard", action="store_true", help="also log to TensorBoard in output_dir"
    )
    new.add_argument(
        "--mlflow",
        nargs="?",
        const="./mlruns",
        default=None,
        metavar="URI",
        help="also log options, metrics and per-class AP charts to MLflow: a local folder "
        "(default ./mlruns, no server needed) or a tracking URI; needs detr-irpe[mlflow]",
    )
    new.add_argument(
        "--wandb",
        action="store_true",
        help="also log options, metrics and per-class AP charts to Weights & Biases (project "
        "$WANDB_PROJECT or detr-irpe; WANDB_MODE=offline keeps it on disk); needs "
        "detr-irpe[wandb]",
    )
    new.add_argument(
        "--finetune",
        default="",
        help="start from this checkpoint's model weights (ours, the original's or a bare state "
        "dict) with a fresh optimizer at epoch 0; tensors that do not fit (a class head for "
        "another number of classes, iRPE tables absent from an upstream DETR checkpoint) keep "
        "their initialisation",
    )
    new.add_argument(
        "--no_progress", dest="progress", action="store_false", help="no progress bars"
    )
    new.add_argument(
        "--grad_accum_steps",
        default=1,
        type=int,
        metavar="N",
        help="accumulate the gradients of N batches per optimizer step (the update of an "
        "N times larger batch)",
    )
    new.add_argument(
        "--ema",
        action="store_true",
        help="keep an exponential moving average of the weights (saved in the checkpoint as "
        "'ema'); evaluation, detr-irpe-eval and -predict use it",
    )
    new.add_argument(
        "--ema_decay",
        default=0.9998,
        type=float,
        metavar="D",
        help="decay of --ema, warmed up as min(D, (1 + t) / (10 + t)) at optimizer step t",
    )
    new.add_argument(
        "--save_best",
        action="store_true",
        help="also write checkpoint_best.pth whenever the validation AP improves",
    )
    new.add_argument(
        "--early_stop",
        default=0,
        type=int,
        metavar="N",
        help="stop after N evaluations without a better validation AP (0: never)",
    )
    for split in ("train", "val"):
        new.add_argument(
            f"--{split}_ann",
            default=None,
            metavar="FILE",
            help=f"COCO annotation file of the {split} split, relative to --coco_path unless "
            f"absolute (default: annotations/instances_{split}2017.json)",
        )
        new.add_argument(
            f"--{split}_images",
            default=None,
            metavar="DIR",
            help=f"image folder (or .zip) of the {split} split, relative to --coco_path unless "
            f"absolute (default: {split}2017)",
        )
    new.add_argument(
        "--data",
        default=None,
        metavar="DIR",
        help="a YOLO/Ultralytics dataset instead of --coco_path: DIR/data.yaml (names), "
        "DIR/images/{train,val}/, DIR/labels/{train,val}/*.txt ('class cx cy w h', "
        "normalised); converted to COCO in output_dir/yolo_as_coco",
    )
    new.add_argument(
        "--fused_optimizer",
        action="store_true",
        help="torch's fused AdamW (one kernel for all parameters; about 3x faster steps on a "
        "CPU) instead of the original's update, which it matches only up to rounding",
    )
    new.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the model for training (evaluation stays eager); training batches "
        "are padded to multiples of --compile_pad so each padded size compiles once (logged "
        "as 'compiled for HxW in S s'); padding changes the numbers slightly",
    )
    new.add_argument(
        "--compile_pad",
        default=128,
        type=int,
        metavar="PX",
        help="with --compile, pad training batches to multiples of PX pixels (fewer sizes, "
        "fewer compilations; 32, the backbone's stride, when all images have one size)",
    )
    new.add_argument(
        "--config",
        default=None,
        metavar="FILE.yaml",
        help="options from a YAML file (option names without dashes as keys); flags on the "
        "command line win. Each run writes its options to output_dir/config.yaml",
    )


def _new_option_names() -> frozenset[str]:
    parser = get_args_parser(add_help=False)
    group = next(g for g in parser._action_groups if g.title == _NEW_GROUP)
    return frozenset(action.dest for action in group._group_actions)


# Options this package added (absent from the original's namespaces).
NEW_OPTIONS: frozenset[str] = _new_option_names()


def default_args(argv: Sequence[str] = ()) -> argparse.Namespace:
    """The completed namespace the parser gives for ``argv`` (defaults when empty)."""
    return complete_args(get_args_parser().parse_args(list(argv)))


def is_complete(args: argparse.Namespace) -> bool:
    """Whether ``args`` holds every option and a resolved device (see :func:`complete_args`)."""
    names = vars(get_args_parser(add_help=False).parse_args([]))
    return all(hasattr(args, name) for name in names) and args.device is not None


def complete_args(args: argparse.Namespace) -> argparse.Namespace:
    """Return a copy of ``args`` with every option this package reads.

    Accepts a namespace holding exactly the original ``main.py`` attributes: any option it
    lacks takes the parser's default, and ``device=None`` becomes ``'cuda'`` when available,
    else ``'cpu'``.
    """
    completed = argparse.Namespace(**vars(args))
    for name, value in vars(get_args_parser(add_help=False).parse_args([])).items():
        if not hasattr(completed, name):
            setattr(completed, name, value)
    if completed.device is None:
        import torch

        completed.device = "cuda" if torch.cuda.is_available() else "cpu"
    return completed


class OptionError(ValueError):
    """An option value that cannot work; the programmes show it as one usage-error line."""


class UnsupportedOptionError(OptionError, NotImplementedError):
    """An option of the original programme that this package does not implement."""


def parse_options(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None
) -> tuple[argparse.Namespace, frozenset[str]]:
    """``(options, given)``: ``argv`` parsed, and the names of the options it sets explicitly
    (as opposed to defaults), for the rules that let a checkpoint's options win.

    With ``--config FILE`` (a parser that has it) the file's values become the defaults
    first; they do not count as given.

    Raises:
        OptionError: the ``--config`` file cannot be read or names an unknown option.
    """
    from detr_irpe.config_file import apply_config_file

    argv = None if argv is None else list(argv)
    apply_config_file(parser, sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    # argparse has no public way to tell a default from a given value; a second parse with
    # every default suppressed leaves only the options present on the command line.
    probe = copy.deepcopy(parser)
    probe._defaults.clear()  # set_defaults (--config) values are defaults, not given
    for action in probe._actions:
        action.default = argparse.SUPPRESS
        action.required = False
    given, _ = probe.parse_known_args(argv)
    return args, frozenset(vars(given))


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _require_at_least(args: argparse.Namespace, minimum: int, names: Sequence[str]) -> None:
    for name in names:
        if getattr(args, name) < minimum:
            raise OptionError(f"--{name} must be at least {minimum}, got {getattr(args, name)}")


def check_model_options(args: argparse.Namespace) -> None:
    """Refuse model options that cannot build a model, each with one clear message.

    Raises:
        OptionError: the message names the flag and the bad value.
    """
    from detr_irpe.models.transformer import encoder_rpe_config

    if args.masks or args.frozen_weights:
        flag = "--masks" if args.masks else "--frozen_weights (which serves --masks)"
        raise UnsupportedOptionError(f"{flag}: panoptic segmentation is not supported by detr-irpe")
    if args.dataset_file != "coco":
        raise OptionError(f"--dataset_file {args.dataset_file!r} is not supported; only 'coco'")
    _require_at_least(args, 1, ("hidden_dim", "nheads", "num_queries", "dim_feedforward"))
    _require_at_least(args, 1, ("dec_layers",))
    _require_at_least(args, 0, ("enc_layers",))
    if args.hidden_dim % args.nheads:
        raise OptionError(
            f"--hidden_dim {args.hidden_dim} is not divisible by --nheads {args.nheads}"
        )
    if args.num_classes is not None and args.num_classes < 1:
        raise OptionError(f"--num_classes must be at least 1, got {args.num_classes}")
    if not 0.0 <= args.dropout < 1.0:
        raise OptionError(f"--dropout must lie in [0, 1), got {args.dropout}")
    try:
        encoder_rpe_config(args.enc_rpe2d)
    except ValueError as err:  # its first line names the field; the rest is the format help
        raise OptionError(f"--enc_rpe2d: {str(err).splitlines()[0]} (format: see --help)") from None


def check_device(args: argparse.Namespace) -> None:
    """Refuse a device that does not exist here, and ``--amp fp16`` off CUDA.

    Raises:
        OptionError: the message names the flag and what to use instead.
    """
    import torch

    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        raise OptionError(f"--device {args.device!r} is not a valid torch device: {err}") from None
    if device.type not in ("cpu", "cuda"):
        raise OptionError(f"--device {args.device}: detr-irpe runs on 'cpu' or 'cuda' devices")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise OptionError(f"--device {args.device}: CUDA is not available; use --device cpu")
    from detr_irpe.engine import autocast_dtype

    try:
        autocast_dtype(args.amp, device)  # the one rule of which --amp runs where
    except ValueError as err:
        raise OptionError(str(err)) from None


def check_run_options(args: argparse.Namespace, *, needs_data: bool) -> None:
    """Refuse run options that cannot work; cap ``--num_workers`` at the usable CPUs.

    Raises:
        OptionError: the message names the flag and the bad value.
    """
    if needs_data and not args.coco_path:
        raise OptionError("--coco_path is required: the folder holding annotations/ and images")
    if args.coco_path and not os.path.isdir(args.coco_path):
        raise OptionError(f"--coco_path '{args.coco_path}' is not a directory")
    _require_at_least(args, 1, ("batch_size", "epochs", "lr_drop", "eval_every"))
    _require_at_least(args, 1, ("grad_accum_steps", "compile_pad"))
    _require_at_least(args, 0, ("early_stop", "num_workers"))
    if not 0.0 < args.ema_decay < 1.0:
        raise OptionError(f"--ema_decay must lie in (0, 1), got {args.ema_decay}")
    cpus = _usable_cpus()
    if args.num_workers > cpus:
        logger.debug("--num_workers %d capped at the %d usable CPUs", args.num_workers, cpus)
        args.num_workers = cpus
    if args.tensorboard and not args.output_dir:
        raise OptionError("--tensorboard needs --output_dir (the event files are written there)")
    _check_trackers(args)


# Tracker flag -> (the module it imports, the detr-irpe extra that installs it).
_TRACKERS = {"mlflow": ("mlflow", "mlflow"), "wandb": ("wandb", "wandb")}


def _check_trackers(args: argparse.Namespace) -> None:
    """Refuse a tracker flag whose package is missing, before the run starts."""
    import importlib.util

    for flag, (module, extra) in _TRACKERS.items():
        if not getattr(args, flag):
            continue
        if not args.output_dir:
            raise OptionError(f"--{flag} needs --output_dir (the charts it logs are written there)")
        if importlib.util.find_spec(module) is None:
            raise OptionError(
                f"--{flag} needs the {module} package: pip install 'detr-irpe[{extra}]'"
            )


def prepare_options(args: argparse.Namespace, *, needs_data: bool = True) -> argparse.Namespace:
    """The one boundary of every programme: ``args`` completed and checked, once.

    Returns a completed copy (:func:`complete_args`) with the device resolved and
    ``--num_workers`` capped; the rest of the code takes it as is.

    Raises:
        OptionError: the first option that cannot work.
    """
    args = complete_args(args)
    check_device(args)
    check_model_options(args)
    check_run_options(args, needs_data=needs_data)
    return args
