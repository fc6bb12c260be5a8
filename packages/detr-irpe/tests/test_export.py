"""Export to ONNX and torch.export: in-graph bucket ids, outputs equal to eager PyTorch."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import irpe_nn
from detr_irpe.checkpoint import model_from_checkpoint, read_checkpoint, save_checkpoint
from detr_irpe.cli.export import main as export_main
from detr_irpe.config import NEW_OPTIONS, get_args_parser
from detr_irpe.export import ATOL, RTOL, ExportableDETR, export_model, run_exported
from irpe_nn.buckets import get_bucket_ids_2d_traceable

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

# (N, H, W): the export size, a non-square size, a batch of two.
SHAPES = [(2, 96, 128), (1, 160, 64), (2, 64, 96)]


@pytest.mark.parametrize("method", [0, 1, 3, 41, 42])
@pytest.mark.parametrize("skip", [0, 1, 3])
def test_traceable_bucket_ids_equal_the_cached_ones(method: int, skip: int) -> None:
    for height, width in [(1, 1), (2, 5), (7, 3), (6, 6), (11, 9)]:
        for alpha, beta, gamma in [(1.9, 3.8, 15.2), (2.0, 4.0, 16.0), (4.0, 8.0, 64.0)]:
            expected = irpe_nn.get_bucket_ids_2d(method, height, width, skip, alpha, beta, gamma)
            got = get_bucket_ids_2d_traceable(method, height, width, skip, alpha, beta, gamma)
            assert got[1] == expected[1]
            assert torch.equal(got[0], expected[0]), (height, width, alpha)


@pytest.fixture(scope="module")
def plain_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny DETR without iRPE (``--enc_rpe2d ''``), untrained weights."""
    from conftest import TINY_ARGV

    from detr_irpe import config
    from detr_irpe.models import build_model

    args = config.default_args([*TINY_ARGV, "--enc_rpe2d", "", "--num_classes", "5"])
    torch.manual_seed(0)
    model = build_model(args)[0]
    path = tmp_path_factory.mktemp("plain") / "plain.pth"
    save_checkpoint(path, {"model": model.state_dict(), "epoch": 0, "args": args})
    return path


def _eager(checkpoint: Path) -> ExportableDETR:
    return ExportableDETR(model_from_checkpoint(checkpoint, {"device": "cpu"}).model).eval()


