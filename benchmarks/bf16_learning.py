"""Does ``--amp bf16`` learn as float32 does? Loss curves of the demo model, fp32 vs bf16.

The small model of the README demo (``detr_irpe.cli.demo``: ResNet-18 from scratch, 2+2
layers of width 128, ``rpe-2.0-product-ctx-1-k``) trains ``--steps`` optimizer steps on the
demo's synthetic shapes (128 px, class colours), with the demo's optimizer settings, once per
seed in float32 and once per seed under ``--amp bf16``. A seed fixes the initial weights, the
data order and the augmentation, so fp32 and bf16 runs of one seed see the same batches.

The run-to-run spread of float32 (the range over seeds) is the yardstick: for each window of
``--window`` steps, and for the last window (the smoothed end of the curve), the mean bf16 loss
over seeds should lie within the range of the fp32 seeds' means. Prints a table and a verdict.
With few seeds that range is a strict yardstick (a fourth fp32 seed would itself fall outside
the range of three half of the time), so the script also prints, for the last window, the
same-seed differences bf16 - fp32 against the fp32 standard deviation over seeds; a bf16 cost
shows as differences of one sign, larger than that deviation.

    python benchmarks/bf16_learning.py [--steps 200] [--seeds 0 1 2] [--json curves.json]

Six runs of ``--steps`` steps: some 20 to 40 minutes on 2 CPU cores with the defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from detr_irpe.cli.demo import DEMO_IMAGE_SIZE, demo_model_argv
from detr_irpe.cli.loaders import build_train_loader, set_epoch
from detr_irpe.config import default_args
from detr_irpe.data.coco import build_dataset
from detr_irpe.data.synthetic import SyntheticConfig, generate_synthetic_coco
from detr_irpe.engine import train_one_epoch
from detr_irpe.memory_format import backbone_memory_format, use_backbone_memory_format
from detr_irpe.models import build_model
from detr_irpe.optim import build_optimizer
from detr_irpe.utils.seeding import seed_everything

MODES = {"fp32": "off", "bf16": "bf16"}


def demo_args(data: Path, seed: int, batch_size: int, amp: str) -> argparse.Namespace:
    """The demo's training options (``detr_irpe.cli.demo.train_argv``) for one run."""
    side = str(DEMO_IMAGE_SIZE)
    return default_args([
        *demo_model_argv(),
        "--coco_path", str(data), "--device", "cpu", "--seed", str(seed), "--amp", amp,
        "--batch_size", str(batch_size), "--num_workers", "0",
        "--lr", "4e-4", "--lr_backbone", "1e-4", "--weight_decay", "1e-4",
        "--train_scales", side, "--train_max_size", side, "--no_crop_aug",
        "--val_size", side, "--val_max_size", side, "--no_progress",
    ])  # fmt: skip


def batches(args: argparse.Namespace) -> Iterator[tuple[int, object]]:
    """``(epoch, batch)`` of the training loader, epoch after epoch, seeded as training is."""
    loader = build_train_loader(build_dataset("train", args), args, torch.device("cpu"))
    epoch = 0
    while True:
        set_epoch(loader, epoch, args.seed)
        for batch in loader:
            yield epoch, batch
        epoch += 1


def loss_curve(data: Path, seed: int, mode: str, options: argparse.Namespace) -> list[float]:
    """The training loss of each of ``options.steps`` steps (before that step's update)."""
    args = demo_args(data, seed, options.batch_size, MODES[mode])
    seed_everything(seed)
    model, criterion, _ = build_model(args)
    # The backbone layout detr-irpe-train gives this --amp (channels_last under bf16).
    use_backbone_memory_format(model, backbone_memory_format("cpu", args.amp))
    optimizer, _ = build_optimizer(model, args)
    losses = []
    for step, (epoch, batch) in zip(range(options.steps), batches(args), strict=False):
        stats = train_one_epoch(
            model, criterion, [batch], optimizer, "cpu", epoch, args.clip_max_norm,
            amp=args.amp, progress=False,
        )  # fmt: skip
        losses.append(stats["loss"])
        if options.verbose and step % 25 == 0:
            print(f"  {mode} seed {seed} step {step}: loss {stats['loss']:.4f}", flush=True)
    return losses


