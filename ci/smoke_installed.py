"""Smoke-test the packages installed by name from the project's package index.

Run in a fresh environment after ``pip install irpe-ops irpe-nn detr-irpe --index-url
file://.../dist/simple``: each package imports from the environment (not from a checkout),
irpe-ops is the build for the running torch, and each does a little real work.

    python ci/smoke_installed.py irpe-ops irpe-nn detr-irpe
    python ci/smoke_installed.py irpe-nn --no-ops      # irpe-nn alone: the PyTorch fallback
"""

from __future__ import annotations

import argparse
import importlib.util
from importlib import metadata
from pathlib import Path

import torch


def _from_site_packages(module: str) -> None:
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None, f"{module} is not installed"
    assert "site-packages" in Path(spec.origin).parts, f"{module} imported from {spec.origin}"


def check_ops(variant: str | None) -> None:
    """The wheel is the build for this torch (and ``variant``: ``cpu``, ``cu``), and
    ``rpe_index`` gathers like ``torch.gather``."""
    import irpe_ops

    _from_site_packages("irpe_ops")
    version = metadata.version("irpe-ops")
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    label = f"+pt{major}{minor}{variant or ''}"
    assert label in version, f"irpe-ops {version} installed next to torch {torch.__version__}"
    table = torch.randn(2, 3, 5, 7)
    index = torch.randint(0, 7, (5, 5))
    expected = table.gather(-1, index.expand(2, 3, 5, 5))
    torch.testing.assert_close(torch.ops.irpe_ops.rpe_index(table, index), expected)
    print(f"irpe-ops {version}: {irpe_ops.build_info()}")


def check_nn(expect_ops: bool) -> None:
    """An ``RPEMultiheadAttention`` runs forward and backward on the expected backend."""
    import irpe_nn

    _from_site_packages("irpe_nn")
    expected = "irpe_ops" if expect_ops else "torch"
    assert irpe_nn.backend() == expected, (
        f"irpe_nn.backend() is {irpe_nn.backend()}, not {expected}"
    )
    layer = irpe_nn.RPEMultiheadAttention(32, 4, rpe_config=irpe_nn.get_rpe_config(rpe_on="k"))
    x = torch.randn(12, 2, 32, requires_grad=True)
    out, _ = layer(x, x, x, hw=(3, 4), need_weights=False)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    print(f"irpe-nn {metadata.version('irpe-nn')}: backend {irpe_nn.backend()}")


def check_detr() -> None:
    """A small DETR-iRPE predicts boxes for a batch of two images."""
    from detr_irpe.config import default_args
    from detr_irpe.models import build_model

    _from_site_packages("detr_irpe")
    args = default_args([
        "--backbone", "resnet18", "--backbone_weights", "none", "--hidden_dim", "32",
        "--nheads", "2", "--dim_feedforward", "64", "--enc_layers", "1", "--dec_layers", "1",
        "--num_queries", "5", "--num_classes", "3", "--device", "cpu",
    ])  # fmt: skip
    model, _, _ = build_model(args)
    with torch.no_grad():
        outputs = model.eval()([torch.rand(3, 96, 128), torch.rand(3, 80, 120)])
    assert outputs["pred_boxes"].shape == (2, 5, 4)
    print(
        f"detr-irpe {metadata.version('detr-irpe')}: {tuple(outputs['pred_logits'].shape)} logits"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("packages", nargs="+", choices=("irpe-ops", "irpe-nn", "detr-irpe"))
    parser.add_argument("--no-ops", action="store_true", help="irpe-ops must not be installed")
    parser.add_argument("--variant", help="the irpe-ops build expected: cpu, or cu (any CUDA)")
    args = parser.parse_args(argv)
    if args.no_ops:
        assert importlib.util.find_spec("irpe_ops") is None, "irpe-ops is installed"
    if "irpe-ops" in args.packages:
        check_ops(args.variant)
    if "irpe-nn" in args.packages:
        check_nn(expect_ops=not args.no_ops)
    if "detr-irpe" in args.packages:
        check_detr()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
