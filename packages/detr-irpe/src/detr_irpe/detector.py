"""A trained detector as one Python object: images in, boxes out.

::

    from detr_irpe import Detector

    detector = Detector.from_checkpoint("run/checkpoint.pth", threshold=0.7)
    result = detector("photo.jpg")          # or a PIL image, an HWC uint8 array, a tensor
    print(result.boxes, result.scores, result.names)
    results = detector(["a.jpg", "b.png"])  # one result per image

The model options, the preprocessing (the validation resize and normalisation) and the class
names come from the checkpoint (this package's or the original's; the original's get the COCO
names). Every input is turned into an 8-bit RGB PIL image first, so the same image given as a
path, a PIL image, an array or a ``[0, 1]`` tensor gives the same detections.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from detr_irpe.atomic import write_text
from detr_irpe.data.coco_names import COCO_CATEGORY_NAMES
from detr_irpe.data.images import load_rgb, to_rgb
from detr_irpe.nested_tensor import NestedTensor

__all__ = ["Detections", "Detector", "write_coco_results"]

ImageInput = str | os.PathLike[str] | Image.Image | np.ndarray | Tensor


@dataclass
class Detections:
    """The detections of one image, scoring at least the detector's threshold, best first.

    Attributes:
        boxes: ``(n, 4)`` float32 ``[x0, y0, x1, y1]`` in the input image's pixels.
        scores: ``(n,)`` float32.
        labels: ``(n,)`` int64 category ids of the dataset.
        names: the ``n`` class names (the id as text when the checkpoint has no names).
        image_size: ``(height, width)`` of the input image.
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    names: list[str] = field(default_factory=list)
    image_size: tuple[int, int] = (0, 0)

    def __len__(self) -> int:
        return int(self.scores.numel())

    def to_coco(self, image_id: int) -> list[dict[str, Any]]:
        """COCO results records: ``image_id``, ``category_id``, ``bbox`` ``[x, y, w, h]``,
        ``score``."""
        return [
            {
                "image_id": int(image_id),
                "category_id": int(label),
                "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                "score": float(score),
            }
            for (x0, y0, x1, y1), label, score in zip(
                self.boxes.tolist(), self.labels.tolist(), self.scores.tolist(), strict=True
            )
        ]


def write_coco_results(
    results: Sequence[Detections], image_ids: Sequence[int], path: str | os.PathLike[str]
) -> None:
    """Write detections as a COCO results JSON file (what ``COCO.loadRes`` reads)."""
    if len(results) != len(image_ids):
        raise ValueError(f"{len(results)} results for {len(image_ids)} image ids")
    records = [r for result, i in zip(results, image_ids, strict=True) for r in result.to_coco(i)]
    write_text(path, json.dumps(records))


