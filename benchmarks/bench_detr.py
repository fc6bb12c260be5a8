"""Training and inference throughput of the detector on the CPU, with a per-phase breakdown.

Two configurations, one run:

* ``demo``: the small model of the README demo, on synthetic images of the demo's size;
* ``r50``: the DETR-R50 default (``rpe-2.0-product-ctx-1-k``, hidden 256, 6+6 layers, 100
  queries) on 800x1066 inputs (the original's validation size for a 4:3 COCO image).

For each: images/s for inference (eval mode, ``no_grad``) and for a training step (forward, loss,
backward, clipping, AdamW step), and the share of time spent in the backbone, the encoder, the
decoder, the matcher, the rest of the step (losses, backward, optimizer) and data loading
(decoding, augmenting and collating images from a synthetic COCO dataset on disk, one worker).

    python benchmarks/bench_detr.py [--config demo r50] [--steps N] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from detr_irpe import build_model, build_optimizer, collate_fn
from detr_irpe.config import default_args
from detr_irpe.data import build_dataset
from detr_irpe.data.synthetic import SyntheticConfig, generate_synthetic_coco

PHASES = ("backbone", "encoder", "decoder", "matcher")

CONFIGS = {
    # The model and image sizes of the README demo (detr_irpe.cli.demo).
    "demo": {"argv": None, "image_size": None, "batch_size": 8},
    "r50": {
        "argv": ["--enc_rpe2d", "rpe-2.0-product-ctx-1-k", "--backbone_weights", "none"],
        "image_size": (800, 1066),
        "batch_size": 2,
    },
}


class PhaseTimer:
    """Wall time spent inside chosen sub-modules' forward calls (hooks on module entry/exit)."""

    def __init__(self, model: torch.nn.Module, criterion: torch.nn.Module) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._start: dict[str, float] = {}
        modules = {
            "backbone": model.backbone,
            "encoder": model.transformer.encoder,
            "decoder": model.transformer.decoder,
            "matcher": criterion.matcher,
        }
        for name, module in modules.items():
            module.register_forward_pre_hook(self._enter(name))
            module.register_forward_hook(self._exit(name))

    def _enter(self, name: str):
        def hook(module, inputs):
            self._start[name] = time.perf_counter()

        return hook

    def _exit(self, name: str):
        def hook(module, inputs, outputs):
            self.seconds[name] += time.perf_counter() - self._start.pop(name)

        return hook

    def reset(self) -> None:
        self.seconds.clear()


@contextmanager
def timed(store: dict[str, float], key: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    store[key] += time.perf_counter() - start


def run_config(name: str, steps: int, data_root: Path) -> dict[str, object]:
    from detr_irpe.cli.demo import DEMO_IMAGE_SIZE, demo_model_argv

    spec = CONFIGS[name]
    argv = spec["argv"] if spec["argv"] is not None else demo_model_argv()
    image_size = spec["image_size"] or (DEMO_IMAGE_SIZE, DEMO_IMAGE_SIZE)
    batch_size = int(spec["batch_size"])
    shorter = min(image_size)
    args = default_args(
        [
            *argv,
            "--device", "cpu", "--batch_size", str(batch_size), "--num_workers", "1",
            "--coco_path", str(data_root / name), "--val_size", str(shorter),
            "--val_max_size", str(max(image_size)), "--train_scales", str(shorter),
            "--train_max_size", str(max(image_size)), "--no_crop_aug",
        ]
    )  # fmt: skip
    generate_synthetic_coco(
        data_root / name,
        SyntheticConfig(
            num_train=4 * batch_size, num_val=batch_size, image_size=max(image_size),
            min_image_size=shorter, seed=0,
        ),
    )  # fmt: skip
    args.num_classes = None
    torch.manual_seed(0)
    model, criterion, _ = build_model(args)
    optimizer, _ = build_optimizer(model, args)
    dataset = build_dataset("train", args)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn, num_workers=1
    )
    batches = []
    other: dict[str, float] = defaultdict(float)
    with timed(other, "data"):
        for batch in loader:
            batches.append(batch)
    data_per_image = other["data"] / len(dataset)
    timer = PhaseTimer(model, criterion)

    # inference
    model.eval()
    samples, _ = batches[0]
    with torch.no_grad():
        model(samples)  # warm-up (bucket tables, allocator)
        timer.reset()
        start = time.perf_counter()
        for i in range(steps):
            model(batches[i % len(batches)][0])
        infer_seconds = time.perf_counter() - start
    infer_phases = dict(timer.seconds)

    # training
    model.train()
    timer.reset()
    step_seconds = 0.0
    for i in range(steps + 1):
        samples, targets = batches[i % len(batches)]
        start = time.perf_counter()
        outputs = model(samples)
        losses = criterion(outputs, targets)
        total = sum(losses[k] * w for k, w in criterion.weight_dict.items() if k in losses)
        optimizer.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_max_norm)
        optimizer.step()
        if i == 0:  # warm-up step
            timer.reset()
            continue
        step_seconds += time.perf_counter() - start
    train_phases = dict(timer.seconds)
    images = steps * batch_size
    train_total = step_seconds + data_per_image * images
    return {
        "config": name,
        "input": f"{image_size[0]}x{image_size[1]}",
        "batch_size": batch_size,
        "threads": torch.get_num_threads(),
        "inference_images_per_s": images / infer_seconds,
        "train_images_per_s": images / train_total,
        "train_images_per_s_model_only": images / step_seconds,
        "inference_share": {k: infer_phases.get(k, 0.0) / infer_seconds for k in PHASES},
        "train_share": {
            **{k: train_phases.get(k, 0.0) / train_total for k in PHASES},
            "losses+backward+optimizer": (step_seconds - sum(train_phases.values())) / train_total,
            "data loading": data_per_image * images / train_total,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--steps", type=int, default=4, help="timed iterations per measurement")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--device", default="cpu", help="only cpu is supported by this script")
    options = parser.parse_args()
    if options.device != "cpu":
        parser.error("bench_detr.py measures CPU throughput only")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in options.config:
            result = run_config(name, options.steps, Path(tmp))
            results.append(result)
            print(f"\n== {name}: input {result['input']}, batch {result['batch_size']}, "
                  f"{result['threads']} threads")  # fmt: skip
            print(f"inference: {result['inference_images_per_s']:.2f} images/s")
            print(
                f"training:  {result['train_images_per_s']:.2f} images/s "
                f"({result['train_images_per_s_model_only']:.2f} without data loading)"
            )
            print("inference share: " + ", ".join(
                f"{k} {v:.0%}" for k, v in result["inference_share"].items()))  # fmt: skip
            print("training share:  " + ", ".join(
                f"{k} {v:.0%}" for k, v in result["train_share"].items()))  # fmt: skip
    if options.json:
        options.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
