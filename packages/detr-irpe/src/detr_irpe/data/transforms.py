"""DETR's joint image/target augmentations, computing the same numbers as the original DETR's.

Every transform is a callable ``(image, target) -> (image, target)``. ``image`` is a
``PIL.Image`` until :class:`ToTensor` (a ``(3, H, W)`` tensor after it); ``target`` is the
dict of :func:`detr_irpe.data.coco.coco_annotations_to_target`, with ``boxes`` in absolute
xyxy pixels until :class:`Normalize` turns them into ``cxcywh`` relative to the final image.
Transforms return a new dict and never modify the one they receive.

Image and box geometry use ``torchvision.transforms.v2.functional`` (boxes as
``tv_tensors.BoundingBoxes``): its bilinear PIL resize, crop, flip, box scaling, box shift and
clamping compute the same numbers as the original. The output size of a resize is computed
here, because the original rounds differently from torchvision's ``max_size`` rule, and the
random draws use Python's ``random`` and torch's RNG in the original's order, so seeded runs
pick the same scales, crops and flips.
"""

from __future__ import annotations

import random
from argparse import Namespace
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torchvision.transforms as transforms_v1
import torchvision.transforms.v2.functional as F
from torchvision import tv_tensors
from torchvision.ops import box_convert

__all__ = [
    "DEFAULT_TRAIN_SCALES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Compose",
    "Normalize",
    "RandomHorizontalFlip",
    "RandomResize",
    "RandomSelect",
    "RandomSizeCrop",
    "ToTensor",
    "crop",
    "crop_branch_sizes",
    "hflip",
    "make_transforms",
    "resize",
    "resize_output_size",
]

Target = dict[str, torch.Tensor]
Transform = Callable[[Any, Target | None], tuple[Any, Target | None]]

# Shorter-side scales of the original multi-scale training.
DEFAULT_TRAIN_SCALES: tuple[int, ...] = tuple(range(480, 801, 32))
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# The original crop branch for scales up to 800: resize to one of these shorter sides, then
# crop a random region with sides in [384, 600].
_CROP_PRE_RESIZE: tuple[int, ...] = (400, 500, 600)
_CROP_RANGE: tuple[int, int] = (384, 600)
_REFERENCE_SCALE = 800

# Per-box fields that follow the boxes when boxes are removed.
_BOX_FIELDS = ("boxes", "labels", "area", "iscrowd")


def _image_size(image: Any) -> tuple[int, int]:
    """``(width, height)`` of a PIL image or a ``(..., H, W)`` tensor."""
    height, width = F.get_size(image)
    return width, height


def _as_boxes(boxes: torch.Tensor, height: int, width: int) -> tv_tensors.BoundingBoxes:
    return tv_tensors.BoundingBoxes(
        boxes, format=tv_tensors.BoundingBoxFormat.XYXY, canvas_size=(height, width)
    )


def resize_output_size(
    image_size: tuple[int, int], size: int, max_size: int | None = None
) -> tuple[int, int]:
    """``(out_height, out_width)`` of resizing the shorter side to ``size``, longer side capped.

    The original's rule, for ``image_size = (w, h)``: if ``max(w, h) / min(w, h) * size >
    max_size`` then ``size = int(round(max_size * min(w, h) / max(w, h)))`` (Python's
    half-even ``round``); if the shorter side already equals ``size`` the size is unchanged;
    otherwise the shorter side becomes ``size`` and the longer ``int(size * long / short)``
    (truncated). Not torchvision's ``max_size`` rule, which can give a different size.
    """
    width, height = image_size
    if max_size is not None:
        shorter, longer = float(min(width, height)), float(max(width, height))
        if longer / shorter * size > max_size:
            size = round(max_size * shorter / longer)  # half-even, as the original
    if (width <= height and width == size) or (height <= width and height == size):
        return height, width
    if width < height:
        return int(size * height / width), size
    return size, int(size * width / height)


def resize(
    image: Any, target: Target | None, size: int, max_size: int | None = None
) -> tuple[Any, Target | None]:
    """Resize the shorter side to ``size`` (see :func:`resize_output_size`), bilinear.

    Boxes are scaled by ``(ow/w, oh/h, ow/w, oh/h)``, ``area`` by ``ow/w * oh/h`` and
    ``size`` becomes ``[oh, ow]``.
    """
    width, height = _image_size(image)
    out_height, out_width = resize_output_size((width, height), size, max_size)
    resized = F.resize(image, [out_height, out_width])
    if target is None:
        return resized, None
    target = dict(target)
    if "boxes" in target:
        boxes = F.resize(_as_boxes(target["boxes"], height, width), [out_height, out_width])
        target["boxes"] = boxes.as_subclass(torch.Tensor)
    if "area" in target:
        target["area"] = target["area"] * ((out_width / width) * (out_height / height))
    if "masks" in target:
        raise NotImplementedError("segmentation masks are not supported by these transforms")
    target["size"] = torch.tensor([out_height, out_width])
    return resized, target


