"""Package attributes imported on first use (PEP 562), so that the programmes' ``--help``
and bad flags answer without loading torch and the models."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_attributes"]


def lazy_attributes(
    package: str, sources: Mapping[str, str], namespace: dict[str, Any]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: each name of ``sources`` is imported from
    its module on first access and then kept in the package's ``namespace``."""

    def get_attribute(name: str) -> Any:
        module = sources.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    def list_attributes() -> list[str]:
        return sorted({*namespace, *sources})

    return get_attribute, list_attributes
