// Helpers shared by the CPU kernels: row iteration order and the fused index range check.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>

#include "checks.h"

namespace irpe_ops::cpu {

// Position of a kernel inside the (i, b, h) row order used by both CPU kernels.
//
// Rows are visited query-row-major: row r stands for (i, p) with i = r / P and p = r % P, where
// p = b * H + h runs over the P = B * H planes. Consecutive rows therefore share one index row
// (index[i, :]), which stays in L1 while it serves all P planes; only the first row of a
// parallel chunk pays a division.
struct RowCursor {
  int64_t i;  // query row
  int64_t b;  // batch
  int64_t h;  // head
  int64_t B;
  int64_t H;

  RowCursor(int64_t row, int64_t B_, int64_t H_) : B(B_), H(H_) {
    const int64_t P = B_ * H_;
    i = row / P;
    const int64_t p = row - i * P;
    b = p / H_;
    h = p - b * H_;
  }

  int64_t plane() const { return b * H + h; }

  // Move to the next row.
  void advance() {
    if (++h < H) {
      return;
    }
    h = 0;
    if (++b < B) {
      return;
    }
    b = 0;
    ++i;
  }
};

// Rows handled together: consecutive rows are the planes (b, h) of one query row i and share
// index[i, :], so a kernel can load each id once for up to kGroup planes and give the core
// kGroup independent copies (or accumulations) to overlap.
constexpr int kGroup = 4;

// `count` rows of query row `i`: kGroup, or 1 where fewer are left in the chunk or the row.
struct RowGroup {
  int64_t i;
  int count;
  int64_t b[kGroup];
  int64_t h[kGroup];
  int64_t plane[kGroup];  // b * H + h
};

// Visits the rows [begin, end) of the (i, b, h) order as RowGroups. `on_query_row(i)` runs
// before the first group of each query row (where the kernels fetch and check index[i, :]).
template <typename OnQueryRow, typename OnGroup>
inline void for_each_row_group(int64_t begin, int64_t end, int64_t B, int64_t H,
                               OnQueryRow&& on_query_row, OnGroup&& on_group) {
  RowCursor cur(begin, B, H);
  const int64_t planes = B * H;
  int64_t current_i = -1;
  for (int64_t r = begin; r < end;) {
    if (cur.i != current_i) {
      current_i = cur.i;
      on_query_row(current_i);
    }
    const int64_t same_row = std::min(end - r, planes - cur.plane());
    RowGroup group{};
    group.i = cur.i;
    group.count = same_row >= kGroup ? kGroup : 1;
    for (int g = 0; g < group.count; ++g) {
      group.b[g] = cur.b;
      group.h[g] = cur.h;
      group.plane[g] = cur.plane();
      cur.advance();
    }
    on_group(group);
    r += group.count;
  }
}

// Min and max of one index row (a loop the compiler vectorises).
template <typename index_t>
inline void row_min_max(const index_t* ix, int64_t n, int64_t& lo, int64_t& hi) {
  index_t mn = ix[0];
  index_t mx = ix[0];
  for (int64_t j = 1; j < n; ++j) {
    mn = std::min(mn, ix[j]);
    mx = std::max(mx, ix[j]);
  }
  lo = mn;
  hi = mx;
}

// Checks one index row against [0, K). The error path computes the range of the whole index so
// that the message matches the CUDA one.
template <typename index_t>
inline void check_index_row(const char* op, const index_t* ix, int64_t Lk, int64_t K,
                            const index_t* whole_index, int64_t whole_numel) {
  if (Lk == 0) {
    return;
  }
  int64_t lo = 0;
  int64_t hi = 0;
  row_min_max(ix, Lk, lo, hi);
  if (lo < 0 || hi >= K) {
    row_min_max(whole_index, whole_numel, lo, hi);
    index_range_error(op, K, lo, hi);
  }
}

// Rows per parallel task: enough elements per task to amortise scheduling.
inline int64_t grain_rows(int64_t row_len) {
  constexpr int64_t kGrainElements = 1 << 15;
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, row_len));
}

}  // namespace irpe_ops::cpu
