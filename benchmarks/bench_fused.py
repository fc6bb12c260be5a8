"""Training-step time (forward + backward) of the fused iRPE attention op on CPU.

DETR encoder size: batch 2, 8 heads, 850 tokens (a 25x34 feature map), head dim 32, product
buckets of ratio 2.0 (row/column offsets clipped to +-4: K = 81), a contextual table on the keys
only, shared by the heads, dropout 0.1. Cases:

* ``fused fp32`` / ``fused bf16``: ``irpe_ops.rpe_attention`` on (B, H, L, D) q, k, v;
* ``fused fp32 2-pass``: the same with the backward forced onto its two-pass schedule (what it
  runs when there are fewer than two planes, B * H, per thread): each dS tile computed twice;
* ``unfused fp32``: the same attention as separate autograd ops (matmul, ``irpe_ops.rpe_index``
  of ``q @ Wk``, softmax, dropout, matmul), materialising (B, H, L, L) tensors;
* ``sdpa fp32``: ``F.scaled_dot_product_attention`` without position encoding nor dropout;
* ``mha fp32``: ``nn.MultiheadAttention(256, 8, dropout=0.1)`` with ``need_weights=False``,
  which includes the input/output projections; ``fused+proj fp32`` is the fused op with the
  same projections (the like-for-like comparison with ``mha``).

Time: median over ``--repeats`` timed steps after ``--warmup`` steps, all in this process.

Usage: ``python benchmarks/bench_fused.py [--repeats 10] [--threads N]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import irpe_ops

HEIGHT, WIDTH, BATCH, HEADS, HEAD_DIM, DROPOUT, CLIP = 25, 34, 2, 8, 32, 0.1, 4


def product_ids(height: int, width: int, clip: int) -> tuple[torch.Tensor, int]:
    """(L, L) int32 product bucket ids of clipped row/column offsets, and the bucket count."""
    pos = torch.arange(height * width)
    rows, cols = pos // width, pos % width
    side = 2 * clip + 1
    dr = (rows[:, None] - rows[None, :]).clamp(-clip, clip) + clip
    dc = (cols[:, None] - cols[None, :]).clamp(-clip, clip) + clip
    return (dr * side + dc).to(torch.int32), side * side


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown CPU"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def time_step(step: Callable[[], None], warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    B, H, D = BATCH, HEADS, HEAD_DIM
    L, E = HEIGHT * WIDTH, HEADS * HEAD_DIM
    ids, K = product_ids(HEIGHT, WIDTH, CLIP)
    scale = D**-0.5

    def leaves(dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        q = (torch.randn(B, H, L, D) * scale).to(dtype).requires_grad_()
        k = torch.randn(B, H, L, D).to(dtype).requires_grad_()
        v = torch.randn(B, H, L, D).to(dtype).requires_grad_()
        wk = (torch.randn(1, D, K) * 0.1).to(dtype).requires_grad_()
        return q, k, v, wk

    grad = torch.randn(B, H, L, D)
    seed = iter(range(1 << 30))

    def fused_step(dtype: torch.dtype) -> Callable[[], None]:
        q, k, v, wk = leaves(dtype)
        g = grad.to(dtype)

        def step() -> None:
            out = irpe_ops.rpe_attention(q, k, v, ids, wk=wk, dropout_p=DROPOUT, seed=next(seed))
            out.backward(g)

        return step

    def two_pass(step: Callable[[], None]) -> Callable[[], None]:
        def forced() -> None:
            os.environ["IRPE_OPS_ATTENTION_BACKWARD"] = "two_pass"
            try:
                step()
            finally:
                del os.environ["IRPE_OPS_ATTENTION_BACKWARD"]

        return forced

    def unfused_step() -> None:
        out = unfused(*fp32)
        out.backward(grad)

    fp32 = leaves(torch.float32)

    def unfused(q, k, v, wk):
        logits = q @ k.transpose(-1, -2) + irpe_ops.rpe_index(q @ wk, ids)
        attn = F.dropout(torch.softmax(logits, dim=-1), DROPOUT, training=True)
        return attn @ v

    def sdpa_step() -> None:
        q, k, v, _ = fp32
        F.scaled_dot_product_attention(q, k, v).backward(grad)

    mha = torch.nn.MultiheadAttention(E, H, dropout=DROPOUT)
    x = torch.randn(L, B, E, requires_grad=True)
    gx = torch.randn(L, B, E)

    def mha_step() -> None:
        mha(x, x, x, need_weights=False)[0].backward(gx)

    wk_proj = (torch.randn(1, D, K) * 0.1).requires_grad_()

    def fused_proj_step() -> None:
        qkv = F.linear(x, mha.in_proj_weight, mha.in_proj_bias)  # (L, B, 3E)
        q, k, v = qkv.view(L, B, 3, H, D).permute(2, 1, 3, 0, 4).unbind(0)  # (B, H, L, D)
        out = irpe_ops.rpe_attention(
            q * scale, k, v, ids, wk=wk_proj, dropout_p=DROPOUT, seed=next(seed)
        )
        out = out.permute(2, 0, 1, 3).reshape(L, B, E)
        F.linear(out, mha.out_proj.weight, mha.out_proj.bias).backward(gx)

    cases = {
        "fused fp32": fused_step(torch.float32),
        "fused fp32 2-pass": two_pass(fused_step(torch.float32)),
        "fused bf16": fused_step(torch.bfloat16),
        "unfused fp32": unfused_step,
        "sdpa fp32": sdpa_step,
        "mha fp32": mha_step,
        "fused+proj fp32": fused_proj_step,
    }
    print(f"CPU: {cpu_model()}; torch {torch.__version__}, {args.threads} threads")
    print(f"B={B} H={H} L={L} ({HEIGHT}x{WIDTH}) D={D} K={K}, Wk shared, dropout {DROPOUT}")
    times = {}
    for name, step in cases.items():
        times[name] = time_step(step, args.warmup, args.repeats)
        print(f"  {name:16s} {times[name] * 1e3:8.1f} ms  (fwd+bwd, median of {args.repeats})")
    fused = times["fused fp32"]
    print("ratios:")
    print(f"  fused fp32 / unfused fp32     {fused / times['unfused fp32']:.2f}")
    print(f"  fused fp32 / 2-pass backward  {fused / times['fused fp32 2-pass']:.2f}")
    print(f"  fused fp32 / sdpa fp32        {fused / times['sdpa fp32']:.2f}")
    print(f"  fused bf16 / fused fp32       {times['fused bf16'] / fused:.2f}")
    print(f"  fused fp32 / mha fp32         {fused / times['mha fp32']:.2f}")
    print(f"  fused+proj fp32 / mha fp32    {times['fused+proj fp32'] / times['mha fp32']:.2f}")


if __name__ == "__main__":
    main()
