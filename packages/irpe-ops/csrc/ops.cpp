// The operator schemas, declared once. Kernels are registered per backend in cpu/ and cuda/;
// fake (meta) kernels and autograd are registered from Python (irpe_ops/ops.py).
#include <torch/library.h>

TORCH_LIBRARY(irpe_ops, m) {
  // out[b, h, i, j] = input[b, h, i, index[i, j]]; input (B, H, Lq, K), index (Lq, Lk).
  m.def("rpe_index(Tensor input, Tensor index) -> Tensor", {at::Tag::pt2_compliant_tag});
  // out[b, h, i, k] = sum_j weights[b, h, i, j] * [index[i, j] == k]; the adjoint of rpe_index.
  m.def("bucket_sum(Tensor weights, Tensor index, SymInt num_buckets) -> Tensor",
        {at::Tag::pt2_compliant_tag});
}
