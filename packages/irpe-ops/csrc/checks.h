// Argument checks shared by the CPU and CUDA kernels of rpe_index and bucket_sum.
//
// Every failure is a TORCH_CHECK (a Python RuntimeError) whose message names the operator, the
// argument and the shapes involved, so that bad input never reaches a kernel.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/aminmax.h>
#include <c10/util/Exception.h>

#include <cstdint>

namespace irpe_ops {

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble;
}

// index: (Lq, Lk) int32 or int64, on the same device as `data` (the input or the weights).
inline void check_index_tensor(const char* op, const at::Tensor& index, const at::Tensor& data,
                               const char* data_name) {
  TORCH_CHECK(index.dim() == 2, op, ": index must be 2-D (Lq, Lk), got shape ", index.sizes());
  TORCH_CHECK(index.scalar_type() == at::kInt || index.scalar_type() == at::kLong, op,
              ": index must be int32 or int64, got ", index.scalar_type());
  TORCH_CHECK(index.device() == data.device(), op, ": ", data_name,
              " and index must be on the same device, got ", data_name, " on ", data.device(),
              " and index on ", index.device());
}

inline void check_data_tensor(const char* op, const at::Tensor& data, const char* data_name,
                              const char* layout) {
  TORCH_CHECK(data.dim() == 4, op, ": ", data_name, " must be 4-D ", layout, ", got shape ",
              data.sizes());
  TORCH_CHECK(is_supported_float(data.scalar_type()), op, ": ", data_name,
              " must be float16, bfloat16, float32 or float64, got ", data.scalar_type());
}

// rpe_index(input (B, H, Lq, K), index (Lq, Lk)).
inline void check_rpe_index_args(const at::Tensor& input, const at::Tensor& index) {
  constexpr const char* op = "irpe_ops.rpe_index";
  check_data_tensor(op, input, "input", "(B, H, Lq, K)");
  check_index_tensor(op, index, input, "input");
  TORCH_CHECK(input.size(2) == index.size(0), op, ": input.size(2) (Lq) must equal index.size(0),",
              " got input shape ", input.sizes(), " and index shape ", index.sizes());
  TORCH_CHECK(input.size(3) >= 1, op, ": input.size(3) (K, the number of buckets) must be at ",
              "least 1, got input shape ", input.sizes());
}

// bucket_sum(weights (B, H, Lq, Lk), index (Lq, Lk), num_buckets).
inline void check_bucket_sum_args(const at::Tensor& weights, const at::Tensor& index,
                                  int64_t num_buckets) {
  constexpr const char* op = "irpe_ops.bucket_sum";
  check_data_tensor(op, weights, "weights", "(B, H, Lq, Lk)");
  check_index_tensor(op, index, weights, "weights");
  TORCH_CHECK(weights.size(2) == index.size(0) && weights.size(3) == index.size(1), op,
              ": weights.shape[2:] (Lq, Lk) must equal index.shape, got weights shape ",
              weights.sizes(), " and index shape ", index.sizes());
  TORCH_CHECK(num_buckets >= 1, op, ": num_buckets must be at least 1, got ", num_buckets);
}

inline void index_range_error(const char* op, int64_t num_buckets, int64_t lo, int64_t hi) {
  TORCH_CHECK(false, op, ": index values must lie in [0, ", num_buckets, ") (", num_buckets,
              " buckets), found values in [", lo, ", ", hi, "]");
}

// Range check of the index values by one min/max reduction. On CUDA this costs one reduction
// kernel and one host synchronisation per call: the price of never reading or writing out of
// bounds. (The CPU kernels check the rows they use themselves, fused into their own loops.)
inline void check_index_range(const char* op, const at::Tensor& index, int64_t num_buckets) {
  if (index.numel() == 0) {
    return;
  }
  const auto [lo_t, hi_t] = at::aminmax(index);
  const int64_t lo = lo_t.item<int64_t>();
  const int64_t hi = hi_t.item<int64_t>();
  if (lo < 0 || hi >= num_buckets) {
    index_range_error(op, num_buckets, lo, hi);
  }
}

}  // namespace irpe_ops
