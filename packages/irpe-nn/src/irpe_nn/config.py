"""iRPE configuration objects and the ``rpe-{ratio}-{method}-{mode}-{shared_head}-{rpe_on}``
string (see docs/layers.md, 'The rpe-… string')."""

from __future__ import annotations

import dataclasses
import math

from .buckets import METHOD, num_base_buckets

__all__ = [
    "MAX_BUCKETS_PER_AXIS",
    "MODES",
    "RPE_HELP",
    "RPEConfig",
    "SingleRPEConfig",
    "get_rpe_config",
    "get_single_rpe_config",
    "parse_rpe_spec",
]

MAX_BUCKETS_PER_AXIS = 255
"""Most buckets per axis, ``S = 2*int(2*ratio) + 1`` (so ``ratio < 64``; product tables then
have at most ``255² = 65025`` buckets). The original's configurations use ratios up to about
3 (13 per axis); the bound turns a mistyped ratio such as ``1e4`` into a clear error instead of
a table of billions of entries."""

MODES = ("bias", "contextual")
"""Valid encoding modes (``"ctx"`` is accepted as an alias of ``"contextual"``)."""

_METHOD_NAMES = {
    "euc": METHOD.EUCLIDEAN,
    "quant": METHOD.QUANT,
    "cross": METHOD.CROSS,
    "product": METHOD.PRODUCT,
}

RPE_HELP = """\
iRPE string format: rpe-{ratio}-{method}-{mode}-{shared_head}-{rpe_on}
  Example: rpe-2.0-product-ctx-1-k (the DETR-with-iRPE default)
  ratio:       float, 0 < ratio < 64, controlling the number of buckets; for the product method
                 ratio | buckets
                 1.9   | 7 x 7 = 49
                 2.0   | 9 x 9 = 81
                 2.5   | 11 x 11 = 121
                 3.0   | 13 x 13 = 169
               (euc, quant and each of the two cross tables: 7, 9, 11, 13)
  method:      euc | quant | cross | product (case-insensitive)
  mode:        bias | ctx | contextual (bias cannot be used on v)
  shared_head: integer; 0 = one table per head, anything else = one table shared by all heads
  rpe_on:      which of q, k, v get an encoding, any combination (e.g. k, qk, qkv)"""


@dataclasses.dataclass(frozen=True)
class SingleRPEConfig:
    """Configuration of one iRPE table set (the original's single-table config)."""

    shared_head: bool
    """One table for all heads (``True``) or one per head."""
    mode: str
    """``"bias"`` or ``"contextual"``."""
    method: METHOD
    """How offsets become buckets."""
    alpha: float
    beta: float
    gamma: float
    num_buckets: int
    """Buckets per table (for cross: per each of the two tables), extra skip bucket included."""


@dataclasses.dataclass(frozen=True)
class RPEConfig:
    """Which of queries, keys and values get an encoding, each ``None`` or a config."""

    rpe_q: SingleRPEConfig | None = None
    rpe_k: SingleRPEConfig | None = None
    rpe_v: SingleRPEConfig | None = None


def _method_id(method: str | int) -> METHOD:
    valid = ", ".join(_METHOD_NAMES)
    if isinstance(method, str):
        try:
            return _METHOD_NAMES[method.lower()]
        except KeyError:
            raise ValueError(f"method: unknown name {method!r}; valid choices: {valid}") from None
    if isinstance(method, int) and not isinstance(method, bool) and method in set(METHOD):
        if method in (METHOD.CROSS_ROWS, METHOD.CROSS_COLS):
            raise ValueError("method: CROSS_ROWS/CROSS_COLS are internal; use METHOD.CROSS")
        return METHOD(method)
    raise ValueError(f"method: unknown value {method!r}; valid choices: {valid} or a METHOD id")


def _mode_name(mode: str) -> str:
    if mode == "ctx":
        return "contextual"
    if mode not in MODES:
        raise ValueError(f"mode: unknown value {mode!r}; valid choices: bias, ctx, contextual")
    return mode


def _check_bucket_count(ratio: float, method: METHOD) -> None:
    """Refuse ratios whose tables would be absurdly large (see :data:`MAX_BUCKETS_PER_AXIS`)."""
    max_ratio = (MAX_BUCKETS_PER_AXIS - 1) // 2 / 2 + 0.5  # int(2*ratio) <= 127 <=> ratio < 64
    if ratio < max_ratio:
        return
    doubled = 2 * ratio
    side = 2 * int(doubled) + 1 if math.isfinite(doubled) else math.inf
    count = side * side if method == METHOD.PRODUCT else side

    def text(number: float) -> str:
        return str(number) if number < 10**12 else f"{number:.3g}"

    product = f" ({MAX_BUCKETS_PER_AXIS**2} for product)" if method == METHOD.PRODUCT else ""
    raise ValueError(
        f"ratio: {ratio!r} gives {text(count)} buckets per table ({text(side)} per axis, "
        f"2*int(2*ratio) + 1); at most {MAX_BUCKETS_PER_AXIS} per axis{product} are allowed, "
        f"i.e. ratio < {max_ratio:g}"
    )