def window_means(curve: list[float], window: int) -> list[float]:
    return [statistics.fmean(curve[i : i + window]) for i in range(0, len(curve), window)]


def report(curves: dict[str, dict[int, list[float]]], window: int) -> bool:
    """Print the per-window table; whether every bf16 window mean is within the fp32 range."""
    means = {mode: {s: window_means(c, window) for s, c in runs.items()}
             for mode, runs in curves.items()}  # fmt: skip
    seeds = sorted(means["fp32"])
    windows = len(next(iter(means["fp32"].values())))
    print(f"\nmean loss per window of {window} steps (fp32 range over seeds = run-to-run spread)")
    header = ["steps", *[f"fp32 s{s}" for s in seeds], *[f"bf16 s{s}" for s in seeds]]
    print("  ".join(f"{h:>9}" for h in header) + "   bf16 mean   fp32 range       within")
    all_within = True
    for w in range(windows):
        fp32 = [means["fp32"][s][w] for s in seeds]
        bf16 = [means["bf16"][s][w] for s in seeds]
        mean = statistics.fmean(bf16)
        within = min(fp32) <= mean <= max(fp32)
        all_within &= within
        steps = f"{w * window}-{(w + 1) * window - 1}"
        cells = "  ".join(f"{v:>9.4f}" for v in fp32 + bf16)
        print(f"{steps:>9}  {cells}   {mean:9.4f}   [{min(fp32):.4f}, {max(fp32):.4f}]"
              f"  {'yes' if within else 'NO'}")  # fmt: skip
    # Same seed, same batches: the paired difference is the bf16 effect without the seed's.
    paired = [means["bf16"][s][-1] - means["fp32"][s][-1] for s in seeds]
    fp32_last = [means["fp32"][s][-1] for s in seeds]
    print(f"last window, bf16 - fp32 of the same seed: "
          f"{', '.join(f'{d:+.4f}' for d in paired)} (mean {statistics.fmean(paired):+.4f}); "
          f"fp32 standard deviation over seeds {statistics.stdev(fp32_last):.4f}")  # fmt: skip
    return all_within


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch_size", type=int, default=8, help="the demo's")
    parser.add_argument("--window", type=int, default=50, help="steps per window mean")
    parser.add_argument("--num_train", type=int, default=400, help="synthetic training images")
    parser.add_argument("--json", type=Path, help="write the curves here")
    parser.add_argument("--verbose", action="store_true", help="print every 25th loss")
    options = parser.parse_args()
    if len(options.seeds) < 2:
        parser.error("--seeds: give at least 2 seeds (the fp32 spread needs them)")
    if options.steps < options.window or options.window < 1:
        parser.error("--steps must be at least --window, which must be at least 1")

    print(f"load average {os.getloadavg()[0]:.2f}, {torch.get_num_threads()} threads")
    curves: dict[str, dict[int, list[float]]] = {mode: {} for mode in MODES}
    with tempfile.TemporaryDirectory(prefix="bf16_learning_") as tmp:
        config = SyntheticConfig(
            num_train=options.num_train, num_val=1, image_size=DEMO_IMAGE_SIZE,
            min_image_size=DEMO_IMAGE_SIZE, class_colors=True, seed=0,
        )  # fmt: skip
        data = generate_synthetic_coco(Path(tmp), config)
        for mode in MODES:
            for seed in options.seeds:
                start = time.perf_counter()
                curves[mode][seed] = loss_curve(data, seed, mode, options)
                last = statistics.fmean(curves[mode][seed][-options.window :])
                print(f"{mode} seed {seed}: {options.steps} steps in "
                      f"{time.perf_counter() - start:.0f} s, mean loss of the last "
                      f"{options.window} steps {last:.4f}", flush=True)  # fmt: skip
    within = report(curves, options.window)
    print(f"\nload average {os.getloadavg()[0]:.2f}")
    verdict = "within" if within else "NOT within"
    print(f"bf16 is {verdict} the fp32 run-to-run spread in every window "
          f"(the last window is the smoothed end of the curve)")  # fmt: skip
    if options.json:
        options.json.write_text(json.dumps({"window": options.window, "curves": curves}))


if __name__ == "__main__":
    main()