def _as_pil(image: ImageInput, index: int) -> Image.Image:
    """Any accepted input as an 8-bit RGB PIL image (the one preprocessing every kind shares)."""
    if isinstance(image, (str, os.PathLike)):
        return load_rgb(Path(image))
    if isinstance(image, Image.Image):
        return to_rgb(image, f"image {index}")
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (3, 4):
            raise ValueError(
                f"image {index}: a NumPy image must be (H, W, 3) or (H, W, 4) uint8, got "
                f"{image.shape} {image.dtype}"
            )
        return to_rgb(Image.fromarray(image), f"image {index}")
    if isinstance(image, Tensor):
        if image.dim() != 3 or image.shape[0] != 3 or not image.is_floating_point():
            raise ValueError(
                f"image {index}: a tensor image must be (3, H, W) float in [0, 1], got "
                f"{tuple(image.shape)} {image.dtype}"
            )
        array = (image.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
        return Image.fromarray(array.permute(1, 2, 0).numpy())
    raise TypeError(
        f"image {index}: expected a path, a PIL image, an HWC uint8 array or a (3, H, W) "
        f"tensor, got {type(image).__name__}"
    )


def _class_names(state: Mapping[str, Any], num_classes: int) -> dict[int, str]:
    stored = state.get("class_names")
    if stored:
        return {int(k): str(v) for k, v in stored.items()}
    if num_classes == 91:  # the class head of a COCO model, such as the original's releases
        return dict(COCO_CATEGORY_NAMES)
    return {}


class Detector:
    """A detection model with its preprocessing, post-processing and class names.

    Build it with :meth:`from_checkpoint`. ``detector(images)`` takes one image or a list
    (paths, PIL images, ``(H, W, 3)`` uint8 arrays, ``(3, H, W)`` float tensors in
    ``[0, 1]``) and returns one :class:`Detections` per image. ``detector.model`` is the
    ``nn.Module``.

    The steps are public for callers that bring their own batches (``detr-irpe-eval`` and
    the evaluation during training, whose data loader already resized and normalised the
    images): :meth:`forward` runs the model on a normalised batch, ``postprocess`` turns its
    outputs into every query's score, label and box, :meth:`detections` adds the threshold,
    the order and the class names.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        postprocess: torch.nn.Module,
        transform: Any = None,
        class_names: Mapping[int, str] | None = None,
        device: torch.device | str | None = None,
        threshold: float = 0.5,
        batch_size: int = 4,
        *,
        amp: str = "off",
        args: Any = None,
    ) -> None:
        from detr_irpe.engine import autocast_dtype

        _check_threshold(threshold)
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.model = model.eval()
        self.postprocess = postprocess
        self.transform = transform
        self.class_names = dict(class_names or {})
        self.device = torch.device(device) if device is not None else _device_of(model)
        autocast_dtype(amp, self.device)  # refuses an unknown mode, or fp16 off CUDA, now
        self.threshold = threshold
        self.batch_size = batch_size
        self.amp = amp
        self.args = args
        """The options the model was built from (``from_checkpoint``), else ``None``."""

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike[str],
        device: str | torch.device | None = None,
        threshold: float = 0.5,
        batch_size: int = 4,
        *,
        overrides: Mapping[str, Any] | None = None,
        base: Any = None,
    ) -> Detector:
        """The detector a checkpoint holds (ours or the original's), on ``device`` (default:
        CUDA when available, else CPU).

        ``overrides`` are options that win over the checkpoint's and ``base`` the other
        options, as :func:`detr_irpe.checkpoint.model_from_checkpoint` takes them.
        """
        from detr_irpe.checkpoint import model_from_checkpoint

        overrides = dict(overrides or {})
        if device is not None:
            overrides["device"] = str(device)
        loaded = model_from_checkpoint(path, overrides, base=base)
        return cls.from_loaded(loaded, threshold=threshold, batch_size=batch_size)

    @classmethod
    def from_loaded(
        cls,
        loaded: Any,
        threshold: float = 0.5,
        batch_size: int = 4,
        class_names: Mapping[int, str] | None = None,
    ) -> Detector:
        """The detector of a :class:`~detr_irpe.checkpoint.CheckpointModel` (what
        ``model_from_checkpoint`` returns; ``detr-irpe-eval`` also needs its criterion).

        ``class_names`` replace the checkpoint's (its stored names, else the COCO names for a
        91-class head, else none: the ids are shown)."""
        from detr_irpe.data.transforms import make_transforms

        args = loaded.args
        names = class_names or _class_names(loaded.checkpoint, int(args.num_classes or 0))
        return cls(
            loaded.model, loaded.postprocessors["bbox"], make_transforms("val", args), names,
            torch.device(args.device), threshold, batch_size, amp=args.amp, args=args,
        )  # fmt: skip

    def __call__(
        self, images: ImageInput | Sequence[ImageInput], threshold: float | None = None
    ) -> Any:
        """:class:`Detections` for one image, or a list of them for a list of images.

        ``threshold`` replaces the detector's for this call."""
        single = not isinstance(images, (list, tuple))
        batch = [images] if single else list(images)
        pil = [_as_pil(image, i) for i, image in enumerate(batch)]
        results = self.detect_images(pil, threshold)
        return results[0] if single else results

    @torch.no_grad()
    def forward(self, samples: NestedTensor) -> dict[str, Any]:
        """The model's raw outputs for a normalised batch (moved to the detector's device,
        under autocast when ``amp`` is on): ``pred_logits (N, Q, C+1)``, ``pred_boxes
        (N, Q, 4)`` normalised cxcywh (and ``aux_outputs``)."""
        from detr_irpe.engine import autocast

        with autocast(self.device, self.amp):
            return self.model(samples.to(self.device))

    def detections(
        self,
        outputs: Mapping[str, Any],
        image_sizes: Tensor,
        threshold: float | None = None,
    ) -> list[Detections]:
        """Per image of a batch, the detections scoring at least ``threshold`` (default: the
        detector's), best first, in the pixels of ``image_sizes (N, 2)`` ``(height, width)``."""
        threshold = self.threshold if threshold is None else _check_threshold(threshold)
        found = self.postprocess(outputs, image_sizes.to(self.device))
        sizes = [(int(h), int(w)) for h, w in image_sizes.tolist()]
        return [self._keep(raw, size, threshold) for raw, size in zip(found, sizes, strict=True)]

    def detect_images(
        self, images: Sequence[Image.Image], threshold: float | None = None
    ) -> list[Detections]:
        """:class:`Detections` for RGB PIL images, up to ``batch_size`` per forward pass."""
        from detr_irpe import nested_tensor

        if self.transform is None:
            raise ValueError("this detector has no transform: run forward() on normalised batches")
        results: list[Detections | None] = [None] * len(images)
        for chunk in self._same_size_chunks(images):
            tensors = [self.transform(images[i], None)[0] for i in chunk]
            sizes = torch.tensor([[images[i].height, images[i].width] for i in chunk])
            outputs = self.forward(nested_tensor.nested_tensor_from_tensor_list(tensors))
            for i, found in zip(chunk, self.detections(outputs, sizes, threshold), strict=True):
                results[i] = found
        return [r for r in results if r is not None]

    def _same_size_chunks(self, images: Sequence[Image.Image]) -> list[list[int]]:
        # Only images of one size share a forward pass: padding changes DETR's output for an
        # image, and an image's detections must not depend on the others given with it.
        groups: dict[tuple[int, int], list[int]] = {}
        for index, image in enumerate(images):
            groups.setdefault(image.size, []).append(index)
        return [
            indices[start : start + self.batch_size]
            for indices in groups.values()
            for start in range(0, len(indices), self.batch_size)
        ]

    def _keep(
        self, raw: Mapping[str, Tensor], size: tuple[int, int], threshold: float
    ) -> Detections:
        scores = raw["scores"].float().cpu()
        order = torch.argsort(scores, descending=True)
        order = order[scores[order] >= threshold]
        labels = raw["labels"].cpu()[order]
        return Detections(
            boxes=raw["boxes"].float().cpu()[order],
            scores=scores[order],
            labels=labels,
            names=[self.class_names.get(int(label), str(int(label))) for label in labels],
            image_size=size,
        )


def _check_threshold(threshold: float) -> float:
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must lie in [0, 1], got {threshold}")
    return threshold


def _device_of(model: torch.nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")
