"""DETR with image relative position encoding (iRPE).

The public surface (imported by name outside the packages): :func:`build_model`, :func:`collate_fn`,
:func:`build_optimizer`, :func:`train_one_epoch`, :func:`load_checkpoint`; the console scripts
``detr-irpe-train``, ``detr-irpe-eval`` and ``detr-irpe-predict``.
"""

from __future__ import annotations

from importlib.metadata import version as _version

from detr_irpe._lazy import lazy_attributes

__version__ = _version("detr-irpe")

# Imported on first use, so that the console scripts answer --help (and report bad flags)
# without loading torch and the models first.
_LAZY = {
    "Detections": "detr_irpe.detector",
    "Detector": "detr_irpe.detector",
    "NestedTensor": "detr_irpe.nested_tensor",
    "build_model": "detr_irpe.models",
    "build_optimizer": "detr_irpe.optim",
    "collate_fn": "detr_irpe.nested_tensor",
    "evaluate": "detr_irpe.engine",
    "load_checkpoint": "detr_irpe.checkpoint",
    "model_from_checkpoint": "detr_irpe.checkpoint",
    "nested_tensor_from_tensor_list": "detr_irpe.nested_tensor",
    "train_one_epoch": "detr_irpe.engine",
}

__all__ = ["__version__", *sorted(_LAZY)]


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, globals())
