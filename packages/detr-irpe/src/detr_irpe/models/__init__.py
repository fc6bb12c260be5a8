"""The DETR-with-iRPE detector: model, matcher, losses and post-processing.

:func:`build_model` turns the command-line options (an ``argparse.Namespace``, possibly one
stored in an original checkpoint) into ``(model, criterion, postprocessors)``.
"""

from __future__ import annotations

import argparse
import logging

import torch
from torch import nn

from detr_irpe.config import check_model_options, complete_args, is_complete
from detr_irpe.models.backbone import Backbone, Joiner, build_backbone, feature_map_size
from detr_irpe.models.criterion import SetCriterion, build_weight_dict
from detr_irpe.models.detr import DETR, MLP
from detr_irpe.models.matcher import HungarianMatcher, build_matcher
from detr_irpe.models.position_encoding import (
    PositionEmbeddingLearned,
    PositionEmbeddingSine,
    build_position_encoding,
)
from detr_irpe.models.postprocess import PostProcess
from detr_irpe.models.transformer import Transformer, build_transformer

__all__ = [
    "COCO_NUM_CLASSES",
    "COCO_PANOPTIC_NUM_CLASSES",
    "DETR",
    "MLP",
    "OTHER_DATASET_NUM_CLASSES",
    "Backbone",
    "HungarianMatcher",
    "Joiner",
    "PositionEmbeddingLearned",
    "PositionEmbeddingSine",
    "PostProcess",
    "SetCriterion",
    "Transformer",
    "build_backbone",
    "build_matcher",
    "build_model",
    "build_position_encoding",
    "build_transformer",
    "build_weight_dict",
    "default_num_classes",
    "feature_map_size",
]

logger = logging.getLogger(__name__)

# Class-logit counts the original derives from --dataset_file (before the extra "no object"
# logit). COCO: the largest category id is 90, so ids 0..90 need 91 logits.
COCO_NUM_CLASSES = 91
# COCO panoptic: largest "thing"/"stuff" category id is 250.
COCO_PANOPTIC_NUM_CLASSES = 250
# The original's fallback for any other --dataset_file value.
OTHER_DATASET_NUM_CLASSES = 20


def default_num_classes(dataset_file: str) -> int:
    """The original's rule: 91 for ``coco``, 250 for ``coco_panoptic``, 20 otherwise."""
    if dataset_file == "coco":
        return COCO_NUM_CLASSES
    if dataset_file == "coco_panoptic":
        return COCO_PANOPTIC_NUM_CLASSES
    return OTHER_DATASET_NUM_CLASSES


def _device_usable(device: str | torch.device) -> bool:
    device = torch.device(device)
    return device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_available())


def build_model(
    args: argparse.Namespace,
) -> tuple[DETR, SetCriterion, dict[str, nn.Module]]:
    """``(model, criterion, {'bbox': PostProcess()})`` for the options in ``args``.

    ``args`` may hold exactly the attributes of the original ``main.py``; options added by this
    package take their defaults (:func:`detr_irpe.config.complete_args`); options that cannot
    build a model raise :class:`detr_irpe.config.OptionError`. Modules are created in
    the original's order (position encoding, backbone, transformer, heads) so a seeded build
    draws the same random numbers. Nothing is downloaded unless ``backbone_weights`` is
    ``'imagenet'`` and the weights are not cached. The model stays on the CPU; the criterion
    is moved to ``args.device`` when that device exists.
    """
    if not is_complete(args):
        args = complete_args(args)
    check_model_options(args)
    num_classes = (
        args.num_classes if args.num_classes is not None else default_num_classes(args.dataset_file)
    )

    backbone = build_backbone(args)
    transformer = build_transformer(args)
    model = DETR(
        backbone,
        transformer,
        num_classes=num_classes,
        num_queries=args.num_queries,
        aux_loss=args.aux_loss,
    )
    matcher = build_matcher(args)
    criterion = SetCriterion(
        num_classes, matcher=matcher, weight_dict=build_weight_dict(args), eos_coef=args.eos_coef
    )
    if _device_usable(args.device):
        criterion.to(args.device)
    postprocessors: dict[str, nn.Module] = {"bbox": PostProcess()}
    logger.debug(
        "built DETR: backbone %s, enc_rpe2d %r, %d classes",
        args.backbone,
        args.enc_rpe2d,
        num_classes,
    )
    return model, criterion, postprocessors
