"""The DETR encoder-decoder transformer with iRPE in the encoder self-attention.

Sequences are ``(L, N, E)`` (sequence first) as in the
original; the image tokens are the feature map flattened row-major (token ``r * w + c``), which is
the order iRPE expects. The state-dict keys and their order are the original's.
"""

from __future__ import annotations

import argparse
import copy
import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

import irpe_nn

__all__ = [
    "Transformer",
    "TransformerDecoder",
    "TransformerDecoderLayer",
    "TransformerEncoder",
    "TransformerEncoderLayer",
    "build_transformer",
    "encoder_rpe_config",
]

_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "glu": F.glu,
}


def _activation(name: str) -> Callable[[Tensor], Tensor]:
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; choose one of {sorted(_ACTIVATIONS)}"
        ) from None


def _with_pos(tensor: Tensor, pos: Tensor | None) -> Tensor:
    return tensor if pos is None else tensor + pos


def _clones(module: nn.Module, count: int) -> nn.ModuleList:
    # Deep copies: every layer starts as an identical copy and gets its own values from the
    # transformer-wide xavier pass that follows.
    return nn.ModuleList([copy.deepcopy(module) for _ in range(count)])


class TransformerEncoderLayer(nn.Module):
    """Self-attention (iRPE) + feed-forward, post-norm (default) or pre-norm.

    ``self_attn`` is :class:`irpe_nn.RPEMultiheadAttention` with the RPE modules of
    ``rpe_config`` (none when ``None``); it gets the feature-map size ``hw`` of the tokens.
    """

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: str = "relu",
        normalize_before: bool = False,
        rpe_config: object | None = None,
    ) -> None:
        super().__init__()
        # Attribute order fixes the state-dict order: self_attn, linear1, linear2, norm1, norm2.
        self.self_attn = irpe_nn.RPEMultiheadAttention(
            d_model, nhead, dropout=dropout, rpe_config=rpe_config
        )
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = _activation(activation)
        self.normalize_before = normalize_before

    def _feed_forward(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(self.activation(self.linear1(x))))

    def forward(
        self,
        src: Tensor,
        src_key_padding_mask: Tensor | None = None,
        pos: Tensor | None = None,
        hw: tuple[int, int] | None = None,
    ) -> Tensor:
        """``src``, ``pos (h*w, N, E)``; ``src_key_padding_mask (N, h*w)`` True on padding;
        ``hw = (h, w)`` of the padded feature map. Returns ``(h*w, N, E)``."""
        if self.normalize_before:
            x = self.norm1(src)
            q = k = _with_pos(x, pos)
            attn = self.self_attn(
                q, k, x, key_padding_mask=src_key_padding_mask, need_weights=False, hw=hw
            )[0]
            src = src + self.dropout1(attn)
            return src + self.dropout2(self._feed_forward(self.norm2(src)))
        q = k = _with_pos(src, pos)
        attn = self.self_attn(
            q, k, src, key_padding_mask=src_key_padding_mask, need_weights=False, hw=hw
        )[0]
        src = self.norm1(src + self.dropout1(attn))
        return self.norm2(src + self.dropout2(self._feed_forward(src)))


class TransformerDecoderLayer(nn.Module):
    """Query self-attention, cross-attention to the encoder memory, feed-forward (no iRPE)."""

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: str = "relu",
        normalize_before: bool = False,
    ) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.activation = _activation(activation)
        self.normalize_before = normalize_before

    def _feed_forward(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(self.activation(self.linear1(x))))

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        memory_key_padding_mask: Tensor | None = None,
        pos: Tensor | None = None,
        query_pos: Tensor | None = None,
    ) -> Tensor:
        """``tgt``, ``query_pos (Q, N, E)``; ``memory``, ``pos (h*w, N, E)``;
        ``memory_key_padding_mask (N, h*w)``. Returns ``(Q, N, E)``."""
        if self.normalize_before:
            x = self.norm1(tgt)
            q = k = _with_pos(x, query_pos)
            tgt = tgt + self.dropout1(self.self_attn(q, k, x, need_weights=False)[0])
            x = self.norm2(tgt)
            attn = self.multihead_attn(
                _with_pos(x, query_pos),
                _with_pos(memory, pos),
                memory,
                key_padding_mask=memory_key_padding_mask,
                need_weights=False,
            )[0]
            tgt = tgt + self.dropout2(attn)
            return tgt + self.dropout3(self._feed_forward(self.norm3(tgt)))
        q = k = _with_pos(tgt, query_pos)
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(q, k, tgt, need_weights=False)[0]))
        attn = self.multihead_attn(
            _with_pos(tgt, query_pos),
            _with_pos(memory, pos),
            memory,
            key_padding_mask=memory_key_padding_mask,
            need_weights=False,
        )[0]
        tgt = self.norm2(tgt + self.dropout2(attn))
        return self.norm3(tgt + self.dropout3(self._feed_forward(tgt)))


