"""DETR with image relative position encoding (iRPE)."""

from importlib.metadata import version as _version

__version__ = _version("detr-irpe")

__all__ = ["__version__"]