def _assert_equal_to_eager(path: Path, eager: ExportableDETR) -> None:
    generator = torch.Generator().manual_seed(1)
    for n, h, w in SHAPES:
        images = torch.randn(n, 3, h, w, generator=generator)
        with torch.no_grad():
            expected = eager(images)
        got = run_exported(path, images)
        for e, g in zip(expected, got, strict=True):
            torch.testing.assert_close(g, e, atol=ATOL, rtol=RTOL)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_irpe_checkpoint_exports(fmt: str, one_epoch_run: Path, tmp_path: Path) -> None:
    checkpoint = one_epoch_run / "checkpoint.pth"
    path = export_model(checkpoint, fmt, tmp_path / f"detr.{fmt}")
    _assert_equal_to_eager(path, _eager(checkpoint))


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_plain_detr_exports_through_the_cli(
    fmt: str, plain_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    output = tmp_path / f"plain.{fmt}"
    assert export_main([str(plain_checkpoint), "--format", fmt, "--output", str(output)]) == 0
    assert str(output) in capsys.readouterr().out
    _assert_equal_to_eager(output, _eager(plain_checkpoint))


@pytest.mark.slow
def test_original_checkpoint_exports(one_epoch_run: Path, tmp_path: Path) -> None:
    """A checkpoint as the original main.py writes it (a pickled Namespace of its options)."""
    state = read_checkpoint(one_epoch_run / "checkpoint.pth")
    original_names = set(vars(get_args_parser().parse_args([]))) - set(NEW_OPTIONS)
    args = argparse.Namespace(**{k: v for k, v in state["args"].items() if k in original_names})
    original = {k: state[k] for k in ("model", "optimizer", "lr_scheduler", "epoch")}
    original["args"] = args
    checkpoint = tmp_path / "rpe-original.pth"
    torch.save(original, checkpoint)
    path = export_model(checkpoint, "onnx", tmp_path / "original.onnx")
    _assert_equal_to_eager(path, _eager(checkpoint))


@pytest.fixture(scope="module")
def irpe_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny DETR with iRPE (``rpe-2.0-product-ctx-1-k``), untrained weights."""
    from conftest import TINY_ARGV

    from detr_irpe import config
    from detr_irpe.models import build_model

    args = config.default_args([*TINY_ARGV, "--num_classes", "5"])
    torch.manual_seed(0)
    model = build_model(args)[0]
    path = tmp_path_factory.mktemp("irpe") / "irpe.pth"
    save_checkpoint(path, {"model": model.state_dict(), "epoch": 0, "args": args})
    return path


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_postprocess_export_gives_the_post_processors_detections(
    fmt: str, irpe_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    output = tmp_path / f"detections.{fmt}"
    argv = [str(irpe_checkpoint), "--format", fmt, "--output", str(output), "--postprocess"]
    assert export_main(argv) == 0 and str(output) in capsys.readouterr().out
    loaded = model_from_checkpoint(irpe_checkpoint, {"device": "cpu"})
    eager, postprocess = ExportableDETR(loaded.model).eval(), loaded.postprocessors["bbox"]
    generator = torch.Generator().manual_seed(2)
    for n, h, w in SHAPES[1:]:
        images = torch.randn(n, 3, h, w, generator=generator)
        orig_sizes = torch.tensor([[480, 640], [h, w]])[:n]
        with torch.no_grad():
            logits, boxes = eager(images)
        expected = postprocess({"pred_logits": logits, "pred_boxes": boxes}, orig_sizes)
        got_boxes, got_scores, got_labels = run_exported(output, images, orig_sizes)
        assert got_boxes.shape == (n, 5, 4) and got_labels.dtype == torch.int64
        for i, result in enumerate(expected):
            assert torch.equal(got_labels[i], result["labels"])
            torch.testing.assert_close(got_scores[i], result["scores"], atol=ATOL, rtol=RTOL)
            torch.testing.assert_close(got_boxes[i], result["boxes"], atol=0.1, rtol=RTOL)
    assert float(got_boxes[0, :, 2].max()) > w, "boxes scaled to orig_sizes, not the input"
    if fmt == "onnx":
        _assert_onnx_names(output)


def _assert_onnx_names(path: Path) -> None:
    import onnx

    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["images", "orig_sizes"]
    assert [o.name for o in graph.output] == ["boxes", "scores", "labels"]
    with pytest.raises(ValueError, match="takes images, orig_sizes; got 1 input"):
        run_exported(path, torch.zeros(1, 3, 64, 64))


def _one_line_error(
    argv: list[str], capsys: pytest.CaptureFixture, main: Callable[..., int] = export_main
) -> tuple[int, str]:
    status = main(argv)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return status, err


def test_cli_errors_are_one_line(
    plain_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = str(tmp_path / "x.pt2")
    status, err = _one_line_error([str(tmp_path / "missing.pth"), "--output", out], capsys)
    assert status != 0 and "detr-irpe-export: error:" in err
    status, err = _one_line_error(
        [str(plain_checkpoint), "--format", "pt2", "--opset", "18", "--output", out], capsys
    )
    assert status == 2 and "--opset" in err


def test_cli_names_the_missing_extra(
    plain_checkpoint: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(__import__("sys").modules, "onnxscript", None)
    argv = [str(plain_checkpoint), "--format", "onnx", "--output", str(tmp_path / "x.onnx")]
    status, err = _one_line_error(argv, capsys)
    assert status == 2
    assert "pip install 'detr-irpe[export]'" in err
