"""Absolute 2-D position encodings added to the image features.

Both encodings map a padded batch ``NestedTensor(features (N, C, h, w), mask (N, h, w))`` to
``pos (N, 2 * num_pos_feats, h, w)``.
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import Tensor, nn

from detr_irpe.nested_tensor import NestedTensor

__all__ = [
    "LEARNED_MAX_SIZE",
    "PositionEmbeddingLearned",
    "PositionEmbeddingSine",
    "build_position_encoding",
]

# Rows/columns of the learned tables in the original: feature maps up to 50x50 (1600 px at
# stride 32) are supported.
LEARNED_MAX_SIZE = 50


class PositionEmbeddingSine(nn.Module):
    """Sinusoidal encoding of the (optionally normalised) cumulative row and column counts.

    For ``nm = ~mask``: ``y = cumsum(nm, rows)``, ``x = cumsum(nm, columns)``; with ``normalize``
    each is divided by its last value (+1e-6) and multiplied by ``scale``, so valid pixels span
    ``(0, scale]`` whatever the padding. Channel ``2m`` is ``sin(v / T^(2m/F))``, ``2m+1`` is
    ``cos(v / T^(2m/F))``; the output is ``concat(PY, PX)`` -- rows first, then columns.
    No parameters.
    """

    def __init__(
        self,
        num_pos_feats: int = 64,
        temperature: float = 10000,
        normalize: bool = False,
        scale: float | None = None,
    ) -> None:
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("PositionEmbeddingSine: scale is only used with normalize=True")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale

    def forward(self, tensor_list: NestedTensor) -> Tensor:
        """``tensor_list.mask (N, h, w)`` (True = padding) -> ``pos (N, 2F, h, w)`` float32."""
        mask = tensor_list.mask
        if mask is None:
            raise ValueError("PositionEmbeddingSine needs the padding mask of the batch")
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            eps = 1e-6
            y_embed = y_embed / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = x_embed / (x_embed[:, :, -1:] + eps) * self.scale

        exponent = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (
            2 * torch.div(exponent, 2, rounding_mode="floor") / self.num_pos_feats
        )
        pos_x = x_embed[:, :, :, None] / dim_t
        pos_y = y_embed[:, :, :, None] / dim_t
        # Interleave sin (even channels) and cos (odd channels).
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


class PositionEmbeddingLearned(nn.Module):
    """Learned absolute encoding: ``pos[b, :, r, c] = concat(col_embed[c], row_embed[r])``.

    Columns first (the opposite of the sine order, as the original). Ignores the mask.
    Parameters ``row_embed.weight``, ``col_embed.weight`` of shape ``(50, num_pos_feats)``,
    initialised uniform on [0, 1).
    """

    def __init__(self, num_pos_feats: int = 256, max_size: int = LEARNED_MAX_SIZE) -> None:
        super().__init__()
        self.row_embed = nn.Embedding(max_size, num_pos_feats)
        self.col_embed = nn.Embedding(max_size, num_pos_feats)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def forward(self, tensor_list: NestedTensor) -> Tensor:
        """``tensor_list.tensors (N, C, h, w)`` -> ``pos (N, 2F, h, w)``."""
        x = tensor_list.tensors
        h, w = x.shape[-2:]
        max_size = self.row_embed.num_embeddings
        if h > max_size or w > max_size:
            raise ValueError(
                f"the learned position embedding supports feature maps up to {max_size}x{max_size}"
                f" (images up to about {max_size * 32} px at stride 32); got {h}x{w}. Use "
                "--position_embedding sine or smaller images"
            )
        x_emb = self.col_embed(torch.arange(w, device=x.device))
        y_emb = self.row_embed(torch.arange(h, device=x.device))
        pos = torch.cat(
            [x_emb.unsqueeze(0).expand(h, w, -1), y_emb.unsqueeze(1).expand(h, w, -1)], dim=-1
        )
        return pos.permute(2, 0, 1).unsqueeze(0).expand(x.shape[0], -1, -1, -1)


def build_position_encoding(args: argparse.Namespace) -> nn.Module:
    """The encoding named by ``args.position_embedding`` with ``args.hidden_dim // 2`` features
    per axis (``'sine'``/``'v2'``: normalised, scale 2π; ``'learned'``/``'v3'``)."""
    n_steps = args.hidden_dim // 2
    if args.position_embedding in ("v2", "sine"):
        return PositionEmbeddingSine(n_steps, normalize=True)
    if args.position_embedding in ("v3", "learned"):
        return PositionEmbeddingLearned(n_steps)
    raise ValueError(
        f"unknown --position_embedding {args.position_embedding!r}; expected 'sine' or 'learned'"
    )
