"""The detector gives the same outputs and gradients on both irpe-nn backends.

Each backend runs in its own process because ``IRPE_BACKEND`` is an environment setting.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    import irpe_nn
    from detr_irpe import build_model
    from detr_irpe.config import default_args

    spec, out = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    args = default_args([
        "--backbone", "resnet18", "--backbone_weights", "none", "--hidden_dim", "32",
        "--dim_feedforward", "64", "--enc_layers", "2", "--dec_layers", "1", "--nheads", "4",
        "--num_queries", "5", "--dropout", "0", "--enc_rpe2d", spec, "--device", "cpu",
    ])
    model, criterion, _ = build_model(args)
    model.eval()
    images = [torch.randn(3, 96, 128), torch.randn(3, 128, 96)]
    targets = [
        {"labels": torch.tensor([1, 2]),
         "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.3, 0.6, 0.2, 0.2]])},
        {"labels": torch.tensor([3]), "boxes": torch.tensor([[0.4, 0.4, 0.3, 0.3]])},
    ]
    outputs = model(images)
    losses = criterion(outputs, targets)
    total = sum(losses[k] * w for k, w in criterion.weight_dict.items() if k in losses)
    total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()
             if p.grad is not None and "rpe" in n}
    torch.save({"backend": irpe_nn.backend(), "logits": outputs["pred_logits"],
                "boxes": outputs["pred_boxes"], "loss": total.detach(), "grads": grads}, out)
    """
)


def _run(tmp_path: Path, spec: str, backend: str | None) -> dict:
    out = tmp_path / f"{backend or 'default'}.pt"
    env = {k: v for k, v in os.environ.items() if k != "IRPE_BACKEND"}
    if backend:
        env["IRPE_BACKEND"] = backend
    subprocess.run([sys.executable, "-c", SCRIPT, spec, str(out)], check=True, env=env, timeout=300)
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize("spec", ["rpe-2.0-product-ctx-1-qkv", "rpe-1.9-cross-bias-0-qk"])
def test_detr_same_on_both_backends(tmp_path, spec):
    default = _run(tmp_path, spec, None)
    fallback = _run(tmp_path, spec, "torch")
    assert default["backend"] == "irpe_ops", "irpe-ops should be installed for the cross tests"
    assert fallback["backend"] == "torch"
    torch.testing.assert_close(default["logits"], fallback["logits"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(default["boxes"], fallback["boxes"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(default["loss"], fallback["loss"], rtol=1e-5, atol=1e-5)
    assert default["grads"].keys() == fallback["grads"].keys() and default["grads"]
    for name, grad in default["grads"].items():
        torch.testing.assert_close(grad, fallback["grads"][name], rtol=1e-4, atol=1e-6, msg=name)
