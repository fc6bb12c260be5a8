"""When the layers take the fused attention of ``irpe_ops`` (no ``L x L`` tensor at all).

The fused operator (``irpe_ops.rpe_attention``) computes the logits with the iRPE terms, the
softmax, the dropout and the value term tile by tile. The layers use it whenever it applies:
no attention weights asked for, float32/bfloat16/float64 on a device with the kernel (CPU;
CUDA through Triton when a GPU is present), no
``attn_mask`` (a key padding mask is fine), and every encoding a single contextual table (not
the cross method, not bias mode). Otherwise they compute the materialised path, which returns
the weights. ``IRPE_FUSED=0`` turns the fused path off (to compare the two).

With dropout 0 both paths agree to float32 rounding. With dropout, the fused path draws its
keep mask from a counter-based hash seeded from torch's generator (a seed reproduces a run),
not the mask ``F.dropout`` would draw.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from .backend import _ops_module, backend

__all__ = ["FUSED_ENV", "attention_path", "fused_tables"]

FUSED_ENV = "IRPE_FUSED"
"""Environment variable: ``0`` keeps the materialised path even where the fused one applies."""

_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float64)


def _fused_op() -> Any:
    ops = _ops_module()
    return getattr(ops, "rpe_attention", None) if ops is not None else None


def _fused_devices() -> frozenset[str]:
    ops = _ops_module()
    return getattr(ops, "FUSED_ATTENTION_DEVICES", frozenset({"cpu"}))


def fused_tables(rpe: tuple[Any, Any, Any]) -> tuple[Any, Any, Any] | None:
    """``(wq, wk, wv)`` lookup tables when every present encoding is a single contextual
    table (the fused kernel's case); ``None`` otherwise."""
    tables = []
    for module in rpe:
        if module is None:
            tables.append(None)
        elif getattr(module, "mode", None) == "contextual" and hasattr(module, "table"):
            tables.append(module.table)
        else:  # the cross method (two tables) or bias mode
            return None
    return tables[0], tables[1], tables[2]


def attention_path(
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    *,
    need_weights: bool = False,
    attn_mask: bool = False,
) -> str:
    """Which computation the iRPE attention takes for these inputs.

    Returns:
        ``"fused"`` (``irpe_ops.rpe_attention``), ``"irpe_ops"`` (materialised, with the
        compiled gather/bucket-sum) or ``"torch"`` (materialised, pure PyTorch).
    """
    name = backend(device)
    usable = (
        name == "irpe_ops"
        and _fused_op() is not None
        and torch.device(device or "cpu").type in _fused_devices()
        and dtype in _FUSED_DTYPES
        and not need_weights
        and not attn_mask
        and os.environ.get(FUSED_ENV, "1").strip() != "0"
    )
    return "fused" if usable else name
