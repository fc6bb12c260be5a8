"""Pictures of learned iRPE tables on the grid of relative offsets."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from .buckets import offset_bucket_table
from .rpe import iRPE, iRPE_Cross

__all__ = ["plot_rpe", "rpe_offset_maps"]


def _encoding_modules(module: nn.Module) -> list[tuple[str, iRPE | iRPE_Cross]]:
    """The iRPE modules in ``module`` (itself included), a cross pair counted once."""
    found: list[tuple[str, iRPE | iRPE_Cross]] = []
    cross_prefixes: list[str] = []
    for name, sub in module.named_modules():
        if any(name.startswith(prefix) for prefix in cross_prefixes):
            continue
        if isinstance(sub, iRPE_Cross):
            found.append((name, sub))
            cross_prefixes.append(f"{name}." if name else "")
        elif isinstance(sub, iRPE):
            found.append((name, sub))
    return found


def _offset_vectors(rpe: iRPE, height: int, width: int) -> torch.Tensor:
    """Table entries for every offset, ``(Hm, 2h-1, 2w-1)`` (bias) or ``(Hm, D, 2h-1, 2w-1)``.

    Pixel ``(r, c)`` is the key at ``(r, c)`` of a ``(2h-1, 2w-1)`` grid whose centre is the
    query, i.e. offset ``(Δr, Δc) = (h-1-r, w-1-c)`` (``pos_query - pos_key``).
    """
    cfg = rpe.rpe_config
    ids = offset_bucket_table(rpe.method, height, width, cfg.alpha, cfg.beta, cfg.gamma)
    ids = ids.flip(0, 1).to(rpe.table.device)
    table = rpe.table.detach().float()
    if rpe.mode == "bias":
        return table[:, ids]
    if rpe.transposed:
        return table[:, :, ids]  # (Hm, D, K) -> (Hm, D, 2h-1, 2w-1)
    return table[:, ids].permute(0, 3, 1, 2)  # (Hm, K, D) -> (Hm, D, 2h-1, 2w-1)


def rpe_offset_maps(module: nn.Module, height: int, width: int) -> list[tuple[str, torch.Tensor]]:
    """What each iRPE module in ``module`` adds, per head, for a centre query.

    Args:
        module: an :class:`~irpe_nn.iRPE`, :class:`~irpe_nn.iRPE_Cross`, an attention layer
            or a whole model.
        height, width: token grid; offsets span ``±(height-1)``, ``±(width-1)``.

    Returns:
        ``[(name, maps (Hm, 2h-1, 2w-1))]``: the bias value, or the L2 norm over ``D`` of
        the contextual vector (rows + columns tables summed for cross), at the offset of
        each pixel (see :func:`plot_rpe` for the orientation).
    """
    if height < 1 or width < 1:
        raise ValueError(f"rpe_offset_maps: height and width must be >= 1, got {height}, {width}")
    maps = []
    for name, rpe in _encoding_modules(module):
        if isinstance(rpe, iRPE_Cross):
            vectors = _offset_vectors(rpe.rp_rows, height, width) + _offset_vectors(
                rpe.rp_cols, height, width
            )
        else:
            vectors = _offset_vectors(rpe, height, width)
        maps.append((name, vectors if rpe.mode == "bias" else vectors.norm(dim=1)))
    return maps


def plot_rpe(
    module: nn.Module,
    path: str | os.PathLike[str],
    height: int,
    width: int,
    *,
    cmap: str = "viridis",
    dpi: int = 100,
) -> Any:
    """Render the learned encodings of every iRPE module in ``module`` as a PNG.

    One row per module, one panel per stored head. Each panel shows, for a query at the
    centre, the bias value or the L2 norm of the contextual vector for every relative
    offset: the vertical axis is ``Δr = r_query - r_key``, the horizontal ``Δc = c_query -
    c_key`` (both decreasing away from the top-left, so the picture is the key grid as
    seen around the query).

    Args:
        module: iRPE module, attention layer or model.
        path: output PNG file.
        height, width: token grid whose offsets are shown.
        cmap, dpi: matplotlib colour map and resolution.

    Returns:
        The ``matplotlib.figure.Figure``.

    Raises:
        ImportError: matplotlib is not installed (``pip install irpe-nn[plot]``).
        ValueError: ``module`` holds no iRPE module.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("plot_rpe needs matplotlib: pip install 'irpe-nn[plot]'") from exc
    maps = rpe_offset_maps(module, height, width)
    if not maps:
        raise ValueError(f"plot_rpe: {type(module).__name__} contains no iRPE module")
    cols = max(m.shape[0] for _, m in maps)
    fig = Figure(figsize=(2.6 * cols, 2.4 * len(maps)), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    extent = (width - 0.5, -(width - 0.5), -(height - 0.5), height - 0.5)
    for row, (name, head_maps) in enumerate(maps):
        rpe = dict(_encoding_modules(module))[name]
        what = "bias" if rpe.mode == "bias" else "|vector|"
        for head in range(head_maps.shape[0]):
            ax = fig.add_subplot(len(maps), cols, row * cols + head + 1)
            image = ax.imshow(head_maps[head].cpu().numpy(), cmap=cmap, extent=extent)
            ax.set_title(f"{name or type(rpe).__name__} head {head}: {what}", fontsize=7)
            ax.set_xlabel("Δc", fontsize=7)
            ax.set_ylabel("Δr", fontsize=7)
            ax.tick_params(labelsize=6)
            fig.colorbar(image, ax=ax, shrink=0.8).ax.tick_params(labelsize=6)
    fig.savefig(os.fspath(path), format="png")
    return fig
