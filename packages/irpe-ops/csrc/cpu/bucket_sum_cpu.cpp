// CPU kernel of irpe_ops::bucket_sum:
//   out[b, h, i, k] = sum_j weights[b, h, i, j] * [index[i, j] == k]
//
// Each output row is reduced by one thread into a private accumulator (float32 for 16-bit
// inputs, the input type otherwise), so there are no atomics or locks and the result does not
// depend on the number of threads: it is bitwise reproducible.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "cpu/index_rows.h"
#include "cpu/output.h"

namespace irpe_ops::cpu {
namespace {

constexpr const char* kOp = "irpe_ops.bucket_sum";

// Accumulation type: float32 for float16/bfloat16, the type itself for float32/float64.
template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Reduces one row of Lk weights into kLanes interleaved accumulators of K entries each.
//
// Neighbouring j often fall into the same bucket (distant tokens share saturated buckets), and a
// single accumulator would then chain every add on the previous store to the same address.
// Spreading consecutive j over kLanes independent copies breaks that chain; the copies are summed
// in a fixed order afterwards, so the result stays deterministic.
template <int kLanes, typename scalar_t, typename acc_t, typename index_t>
inline void reduce_row(const scalar_t* __restrict w, int64_t stride_j, const index_t* __restrict ix,
                       int64_t Lk, acc_t* __restrict acc, int64_t K) {
  int64_t j = 0;
  if constexpr (kLanes == 4) {
    if (stride_j == 1) {
      for (; j + 4 <= Lk; j += 4) {
        acc[ix[j]] += static_cast<acc_t>(w[j]);
        acc[K + ix[j + 1]] += static_cast<acc_t>(w[j + 1]);
        acc[2 * K + ix[j + 2]] += static_cast<acc_t>(w[j + 2]);
        acc[3 * K + ix[j + 3]] += static_cast<acc_t>(w[j + 3]);
      }
    } else {
      for (; j + 4 <= Lk; j += 4) {
        acc[ix[j]] += static_cast<acc_t>(w[j * stride_j]);
        acc[K + ix[j + 1]] += static_cast<acc_t>(w[(j + 1) * stride_j]);
        acc[2 * K + ix[j + 2]] += static_cast<acc_t>(w[(j + 2) * stride_j]);
        acc[3 * K + ix[j + 3]] += static_cast<acc_t>(w[(j + 3) * stride_j]);
      }
    }
  }
  for (; j < Lk; ++j) {
    acc[ix[j]] += static_cast<acc_t>(w[j * stride_j]);
  }
}

template <int kLanes, typename scalar_t, typename index_t>
void bucket_sum_kernel(const at::Tensor& weights, const at::Tensor& index, int64_t K,
                       at::Tensor& out) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t B = weights.size(0);
  const int64_t H = weights.size(1);
  const int64_t Lq = weights.size(2);
  const int64_t Lk = weights.size(3);
  const int64_t sB = weights.stride(0);
  const int64_t sH = weights.stride(1);
  const int64_t sQ = weights.stride(2);
  const int64_t sJ = weights.stride(3);
  const scalar_t* w = weights.const_data_ptr<scalar_t>();
  const index_t* idx = index.const_data_ptr<index_t>();
  scalar_t* o = out.mutable_data_ptr<scalar_t>();
  const int64_t rows = Lq * B * H;

  at::parallel_for(0, rows, grain_rows(Lk + K), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(static_cast<size_t>(kLanes * K));
    RowCursor cur(begin, B, H);
    const index_t* ix = idx + cur.i * Lk;
    check_index_row(kOp, ix, Lk, K, idx, Lq * Lk);
    for (int64_t r = begin; r < end; ++r) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      reduce_row<kLanes>(w + cur.b * sB + cur.h * sH + cur.i * sQ, sJ, ix, Lk, acc.data(), K);
      scalar_t* dst = o + (cur.plane() * Lq + cur.i) * K;
      if constexpr (kLanes == 4) {
        const acc_t* a = acc.data();
        for (int64_t k = 0; k < K; ++k) {
          dst[k] = static_cast<scalar_t>((a[k] + a[K + k]) + (a[2 * K + k] + a[3 * K + k]));
        }
      } else {
        for (int64_t k = 0; k < K; ++k) {
          dst[k] = static_cast<scalar_t>(acc[k]);
        }
      }
      if (cur.advance() && r + 1 < end) {
        ix = idx + cur.i * Lk;
        check_index_row(kOp, ix, Lk, K, idx, Lq * Lk);
      }
    }
  });
}

template <typename scalar_t, typename index_t>
void dispatch_lanes(const at::Tensor& weights, const at::Tensor& index, int64_t K,
                    at::Tensor& out) {
  // Several accumulators pay off when buckets repeat within a row (K well below Lk); for wide
  // rows of distinct buckets their zeroing and merging would cost more than they save.
  if (4 * K <= weights.size(3)) {
    bucket_sum_kernel<4, scalar_t, index_t>(weights, index, K, out);
  } else {
    bucket_sum_kernel<1, scalar_t, index_t>(weights, index, K, out);
  }
}

at::Tensor bucket_sum_cpu(const at::Tensor& weights, const at::Tensor& index_arg,
                          int64_t num_buckets) {
  check_bucket_sum_args(weights, index_arg, num_buckets);
  TORCH_CHECK(weights.device().is_cpu(), kOp, ": expected CPU tensors, got weights on ",
              weights.device());
  const at::Tensor index = index_arg.contiguous();
  at::Tensor out = empty_output({weights.size(0), weights.size(1), weights.size(2), num_buckets},
                             weights.options());
  if (out.numel() == 0 || index.size(1) == 0) {
    check_index_range(kOp, index, num_buckets);
    return out.zero_();  // Lk == 0: every bucket sums nothing
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weights.scalar_type(), "bucket_sum_cpu",
                                  [&] {
                                    if (index.scalar_type() == at::kInt) {
                                      dispatch_lanes<scalar_t, int32_t>(weights, index,
                                                                        num_buckets, out);
                                    } else {
                                      dispatch_lanes<scalar_t, int64_t>(weights, index,
                                                                        num_buckets, out);
                                    }
                                  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(irpe_ops, CPU, m) {
  m.impl("bucket_sum", &bucket_sum_cpu);
}

}  // namespace irpe_ops::cpu
