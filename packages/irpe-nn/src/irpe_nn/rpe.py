"""The iRPE modules: learned lookup tables indexed by bucket ids."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .backend import backend, bucket_sum, index_dtype, rpe_index
from .bucket_cache import bucket_ids
from .buckets import METHOD, num_base_buckets
from .config import MODES, SingleRPEConfig, parse_rpe_spec
from .sizes import is_traced_size

__all__ = ["build_rpe", "iRPE", "iRPE_Cross"]


class iRPE(nn.Module):
    """Image relative position encoding for one of queries, keys or values.

    Parameters (zeros, then ``initializer(param)`` if one is given), with ``Hm =
    num_heads`` (1 for a shared table), ``D = head_dim``, ``K = num_buckets``:

    * ``transposed`` (q/k), ``mode="bias"``: ``lookup_table_bias`` ``(Hm, K)``;
    * ``transposed`` (q/k), ``mode="contextual"``: ``lookup_table_weight`` ``(Hm, D, K)``;
    * not ``transposed`` (v), ``mode="contextual"``: ``lookup_table_weight`` ``(Hm, K, D)``.

    Args:
        head_dim: ``D``.
        num_heads: heads stored in the table (1 when shared across the attention heads).
        mode: ``"bias"`` or ``"contextual"`` (``"ctx"`` accepted).
        method: a :class:`~irpe_nn.METHOD` id (``CROSS`` needs :class:`iRPE_Cross`).
        transposed: ``True`` for the q/k encodings, ``False`` for the value encoding.
        num_buckets: ``K``; defaults to ``rpe_config.num_buckets``.
        initializer: called once per parameter after creation.
        rpe_config: supplies ``alpha``, ``beta``, ``gamma`` (a
            :class:`~irpe_nn.SingleRPEConfig` or any object with those attributes).

    Raises:
        ValueError: invalid mode or method, bias mode on values, missing config.
    """

    def __init__(
        self,
        head_dim: int,
        num_heads: int = 8,
        mode: str | None = None,
        method: int | None = None,
        transposed: bool = True,
        num_buckets: int | None = None,
        initializer: Callable[[torch.Tensor], Any] | None = None,
        rpe_config: SingleRPEConfig | None = None,
    ) -> None:
        super().__init__()
        if mode == "ctx":
            mode = "contextual"
        if mode not in MODES:
            raise ValueError(f"iRPE: mode must be one of bias, contextual (or ctx), got {mode!r}")
        valid_methods = (
            METHOD.EUCLIDEAN,
            METHOD.QUANT,
            METHOD.PRODUCT,
            METHOD.CROSS_ROWS,
            METHOD.CROSS_COLS,
        )
        if method not in valid_methods:
            hint = "; use iRPE_Cross for METHOD.CROSS" if method == METHOD.CROSS else ""
            raise ValueError(f"iRPE: method must be one of {list(valid_methods)}{hint}")
        if mode == "bias" and not transposed:
            raise ValueError("iRPE: mode 'bias' cannot be used on values (transposed=False)")
        if rpe_config is None:
            raise ValueError("iRPE: rpe_config (with alpha, beta, gamma) is required")
        if num_buckets is None:
            num_buckets = rpe_config.num_buckets
        for name, value in (
            ("head_dim", head_dim),
            ("num_heads", num_heads),
            ("num_buckets", num_buckets),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"iRPE: {name} must be an int >= 1, got {value!r}")
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.mode = mode
        self.method = METHOD(method)
        self.transposed = transposed
        self.num_buckets = num_buckets
        self.initializer = initializer
        self.rpe_config = rpe_config
        if mode == "bias":
            self.lookup_table_bias = nn.Parameter(torch.zeros(num_heads, num_buckets))
        elif transposed:
            self.lookup_table_weight = nn.Parameter(torch.zeros(num_heads, head_dim, num_buckets))
        else:
            self.lookup_table_weight = nn.Parameter(torch.zeros(num_heads, num_buckets, head_dim))
        if initializer is not None:
            for param in self.parameters():
                initializer(param)

    def extra_repr(self) -> str:
        return (
            f"head_dim={self.head_dim}, num_heads={self.num_heads}, mode={self.mode!r}, "
            f"method={self.method.name}, transposed={self.transposed}, "
            f"num_buckets={self.num_buckets}"
        )

    @property
    def table(self) -> torch.Tensor:
        """The lookup table (``lookup_table_bias`` or ``lookup_table_weight``)."""
        return self.lookup_table_bias if self.mode == "bias" else self.lookup_table_weight

    def grid(self, length: int, height: int | None, width: int | None) -> tuple[int, int, int]:
        """``(height, width, skip)`` of a sequence of ``length`` tokens.

        Without ``height``/``width`` the grid is assumed square (``int(sqrt(length))``,
        as the original). Raises ``ValueError`` when the length does not fit.
        """
        if height is None and width is None:
            height = width = int(math.sqrt(length))
        elif height is None or width is None:
            raise ValueError(
                f"iRPE: give both height and width (got height={height}, width={width})"
            )
        has_skip_bucket = (
            self.num_buckets == num_base_buckets(self.method, self.rpe_config.beta) + 1
        )
        if is_traced_size(height) or is_traced_size(width):
            # The legacy tracer's sizes: checks would bake this input's grid into the trace.
            # The skip count is fixed by the model (0 without a skip bucket).
            return height, width, int(length - height * width) if has_skip_bucket else 0
        skip = length - height * width
        # Branch on the Python bool first: comparing a symbolic (skip > 0) with a bool breaks
        # torch.compile(dynamic=True).
        bad_skip = (skip == 0) if has_skip_bucket else (skip != 0)
        if skip < 0 or bad_skip:
            built = "skip > 0 tokens" if has_skip_bucket else "skip = 0"
            raise ValueError(
                f"iRPE: sequence length {length} is not skip + height*width with height={height}, "
                f"width={width} (height*width={height * width}) and the module built for "
                f"{built} (num_buckets={self.num_buckets}); pass hw=(height, width) of the "
                f"token grid, and skip=<number of non-spatial tokens> to the config"
            )
        return height, width, skip

    def bucket_ids(
        self, length: int, height: int | None, width: int | None, device: torch.device, name: str
    ) -> torch.Tensor:
        """Cached id table ``(length, length)`` for backend ``name`` (:mod:`irpe_nn.backend`)."""
        height, width, skip = self.grid(length, height, width)
        cfg = self.rpe_config
        ids, _ = bucket_ids(
            self.method,
            cfg.alpha,
            cfg.beta,
            cfg.gamma,
            height,
            width,
            skip,
            index_dtype(name),
            device,
        )
        return ids

    def forward(
        self, x: torch.Tensor, height: int | None = None, width: int | None = None
    ) -> torch.Tensor:
        """Encoding term of the attention.

        Args:
            x: q/k module: scaled queries (for rpe_k) or keys (for rpe_q) ``(B, nh, L, D)``;
                v module: attention probabilities ``(B, nh, L, L)``.
            height, width: token grid (``L = skip + height*width``).

        Returns:
            bias: ``(1, Hm, L, L)``, ``out[0, h, i, j] = T[h, bkt(i, j)]`` (``x`` only gives
            the dtype); contextual q/k: ``(B, nh, L, L)``, ``out[b, h, i, j] = sum_d x[b, h,
            i, d] T[h, d, bkt(i, j)]``; v: ``(B, nh, L, D)``, ``out[b, h, i, :] = sum_j x[b,
            h, i, j] T[h, bkt(i, j), :]``. (``h`` of the table is 0 when shared.)
        """
        if x.dim() != 4:
            raise ValueError(f"iRPE: x must be 4-D (B, nh, L, D or L), got shape {tuple(x.shape)}")
        _, nh, L, last = x.shape
        if self.num_heads != 1 and nh != self.num_heads:
            raise ValueError(
                f"iRPE: x has {nh} heads (dim 1 of {tuple(x.shape)}) but the table has "
                f"{self.num_heads}"
            )
        if self.transposed and last != self.head_dim:
            raise ValueError(
                f"iRPE: last dim of x {tuple(x.shape)} must be head_dim={self.head_dim}"
            )
        if not self.transposed and last != L:
            raise ValueError(
                f"iRPE: the value encoding needs square attention weights (B, nh, L, L), got "
                f"{tuple(x.shape)}; relative positions need queries and keys on one grid"
            )
        name = backend(x.device)
        ids = self.bucket_ids(L, height, width, x.device, name)
        # Tables follow the activations' dtype (autocast, half models).
        table = self.table.to(x.dtype)
        Hm, K = self.num_heads, self.num_buckets
        if self.mode == "bias":
            # A stride-0 view makes the bias gather the same op as the contextual one; its
            # backward is then a bucket sum instead of a slow index_put with accumulate.
            return rpe_index(table.view(1, Hm, 1, K).expand(1, Hm, L, K), ids, name)
        if self.transposed:
            # Matmul with the table first, then gather: the original's order (fixes the
            # float result) and K << L, so the matmul is small.
            weight = table[0] if Hm == 1 else table
            return rpe_index(torch.matmul(x, weight), ids, name)
        # Value side: bucket-sum the probabilities, then one (K x D) matmul, instead of
        # materialising T[bkt] as (Hm, L, L, D).
        weight = table[0] if Hm == 1 else table
        return torch.matmul(bucket_sum(x, ids, K, name), weight)


class iRPE_Cross(nn.Module):
    """The cross method: a rows table and a columns table whose encodings are added.

    Holds ``rp_rows`` (:attr:`METHOD.CROSS_ROWS`) and ``rp_cols`` (:attr:`METHOD.CROSS_COLS`),
    two :class:`iRPE` built with the same keyword arguments. Unlike the original it exposes
    ``num_buckets`` (per table), ``mode``, ``transposed``, ``num_heads``, ``head_dim``.
    """

    def __init__(self, method: int = METHOD.CROSS, **kwargs: Any) -> None:
        super().__init__()
        if method != METHOD.CROSS:
            raise ValueError(f"iRPE_Cross: method must be METHOD.CROSS (4), got {method!r}")
        self.method = METHOD.CROSS
        self.rp_rows = iRPE(**kwargs, method=METHOD.CROSS_ROWS)
        self.rp_cols = iRPE(**kwargs, method=METHOD.CROSS_COLS)

    num_buckets = property(lambda self: self.rp_rows.num_buckets, doc="Buckets per table.")
    mode = property(lambda self: self.rp_rows.mode)
    transposed = property(lambda self: self.rp_rows.transposed)
    num_heads = property(lambda self: self.rp_rows.num_heads)
    head_dim = property(lambda self: self.rp_rows.head_dim)
    rpe_config = property(lambda self: self.rp_rows.rpe_config)

    def forward(
        self, x: torch.Tensor, height: int | None = None, width: int | None = None
    ) -> torch.Tensor:
        """``rp_rows(x, height, width) + rp_cols(x, height, width)`` (shapes as :class:`iRPE`)."""
        return self.rp_rows(x, height, width) + self.rp_cols(x, height, width)


def build_rpe(config: Any, head_dim: int, num_heads: int) -> Sequence[iRPE | iRPE_Cross | None]:
    """Modules ``[rpe_q, rpe_k, rpe_v]`` for an attention layer.

    Args:
        config: an :class:`~irpe_nn.RPEConfig` (or any object with ``rpe_q``, ``rpe_k``,
            ``rpe_v`` attributes), an ``rpe-…`` string (parsed by
            :func:`~irpe_nn.parse_rpe_spec`; ``""`` means none), or ``None``.
        head_dim: ``embed_dim // num_heads`` of the attention.
        num_heads: heads of the attention (tables have 1 head when ``shared_head``).

    Returns:
        ``(None, None, None)`` when ``config`` is ``None``, else a list of three entries,
        each an :class:`iRPE`, an :class:`iRPE_Cross` (method cross) or ``None``.

    Raises:
        ValueError: a malformed ``rpe-…`` string (see :func:`~irpe_nn.parse_rpe_spec`).
        TypeError: ``config`` is none of the above.
    """
    if isinstance(config, str):
        config = parse_rpe_spec(config)
    if config is None:
        return None, None, None
    if not all(hasattr(config, name) for name in ("rpe_q", "rpe_k", "rpe_v")):
        raise TypeError(
            f"rpe_config: expected an RPEConfig, an 'rpe-...' string (e.g. "
            f"'rpe-2.0-product-ctx-1-k') or None, got {type(config).__name__}"
        )
    modules: list[iRPE | iRPE_Cross | None] = []
    for single, transposed in (
        (config.rpe_q, True),
        (config.rpe_k, True),
        (config.rpe_v, False),
    ):
        if single is None:
            modules.append(None)
            continue
        cls = iRPE_Cross if single.method == METHOD.CROSS else iRPE
        modules.append(
            cls(
                head_dim=head_dim,
                num_heads=1 if single.shared_head else num_heads,
                mode=single.mode,
                method=single.method,
                transposed=transposed,
                num_buckets=single.num_buckets,
                rpe_config=single,
            )
        )
    return modules
