"""Inference throughput on the CPU: eager PyTorch against the exported ONNX file in ONNX Runtime.

Two models, batch 1, random initial weights (throughput does not depend on them; nothing is
downloaded):

* ``demo``: the small model of the README demo (``detr-irpe-demo``) on 128x128 images;
* ``r50``: DETR-R50 with ``rpe-2.0-product-ctx-1-k`` iRPE in the encoder (hidden 256, 6+6
  layers, 100 queries, 91 classes) on 800x1066 images (the validation size of a 4:3 COCO
  image).

Each model is exported with :func:`detr_irpe.export.export_model` (which checks the file
against eager PyTorch on small inputs), then both run the same normalised input: eager
PyTorch with its usual iRPE kernels (``irpe_ops`` when built) under ``no_grad``, and ONNX
Runtime's CPU provider with as many intra-op threads as PyTorch. The table gives images/s
after one warm-up run.

    python benchmarks/bench_deploy.py [--config demo r50] [--runs N] [--threads T] [--quick]

``--quick`` is a smoke run (the demo model only, two runs). The default takes about 1.5
minutes on 2 idle cores (2.5 on a busy machine), most of it exporting and running the R50
model.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

CONFIGS: dict[str, dict[str, object]] = {
    "demo": {"argv": None, "size": (128, 128)},
    "r50": {
        "argv": ["--enc_rpe2d", "rpe-2.0-product-ctx-1-k", "--backbone_weights", "none"],
        "size": (800, 1066),
    },
}


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``; the platform's word elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build(name: str) -> torch.nn.Module:
    """The untrained DETR of a configuration, in eval mode on the CPU."""
    from detr_irpe.cli.demo import demo_model_argv
    from detr_irpe.config import default_args
    from detr_irpe.models import build_model

    argv = CONFIGS[name]["argv"] or demo_model_argv()
    args = default_args([*argv, "--device", "cpu"])  # type: ignore[list-item]
    args.num_classes = args.num_classes or 91
    torch.manual_seed(0)
    return build_model(args)[0].eval()


def images_per_second(run: Callable[[], object], runs: int) -> float:
    """Batch-1 images/s of ``run`` over ``runs`` calls after one warm-up call."""
    run()  # warm-up: allocator, bucket tables, ONNX Runtime's first-run planning
    start = time.perf_counter()
    for _ in range(runs):
        run()
    return runs / (time.perf_counter() - start)


def measure(name: str, runs: int, threads: int, folder: Path) -> dict[str, object]:
    """Eager and ONNX Runtime images/s of one configuration."""
    import onnxruntime

    from detr_irpe.export import ExportableDETR, export_model

    model = build(name)
    height, width = CONFIGS[name]["size"]  # type: ignore[misc]
    start = time.perf_counter()
    # The exporter reports each pass on the console; the table is what this script shows.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        path = export_model(model, "onnx", folder / f"{name}.onnx")
    export_seconds = time.perf_counter() - start
    images = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(0))
    eager = ExportableDETR(model).eval()

    def run_eager() -> object:
        with torch.no_grad():
            return eager(images)

    # Eager first, before ONNX Runtime's thread pool exists: its spinning threads would
    # compete with PyTorch's for the same cores.
    eager_rate = images_per_second(run_eager, runs)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {"images": images.numpy()}
    return {
        "config": name,
        "input": f"{height}x{width}",
        "eager": eager_rate,
        "onnxruntime": images_per_second(lambda: session.run(None, feed), runs),
        "runs": runs,
        "export_s": export_seconds,
    }


def print_table(results: list[dict[str, object]], threads: int) -> None:
    import onnxruntime

    print(f"CPU: {cpu_name()}")
    print(
        f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, {threads} threads, "
        "batch 1, timed runs after one warm-up"
    )
    print()
    print("| model | input | runs | eager PyTorch (img/s) | ONNX Runtime (img/s) | ORT / eager |")
    print("|---|---|---|---|---|---|")
    for r in results:
        ratio = float(r["onnxruntime"]) / float(r["eager"])  # type: ignore[arg-type]
        print(
            f"| {r['config']} | {r['input']} | {r['runs']} | {r['eager']:.2f} "
            f"| {r['onnxruntime']:.2f} | {ratio:.2f}x |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--runs", type=int, default=None, help="timed runs (default: 20 / 3)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--quick", action="store_true", help="smoke run: demo model, two runs")
    options = parser.parse_args()
    if options.threads < 1:
        parser.error(f"--threads must be at least 1, got {options.threads}")
    if options.runs is not None and options.runs < 1:
        parser.error(f"--runs must be at least 1, got {options.runs}")
    configs = ["demo"] if options.quick else options.config
    torch.set_num_threads(options.threads)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in configs:
            # The R50 model at 800 px takes seconds per image on a few cores: fewer runs.
            runs = options.runs or (2 if options.quick else 20 if name == "demo" else 3)
            results.append(measure(name, runs, options.threads, Path(tmp)))
            print(f"{name}: exported in {results[-1]['export_s']:.0f} s", flush=True)
    print_table(results, options.threads)


if __name__ == "__main__":
    main()