def crop(
    image: Any, target: Target | None, region: tuple[int, int, int, int]
) -> tuple[Any, Target | None]:
    """Crop ``region = (top, left, height, width)``.

    Boxes are shifted by ``(-left, -top)`` and clipped to ``[0, width] x [0, height]``;
    ``area`` becomes the clipped box area; boxes of zero width or height are removed with
    their ``labels``, ``area`` and ``iscrowd``; ``size`` becomes ``[height, width]``.
    """
    top, left, height, width = region
    image_width, image_height = _image_size(image)
    cropped = F.crop(image, top, left, height, width)
    if target is None:
        return cropped, None
    target = dict(target)
    target["size"] = torch.tensor([height, width])
    if "masks" in target:
        raise NotImplementedError("segmentation masks are not supported by these transforms")
    if "boxes" in target:
        boxes = F.crop(
            _as_boxes(target["boxes"], image_height, image_width), top, left, height, width
        )
        boxes = boxes.as_subclass(torch.Tensor)
        target["boxes"] = boxes
        target["area"] = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        for field in _BOX_FIELDS:
            if field in target:
                target[field] = target[field][keep]
    return cropped, target


def hflip(image: Any, target: Target | None) -> tuple[Any, Target | None]:
    """Mirror left-right; boxes ``[x0, y0, x1, y1] -> [W - x1, y0, W - x0, y1]``."""
    width, height = _image_size(image)
    flipped = F.horizontal_flip(image)
    if target is None:
        return flipped, None
    target = dict(target)
    if "masks" in target:
        raise NotImplementedError("segmentation masks are not supported by these transforms")
    if "boxes" in target:
        boxes = F.horizontal_flip(_as_boxes(target["boxes"], height, width))
        target["boxes"] = boxes.as_subclass(torch.Tensor)
    return flipped, target


class Compose:
    """Apply ``transforms`` in order."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: Any, target: Target | None) -> tuple[Any, Target | None]:
        for transform in self.transforms:
            image, target = transform(image, target)
        return image, target

    def __repr__(self) -> str:
        inner = "".join(f"\n    {t!r}," for t in self.transforms)
        return f"{type(self).__name__}([{inner}\n])"


class RandomHorizontalFlip:
    """:func:`hflip` with probability ``p`` (one ``random.random()`` draw)."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, image: Any, target: Target | None) -> tuple[Any, Target | None]:
        if random.random() < self.p:
            return hflip(image, target)
        return image, target

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p})"


class RandomResize:
    """:func:`resize` to a shorter side drawn with ``random.choice(sizes)``."""

    def __init__(self, sizes: Sequence[int], max_size: int | None = None) -> None:
        if not sizes:
            raise ValueError("RandomResize needs at least one size")
        self.sizes = list(sizes)
        self.max_size = max_size

    def __call__(self, image: Any, target: Target | None) -> tuple[Any, Target | None]:
        return resize(image, target, random.choice(self.sizes), self.max_size)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sizes={self.sizes}, max_size={self.max_size})"


class RandomSizeCrop:
    """:func:`crop` of a random region with sides in ``[min_size, max_size]``.

    Width then height are drawn with ``random.randint(min_size, min(side, max_size))``, the
    position with ``torchvision.transforms.RandomCrop.get_params`` (torch's RNG), as in the
    original. Where an image side is shorter than ``min_size`` (the original raises) the whole
    side is kept.
    """

    def __init__(self, min_size: int, max_size: int) -> None:
        if not 0 < min_size <= max_size:
            raise ValueError(f"need 0 < min_size <= max_size, got {min_size}, {max_size}")
        self.min_size = min_size
        self.max_size = max_size

    def __call__(self, image: Any, target: Target | None) -> tuple[Any, Target | None]:
        width, height = _image_size(image)
        crop_width = random.randint(min(self.min_size, width), min(width, self.max_size))
        crop_height = random.randint(min(self.min_size, height), min(height, self.max_size))
        region = transforms_v1.RandomCrop.get_params(image, (crop_height, crop_width))
        return crop(image, target, region)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(min_size={self.min_size}, max_size={self.max_size})"


