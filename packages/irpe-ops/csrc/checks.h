// Argument checks shared by the CPU and CUDA kernels of rpe_index and bucket_sum.
//
// Every failure is a TORCH_CHECK (a Python RuntimeError) whose message names the operator, the
// argument and the shapes involved, so that bad input never reaches a kernel.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/aminmax.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <utility>

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

// rpe_attention(q, k, v (B, H, L, D), ids (L, L) int32, wq (Hq, D, K)?, wk (Hk, D, K)?,
// wv (Hv, K, D)?, key_padding_mask (B, L) bool?, dropout_p). Returns K, the number of buckets
// (0 when no table is given: ids is then unused, but its shape is still checked).
inline int64_t check_rpe_attention_args(const at::Tensor& q, const at::Tensor& k,
                                        const at::Tensor& v, const at::Tensor& ids,
                                        const std::optional<at::Tensor>& wq,
                                        const std::optional<at::Tensor>& wk,
                                        const std::optional<at::Tensor>& wv,
                                        const std::optional<at::Tensor>& key_padding_mask,
                                        double dropout_p) {
  constexpr const char* op = "irpe_ops.rpe_attention";
  TORCH_CHECK(q.dim() == 4, op, ": q must be 4-D (B, H, L, D), got shape ", q.sizes());
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16 ||
                  q.scalar_type() == at::kDouble,
              op, ": q must be float32, bfloat16 or float64, got ", q.scalar_type());
  TORCH_CHECK(q.size(2) >= 1 && q.size(3) >= 1, op, ": q must have L >= 1 and D >= 1, got shape ",
              q.sizes());
  const std::pair<const at::Tensor*, const char*> qkv[] = {{&k, "k"}, {&v, "v"}};
  for (const auto& [t, name] : qkv) {
    TORCH_CHECK(t->sizes() == q.sizes(), op, ": ", name, " must have q's shape (B, H, L, D) ",
                q.sizes(), ", got ", t->sizes());
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), op, ": ", name, " must have q's dtype ",
                q.scalar_type(), ", got ", t->scalar_type());
    TORCH_CHECK(t->device() == q.device(), op, ": ", name, " must be on q's device ", q.device(),
                ", got ", t->device());
  }
  const int64_t B = q.size(0);
  const int64_t H = q.size(1);
  const int64_t L = q.size(2);
  const int64_t D = q.size(3);
  TORCH_CHECK(ids.dim() == 2 && ids.size(0) == L && ids.size(1) == L, op,
              ": ids must be (L, L) = (", L, ", ", L, "), got shape ", ids.sizes());
  TORCH_CHECK(ids.scalar_type() == at::kInt, op, ": ids must be int32, got ", ids.scalar_type());
  TORCH_CHECK(ids.device() == q.device(), op, ": ids must be on q's device ", q.device(),
              ", got ", ids.device());
  int64_t K = 0;
  // (tensor, name, layout, index of the D dim, index of the K dim)
  struct Table {
    const std::optional<at::Tensor>& t;
    const char* name;
    const char* layout;
    int d_dim;
    int k_dim;
  };
  const Table tables[] = {{wq, "wq", "(Hq, D, K)", 1, 2},
                          {wk, "wk", "(Hk, D, K)", 1, 2},
                          {wv, "wv", "(Hv, K, D)", 2, 1}};
  for (const Table& table : tables) {
    if (!table.t.has_value()) {
      continue;
    }
    const at::Tensor& w = *table.t;
    TORCH_CHECK(w.dim() == 3, op, ": ", table.name, " must be 3-D ", table.layout, ", got shape ",
                w.sizes());
    TORCH_CHECK(w.size(0) == 1 || w.size(0) == H, op, ": ", table.name,
                ".size(0) must be 1 (shared) or H = ", H, ", got shape ", w.sizes());
    TORCH_CHECK(w.size(table.d_dim) == D, op, ": ", table.name, " must be ", table.layout,
                " with D = ", D, ", got shape ", w.sizes());
    TORCH_CHECK(w.size(table.k_dim) >= 1, op, ": ", table.name,
                " must have at least one bucket, got shape ", w.sizes());
    TORCH_CHECK(K == 0 || w.size(table.k_dim) == K, op,
                ": the tables must agree on the number of buckets K, got ", K, " and ", table.name,
                " of shape ", w.sizes());
    K = w.size(table.k_dim);
    TORCH_CHECK(w.scalar_type() == q.scalar_type(), op, ": ", table.name, " must have q's dtype ",
                q.scalar_type(), ", got ", w.scalar_type());
    TORCH_CHECK(w.device() == q.device(), op, ": ", table.name, " must be on q's device ",
                q.device(), ", got ", w.device());
  }
  if (key_padding_mask.has_value()) {
    const at::Tensor& mask = *key_padding_mask;
    TORCH_CHECK(mask.dim() == 2 && mask.size(0) == B && mask.size(1) == L, op,
                ": key_padding_mask must be (B, L) = (", B, ", ", L, "), got shape ",
                mask.sizes());
    TORCH_CHECK(mask.scalar_type() == at::kBool, op, ": key_padding_mask must be bool, got ",
                mask.scalar_type());
    TORCH_CHECK(mask.device() == q.device(), op, ": key_padding_mask must be on q's device ",
                q.device(), ", got ", mask.device());
  }
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1), got ",
              dropout_p);
  return K;
}

}  // namespace irpe_ops
