"""ResNet-50 backbone forward + backward under bf16 autocast: channels_last vs contiguous.

The backbone as ``detr-irpe-train`` builds it (frozen batch norm, layer2-4 trained), one
800x1066 image, ``torch.autocast('cpu', bfloat16)``. It decides
:data:`detr_irpe.memory_format.CPU_CHANNELS_LAST` (whether ``--amp bf16`` on the CPU uses
channels_last).
Take the figures on a quiet machine (``uptime`` load average well below the core count).

    python benchmarks/bench_channels_last.py [--steps N] [--size H W] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from detr_irpe.models.backbone import Backbone


def step(backbone: torch.nn.Module, images: torch.Tensor, device: str) -> None:
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        features = backbone.body(images)["0"]
    features.float().sum().backward()


def prepare(fmt: torch.memory_format, options: argparse.Namespace) -> tuple:
    """``(backbone, images)`` in ``fmt``, warmed up (oneDNN primitive creation)."""
    torch.manual_seed(0)
    backbone = Backbone("resnet50", True, False, False).to(options.device)
    images = torch.randn(1, 3, *options.size, device=options.device)
    backbone = backbone.to(memory_format=fmt)
    images = images.contiguous(memory_format=fmt)
    step(backbone, images, options.device)
    return backbone, images


def timed_step(backbone: torch.nn.Module, images: torch.Tensor, device: str) -> float:
    start = time.perf_counter()
    step(backbone, images, device)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--size", type=int, nargs=2, default=(800, 1066), metavar=("H", "W"))
    parser.add_argument("--device", default="cpu")
    options = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f}, {torch.get_num_threads()} threads")
    formats = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
    prepared = {name: prepare(fmt, options) for name, fmt in formats.items()}
    times: dict[str, list[float]] = {name: [] for name in formats}
    # Alternated steps, so that a change of load affects both formats alike.
    for _ in range(options.steps):
        for name, (backbone, images) in prepared.items():
            times[name].append(timed_step(backbone, images, options.device))
    for name, values in times.items():
        rounded = ", ".join(f"{v:.2f}" for v in values)
        print(f"{name:>13}: median {statistics.median(values):.3f} s per forward+backward "
              f"({rounded})")  # fmt: skip
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
