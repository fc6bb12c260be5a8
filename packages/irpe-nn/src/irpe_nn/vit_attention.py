"""Attention for vision transformers written the timm way: ``(B, N, C)`` tokens, a class
token ahead of the patch grid, one ``qkv`` linear layer.

Swap a ViT/DeiT block's ``attn`` for :class:`RPEAttention` to give it iRPE (the original iRPE
work evaluated DeiT this way); docs/layers.md has a complete small ViT.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .config import parse_rpe_spec
from .functional import rpe_attention
from .rpe import build_rpe

__all__ = ["RPEAttention"]


class RPEAttention(nn.Module):
    """Multi-head self-attention over ``(B, N, C)`` tokens with iRPE on the patch grid.

    Parameters as timm's ``Attention`` (``qkv``: ``nn.Linear(C, 3C)``, ``proj``:
    ``nn.Linear(C, C)``), plus ``rpe_q``, ``rpe_k``, ``rpe_v`` built from ``rpe_config``.

    Args:
        dim: ``C``; divisible by ``num_heads``.
        num_heads: heads.
        qkv_bias: bias of the ``qkv`` projection.
        attn_drop: dropout on the attention probabilities (in training).
        proj_drop: dropout after the output projection.
        rpe_config: an ``rpe-…`` string (parsed with ``skip``), an :class:`~irpe_nn.RPEConfig`
            built with the same ``skip``, or ``None`` (plain attention).
        skip: tokens ahead of the patch grid without a position (1 for a class token, 2 with a
            distillation token); they get their own bucket.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        rpe_config: Any = None,
        skip: int = 1,
    ) -> None:
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"RPEAttention: dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.skip = skip
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        if isinstance(rpe_config, str):
            rpe_config = parse_rpe_spec(rpe_config, skip=skip)
        self.rpe_q, self.rpe_k, self.rpe_v = build_rpe(rpe_config, self.head_dim, num_heads)

    def forward(self, x: torch.Tensor, hw: tuple[int, int] | None = None) -> torch.Tensor:
        """``x (B, N, C)`` -> ``(B, N, C)``, with ``N = skip + height * width``.

        ``hw`` is the patch grid ``(height, width)``; by default square,
        ``sqrt(N - skip)`` on each side.
        """
        B, N, C = x.shape
        if hw is None:
            side = math.isqrt(max(N - self.skip, 0))
            if side * side != N - self.skip:
                raise ValueError(
                    f"RPEAttention: {N} tokens are not skip={self.skip} plus a square grid; "
                    "pass hw=(height, width)"
                )
            hw = (side, side)
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = rpe_attention(
            qkv[0], qkv[1], qkv[2], (self.rpe_q, self.rpe_k, self.rpe_v), hw,
            dropout_p=self.attn_drop if self.training else 0.0,
        )  # fmt: skip
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, C)))
