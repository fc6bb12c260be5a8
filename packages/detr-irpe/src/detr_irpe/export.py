"""Export a checkpoint's detector to ONNX or to a ``torch.export`` program (``.pt2``).

The exported graph takes ``images (N, 3, H, W)`` float32, normalised as in training (ImageNet
mean and std), all of one size (no padding mask), with ``N``, ``H`` and ``W`` dynamic, and
returns ``pred_logits (N, Q, num_classes + 1)`` and ``pred_boxes (N, Q, 4)``.

With ``postprocess=True`` it also takes ``orig_sizes (N, 2)`` int64 ``(height, width)`` and
returns what the model's post-processing (:func:`detr_irpe.models.postprocess.decode_detections`)
computes instead: ``boxes (N, Q, 4)`` float32 ``[x0, y0, x1, y1]`` in the pixels of
``orig_sizes``, ``scores (N, Q)`` float32 and ``labels (N, Q)`` int64 (the best real class of
the softmax; no threshold, no sorting).

While exporting, the iRPE layers use their PyTorch formulation (``IRPE_BACKEND=torch``,
``IRPE_FUSED=0``: gather and scatter-add instead of the ``irpe_ops`` operators and the fused
kernel) and compute their bucket ids inside the graph from the feature-map size
(:func:`irpe_nn.buckets.get_bucket_ids_2d_traceable`).

:func:`export_model` checks its result before returning: the exported program and eager
PyTorch must agree on two input sizes.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from detr_irpe.nested_tensor import NestedTensor

__all__ = [
    "FORMATS",
    "ExportMismatchError",
    "ExportableDETR",
    "ExportableDetections",
    "export_mode",
    "export_model",
    "run_exported",
]

FORMATS = ("onnx", "pt2")
OUTPUT_NAMES = ("pred_logits", "pred_boxes")
POSTPROCESSED_NAMES = ("boxes", "scores", "labels")
ATOL, RTOL = 1e-4, 1e-3
MIN_SIDE, MAX_SIDE = 33, 4096
"""Image sides the exported graph accepts (feature maps of at least 2x2 at stride 32)."""
logger = logging.getLogger(__name__)
MISSING_EXTRA = "detr-irpe-export needs the export extra: pip install 'detr-irpe[export]'"


class ExportMismatchError(RuntimeError):
    """The exported program's outputs differ from eager PyTorch's."""


class ExportableDETR(nn.Module):
    """``images (N, 3, H, W)`` -> ``(pred_logits (N, Q, C+1), pred_boxes (N, Q, 4))``.

    Wraps a :class:`~detr_irpe.models.detr.DETR` with an all-valid padding mask (a batch of
    same-size images), so the graph has one tensor input and two tensor outputs. The
    auxiliary decoder outputs are not computed (with one decoder layer their empty list
    left an ``unbind`` without outputs in the graph, which ``torch.export.load`` rejects).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        n, _, h, w = images.shape
        mask = torch.zeros((n, h, w), dtype=torch.bool, device=images.device)
        aux_loss = getattr(self.model, "aux_loss", False)
        self.model.aux_loss = False
        try:
            out = self.model(NestedTensor(images, mask))
        finally:
            self.model.aux_loss = aux_loss
        return out["pred_logits"], out["pred_boxes"]


class ExportableDetections(nn.Module):
    """``(images (N, 3, H, W), orig_sizes (N, 2))`` -> ``(boxes (N, Q, 4), scores (N, Q),
    labels (N, Q))``: :class:`ExportableDETR` followed by the model's post-processing."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.detr = ExportableDETR(model)

    def forward(self, images: Tensor, orig_sizes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        from detr_irpe.models.postprocess import decode_detections

        logits, boxes = self.detr(images)
        scores, labels, boxes = decode_detections(logits, boxes, orig_sizes)
        return boxes, scores, labels


@contextlib.contextmanager
def export_mode() -> Iterator[None]:
    """The iRPE layers' PyTorch formulation (no ``irpe_ops`` operator, no fused kernel)."""
    saved = {name: os.environ.get(name) for name in ("IRPE_BACKEND", "IRPE_FUSED")}
    os.environ["IRPE_BACKEND"], os.environ["IRPE_FUSED"] = "torch", "0"
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise ImportError(MISSING_EXTRA) from None


