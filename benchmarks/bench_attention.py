"""Forward+backward time and peak memory of attention with iRPE on CPU.

Compares, for the DETR encoder shape (sequence 25x34 = 850 tokens, batch 2, embed 256,
8 heads, dropout 0.1, training mode, query is key, value differs):

* ``plain``: ``torch.nn.MultiheadAttention`` with the same dropout, ``need_weights=False``
  (PyTorch then runs its fused ``scaled_dot_product_attention``);
* ``floor``: the same without dropout (SDPA's fastest case: no position encoding, no dropout);
* ``fused``: ``irpe_nn.RPEMultiheadAttention`` with ``need_weights=False`` on the fused
  ``irpe_ops.rpe_attention`` kernel (no ``L x L`` tensor);
* ``irpe_ops`` / ``torch``: the same layer on the materialised path (``IRPE_FUSED=0``) with the
  compiled gather or the PyTorch fallback;
* ``naive``: the same layer computed the way the original implementation does it
  (``benchmarks/_naive_irpe.py``: flat ``L*K`` advanced indexing, ``(H, L, L, D)`` value
  term, ``torch.equal`` projection choice).

Each case runs in a fresh subprocess. Time: median (and min) over ``--repeats`` timed
forward+backward passes after one warm-up pass. Peak memory: the process's peak resident
set size (``resource.getrusage().ru_maxrss``) minus its resident size just before the
warm-up pass, i.e. the most memory the passes ever held at once (activations saved for the
backward, gradients, temporaries). PyTorch's CPU allocator hands large blocks straight back
to the OS, so this tracks live tensors rather than allocator caching.

Usage: ``python benchmarks/bench_attention.py [--repeats 5] [--grid 25 34] [--batch 2]
[--json results.json]`` (``--grid 64 64 --batch 1`` for the memory goal).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HEIGHT, WIDTH, BATCH, EMBED, HEADS, DROPOUT = 25, 34, 2, 256, 8, 0.1
SPECS = ("rpe-2.0-product-ctx-1-k", "rpe-2.0-product-ctx-1-qkv")
IMPLEMENTATIONS = ("fused", "irpe_ops", "torch", "naive")

_log = logging.getLogger("bench_attention")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_case(impl: str, spec: str, repeats: int, grid: tuple[int, int], batch: int) -> dict:
    """Time one implementation in this process; returns the measurements."""
    height, width = grid
    os.environ["IRPE_FUSED"] = "1" if impl == "fused" else "0"
    if impl in ("irpe_ops", "torch"):
        os.environ["IRPE_BACKEND"] = impl
    import torch

    import irpe_nn

    sys.path.insert(0, str(Path(__file__).parent))
    from _naive_irpe import naive_attention

    torch.manual_seed(0)
    length = height * width
    src = torch.randn(length, batch, EMBED, requires_grad=True)
    pos = torch.randn(length, batch, EMBED)
    if impl in ("plain", "floor"):
        layer = torch.nn.MultiheadAttention(EMBED, HEADS, dropout=DROPOUT if impl == "plain" else 0)

        def step():
            q = src + pos
            return layer(q, q, src, need_weights=False)[0]
    else:
        layer = irpe_nn.RPEMultiheadAttention(
            EMBED, HEADS, dropout=DROPOUT, rpe_config=irpe_nn.parse_rpe_spec(spec)
        )
        for name, param in layer.named_parameters():
            if name.startswith("rpe_"):
                torch.nn.init.xavier_uniform_(param)

        def step():
            q = src + pos
            if impl == "naive":
                return naive_attention(layer, q, q, src, (height, width))[0]
            return layer(q, q, src, need_weights=False, hw=(height, width))[0]

    layer.train()
    grad_out = torch.randn(length, batch, EMBED)
    baseline = _rss_bytes()
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        step().backward(grad_out)
        if i:  # the first pass warms up (bucket tables, allocator, thread pool)
            times.append(time.perf_counter() - start)
        layer.zero_grad(set_to_none=True)
        src.grad = None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {
        "impl": impl,
        "spec": "-" if impl == "plain" else spec,
        "backend": irpe_nn.attention_path() if impl in ("fused", "irpe_ops", "torch") else impl,
        "median_ms": statistics.median(times) * 1e3,
        "min_ms": min(times) * 1e3,
        "peak_mb": max(0, peak - baseline) / 2**20,
        "threads": torch.get_num_threads(),
    }


def check_agreement() -> float:
    """Largest difference between ours (both backends) and the naive baseline, float64."""
    import torch

    import irpe_nn

    sys.path.insert(0, str(Path(__file__).parent))
    from _naive_irpe import naive_attention

    torch.manual_seed(0)
    worst = 0.0
    for spec in SPECS:
        layer = irpe_nn.RPEMultiheadAttention(32, 4, rpe_config=irpe_nn.parse_rpe_spec(spec))
        layer = layer.double().eval()
        for param in layer.parameters():
            torch.nn.init.normal_(param, std=0.3)
        x = torch.randn(20, 2, 32, dtype=torch.float64)
        want = naive_attention(layer, x, x, x + 1, (4, 5))[0]
        for name in ("torch", "irpe_ops"):
            os.environ["IRPE_BACKEND"] = name
            if irpe_nn.backend() != name:
                continue
            got = layer(x, x, x + 1, hw=(4, 5))[0]
            worst = max(worst, (got - want).abs().max().item())
    os.environ.pop("IRPE_BACKEND", None)
    return worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per case")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--grid", nargs=2, type=int, default=(HEIGHT, WIDTH), help="token grid")
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument(
        "--impls",
        nargs="+",
        default=list(IMPLEMENTATIONS),
        choices=IMPLEMENTATIONS,
        help="iRPE implementations to run (naive needs (H, L, L, D) memory: leave it out on "
        "large grids)",
    )
    parser.add_argument("--specs", nargs="+", default=list(SPECS), help="iRPE strings")
    parser.add_argument("--case", nargs=2, metavar=("IMPL", "SPEC"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if args.case:  # child process: one measurement, printed as JSON
        print(json.dumps(run_case(*args.case, args.repeats, tuple(args.grid), args.batch)))
        return 0

    _log.info("max |ours - naive| (float64, small case): %.2e", check_agreement())
    cases = [("plain", "-"), ("floor", "-")]
    cases += [(impl, spec) for spec in args.specs for impl in args.impls]
    results = []
    for impl, spec in cases:
        cmd = [sys.executable, __file__, "--case", impl, spec, "--repeats", str(args.repeats)]
        cmd += ["--grid", *map(str, args.grid), "--batch", str(args.batch)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            _log.warning("case %s %s failed:\n%s", impl, spec, proc.stderr.strip())
            continue
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        _log.info("done: %s %s", impl, spec)

    plain = next((r for r in results if r["impl"] == "plain"), None)
    floor = next((r for r in results if r["impl"] == "floor"), None)
    header = (
        f"{'spec':28s} {'impl':9s} {'backend':9s} {'median ms':>10s} {'min ms':>8s} "
        f"{'peak MB':>8s} {'x plain':>8s} {'x floor':>8s} {'naive/this time':>16s} "
        f"{'this/naive mem':>15s} {'mem/plain':>9s}"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        naive = next((n for n in results if n["impl"] == "naive" and n["spec"] == r["spec"]), None)
        r["x_plain"] = r["median_ms"] / plain["median_ms"] if plain else None
        r["x_floor"] = r["median_ms"] / floor["median_ms"] if floor else None
        r["mem_over_plain"] = (
            r["peak_mb"] / plain["peak_mb"] if plain and plain["peak_mb"] else None
        )
        r["naive_over_this_time"] = naive["median_ms"] / r["median_ms"] if naive else None
        r["this_over_naive_mem"] = r["peak_mb"] / naive["peak_mb"] if naive else None
        fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        lines.append(
            f"{r['spec']:28s} {r['impl']:9s} {r['backend']:9s} {r['median_ms']:10.1f} "
            f"{r['min_ms']:8.1f} {r['peak_mb']:8.1f} {fmt(r['x_plain']):>8s} "
            f"{fmt(r['x_floor']):>8s} {fmt(r['naive_over_this_time']):>16s} "
            f"{fmt(r['this_over_naive_mem']):>15s} {fmt(r['mem_over_plain']):>9s}"
        )
    threads = results[0]["threads"] if results else "?"
    lines.append(
        f"\nCPU: {_cpu_model()}, {os.cpu_count()} cores, "
        f"{threads} torch threads; L={args.grid[0]}x{args.grid[1]}="
        f"{args.grid[0] * args.grid[1]}, batch {args.batch}, "
        f"embed {EMBED}, {HEADS} heads, dropout {DROPOUT}, training, fwd+bwd, "
        f"{args.repeats} timed passes.\npeak MB = peak RSS of a fresh process minus its RSS "
        "before the first pass (memory held at once by the passes)."
    )
    print("\n".join(lines))
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "results": results,
                    "shape": {
                        "height": args.grid[0],
                        "width": args.grid[1],
                        "batch": args.batch,
                        "embed": EMBED,
                        "heads": HEADS,
                        "dropout": DROPOUT,
                        "repeats": args.repeats,
                    },
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