class TransformerEncoder(nn.Module):
    """``num_layers`` deep copies of ``encoder_layer``, then ``norm`` if given (pre-norm only)."""

    def __init__(
        self, encoder_layer: TransformerEncoderLayer, num_layers: int, norm: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.layers = _clones(encoder_layer, num_layers)
        self.num_layers = num_layers
        self.norm = norm

    def forward(
        self,
        src: Tensor,
        src_key_padding_mask: Tensor | None = None,
        pos: Tensor | None = None,
        hw: tuple[int, int] | None = None,
    ) -> Tensor:
        """``(h*w, N, E)`` -> memory ``(h*w, N, E)``."""
        output = src
        for layer in self.layers:
            output = layer(output, src_key_padding_mask=src_key_padding_mask, pos=pos, hw=hw)
        if self.norm is not None:
            output = self.norm(output)
        return output


class TransformerDecoder(nn.Module):
    """``num_layers`` deep copies of ``decoder_layer`` and the shared output ``norm``.

    With ``return_intermediate`` the normed output of every layer is returned,
    ``(num_layers, Q, N, E)``; otherwise ``(1, Q, N, E)``.
    """

    def __init__(
        self,
        decoder_layer: TransformerDecoderLayer,
        num_layers: int,
        norm: nn.Module | None = None,
        return_intermediate: bool = False,
    ) -> None:
        super().__init__()
        self.layers = _clones(decoder_layer, num_layers)
        self.num_layers = num_layers
        self.norm = norm
        self.return_intermediate = return_intermediate
        if return_intermediate and norm is None:
            raise ValueError("TransformerDecoder: return_intermediate needs a norm")

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        memory_key_padding_mask: Tensor | None = None,
        pos: Tensor | None = None,
        query_pos: Tensor | None = None,
    ) -> Tensor:
        output = tgt
        intermediate = []
        for layer in self.layers:
            output = layer(
                output,
                memory,
                memory_key_padding_mask=memory_key_padding_mask,
                pos=pos,
                query_pos=query_pos,
            )
            if self.return_intermediate:
                intermediate.append(self.norm(output))
        if self.return_intermediate:
            return torch.stack(intermediate)
        if self.norm is not None:
            output = self.norm(output)
        return output.unsqueeze(0)


@functools.lru_cache(maxsize=32)
def encoder_rpe_config(enc_rpe2d: str) -> Any:
    """The iRPE configuration of an ``--enc_rpe2d`` string (``None`` for ``''``).

    Parsed once per string (the programmes check the option at their boundary, the model is
    built from it later): the result is shared, so treat it as read-only.

    Raises:
        ValueError: a malformed string, naming the bad field.
    """
    return irpe_nn.parse_rpe_spec(enc_rpe2d)


class Transformer(nn.Module):
    """Encoder (iRPE self-attention) + decoder with learned queries.

    ``enc_rpe2d`` is the iRPE string ``rpe-{ratio}-{method}-{mode}-{shared_head}-{rpe_on}``
    (docs/layers.md, 'The ``rpe-…`` string') applied to every encoder layer; ``''`` gives no
    RPE (the encoder still uses :class:`irpe_nn.RPEMultiheadAttention`, computing plain
    multi-head attention).
    """

    def __init__(
        self,
        d_model: int = 512,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: str = "relu",
        normalize_before: bool = False,
        return_intermediate_dec: bool = False,
        enc_rpe2d: str = "",
    ) -> None:
        super().__init__()
        if d_model % nhead != 0:
            raise ValueError(f"hidden_dim {d_model} is not divisible by nheads {nhead}")
        self.enc_rpe2d = enc_rpe2d
        rpe_config = encoder_rpe_config(enc_rpe2d)
        encoder_layer = TransformerEncoderLayer(
            d_model, nhead, dim_feedforward, dropout, activation, normalize_before, rpe_config
        )
        encoder_norm = nn.LayerNorm(d_model) if normalize_before else None
        self.encoder = TransformerEncoder(encoder_layer, num_encoder_layers, encoder_norm)

        decoder_layer = TransformerDecoderLayer(
            d_model, nhead, dim_feedforward, dropout, activation, normalize_before
        )
        decoder_norm = nn.LayerNorm(d_model)
        self.decoder = TransformerDecoder(
            decoder_layer,
            num_decoder_layers,
            decoder_norm,
            return_intermediate=return_intermediate_dec,
        )
        self._reset_parameters()
        self.d_model = d_model
        self.nhead = nhead

    def _reset_parameters(self) -> None:
        # Every matrix-shaped parameter, iRPE lookup tables included (as in the original), in
        # parameters() order so seeded builds reproduce the original's values.
        for parameter in self.parameters():
            if parameter.dim() > 1:
                nn.init.xavier_uniform_(parameter)

    def forward(
        self, src: Tensor, mask: Tensor, query_embed: Tensor, pos_embed: Tensor
    ) -> tuple[Tensor, Tensor]:
        """
        Args:
            src: projected features ``(N, E, h, w)``.
            mask: padding mask ``(N, h, w)``, True on padding.
            query_embed: learned queries ``(Q, E)``.
            pos_embed: position encoding ``(N, E, h, w)``.

        Returns:
            ``hs (num_dec_layers or 1, N, Q, E)`` (decoder outputs after the shared norm) and
            ``memory (N, E, h, w)`` (encoder output).
        """
        bs, c, h, w = src.shape
        src = src.flatten(2).permute(2, 0, 1)
        pos_embed = pos_embed.flatten(2).permute(2, 0, 1)
        query_pos = query_embed.unsqueeze(1).expand(-1, bs, -1)
        mask = mask.flatten(1)
        tgt = torch.zeros_like(query_pos)
        memory = self.encoder(src, src_key_padding_mask=mask, pos=pos_embed, hw=(h, w))
        hs = self.decoder(
            tgt, memory, memory_key_padding_mask=mask, pos=pos_embed, query_pos=query_pos
        )
        return hs.transpose(1, 2), memory.permute(1, 2, 0).view(bs, c, h, w)


def build_transformer(args: argparse.Namespace) -> Transformer:
    """The transformer of the command-line options (decoder returns every layer's output)."""
    return Transformer(
        d_model=args.hidden_dim,
        dropout=args.dropout,
        nhead=args.nheads,
        dim_feedforward=args.dim_feedforward,
        num_encoder_layers=args.enc_layers,
        num_decoder_layers=args.dec_layers,
        normalize_before=args.pre_norm,
        return_intermediate_dec=True,
        enc_rpe2d=args.enc_rpe2d,
    )
