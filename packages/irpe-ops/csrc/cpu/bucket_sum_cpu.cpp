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

// Rows are reduced kGroup at a time (index_rows.h). Their accumulators are independent, so an
// add never waits on the previous add to the same bucket of its own row (neighbouring j often
// fall into one bucket: distant tokens share saturated buckets).

// Every row is summed in ascending j into one accumulator per bucket, whether it is reduced
// alone or in a group: grouping (which depends on how rows are split between threads) never
// changes a result.
template <typename scalar_t, typename acc_t, typename index_t>
inline void reduce_row(const scalar_t* __restrict w, int64_t stride_j, const index_t* __restrict ix,
                       int64_t Lk, acc_t* __restrict acc) {
  for (int64_t j = 0; j < Lk; ++j) {
    acc[ix[j]] += static_cast<acc_t>(w[j * stride_j]);
  }
}

template <typename scalar_t, typename acc_t, typename index_t>
inline void reduce_rows(const scalar_t* const (&w)[kGroup], int64_t stride_j,
                        const index_t* __restrict ix, int64_t Lk, acc_t* __restrict acc,
                        int64_t K) {
  const scalar_t* __restrict w0 = w[0];
  const scalar_t* __restrict w1 = w[1];
  const scalar_t* __restrict w2 = w[2];
  const scalar_t* __restrict w3 = w[3];
  acc_t* __restrict a0 = acc;
  acc_t* __restrict a1 = acc + K;
  acc_t* __restrict a2 = acc + 2 * K;
  acc_t* __restrict a3 = acc + 3 * K;
  for (int64_t j = 0; j < Lk; ++j) {
    const int64_t k = ix[j];
    const int64_t jj = j * stride_j;
    a0[k] += static_cast<acc_t>(w0[jj]);
    a1[k] += static_cast<acc_t>(w1[jj]);
    a2[k] += static_cast<acc_t>(w2[jj]);
    a3[k] += static_cast<acc_t>(w3[jj]);
  }
}

template <typename scalar_t, typename index_t>
void bucket_sum_kernel(const at::Tensor& weights, const at::Tensor& index, int64_t K,
                       at::Tensor& out) {
  static_assert(kGroup == 4, "reduce_rows is written out for 4 rows");
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
    std::vector<acc_t> acc(static_cast<size_t>(kGroup * K));
    const index_t* ix = nullptr;
    for_each_row_group(
        begin, end, B, H,
        [&](int64_t i) {
          ix = idx + i * Lk;
          check_index_row(kOp, ix, Lk, K, idx, Lq * Lk);
        },
        [&](const RowGroup& group) {
          const scalar_t* src[kGroup] = {};
          for (int g = 0; g < group.count; ++g) {
            src[g] = w + group.b[g] * sB + group.h[g] * sH + group.i * sQ;
          }
          std::fill(acc.begin(), acc.begin() + group.count * K, acc_t(0));
          if (group.count == kGroup) {
            reduce_rows(src, sJ, ix, Lk, acc.data(), K);
          } else {
            reduce_row(src[0], sJ, ix, Lk, acc.data());
          }
          for (int g = 0; g < group.count; ++g) {
            const acc_t* a = acc.data() + g * K;
            scalar_t* dst = o + (group.plane[g] * Lq + group.i) * K;
            for (int64_t k = 0; k < K; ++k) {
              dst[k] = static_cast<scalar_t>(a[k]);
            }
          }
        });
  });
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
                                      bucket_sum_kernel<scalar_t, int32_t>(weights, index,
                                                                        num_buckets, out);
                                    } else {
                                      bucket_sum_kernel<scalar_t, int64_t>(weights, index,
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
