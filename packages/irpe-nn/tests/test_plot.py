"""plot_rpe writes a PNG with one panel per stored head; rpe_offset_maps values."""

from __future__ import annotations

import pytest
import torch
from reference import bucket_ids_ref

import irpe_nn

pytest.importorskip("matplotlib")


def image_axes(fig):
    return [ax for ax in fig.axes if ax.images]


def test_single_module(tmp_path):
    layer = irpe_nn.RPEMultiheadAttention(
        8, 2, rpe_config=irpe_nn.parse_rpe_spec("rpe-2.0-product-ctx-0-k")
    )
    path = tmp_path / "k.png"
    fig = irpe_nn.plot_rpe(layer.rpe_k, path, 3, 4)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(image_axes(fig)) == 2
    assert image_axes(fig)[0].images[0].get_array().shape == (5, 7)


def test_whole_model_counts_heads(tmp_path):
    model = torch.nn.Sequential(
        irpe_nn.RPEMultiheadAttention(
            8, 2, rpe_config=irpe_nn.parse_rpe_spec("rpe-2.0-product-ctx-0-qkv")
        ),
        irpe_nn.RPEMultiheadAttention(
            8, 2, rpe_config=irpe_nn.parse_rpe_spec("rpe-1.9-cross-bias-1-qk")
        ),
    )
    fig = irpe_nn.plot_rpe(model, tmp_path / "model.png", 4, 4)
    # 3 modules x 2 heads + 2 cross modules (rows and columns drawn together) x 1 head.
    assert len(image_axes(fig)) == 3 * 2 + 2 * 1
    assert (tmp_path / "model.png").stat().st_size > 0


def test_offset_maps_values():
    cfg = irpe_nn.parse_rpe_spec("rpe-2.0-product-bias-0-k")
    layer = irpe_nn.RPEMultiheadAttention(8, 2, rpe_config=cfg)
    torch.nn.init.normal_(layer.rpe_k.lookup_table_bias)
    ctx = irpe_nn.RPEMultiheadAttention(
        8, 2, rpe_config=irpe_nn.parse_rpe_spec("rpe-2.0-product-ctx-0-v")
    )
    torch.nn.init.normal_(ctx.rpe_v.lookup_table_weight)
    h, w = 3, 4
    # A (2h-1) x (2w-1) grid with the query at its centre covers every offset.
    centre = (h - 1) * (2 * w - 1) + (w - 1)
    ids = bucket_ids_ref(3, 2 * h - 1, 2 * w - 1, 0, 2.0)[centre].view(2 * h - 1, 2 * w - 1)
    [(name, maps)] = irpe_nn.rpe_offset_maps(layer, h, w)
    assert name == "rpe_k"
    torch.testing.assert_close(maps, layer.rpe_k.lookup_table_bias.detach()[:, ids])
    [(_, norms)] = irpe_nn.rpe_offset_maps(ctx, h, w)
    torch.testing.assert_close(norms, ctx.rpe_v.lookup_table_weight.detach()[:, ids].norm(dim=-1))


def test_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="no iRPE module"):
        irpe_nn.plot_rpe(torch.nn.Linear(2, 2), tmp_path / "x.png", 3, 3)
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    layer = irpe_nn.RPEMultiheadAttention(
        8, 2, rpe_config=irpe_nn.parse_rpe_spec("rpe-2.0-product-ctx-1-k")
    )
    with pytest.raises(ImportError, match=r"irpe-nn\[plot\]"):
        irpe_nn.plot_rpe(layer, tmp_path / "x.png", 3, 3)
