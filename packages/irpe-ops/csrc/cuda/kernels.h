// Interface between the CUDA launchers (ops_cuda.cpp, compiled by the C++ compiler with the torch
// headers) and the kernels (*.cu, compiled by nvcc with CUDA headers only). Only raw pointers,
// sizes, strides and a stream cross it, which keeps nvcc away from the heavy torch headers.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace irpe_ops::cuda {

enum class FloatType : int { kHalf, kBFloat16, kFloat, kDouble };

// Sizes of a (B, H, Lq, Lk) problem with K buckets.
struct Sizes {
  int64_t B;
  int64_t H;
  int64_t Lq;
  int64_t Lk;
  int64_t K;
};

// out (B, H, Lq, Lk) contiguous = input (B, H, Lq, K) gathered by index (Lq, Lk) contiguous.
struct RpeIndexArgs {
  const void* input;
  int64_t input_strides[4];  // in elements
  int element_size;          // 2, 4 or 8 bytes: the kernel only copies bits
  const void* index;
  bool index_is_int64;
  void* out;
  Sizes sizes;
};

// out (B, H, Lq, K) contiguous = bucket sums of weights (B, H, Lq, Lk) by index (Lq, Lk).
struct BucketSumArgs {
  const void* weights;
  int64_t weights_strides[4];  // in elements
  FloatType dtype;
  const void* index;
  bool index_is_int64;
  void* out;
  // Accumulator rows (B * H * Lq, K) of the accumulation type, used only when
  // bucket_sum_workspace_bytes() is non-zero; may alias `out` when the types agree.
  void* workspace;
  Sizes sizes;
};

void launch_rpe_index(const RpeIndexArgs& args, cudaStream_t stream);

// Bytes of global workspace bucket_sum needs: 0 when a row's K accumulators fit in shared memory
// (K up to 12256 for float accumulators, 6112 for double), else B * H * Lq * K accumulators.
int64_t bucket_sum_workspace_bytes(const Sizes& sizes, FloatType dtype);

void launch_bucket_sum(const BucketSumArgs& args, cudaStream_t stream);

}  // namespace irpe_ops::cuda
