"""DETR with image relative position encoding (iRPE).

The public surface (imported by name outside the packages): :func:`build_model`, :func:`collate_fn`,
:func:`build_optimizer`, :func:`train_one_epoch`, :func:`load_checkpoint`; the console scripts
``detr-irpe-train``, ``detr-irpe-eval`` and ``detr-irpe-predict``.
"""

from importlib.metadata import version as _version

from detr_irpe.checkpoint import load_checkpoint
from detr_irpe.engine import evaluate, train_one_epoch
from detr_irpe.models import build_model
from detr_irpe.nested_tensor import NestedTensor, collate_fn, nested_tensor_from_tensor_list
from detr_irpe.optim import build_optimizer

__version__ = _version("detr-irpe")

__all__ = [
    "NestedTensor",
    "__version__",
    "build_model",
    "build_optimizer",
    "collate_fn",
    "evaluate",
    "load_checkpoint",
    "nested_tensor_from_tensor_list",
    "train_one_epoch",
]
