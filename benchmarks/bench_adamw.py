"""Time of one AdamW step on the DETR-R50 parameter set: for-loop, foreach and fused.

The parameter groups are those of ``detr-irpe-train`` (``build_optimizer``) for DETR-R50 with
``rpe-2.0-product-ctx-1-k`` and a trained backbone (about 41M trainable parameters); the
gradients are random. Also reports whether the foreach and fused updates are bitwise equal to
the for-loop's over a few steps (the for-loop is what the original runs on the CPU).

    python benchmarks/bench_adamw.py [--steps N] [--repeats R]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from detr_irpe import build_model
from detr_irpe.config import default_args
from detr_irpe.optim import parameter_groups

IMPLEMENTATIONS = {  # timed in this order
    "for-loop": {"foreach": False},
    "foreach": {"foreach": True},
    "fused": {"fused": True},
}


def r50_model() -> torch.nn.Module:
    args = default_args(
        ["--enc_rpe2d", "rpe-2.0-product-ctx-1-k", "--backbone_weights", "none",
         "--num_classes", "91", "--device", "cpu"]
    )  # fmt: skip
    torch.manual_seed(0)
    return build_model(args)[0], args


def make_optimizer(model: torch.nn.Module, args: argparse.Namespace, **kwargs: bool):
    """``build_optimizer``'s groups and hyper-parameters with another implementation."""
    groups = parameter_groups(model, args.lr_backbone)
    return torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay, **kwargs)


def set_random_grads(model: torch.nn.Module, step: int) -> None:
    generator = torch.Generator().manual_seed(step)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn(p.shape, generator=generator) * 1e-3


def time_steps(model, args, kwargs, steps: int, repeats: int) -> float:
    optimizer = make_optimizer(model, args, **kwargs)
    set_random_grads(model, 0)
    optimizer.step()  # creates the states, not timed
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            optimizer.step()
        times.append((time.perf_counter() - start) / steps)
    return statistics.median(times)


def max_ulp_difference(a: torch.Tensor, b: torch.Tensor) -> int:
    return int((a.view(torch.int32).long() - b.view(torch.int32).long()).abs().max())


def compare(model, args, kwargs, steps: int = 5) -> tuple[bool, int]:
    """``(bitwise equal, max ulp difference)`` of the parameters after ``steps`` steps."""
    results = []
    for variant in ({"foreach": False}, kwargs):
        copy_ = copy.deepcopy(model)
        optimizer = make_optimizer(copy_, args, **variant)
        for step in range(steps):
            set_random_grads(copy_, step)
            optimizer.step()
        results.append([p.detach() for p in copy_.parameters() if p.requires_grad])
    equal = all(torch.equal(a, b) for a, b in zip(*results, strict=True))
    ulps = max(max_ulp_difference(a, b) for a, b in zip(*results, strict=True))
    return equal, ulps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    options = parser.parse_args()
    model, args = r50_model()
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"{n / 1e6:.1f}M trainable parameters, {torch.get_num_threads()} threads")
    for name, kwargs in IMPLEMENTATIONS.items():
        seconds = time_steps(model, args, kwargs, options.steps, options.repeats)
        line = f"{name:>9}: {seconds * 1e3:7.1f} ms/step"
        if name != "for-loop":
            equal, ulps = compare(model, args, kwargs)
            line += f"  bitwise equal to for-loop after 5 steps: {equal} (max {ulps} ulp)"
        print(line, flush=True)


if __name__ == "__main__":
    main()
