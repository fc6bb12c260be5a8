// The operator schemas, declared once. Kernels are registered per backend in cpu/ and cuda/;
// fake (meta) kernels and autograd are registered from Python (irpe_ops/ops.py).
#include <torch/library.h>

TORCH_LIBRARY(irpe_ops, m) {
  // out[b, h, i, j] = input[b, h, i, index[i, j]]; input (B, H, Lq, K), index (Lq, Lk).
  m.def("rpe_index(Tensor input, Tensor index) -> Tensor", {at::Tag::pt2_compliant_tag});
  // out[b, h, i, k] = sum_j weights[b, h, i, j] * [index[i, j] == k]; the adjoint of rpe_index.
  m.def("bucket_sum(Tensor weights, Tensor index, SymInt num_buckets) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  // Fused iRPE attention (flash-attention style, never an (L, L) tensor per head); see
  // cpu/rpe_attention_cpu.cpp. q (already scaled by D**-0.5), k, v: (B, H, L, D); ids: (L, L)
  // int32; wq, wk: (Hq|Hk, D, K), wv: (Hv, K, D); key_padding_mask: (B, L) bool.
  // Returns out (B, H, L, D) and logsumexp (B, H, L) (float32; float64 for float64 inputs).
  m.def(
      "rpe_attention(Tensor q, Tensor k, Tensor v, Tensor ids, Tensor? wq, Tensor? wk, "
      "Tensor? wv, Tensor? key_padding_mask, float dropout_p, int seed, int offset) "
      "-> (Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  // Gradients (dq, dk, dv, dwq, dwk, dwv); a table's gradient is an empty (0,) tensor when the
  // table is None. The dropout mask is regenerated from (seed, offset).
  m.def(
      "rpe_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor ids, "
      "Tensor? wq, Tensor? wk, Tensor? wv, Tensor? key_padding_mask, Tensor out, "
      "Tensor logsumexp, float dropout_p, int seed, int offset) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  // Debug/test: the dropout keep mask (B, H, L, L) bool that rpe_attention uses for q's shape.
  m.def("_rpe_attention_keep_mask(Tensor q, float dropout_p, int seed, int offset) -> Tensor",
        {at::Tag::pt2_compliant_tag});
}
