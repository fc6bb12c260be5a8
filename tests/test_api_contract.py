"""The packages' public surface: code outside the packages imports exactly these names."""

from __future__ import annotations

import inspect
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import detr_irpe
import irpe_nn
import irpe_ops


def _parameters(func) -> list[str]:
    return list(inspect.signature(func).parameters)


@pytest.mark.parametrize("module", [irpe_ops, irpe_nn, detr_irpe])
def test_version_is_single_sourced(module):
    from importlib.metadata import version

    distribution = module.__name__.replace("_", "-")
    assert module.__version__ == version(distribution)
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", module.__version__)


def test_irpe_ops_surface():
    assert _parameters(irpe_ops.rpe_index)[:2] == ["input", "index"]
    assert _parameters(irpe_ops.bucket_sum)[:3] == ["weights", "index", "num_buckets"]
    assert isinstance(irpe_ops.cuda_built(), bool)
    # The same ops through the dispatcher.
    x = torch.randn(1, 2, 3, 4)
    index = torch.randint(0, 4, (3, 5))
    torch.testing.assert_close(torch.ops.irpe_ops.rpe_index(x, index), irpe_ops.rpe_index(x, index))
    w = torch.randn(1, 2, 3, 5)
    torch.testing.assert_close(
        torch.ops.irpe_ops.bucket_sum(w, index, 4), irpe_ops.bucket_sum(w, index, 4)
    )


def test_irpe_nn_surface():
    assert (
        irpe_nn.METHOD.EUCLIDEAN,
        irpe_nn.METHOD.QUANT,
        irpe_nn.METHOD.PRODUCT,
        irpe_nn.METHOD.CROSS,
        irpe_nn.METHOD.CROSS_ROWS,
        irpe_nn.METHOD.CROSS_COLS,
    ) == (0, 1, 3, 4, 41, 42)
    assert _parameters(irpe_nn.piecewise_index) == [
        "relative_position",
        "alpha",
        "beta",
        "gamma",
        "dtype",
    ]
    assert _parameters(irpe_nn.get_bucket_ids_2d)[:7] == [
        "method",
        "height",
        "width",
        "skip",
        "alpha",
        "beta",
        "gamma",
    ]
    signature = inspect.signature(irpe_nn.get_rpe_config)
    assert {name: p.default for name, p in signature.parameters.items()} == {
        "ratio": 1.9,
        "method": "product",
        "mode": "contextual",
        "shared_head": True,
        "skip": 0,
        "rpe_on": "k",
    }
    config = irpe_nn.get_rpe_config()
    assert config.rpe_q is None and config.rpe_v is None
    for field in ("shared_head", "mode", "method", "alpha", "beta", "gamma", "num_buckets"):
        assert hasattr(config.rpe_k, field)
    assert irpe_nn.parse_rpe_spec("") is None
    with pytest.raises(ValueError, match="method"):
        irpe_nn.parse_rpe_spec("rpe-2.0-foo-ctx-1-k")
    assert _parameters(irpe_nn.build_rpe) == ["config", "head_dim", "num_heads"]
    attention = inspect.signature(irpe_nn.RPEMultiheadAttention)
    # The original's parameters, in order; later additions (batch_first) have defaults.
    added = list(attention.parameters.values())[9:]
    assert all(p.default is not inspect.Parameter.empty for p in added)
    assert list(attention.parameters)[:9] == [
        "embed_dim",
        "num_heads",
        "dropout",
        "bias",
        "add_bias_kv",
        "add_zero_attn",
        "kdim",
        "vdim",
        "rpe_config",
    ]
    forward = inspect.signature(irpe_nn.RPEMultiheadAttention.forward)
    assert list(forward.parameters)[1:] == [
        "query",
        "key",
        "value",
        "key_padding_mask",
        "need_weights",
        "attn_mask",
        "hw",
    ]
    assert irpe_nn.backend() in {"irpe_ops", "torch"}
    assert issubclass(irpe_nn.iRPE, torch.nn.Module)
    assert issubclass(irpe_nn.iRPE_Cross, torch.nn.Module)


def test_detr_irpe_surface():
    for name, params in {
        "build_model": ["args"],
        "collate_fn": ["batch"],
        "build_optimizer": ["model", "args"],
        "load_checkpoint": ["path_or_state", "model"],
    }.items():
        assert _parameters(getattr(detr_irpe, name))[: len(params)] == params, name
    assert _parameters(detr_irpe.train_one_epoch)[:7] == [
        "model",
        "criterion",
        "data_loader",
        "optimizer",
        "device",
        "epoch",
        "max_norm",
    ]


@pytest.mark.parametrize("script", ["detr-irpe-train", "detr-irpe-eval", "detr-irpe-predict"])
def test_console_scripts_answer_help(script):
    path = shutil.which(script) or shutil.which(script, path=str(Path(sys.executable).parent))
    assert path, f"{script} is not installed"
    result = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage" in result.stdout.lower()
