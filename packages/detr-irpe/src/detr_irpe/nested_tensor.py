"""Padded image batches (:class:`NestedTensor`) and the DataLoader collation that builds them.

DETR trains on images of different sizes. A batch is stored as one zero-padded tensor plus a
boolean mask that is ``True`` on the padding (as in the original); every image sits in the
top-left corner, so grid coordinates of valid pixels do not depend on the padding.

``size_multiple`` rounds the padded height and width up to a multiple (``--compile``: each
padded size is compiled once, so fewer sizes mean fewer compilations); the default of 1 pads
to the largest image only, as the original.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["NestedTensor", "collate_fn", "nested_tensor_from_tensor_list"]


class NestedTensor:
    """A padded batch ``tensors (N, C, H, W)`` with its padding ``mask (N, H, W)`` (True = padding).

    ``mask`` may be ``None`` for a batch without padding information.
    """

    __slots__ = ("mask", "tensors")

    def __init__(self, tensors: Tensor, mask: Tensor | None) -> None:
        if mask is not None:
            if mask.dtype != torch.bool:
                raise TypeError(f"NestedTensor mask must be a bool tensor, got {mask.dtype}")
            if mask.dim() != tensors.dim() - 1 or (
                mask.shape[0] != tensors.shape[0] or mask.shape[1:] != tensors.shape[2:]
            ):
                expected = (tensors.shape[0], *tensors.shape[2:])
                raise ValueError(
                    f"NestedTensor mask of shape {tuple(mask.shape)} does not match tensors of "
                    f"shape {tuple(tensors.shape)}: expected {expected}"
                )
        self.tensors = tensors
        self.mask = mask

    def to(self, device: torch.device | str, non_blocking: bool = False) -> NestedTensor:
        """Both tensors moved to ``device``."""
        tensors = self.tensors.to(device, non_blocking=non_blocking)
        mask = None if self.mask is None else self.mask.to(device, non_blocking=non_blocking)
        return NestedTensor(tensors, mask)

    def decompose(self) -> tuple[Tensor, Tensor | None]:
        """``(tensors, mask)``."""
        return self.tensors, self.mask

    @property
    def device(self) -> torch.device:
        return self.tensors.device

    def __repr__(self) -> str:
        mask = None if self.mask is None else tuple(self.mask.shape)
        return f"NestedTensor(tensors={tuple(self.tensors.shape)}, mask={mask})"


def _round_up(size: int, multiple: int) -> int:
    return math.ceil(size / multiple) * multiple


def nested_tensor_from_tensor_list(
    tensor_list: Sequence[Tensor], size_multiple: int = 1
) -> NestedTensor:
    """Pad a list of ``(C, H_b, W_b)`` images into one batch.

    Returns a :class:`NestedTensor` with ``tensors (N, C, H, W)`` (image ``b`` copied into the
    top-left corner, zeros elsewhere) and ``mask (N, H, W)``, True on padding, where ``H`` and
    ``W`` are ``max H_b`` and ``max W_b`` rounded up to a multiple of ``size_multiple``.
    The dtype and device are those of the first image.
    """
    if size_multiple < 1:
        raise ValueError(f"size_multiple must be at least 1, got {size_multiple}")
    if isinstance(tensor_list, Tensor) and tensor_list.dim() == 4:
        tensor_list = list(tensor_list.unbind(0))
    if len(tensor_list) == 0:
        raise ValueError("cannot build a batch from an empty list of images")
    for index, image in enumerate(tensor_list):
        if not isinstance(image, Tensor):
            raise TypeError(f"image {index} of the batch is a {type(image).__name__}, not a tensor")
        if image.dim() != 3:
            raise ValueError(
                f"image {index} of the batch has shape {tuple(image.shape)}; only 3-D (C, H, W) "
                "images are supported"
            )
    channels = tensor_list[0].shape[0]
    for index, image in enumerate(tensor_list):
        if image.shape[0] != channels:
            raise ValueError(
                f"image {index} of the batch has {image.shape[0]} channels, image 0 has {channels}"
            )
    height = _round_up(max(image.shape[1] for image in tensor_list), size_multiple)
    width = _round_up(max(image.shape[2] for image in tensor_list), size_multiple)
    first = tensor_list[0]
    tensors = first.new_zeros((len(tensor_list), channels, height, width))
    mask = torch.ones((len(tensor_list), height, width), dtype=torch.bool, device=first.device)
    for image, padded, padded_mask in zip(tensor_list, tensors, mask, strict=True):
        padded[:, : image.shape[1], : image.shape[2]].copy_(image)
        padded_mask[: image.shape[1], : image.shape[2]] = False
    return NestedTensor(tensors, mask)


def collate_fn(
    batch: Sequence[tuple[Tensor, Mapping[str, Any]]], size_multiple: int = 1
) -> tuple[NestedTensor, tuple[Mapping[str, Any], ...]]:
    """DataLoader collation: a list of ``(image (3, H, W), target dict)`` pairs to
    ``(NestedTensor, tuple of target dicts)``; the targets are passed through unchanged.
    ``size_multiple``: see :func:`nested_tensor_from_tensor_list` (bind it with
    ``functools.partial``, which DataLoader workers can pickle)."""
    images = []
    targets = []
    for index, sample in enumerate(batch):
        if not isinstance(sample, (tuple, list)) or len(sample) != 2:
            raise TypeError(
                f"sample {index} of the batch must be an (image, target) pair, got "
                f"{type(sample).__name__}"
                + (f" of length {len(sample)}" if isinstance(sample, (tuple, list)) else "")
            )
        images.append(sample[0])
        targets.append(sample[1])
    return nested_tensor_from_tensor_list(images, size_multiple), tuple(targets)