def _dynamic_shapes(postprocess: bool) -> dict[str, Any]:
    dim = torch.export.Dim
    # Sizes 1 are specialised by the tracer: examples have a batch of 2 and feature maps of
    # at least 2x2 (images of at least MIN_SIDE pixels).
    side = {"min": MIN_SIDE, "max": MAX_SIDE}
    batch = dim("batch", min=1, max=1024)
    shapes: dict[str, Any] = {
        "images": {0: batch, 2: dim("height", **side), 3: dim("width", **side)}
    }
    if postprocess:
        shapes["orig_sizes"] = {0: batch}
    return shapes


def _example_inputs(size: tuple[int, int], postprocess: bool) -> tuple[Tensor, ...]:
    images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    if not postprocess:
        return (images,)
    return images, torch.tensor([[size[0] * 3, size[1] * 3], [size[0], size[1]]])


def _export_program(wrapper: nn.Module, example: tuple[Tensor, ...]) -> Any:
    postprocess = isinstance(wrapper, ExportableDetections)
    with export_mode(), torch.no_grad():
        return torch.export.export(
            wrapper, example, dynamic_shapes=_dynamic_shapes(postprocess), strict=False
        )


def _save(program: Any, fmt: str, output: Path, opset: int | None, postprocess: bool) -> None:
    if fmt == "pt2":
        torch.export.save(program, output)
        return
    _require_onnx()
    inputs, outputs = (
        (["images", "orig_sizes"], POSTPROCESSED_NAMES)
        if postprocess
        else (["images"], OUTPUT_NAMES)
    )
    with export_mode(), torch.no_grad():
        onnx_program = torch.onnx.export(
            program, input_names=inputs, output_names=list(outputs), opset_version=opset,
            dynamo=True,
        )  # fmt: skip
    onnx_program.save(str(output))


def run_exported(path: str | os.PathLike[str], *inputs: Tensor) -> tuple[Tensor, ...]:
    """Run an exported file (``.onnx`` through ONNX Runtime, else ``torch.export.load``) on
    ``images`` (and ``orig_sizes`` for a ``postprocess`` export); its outputs in order."""
    path = Path(path)
    if path.suffix == ".onnx":
        _require_onnx()
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        if len(names) != len(inputs):
            raise ValueError(f"{path} takes {', '.join(names)}; got {len(inputs)} input(s)")
        feed = {name: x.cpu().numpy() for name, x in zip(names, inputs, strict=True)}
        return tuple(torch.from_numpy(o) for o in session.run(None, feed))
    module = torch.export.load(str(path)).module()
    with torch.no_grad():
        return tuple(module(*inputs))


def _check_sizes(model_height: int, model_width: int) -> list[tuple[int, int, int]]:
    return [(1, model_height, model_width), (2, model_height + 32, model_width - 32)]


def _check_inputs(
    n: int, h: int, w: int, postprocess: bool, generator: torch.Generator
) -> tuple[Tensor, ...]:
    images = torch.randn(n, 3, h, w, generator=generator)
    if not postprocess:
        return (images,)
    # Original sizes unlike the input's, so that a box scaled by the wrong side shows.
    return images, torch.randint(MIN_SIDE, 2 * MAX_SIDE, (n, 2), generator=generator)


def _agree(expected: Tensor, got: Tensor, scale: float) -> bool:
    if expected.shape != got.shape or expected.dtype != got.dtype:
        return False
    if not expected.is_floating_point():  # labels: the same class for every query
        return torch.equal(expected, got)
    return torch.allclose(got, expected, atol=ATOL * scale, rtol=RTOL)


