"""Training throughput of the real ``detr-irpe-train`` loop, before/after, one run.

DETR-R50 with ``rpe-2.0-product-ctx-1-k`` (random backbone weights: nothing is downloaded,
and the speed does not depend on the values) trains on a synthetic set of square 800x800
images with a fixed-size augmentation (one scale, 800; no crop, no flip), so every batch has
the same shape. Batch 2, one data worker, the torch threads torch picks.

Each run is ``detr-irpe-train --epochs 2`` on ``--iters`` batches: epoch 0 warms up (oneDNN
primitives, ``--compile``'s compilation), epoch 1 is measured; images/s is the batch size over
epoch 1's ``train_iter_time`` (``log.txt``: mean seconds per iteration, data wait included).

Modes: ``fp32`` (the default options), ``bf16`` (``--amp bf16``), ``bf16+fused`` (and
``--fused_optimizer``), ``bf16+compile`` (and ``--compile``); ``--modes`` picks them (default
``fp32 bf16``; ``--compile`` adds ``bf16+compile``). ``--src PATH`` (repeatable) runs another
checkout of the repository, e.g. a worktree of the commit before the change, through
``PYTHONPATH``; modes its parser lacks are skipped. The compiled ``irpe_ops`` extension is
the installed one for every source, unless ``--python PY`` (repeatable, one per ``--src``, in
the same order) runs a source with another interpreter: a virtual environment with that
checkout's irpe-ops built into it, so that the before checkout also runs its own operators.

    mkdir /tmp/before && git archive e3e095f | tar -x -C /tmp/before
    python benchmarks/bench_train.py --src /tmp/before --src . [--compile] [--iters N]
    python benchmarks/bench_train.py --src /tmp/before --python /tmp/venv-before/bin/python \
        --src . --python .venv/bin/python

Defaults take about 5 minutes per source on 2 cores (R50 at 800 px is several seconds per
image in float32). Take figures on a quiet machine: the load average is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE_SOURCES = ("packages/detr-irpe/src", "packages/irpe-nn/src")
MODES = {
    "fp32": [],
    "bf16": ["--amp", "bf16"],
    "bf16+fused": ["--amp", "bf16", "--fused_optimizer"],
    "bf16+compile": ["--amp", "bf16", "--compile", "--compile_pad", "32"],
}
DEFAULT_MODES = ["fp32", "bf16"]


def cpu_description() -> str:
    """lscpu's model name and whether the CPU has the bf16 instructions autocast uses."""
    name = platform.processor() or "unknown CPU"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        name = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines()
                    if line.startswith("Model name"))  # fmt: skip
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    flags: set[str] = set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    marks = ", ".join(f"{flag} {'yes' if flag in flags else 'no'}"
                      for flag in ("avx512_bf16", "amx_bf16"))  # fmt: skip
    return f"{name} ({os.cpu_count()} CPUs; {marks})"


def make_dataset(root: Path, options: argparse.Namespace) -> Path:
    """``--iters`` batches of square ``--side`` px training images and one validation image."""
    from detr_irpe.data.synthetic import SyntheticConfig, generate_synthetic_coco

    config = SyntheticConfig(
        num_train=options.iters * options.batch_size, num_val=1,
        image_size=options.side, min_image_size=options.side, seed=0,
    )  # fmt: skip
    return generate_synthetic_coco(root, config)


