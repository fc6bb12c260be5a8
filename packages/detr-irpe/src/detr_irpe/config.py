"""Command-line options of the detector, compatible with the original ``main.py``.

Every original flag keeps its name and default (docs/detector.md, 'Original flags'), so
existing commands and pickled ``argparse.Namespace`` objects stay valid. Options added by this
package are listed in ``NEW_OPTIONS``; :func:`complete_args` fills them in when an older
namespace (for example one stored in an original checkpoint) lacks them.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

__all__ = ["NEW_OPTIONS", "complete_args", "default_args", "get_args_parser"]


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """The parser of ``detr-irpe-train`` (original flags first, then the new ones)."""
    from irpe_nn import RPE_HELP

    parser = argparse.ArgumentParser(
        "DETR with iRPE", add_help=add_help, formatter_class=argparse.RawTextHelpFormatter
    )
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
    model.add_argument("--enc_rpe2d", default="", type=str, help=RPE_HELP)
    model.add_argument("--masks", action="store_true", help="train the segmentation head")

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

    data = parser.add_argument_group("data")
    data.add_argument("--dataset_file", default="coco")
    data.add_argument("--coco_path", type=str)
    data.add_argument("--coco_panoptic_path", type=str)
    data.add_argument("--remove_difficult", action="store_true")

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

    new = parser.add_argument_group("added by detr-irpe")
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
    return parser


# Options this package added, with their defaults; absent from the original's namespaces.
NEW_OPTIONS: dict[str, object] = {
    "amp": "off",
    "num_classes": None,
    "backbone_weights": "imagenet",
    "backbone_norm": "frozen",
    "skip_bad_samples": False,
    "eval_every": 1,
    "val_max_size": 1333,
    "val_size": 800,
    "train_scales": None,
    "train_max_size": 1333,
    "crop_aug": True,
    "flip_aug": True,
    "tensorboard": False,
    "finetune": "",
    "progress": True,
}


def default_args(argv: Sequence[str] = ()) -> argparse.Namespace:
    """The namespace the parser gives for ``argv`` (defaults when empty), device resolved."""
    return complete_args(get_args_parser().parse_args(list(argv)))


def complete_args(args: argparse.Namespace) -> argparse.Namespace:
    """Return a copy of ``args`` with every option this package reads.

    Accepts a namespace holding exactly the original ``main.py`` attributes: any newer option
    takes its default, and ``device=None`` becomes ``'cuda'`` when available, else ``'cpu'``.
    """
    completed = argparse.Namespace(**vars(args))
    defaults = vars(get_args_parser().parse_args([]))
    for name, value in {**defaults, **NEW_OPTIONS}.items():
        if not hasattr(completed, name):
            setattr(completed, name, value)
    if completed.device is None:
        completed.device = _default_device()
    return completed