class RandomSelect:
    """``first`` with probability ``p``, else ``second`` (one ``random.random()`` draw)."""

    def __init__(self, first: Transform, second: Transform, p: float = 0.5) -> None:
        self.first, self.second, self.p = first, second, p

    def __call__(self, image: Any, target: Target | None) -> tuple[Any, Target | None]:
        if random.random() < self.p:
            return self.first(image, target)
        return self.second(image, target)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p}, first={self.first!r}, second={self.second!r})"


class ToTensor:
    """PIL image (or uint8 tensor) -> ``(C, H, W)`` float32 in ``[0, 1]``; target unchanged.

    Divides by 255 like ``torchvision.transforms.functional.to_tensor`` (``v2.ToDtype``
    multiplies by ``1/255``, which differs in the last bit).
    """

    def __call__(self, image: Any, target: Target | None) -> tuple[torch.Tensor, Target | None]:
        tensor = image if isinstance(image, torch.Tensor) else F.pil_to_tensor(image)
        if not tensor.is_floating_point():
            tensor = tensor.to(torch.float32).div(255)
        return tensor, target

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Normalize:
    """``(x - mean) / std`` per channel; boxes -> ``cxcywh / [W, H, W, H]`` of this image."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean, self.std = list(mean), list(std)

    def __call__(
        self, image: torch.Tensor, target: Target | None
    ) -> tuple[torch.Tensor, Target | None]:
        image = F.normalize(image, mean=self.mean, std=self.std)
        if target is None:
            return image, None
        target = dict(target)
        if "boxes" in target:
            height, width = image.shape[-2:]
            scale = torch.tensor([width, height, width, height], dtype=torch.float32)
            target["boxes"] = box_convert(target["boxes"], "xyxy", "cxcywh") / scale
        return image, target

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mean={self.mean}, std={self.std})"


def crop_branch_sizes(scales: Sequence[int]) -> tuple[list[int], tuple[int, int]]:
    """Pre-crop shorter sides and crop side range of the crop branch for ``scales``.

    The original's values (``[400, 500, 600]`` and ``(384, 600)``) belong to scales up to 800;
    for other scales they are multiplied by ``max(scales) / 800`` and rounded, so small-image
    training keeps the same proportions instead of upsampling to 400-600 pixels.
    """
    factor = max(scales) / _REFERENCE_SCALE
    pre_resize = [max(1, round(side * factor)) for side in _CROP_PRE_RESIZE]
    low, high = (max(1, round(side * factor)) for side in _CROP_RANGE)
    return pre_resize, (low, high)


def make_transforms(image_set: str, args: Namespace) -> Compose:
    """The original's augmentation for ``'train'`` and resize for ``'val'`` (and ``'test'``).

    Train: :class:`RandomHorizontalFlip` (unless ``args.flip_aug`` is false), then (when
    ``args.crop_aug``) with probability 1/2 ``RandomResize(scales, max_size)`` or else
    ``RandomResize(pre)``, ``RandomSizeCrop``,
    ``RandomResize(scales, max_size)`` (sizes from :func:`crop_branch_sizes`); then
    :class:`ToTensor` and ImageNet :class:`Normalize`. ``scales`` is ``args.train_scales``
    (default :data:`DEFAULT_TRAIN_SCALES`), ``max_size`` is ``args.train_max_size``.
    Val: ``RandomResize([args.val_size], args.val_max_size)``, ToTensor, Normalize.
    ``args`` are completed options (:func:`detr_irpe.config.complete_args`).
    """
    normalize = Compose([ToTensor(), Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    if image_set == "train":
        scales = list(args.train_scales or DEFAULT_TRAIN_SCALES)
        max_size = args.train_max_size
        resize_step: Transform = RandomResize(scales, max_size=max_size)
        if args.crop_aug:
            pre_resize, (crop_min, crop_max) = crop_branch_sizes(scales)
            resize_step = RandomSelect(
                resize_step,
                Compose(
                    [
                        RandomResize(pre_resize),
                        RandomSizeCrop(crop_min, crop_max),
                        RandomResize(scales, max_size=max_size),
                    ]
                ),
            )
        flip = [RandomHorizontalFlip()] if args.flip_aug else []
        return Compose([*flip, resize_step, normalize])
    if image_set in ("val", "test"):
        size = args.val_size
        max_size = args.val_max_size
        return Compose([RandomResize([size], max_size=max_size), normalize])
    raise ValueError(f"unknown image_set {image_set!r}; expected 'train', 'val' or 'test'")
