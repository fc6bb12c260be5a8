"""Grid sizes recorded by the legacy tracer (``torch.jit.trace``, ``torch.onnx.export`` with
``dynamo=False``): 0-d tensors that keep the traced graph valid at other sizes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import irpe_nn
from irpe_nn.fused import FUSED_ENV
from irpe_nn.sizes import is_size, is_traced_size


class GridAttention(nn.Module):
    """``(N, C, H, W)`` feature map -> iRPE self-attention over its ``H*W`` tokens, with the
    grid read from the input's shape (as DETR's encoder does)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        spec = irpe_nn.parse_rpe_spec("rpe-2.0-product-ctx-1-qkv")
        self.attention = irpe_nn.RPEMultiheadAttention(8, 2, rpe_config=spec)
        with torch.no_grad():  # the tables start at zero: make the iRPE terms count
            for param in self.attention.parameters():
                param.normal_(0, 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        tokens = x.flatten(2).permute(2, 0, 1)
        return self.attention(tokens, tokens, tokens, need_weights=False, hw=(h, w))[0]


@pytest.fixture
def torch_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    # What tracing sees: the PyTorch formulation, not a C++ operator or the fused kernel.
    monkeypatch.setenv(irpe_nn.BACKEND_ENV, "torch")
    monkeypatch.setenv(FUSED_ENV, "0")


def test_sizes() -> None:
    assert is_size(3) and is_size(torch.tensor(3)) and is_traced_size(torch.tensor(3))
    assert not is_size(True) and not is_size(3.0) and not is_size(torch.tensor(3.0))
    assert not is_size(torch.tensor([3])) and not is_traced_size(3)


@pytest.mark.usefixtures("torch_backend")
def test_a_jit_trace_runs_at_other_grid_sizes() -> None:
    model = GridAttention().eval()
    with torch.no_grad():
        traced = torch.jit.trace(model, torch.randn(2, 8, 4, 3))
        for shape in [(2, 8, 4, 3), (1, 8, 5, 7), (3, 8, 2, 9)]:
            x = torch.randn(shape)
            torch.testing.assert_close(traced(x), model(x), atol=1e-5, rtol=1e-4)


@pytest.mark.usefixtures("torch_backend")
def test_the_legacy_onnx_exporter_keeps_height_and_width_dynamic(tmp_path) -> None:
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    model = GridAttention().eval()
    path = tmp_path / "attention.onnx"
    with torch.no_grad():
        torch.onnx.export(
            model, (torch.randn(2, 8, 4, 3),), str(path), input_names=["x"],
            dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}}, dynamo=False,
        )  # fmt: skip
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in [(1, 8, 5, 7), (3, 8, 6, 2)]:
        x = torch.randn(shape)
        with torch.no_grad():
            expected = model(x)
        got = torch.from_numpy(session.run(None, {"x": x.numpy()})[0])
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_a_float_size_is_still_refused() -> None:
    layer = irpe_nn.RPEMultiheadAttention(
        8, 2, rpe_config=irpe_nn.parse_rpe_spec("rpe-2.0-product-ctx-1-k")
    )
    tokens = torch.randn(12, 1, 8)
    with pytest.raises(ValueError, match=r"hw must be a pair of ints .* got \(4\.0, 3\)"):
        layer(tokens, tokens, tokens, hw=(4.0, 3))