def environment(src: Path) -> dict[str, str]:
    """The environment that imports the packages of checkout ``src`` first."""
    paths = [str(src / sub) for sub in PACKAGE_SOURCES]
    for path in paths:
        if not Path(path).is_dir():
            raise SystemExit(f"--src {src}: {path} is not a directory (not a checkout?)")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def supported(src: Path, python: str, mode: str) -> bool:
    """Whether ``src``'s ``detr-irpe-train`` has every flag of ``mode`` (``--help`` is fast)."""
    flags = [flag for flag in MODES[mode] if flag.startswith("--")]
    help_text = subprocess.run(
        [python, "-m", "detr_irpe.cli.train", "--help"],
        env=environment(src), capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return all(flag in help_text.split() for flag in flags)


def train_argv(
    python: str, data: Path, out: Path, options: argparse.Namespace, mode: str
) -> list[str]:
    side = str(options.side)
    return [
        python, "-m", "detr_irpe.cli.train",
        "--enc_rpe2d", "rpe-2.0-product-ctx-1-k", "--backbone_weights", "none",
        "--coco_path", str(data), "--output_dir", str(out), "--device", "cpu",
        "--epochs", "2", "--lr_drop", "100", "--eval_every", "100",
        "--batch_size", str(options.batch_size), "--num_workers", "1", "--no_progress",
        "--train_scales", side, "--no_crop_aug", "--no_flip_aug",
        "--val_size", side, "--val_max_size", side,
        *MODES[mode],
    ]  # fmt: skip


def run_one(
    src: Path, python: str, data: Path, options: argparse.Namespace, mode: str
) -> dict[str, float]:
    """Train once; ``{'s_per_iter', 'images_per_s', 'warmup_s'}`` of the run."""
    with tempfile.TemporaryDirectory(prefix="bench_train_") as out:
        result = subprocess.run(
            train_argv(python, data, Path(out), options, mode),
            env=environment(src), capture_output=True, text=True,
        )  # fmt: skip
        if result.returncode != 0:
            tail = "\n".join(result.stderr.strip().splitlines()[-15:])
            raise SystemExit(f"{src} {mode}: detr-irpe-train failed:\n{tail}")
        records = [json.loads(line) for line in (Path(out) / "log.txt").read_text().splitlines()]
    if options.verbose:
        print(result.stderr)
    warmup, measured = records[0], records[1]
    seconds = float(measured["train_iter_time"])
    return {
        "s_per_iter": seconds,
        "images_per_s": options.batch_size / seconds,
        "warmup_s": float(warmup["epoch_time"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--src",
        type=Path,
        action="append",
        metavar="PATH",
        help="a checkout of the repository to run (repeatable; default: this one)",
    )
    parser.add_argument(
        "--python",
        action="append",
        metavar="PY",
        help="the interpreter of each --src, in order (default: this one)",
    )
    parser.add_argument("--iters", type=int, default=3, help="measured iterations (and warm-up)")
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument(
        "--side", type=int, default=800, help="image side in pixels (smaller: to try the script)"
    )
    parser.add_argument(
        "--modes", nargs="+", choices=list(MODES), default=DEFAULT_MODES, help="what to run"
    )
    parser.add_argument("--compile", action="store_true", help="also run bf16+compile")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--verbose", action="store_true", help="print each run's log")
    options = parser.parse_args()
    if min(options.iters, options.batch_size) < 1 or options.side < 32:
        parser.error("--iters and --batch_size must be at least 1, --side at least 32")
    sources = [path.resolve() for path in options.src or [REPO]]
    pythons = options.python or [sys.executable] * len(sources)
    if len(pythons) != len(sources):
        parser.error(f"--python given {len(pythons)} times for {len(sources)} --src")
    modes = list(dict.fromkeys(options.modes + (["bf16+compile"] if options.compile else [])))

    print(f"CPU: {cpu_description()}")
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    side, iters = options.side, options.iters
    print(
        f"DETR-R50 rpe-2.0-product-ctx-1-k, {side}x{side}, batch {options.batch_size}, "
        f"1 worker, {iters} measured iterations after {iters} warm-up"
    )
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_train_data_") as tmp:
        data = make_dataset(Path(tmp), options)
        for src, python in zip(sources, pythons, strict=True):
            for mode in modes:
                if not supported(src, python, mode):
                    print(f"{src}: {mode} skipped (its detr-irpe-train lacks the flags)")
                    continue
                row = {"src": str(src), "mode": mode, "python": python,
                       **run_one(src, python, data, options, mode)}  # fmt: skip
                row["load"] = os.getloadavg()[0]
                results.append(row)
                print(f"{src}  {mode:>12}: {row['images_per_s']:.3f} images/s "
                      f"({row['s_per_iter']:.2f} s/iter; warm-up epoch {row['warmup_s']:.0f} s; "
                      f"load {row['load']:.2f})", flush=True)  # fmt: skip
    base = results[0]["images_per_s"] if results else 1.0
    print(f"\nrelative to {results[0]['src']} {results[0]['mode']}:" if results else "")
    for row in results:
        print(f"  {row['src']}  {row['mode']:>12}: x{row['images_per_s'] / base:.2f}")
    if options.json:
        options.json.write_text(
            json.dumps({"cpu": cpu_description(), "results": results}, indent=1)
        )


if __name__ == "__main__":
    main()