def verify_export(wrapper: nn.Module, path: Path, shapes: Sequence[tuple[int, int, int]]) -> float:
    """Largest absolute difference between ``path`` and eager PyTorch on ``(N, H, W)``
    random inputs; raises :class:`ExportMismatchError` beyond ``atol``/``rtol``.

    Boxes in pixels (``postprocess``) get ``atol`` times the image side, their scale."""
    postprocess = isinstance(wrapper, ExportableDetections)
    names = POSTPROCESSED_NAMES if postprocess else OUTPUT_NAMES
    worst = 0.0
    generator = torch.Generator().manual_seed(0)
    for n, h, w in shapes:
        inputs = _check_inputs(n, h, w, postprocess, generator)
        with torch.no_grad():
            expected = wrapper(*inputs)
        got = run_exported(path, *inputs)
        for name, e, g in zip(names, expected, got, strict=True):
            e = e.cpu()
            scale = float(inputs[1].max()) if name == "boxes" else 1.0
            diff = (g.double() - e.double()).abs().max().item() if e.shape == g.shape else 0.0
            if not _agree(e, g, scale):
                raise ExportMismatchError(
                    f"{path}: {name} of the exported model differs from PyTorch's on a "
                    f"{n}x3x{h}x{w} input (max abs diff {diff:.3g}, shapes {tuple(g.shape)} "
                    f"vs {tuple(e.shape)}, dtypes {g.dtype} vs {e.dtype})"
                )
            worst = max(worst, diff / scale)
    return worst


def export_model(
    checkpoint: str | os.PathLike[str] | nn.Module,
    format: str = "onnx",
    output: str | os.PathLike[str] | None = None,
    opset: int | None = None,
    *,
    size: tuple[int, int] = (96, 128),
    overrides: Mapping[str, Any] | None = None,
    postprocess: bool = False,
) -> Path:
    """Export a checkpoint's detector (or a DETR module) and check the result.

    Args:
        checkpoint: a checkpoint path or URL (see :func:`detr_irpe.model_from_checkpoint`),
            or a built DETR.
        format: ``"onnx"`` or ``"pt2"`` (``torch.export.save``; load with
            ``torch.export.load(path).module()``).
        output: the file to write (default: the checkpoint's name with the format's suffix).
        opset: ONNX opset (default: the exporter's).
        size: ``(H, W)`` of the example input traced (any size runs afterwards).
        overrides: options over the checkpoint's (``{"device": "cpu"}`` is always applied).
        postprocess: also take ``orig_sizes`` and return ``boxes``, ``scores``, ``labels``
            (see the module docstring) instead of the raw outputs.

    Returns:
        The written file.

    Raises:
        ValueError: unknown format; ImportError: the export extra is missing;
        ExportMismatchError: the exported program disagrees with PyTorch.
    """
    if format not in FORMATS:
        raise ValueError(f"export format must be one of {', '.join(FORMATS)}, got {format!r}")
    if format == "onnx":
        _require_onnx()
    model = _load_model(checkpoint, overrides)
    if output is None:
        if not isinstance(checkpoint, (str, os.PathLike)):
            raise ValueError("export_model: give output= when exporting a module")
        output = Path(checkpoint).with_suffix(f".{format}")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    wrapper = (ExportableDetections(model) if postprocess else ExportableDETR(model)).eval()
    program = _export_program(wrapper, _example_inputs(size, postprocess))
    _save(program, format, output, opset, postprocess)
    worst = verify_export(wrapper, output, _check_sizes(*size))
    logger.info("%s: equal to PyTorch on two sizes (max abs diff %.2g)", output, worst)
    return output


def _load_model(checkpoint: Any, overrides: Mapping[str, Any] | None) -> nn.Module:
    if isinstance(checkpoint, nn.Module):
        return checkpoint.cpu().eval()
    from detr_irpe.checkpoint import model_from_checkpoint

    options = {**dict(overrides or {}), "device": "cpu"}
    return model_from_checkpoint(checkpoint, options).model.eval()
