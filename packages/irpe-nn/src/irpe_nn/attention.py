"""Multi-head attention with iRPE: a drop-in for the original's
``RPEMultiheadAttention``, with its parameter names, initialisation and forward semantics."""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .functional import attention, attention_with_weights
from .rpe import build_rpe
from .sizes import is_size, is_traced_size

__all__ = ["RPEMultiheadAttention"]

_log = logging.getLogger(__name__)


def _rows(tensor: torch.Tensor | None, start: int, stop: int) -> torch.Tensor | None:
    return None if tensor is None else tensor[start:stop]


class RPEMultiheadAttention(nn.Module):
    """PyTorch-1.7-style multi-head attention with optional iRPE on queries, keys, values.

    Parameters (names and shapes as the original, so its state dicts load unchanged):
    ``in_proj_weight (3E, E)`` (or ``q_proj_weight (E, E)``, ``k_proj_weight (E, kdim)``,
    ``v_proj_weight (E, vdim)`` when ``kdim``/``vdim`` differ from ``E``), ``in_proj_bias
    (3E)`` if ``bias``, ``out_proj`` (an ``nn.Linear(E, E)``, always with a bias as in
    PyTorch 1.7), ``bias_k``/``bias_v (1, 1, E)`` if ``add_bias_kv``, and the submodules
    ``rpe_q``, ``rpe_k``, ``rpe_v`` built from ``rpe_config`` (``None`` when absent).

    Args:
        embed_dim: ``E``.
        num_heads: ``nh``; ``E`` must be divisible by it (``D = E // nh``).
        dropout: dropout probability on the attention weights.
        bias: learn ``in_proj_bias``.
        add_bias_kv: append learned ``bias_k``/``bias_v`` to keys/values (not with iRPE).
        add_zero_attn: append a zero key/value (not with iRPE).
        kdim, vdim: feature sizes of key and value (default ``E``).
        rpe_config: an :class:`~irpe_nn.RPEConfig` (e.g. from
            :func:`~irpe_nn.parse_rpe_spec`), an ``rpe-…`` string such as
            ``"rpe-2.0-product-ctx-1-k"`` (parsed with ``skip=0``), or ``None``.
        batch_first: inputs and outputs ``(N, L, E)`` instead of ``(L, N, E)`` (as
            ``nn.MultiheadAttention``).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        rpe_config: Any = None,
        batch_first: bool = False,
    ) -> None:
        super().__init__()
        if num_heads < 1 or embed_dim % num_heads != 0:
            raise ValueError(
                f"RPEMultiheadAttention: embed_dim ({embed_dim}) must be divisible by "
                f"num_heads ({num_heads})"
            )
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"RPEMultiheadAttention: dropout must be in [0, 1], got {dropout}")
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.head_dim = embed_dim // num_heads
        self.batch_first = batch_first

        # Creation order follows PyTorch 1.7 so the RNG stream (out_proj's own init) and the
        # state-dict key order match the original.
        if self._qkv_same_embed_dim:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(embed_dim, embed_dim))
            self.k_proj_weight = nn.Parameter(torch.empty(embed_dim, self.kdim))
            self.v_proj_weight = nn.Parameter(torch.empty(embed_dim, self.vdim))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty(1, 1, embed_dim))
            self.bias_v = nn.Parameter(torch.empty(1, 1, embed_dim))
        else:
            self.bias_k = self.bias_v = None
        self.add_zero_attn = add_zero_attn
        self._reset_parameters()

        self.rpe_q, self.rpe_k, self.rpe_v = build_rpe(
            rpe_config, head_dim=self.head_dim, num_heads=num_heads
        )
        for name, module in (("q", self.rpe_q), ("k", self.rpe_k), ("v", self.rpe_v)):
            if module is not None:
                _log.debug("The number of buckets on rpe_%s: %d", name, module.num_buckets)

    def _reset_parameters(self) -> None:
        if self._qkv_same_embed_dim:
            nn.init.xavier_uniform_(self.in_proj_weight)
        else:
            nn.init.xavier_uniform_(self.q_proj_weight)
            nn.init.xavier_uniform_(self.k_proj_weight)
            nn.init.xavier_uniform_(self.v_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.constant_(self.in_proj_bias, 0.0)
            nn.init.constant_(self.out_proj.bias, 0.0)
        if self.bias_k is not None:
            nn.init.xavier_normal_(self.bias_k)
        if self.bias_v is not None:
            nn.init.xavier_normal_(self.bias_v)

    @property
    def has_rpe(self) -> bool:
        """Whether any of ``rpe_q``, ``rpe_k``, ``rpe_v`` is present."""
        return any(m is not None for m in (self.rpe_q, self.rpe_k, self.rpe_v))

    def _project(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Input projections ``(L, N, E)``. Shared inputs are detected by identity (one
        GEMM for several projections), never by comparing values as the original did."""
        E, b = self.embed_dim, self.in_proj_bias
        if not self._qkv_same_embed_dim:
            return (
                F.linear(query, self.q_proj_weight, _rows(b, 0, E)),
                F.linear(key, self.k_proj_weight, _rows(b, E, 2 * E)),
                F.linear(value, self.v_proj_weight, _rows(b, 2 * E, 3 * E)),
            )
        W = self.in_proj_weight
        if query is key and key is value:
            q, k, v = F.linear(query, W, b).chunk(3, dim=-1)
        elif query is key:
            q, k = F.linear(query, W[: 2 * E], _rows(b, 0, 2 * E)).chunk(2, dim=-1)
            v = F.linear(value, W[2 * E :], _rows(b, 2 * E, 3 * E))
        elif key is value:
            q = F.linear(query, W[:E], _rows(b, 0, E))
            k, v = F.linear(key, W[E:], _rows(b, E, 3 * E)).chunk(2, dim=-1)
        else:
            q = F.linear(query, W[:E], _rows(b, 0, E))
            k = F.linear(key, W[E : 2 * E], _rows(b, E, 2 * E))
            v = F.linear(value, W[2 * E :], _rows(b, 2 * E, 3 * E))
        return q, k, v

    def _check_inputs(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None,
        hw: Any,
    ) -> tuple[int, int] | None:
        for name, tensor, dim in (
            ("query", query, self.embed_dim),
            ("key", key, self.kdim),
            ("value", value, self.vdim),
        ):
            if tensor.dim() != 3 or tensor.shape[2] != dim:
                raise ValueError(
                    f"RPEMultiheadAttention: {name} must be (L, N, {dim}) (sequence first), "
                    f"got shape {tuple(tensor.shape)}"
                )
        if key.shape[:2] != value.shape[:2] or key.shape[1] != query.shape[1]:
            raise ValueError(
                f"RPEMultiheadAttention: query {tuple(query.shape)}, key {tuple(key.shape)} and "
                f"value {tuple(value.shape)} must share the batch size, key and value the length"
            )
        if key_padding_mask is not None and tuple(key_padding_mask.shape) != (
            key.shape[1],
            key.shape[0],
        ):
            raise ValueError(
                f"RPEMultiheadAttention: key_padding_mask must be (N, Lk) = "
                f"{(key.shape[1], key.shape[0])}, got {tuple(key_padding_mask.shape)}"
            )
        if not self.has_rpe:
            return None
        if hw is None:
            raise ValueError(
                "RPEMultiheadAttention: this layer has iRPE, so forward needs the token grid: "
                "pass hw=(height, width) with L = skip + height*width"
            )
        if not isinstance(hw, (tuple, list, torch.Size)) or len(hw) != 2:
            raise ValueError(
                f"RPEMultiheadAttention: hw must be a pair of ints (height, width), got {hw!r}"
            )
        if not all(is_size(s) for s in hw):
            raise ValueError(
                "RPEMultiheadAttention: hw must be a pair of ints (height, width) (or the "
                f"0-d integer tensors a tracer records for them), got {hw!r}"
            )
        if any(is_traced_size(s) for s in hw):
            # Sizes recorded by the legacy tracer (torch.jit.trace, torch.onnx.export with
            # dynamo=False): checking their values here would bake this input's grid into
            # the trace; the graph computes the bucket ids from them instead.
            return hw[0], hw[1]
        if hw[0] < 1 or hw[1] < 1:
            raise ValueError(f"RPEMultiheadAttention: hw must be positive, got {tuple(hw)}")
        if key.shape[0] != query.shape[0]:
            raise ValueError(
                f"RPEMultiheadAttention: iRPE needs self-attention over one token grid "
                f"(key length == query length), got Lq={query.shape[0]}, Lk={key.shape[0]}"
            )
        if self.bias_k is not None or self.add_zero_attn:
            raise ValueError(
                "RPEMultiheadAttention: add_bias_kv/add_zero_attn append keys outside the token "
                "grid and cannot be combined with iRPE"
            )
        if query.shape[0] < hw[0] * hw[1] <= query.shape[1]:  # the batch read as sequence
            given = tuple(query.transpose(0, 1).shape if self.batch_first else query.shape)
            expected = (
                "batch-first (N, L, E) expected (the layer has batch_first=True)"
                if self.batch_first
                else "sequence-first (L, N, E) expected; pass batch_first=True for (N, L, E)"
            )
            raise ValueError(
                f"RPEMultiheadAttention: {expected}; got {given} for a {hw[0]}x{hw[1]} grid"
            )
        return hw[0], hw[1]

    @staticmethod
    def _normalise_attn_mask(
        attn_mask: torch.Tensor | None, batch_heads: int, Lq: int, Lk: int
    ) -> torch.Tensor | None:
        if attn_mask is None:
            return None
        if attn_mask.dtype == torch.uint8:
            warnings.warn(
                "Byte tensor for attn_mask is deprecated; use a bool tensor instead.",
                stacklevel=3,
            )
            attn_mask = attn_mask.to(torch.bool)
        if not (attn_mask.is_floating_point() or attn_mask.dtype == torch.bool):
            raise ValueError(
                f"RPEMultiheadAttention: attn_mask must be float or bool, got {attn_mask.dtype}"
            )
        if attn_mask.dim() == 2:
            attn_mask = attn_mask.unsqueeze(0)
            expected = (1, Lq, Lk)
        elif attn_mask.dim() == 3:
            expected = (batch_heads, Lq, Lk)
        else:
            raise ValueError(
                f"RPEMultiheadAttention: attn_mask must be 2-D or 3-D, got {attn_mask.dim()}-D"
            )
        if tuple(attn_mask.shape) != expected:
            want = f"(Lq, Lk) = {(Lq, Lk)} or (N*nh, Lq, Lk) = {(batch_heads, Lq, Lk)}"
            raise ValueError(
                f"RPEMultiheadAttention: attn_mask must be {want}, got {tuple(attn_mask.shape)}"
            )
        return attn_mask

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        hw: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention of ``query`` over ``key``/``value`` with the iRPE terms.

        Args:
            query: ``(Lq, N, E)``.
            key: ``(Lk, N, kdim)``.
            value: ``(Lk, N, vdim)``.
            key_padding_mask: ``(N, Lk)`` bool, ``True`` = padding (ignored key).
            need_weights: also return the head-averaged attention weights.
            attn_mask: ``(Lq, Lk)`` or ``(N*nh, Lq, Lk)``; bool (``True`` = masked) or
                float (added to the logits).
            hw: ``(height, width)`` of the token grid, required when iRPE is present
                (``Lq = Lk = skip + height*width``).

        Returns:
            ``(out (Lq, N, E), weights (N, Lq, Lk) or None)``; ``weights`` are the
            post-dropout probabilities averaged over heads.

        Logits: ``A = (s q) k^T + R_k + R_q^T`` with ``s = D**-0.5``; ``R_k = rpe_k(s q)``,
        ``R_q = rpe_q(s k)``; masks after the iRPE terms; ``P = dropout(softmax(A))``;
        ``out = (P v + rpe_v(P)) W_o^T + b_o``.
        """
        if self.batch_first:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        grid = self._check_inputs(query, key, value, key_padding_mask, hw)
        Lq, B, E = query.shape
        nh, D = self.num_heads, self.head_dim

        q, k, v = self._project(query, key, value)
        attn_mask = self._normalise_attn_mask(attn_mask, B * nh, Lq, key.shape[0])
        if key_padding_mask is not None and key_padding_mask.dtype == torch.uint8:
            key_padding_mask = key_padding_mask.to(torch.bool)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.repeat(1, B, 1)])
            v = torch.cat([v, self.bias_v.repeat(1, B, 1)])
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            if key_padding_mask is not None:
                key_padding_mask = F.pad(key_padding_mask, (0, 1))

        # (L, N, E) -> (N*nh, L, D), batch-major: row b*nh + h is head h of sample b. Explicit
        # lengths (no -1), so that an empty batch (N = 0) reshapes too.
        q = q.contiguous().view(Lq, B * nh, D).transpose(0, 1)
        k = k.contiguous().view(k.shape[0], B * nh, D).transpose(0, 1)
        v = v.contiguous().view(v.shape[0], B * nh, D).transpose(0, 1)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(B * nh, 1, D)], dim=1)
            v = torch.cat([v, v.new_zeros(B * nh, 1, D)], dim=1)
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            if key_padding_mask is not None:
                key_padding_mask = F.pad(key_padding_mask, (0, 1))
        Lk = k.shape[1]

        masks = []
        if attn_mask is not None:
            masks.append(attn_mask.view(B, nh, Lq, Lk) if attn_mask.shape[0] != 1 else attn_mask)
        heads = (q.view(B, nh, Lq, D), k.view(B, nh, Lk, D), v.view(B, nh, Lk, D))
        rpe = (self.rpe_q, self.rpe_k, self.rpe_v)
        dropout_p = self.dropout if self.training else 0.0
        probs = None
        if need_weights:
            if key_padding_mask is not None:
                masks.append(key_padding_mask.view(B, 1, 1, Lk))
            out, probs = attention_with_weights(*heads, rpe, grid, masks, dropout_p)
        else:  # the fused kernel where it applies (irpe_nn.fused)
            out = attention(*heads, rpe, grid, masks, key_padding_mask, dropout_p)
        out = self.out_proj(out.permute(2, 0, 1, 3).reshape(Lq, B, E))
        if self.batch_first:
            out = out.transpose(0, 1)
        if probs is None:
            return out, None
        return out, probs.sum(dim=1) / nh
