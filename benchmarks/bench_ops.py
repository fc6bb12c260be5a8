"""Benchmark of the irpe_ops operators against the pure-torch formulations they replace.

At the DETR encoder size (B=2 images, H=8 heads, Lq=Lk=850 tokens, K=81 product buckets,
float32) it times, as the median of ``--repeats`` runs after ``--warmup`` runs:

* ``rpe_index``         -- irpe_ops forward;
* ``bucket_sum``        -- irpe_ops backward of rpe_index (the bucket sum);
* ``gather``            -- ``torch.gather`` with the index expanded to ``(B, H, Lq, Lk)``;
* ``gather backward``   -- its backward, ``zeros.scatter_add_`` of the gradient;
* ``copy``              -- ``out.copy_(src)`` of an output-sized tensor (a memory-bound floor);

and prints the ratios against the goals (forward >= 4x gather and within 2x of the copy;
bucket_sum >= 2x the scatter_add). ``torch.set_num_threads`` is left at its default.

Usage::

    python benchmarks/bench_ops.py [--device cpu|cuda] [--repeats 30] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import irpe_ops

_log = logging.getLogger("bench_ops")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of ``fn()`` in seconds, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    _synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def make_inputs(
    B: int, H: int, L: int, K: int, dtype: torch.dtype, device: torch.device, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random inputs of the benchmark: scores ``(B, H, L, K)``, ids ``(L, L)``, grads ``(B,H,L,L)``.

    The ids are those of a product-method table on a near-square grid, so that buckets repeat
    along rows the way they do in DETR (not uniformly random ids).
    """
    gen = torch.Generator().manual_seed(seed)
    side = round(L**0.5)
    rows = torch.arange(L) // side
    cols = torch.arange(L) % side
    per_axis = round(K**0.5)
    half = per_axis // 2
    # A coarse saturating bucketing of the row/column offsets (the shape, not iRPE's exact g).
    d_row = (rows[:, None] - rows[None, :]).clamp(-half, half) + half
    d_col = (cols[:, None] - cols[None, :]).clamp(-half, half) + half
    index = (d_row * per_axis + d_col).to(torch.int32) % K
    return {
        "input": torch.randn(B, H, L, K, generator=gen, dtype=dtype).to(device),
        "index": index.to(device),
        "grad": torch.randn(B, H, L, L, generator=gen, dtype=dtype).to(device),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Time every variant; returns the figures (seconds and ratios)."""
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    B, H, L, K = args.batch, args.heads, args.length, args.buckets
    data = make_inputs(B, H, L, K, dtype, device)
    inp, index, grad = data["input"], data["index"], data["grad"]
    index_expanded = index.long().expand(B, H, L, L)
    out_buffer = torch.empty_like(grad)
    zeros = torch.zeros_like(inp)

    # Correctness first: a benchmark of wrong results is worthless.
    torch.testing.assert_close(
        irpe_ops.rpe_index(inp, index), torch.gather(inp, -1, index_expanded)
    )
    torch.testing.assert_close(
        irpe_ops.bucket_sum(grad, index, K),
        zeros.clone().scatter_add_(-1, index_expanded, grad),
        rtol=1e-4,
        atol=1e-4,
    )

    cases: dict[str, Callable[[], Any]] = {
        "rpe_index": lambda: irpe_ops.rpe_index(inp, index),
        "bucket_sum": lambda: irpe_ops.bucket_sum(grad, index, K),
        "gather": lambda: torch.gather(inp, -1, index_expanded),
        "gather backward (scatter_add_)": lambda: zeros.clone().scatter_add_(
            -1, index_expanded, grad
        ),
        "copy (output-sized)": lambda: out_buffer.copy_(grad),
    }
    seconds = {}
    for name, fn in cases.items():
        seconds[name] = time_call(fn, device, args.warmup, args.repeats)
        _log.info("%-32s %9.3f ms", name, seconds[name] * 1e3)

    ratios = {
        "gather / rpe_index (goal >= 4)": seconds["gather"] / seconds["rpe_index"],
        "rpe_index / copy (goal <= 2)": seconds["rpe_index"] / seconds["copy (output-sized)"],
        "scatter_add / bucket_sum (goal >= 2)": seconds["gather backward (scatter_add_)"]
        / seconds["bucket_sum"],
    }
    return {
        "config": {
            "B": B,
            "H": H,
            "Lq": L,
            "Lk": L,
            "K": K,
            "dtype": args.dtype,
            "device": str(device),
            "threads": torch.get_num_threads(),
            "repeats": args.repeats,
            "torch": torch.__version__,
            "irpe_ops": irpe_ops.__version__,
        },
        "seconds": seconds,
        "ratios": ratios,
    }


def format_table(result: dict[str, Any]) -> str:
    """The figures as a Markdown table."""
    cfg = result["config"]
    lines = [
        f"B={cfg['B']} H={cfg['H']} Lq=Lk={cfg['Lq']} K={cfg['K']} {cfg['dtype']} on "
        f"{cfg['device']} ({cfg['threads']} threads), median of {cfg['repeats']}",
        "",
        "| operation | time (ms) |",
        "|---|---:|",
    ]
    lines += [f"| {name} | {sec * 1e3:.3f} |" for name, sec in result["seconds"].items()]
    lines += ["", "| ratio | value |", "|---|---:|"]
    lines += [f"| {name} | {value:.2f} |" for name, value in result["ratios"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--dtype", default="float32", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--length", type=int, default=850, help="Lq = Lk")
    parser.add_argument("--buckets", type=int, default=81, help="K")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    result = run(args)
    _log.info("\n%s", format_table(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        _log.info("wrote %s", args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
