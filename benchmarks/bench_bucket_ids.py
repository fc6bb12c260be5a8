"""Bucket ids inside attention tiles: read from the cached (L, L) table, or computed from the
tokens' grid coordinates?

The fused attention's position term adds ``QWk[i, ids[i, j]]`` to every logit of a tile. The
CPU kernel reads ``ids`` from the cached ``(L, L)`` int32 table (2.9 MB at 25 x 34 tokens, read
again by every (b, h) plane). The alternative computes it from the grid coordinates: for the
product method ``ids[i, j] = R[r_i - r_j] * S + C[c_i - c_j]`` with small per-axis tables ``R``
and ``C`` (every iRPE method is a small table of the row and column offsets). This script
times only that step, both ways, with the kernel's AVX-512 gathers, over the tiles of the DETR
encoder shape (B 2, H 8, L 850 = 25 x 34, 64 x 64 tiles, K = 81), and checks that both give
the same sums. It compiles a small C++ extension at start (torch.utils.cpp_extension;
AVX-512 CPUs only).

    python benchmarks/bench_bucket_ids.py [--repeats 20]

The loop runs on one thread (the extension is built without OpenMP): a per-core comparison.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from bench_fused import CLIP, HEIGHT, WIDTH, cpu_model, product_ids
from torch.utils.cpp_extension import load_inline

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

constexpr int64_t kBlock = 64;

// s[r, c] += qwk[i0 + r, ids[i0 + r, j0 + c]] for every tile of every plane; returns sum(s).
// mode 0: ids from the (L, L) table; mode 1: from coordinates and per-axis tables.
double run(torch::Tensor qwk, torch::Tensor ids,
    torch::Tensor rows, torch::Tensor cols, torch::Tensor rtab, torch::Tensor ctab,
    int64_t side, int64_t height, int64_t width, int64_t mode) {
  const int64_t planes = qwk.size(0), L = qwk.size(1), K = qwk.size(2);
  const float* q = qwk.data_ptr<float>();
  const int32_t* id = ids.data_ptr<int32_t>();
  const int32_t* rw = rows.data_ptr<int32_t>();
  const int32_t* cl = cols.data_ptr<int32_t>();
  const int32_t* rt = rtab.data_ptr<int32_t>();
  const int32_t* ct = ctab.data_ptr<int32_t>();
  const int64_t nb = (L + kBlock - 1) / kBlock;
  std::vector<double> totals(planes * nb, 0.0);
  at::parallel_for(0, planes * nb, 1, [&](int64_t begin, int64_t end) {
    alignas(64) float s[kBlock * kBlock];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t p = task / nb, i0 = (task % nb) * kBlock, mq = std::min(kBlock, L - i0);
      // The tile accumulates over the key blocks (only the id lookups and the gathers are
      // timed, not a tile's other work), and is summed once per query block.
      std::fill(s, s + kBlock * kBlock, 0.0f);
      for (int64_t j0 = 0; j0 < L; j0 += kBlock) {
        const int64_t nk = std::min(kBlock, L - j0);
        for (int64_t r = 0; r < mq; ++r) {
          const int64_t i = i0 + r;
          const float* row = q + (p * L + i) * K;
          const __m512i ri = _mm512_set1_epi32(rw[i] + (int32_t)height - 1);
          const __m512i ci = _mm512_set1_epi32(cl[i] + (int32_t)width - 1);
          const __m512i sd = _mm512_set1_epi32((int32_t)side);
          for (int64_t c = 0; c < nk; c += 16) {
            const __mmask16 m = nk - c >= 16 ? 0xFFFF : (__mmask16)((1U << (nk - c)) - 1U);
            __m512i idx;
            if (mode == 0) {
              idx = _mm512_maskz_loadu_epi32(m, id + i * L + j0 + c);
            } else {
              const __m512i dr = _mm512_sub_epi32(ri, _mm512_maskz_loadu_epi32(m, rw + j0 + c));
              const __m512i dc = _mm512_sub_epi32(ci, _mm512_maskz_loadu_epi32(m, cl + j0 + c));
              const __m512i br = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), m, dr, rt, 4);
              const __m512i bc = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), m, dc, ct, 4);
              idx = _mm512_add_epi32(_mm512_mullo_epi32(br, sd), bc);
            }
            const __m512 g = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, idx, row, 4);
            float* out = s + r * kBlock + c;
            _mm512_mask_storeu_ps(out, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, out), g));
          }
        }
      }
      double total = 0.0;
      for (int64_t e = 0; e < kBlock * kBlock; ++e) total += s[e];
      totals[task] = total;
    }
  });
  double sum = 0.0;
  for (double t : totals) sum += t;
  return sum;
}

"""


def per_axis_tables(length: int) -> torch.Tensor:
    """Bucket of each offset ``d - (length - 1)``, d in [0, 2 length - 1): clipped to +-CLIP."""
    offsets = torch.arange(2 * length - 1) - (length - 1)
    return (offsets.clamp(-CLIP, CLIP) + CLIP).to(torch.int32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if "avx512f" not in Path("/proc/cpuinfo").read_text():
        raise SystemExit("this benchmark uses AVX-512 gathers, as the CPU kernel does: no avx512f")
    ext = load_inline(
        "bench_bucket_ids_ext",
        cpp_sources=[SOURCE],
        functions=["run"],
        extra_cflags=["-O3", "-mavx512f"],
    )

    planes, length = 2 * 8, HEIGHT * WIDTH
    ids, K = product_ids(HEIGHT, WIDTH, CLIP)
    pos = torch.arange(length, dtype=torch.int32)
    rows, cols = pos // WIDTH, pos % WIDTH
    rtab, ctab = per_axis_tables(HEIGHT), per_axis_tables(WIDTH)
    side = 2 * CLIP + 1
    from_coords = (
        rtab[(rows[:, None] - rows[None, :]) + HEIGHT - 1] * side
        + ctab[(cols[:, None] - cols[None, :]) + WIDTH - 1]
    )
    assert torch.equal(from_coords, ids), "per-axis tables disagree with the id table"
    qwk = torch.randn(planes, length, K)

    def call(mode: int) -> float:
        return ext.run(qwk, ids, rows, cols, rtab, ctab, side, HEIGHT, WIDTH, mode)

    assert abs(call(0) - call(1)) <= 1e-6 * abs(call(0)) + 1e-3, "the two ways disagree"
    times: dict[str, list[float]] = {"table": [], "coordinates": []}
    for _ in range(args.repeats):  # alternated, so that drifts hit both alike
        for mode, name in enumerate(times):
            start = time.perf_counter()
            call(mode)
            times[name].append(time.perf_counter() - start)
    print(f"CPU: {cpu_model()}; torch {torch.__version__}, one thread")
    print(f"{planes} planes, L={length} ({HEIGHT}x{WIDTH}), K={K}, 64x64 tiles, position term only")
    medians = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
    for name, ms in medians.items():
        print(f"  ids from the {name:12s} {ms:7.2f} ms (median of {args.repeats})")
    print(f"  coordinates / table: {medians['coordinates'] / medians['table']:.2f}")


if __name__ == "__main__":
    main()
