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

  // Move to the next row; returns true when the query row i changed.
  bool advance() {
    if (++h < H) {
      return false;
    }
    h = 0;
    if (++b < B) {
      return false;
    }
    b = 0;
    ++i;
    return true;
  }
};

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