def get_single_rpe_config(
    ratio: float = 1.9,
    method: str | int = METHOD.PRODUCT,
    mode: str = "contextual",
    shared_head: bool = True,
    skip: int = 0,
) -> SingleRPEConfig:
    """One table-set config: ``alpha, beta, gamma = ratio, 2*ratio, 8*ratio`` and the bucket
    count ``S = 2*int(2*ratio) + 1`` per axis (``S²`` for product, ``S`` otherwise), plus one
    bucket shared by all skip tokens when ``skip > 0``.

    Raises:
        ValueError: naming ``ratio``, ``method``, ``mode`` or ``skip`` when it is invalid; a
            ``ratio`` of 64 or more (more than :data:`MAX_BUCKETS_PER_AXIS` buckets per axis)
            is refused with the bucket count it would give.
    """
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        raise ValueError(f"ratio: expected a number, got {ratio!r}")
    if not (math.isfinite(ratio) and ratio > 0):
        raise ValueError(f"ratio: must be a finite number > 0, got {ratio!r}")
    if isinstance(skip, bool) or not isinstance(skip, int) or skip < 0:
        raise ValueError(f"skip: must be an int >= 0, got {skip!r}")
    method_id = _method_id(method)
    _check_bucket_count(ratio, method_id)
    alpha, beta, gamma = 1 * ratio, 2 * ratio, 8 * ratio
    num_buckets = num_base_buckets(method_id, beta) + (1 if skip > 0 else 0)
    return SingleRPEConfig(
        shared_head=bool(shared_head),
        mode=_mode_name(mode),
        method=method_id,
        alpha=alpha,
        beta=beta,
        gamma=gamma,
        num_buckets=num_buckets,
    )


def get_rpe_config(
    ratio: float = 1.9,
    method: str | int = "product",
    mode: str = "contextual",
    shared_head: bool = True,
    skip: int = 0,
    rpe_on: str = "k",
) -> RPEConfig:
    """Config for an attention layer: the same :class:`SingleRPEConfig` on each of q, k, v
    whose letter occurs in ``rpe_on``.

    Stricter than the original: ``rpe_on`` must consist of the letters ``q``, ``k``, ``v``
    only (at least one), and ``mode="bias"`` with ``v`` is refused here already.

    Raises:
        ValueError: naming the invalid argument.
    """
    if not isinstance(rpe_on, str) or not rpe_on or set(rpe_on) - set("qkv"):
        raise ValueError(
            f"rpe_on: expected a combination of the letters q, k, v (e.g. 'k', 'qkv'), "
            f"got {rpe_on!r}"
        )
    single = get_single_rpe_config(ratio, method, mode, shared_head, skip)
    if single.mode == "bias" and "v" in rpe_on:
        raise ValueError(
            f"mode: 'bias' cannot be used on values (rpe_on={rpe_on!r}); use 'ctx' for v"
        )
    return RPEConfig(
        rpe_q=single if "q" in rpe_on else None,
        rpe_k=single if "k" in rpe_on else None,
        rpe_v=single if "v" in rpe_on else None,
    )


def parse_rpe_spec(spec: str | None, skip: int = 0) -> RPEConfig | None:
    """Parse ``rpe-{ratio}-{method}-{mode}-{shared_head}-{rpe_on}`` (the ``--enc_rpe2d``
    value of DETR-with-iRPE) into an :class:`RPEConfig`.

    ``None`` or ``""`` gives ``None`` (no encoding). Example: ``"rpe-2.0-product-ctx-1-k"``.

    Raises:
        ValueError: naming the malformed field and its valid choices, followed by
            :data:`RPE_HELP`.
    """
    if spec is None or spec == "":
        return None
    if not isinstance(spec, str):
        raise ValueError(f"iRPE spec: expected a string, got {type(spec).__name__}\n\n{RPE_HELP}")

    def fail(message: str) -> ValueError:
        return ValueError(f"iRPE spec {spec!r}: {message}\n\n{RPE_HELP}")

    fields = spec.split("-")
    if len(fields) != 6:
        raise fail(f"expected 6 fields separated by '-', got {len(fields)}")
    prefix, ratio_text, method, mode, shared_text, rpe_on = fields
    if prefix != "rpe":
        raise fail(f"field 0 (prefix) must be 'rpe', got {prefix!r}")
    try:
        ratio = float(ratio_text)
    except ValueError:
        raise fail(f"field 1 (ratio) must be a float, got {ratio_text!r}") from None
    try:
        shared_head = bool(int(shared_text))
    except ValueError:
        raise fail(f"field 4 (shared_head) must be an integer, got {shared_text!r}") from None
    try:
        return get_rpe_config(ratio, method, mode, shared_head, skip, rpe_on)
    except ValueError as exc:
        raise fail(str(exc)) from None
