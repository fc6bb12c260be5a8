// CUDA launchers of rpe_index and bucket_sum: argument checks, device guard, current stream,
// output allocation and launch-error checks. The kernels themselves live in the .cu files.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "checks.h"
#include "cuda/kernels.h"

namespace irpe_ops::cuda {
namespace {

void copy_strides(const at::Tensor& t, int64_t (&strides)[4]) {
  for (int d = 0; d < 4; ++d) {
    strides[d] = t.stride(d);
  }
}

FloatType float_type(at::ScalarType t) {
  switch (t) {
    case at::kHalf:
      return FloatType::kHalf;
    case at::kBFloat16:
      return FloatType::kBFloat16;
    case at::kFloat:
      return FloatType::kFloat;
    default:  // kDouble: the argument checks admit nothing else
      return FloatType::kDouble;
  }
}

at::Tensor rpe_index_cuda(const at::Tensor& input, const at::Tensor& index_arg) {
  constexpr const char* op = "irpe_ops.rpe_index";
  check_rpe_index_args(input, index_arg);
  TORCH_CHECK(input.is_cuda(), op, ": expected CUDA tensors, got input on ", input.device());
  const c10::cuda::CUDAGuard guard(input.device());
  const int64_t K = input.size(3);
  check_index_range(op, index_arg, K);
  const at::Tensor index = index_arg.contiguous();
  at::Tensor out = at::empty({input.size(0), input.size(1), input.size(2), index.size(1)},
                             input.options());
  if (out.numel() == 0) {
    return out;
  }
  RpeIndexArgs args{};
  args.input = input.const_data_ptr();
  copy_strides(input, args.input_strides);
  args.element_size = static_cast<int>(input.element_size());
  args.index = index.const_data_ptr();
  args.index_is_int64 = index.scalar_type() == at::kLong;
  args.out = out.mutable_data_ptr();
  args.sizes = {input.size(0), input.size(1), input.size(2), index.size(1), K};
  launch_rpe_index(args, c10::cuda::getCurrentCUDAStream(input.device().index()).stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor bucket_sum_cuda(const at::Tensor& weights, const at::Tensor& index_arg,
                           int64_t num_buckets) {
  constexpr const char* op = "irpe_ops.bucket_sum";
  check_bucket_sum_args(weights, index_arg, num_buckets);
  TORCH_CHECK(weights.is_cuda(), op, ": expected CUDA tensors, got weights on ",
              weights.device());
  const c10::cuda::CUDAGuard guard(weights.device());
  check_index_range(op, index_arg, num_buckets);
  const at::Tensor index = index_arg.contiguous();
  at::Tensor out = at::empty({weights.size(0), weights.size(1), weights.size(2), num_buckets},
                             weights.options());
  if (out.numel() == 0) {
    return out;
  }
  BucketSumArgs args{};
  args.weights = weights.const_data_ptr();
  copy_strides(weights, args.weights_strides);
  args.dtype = float_type(weights.scalar_type());
  args.index = index.const_data_ptr();
  args.index_is_int64 = index.scalar_type() == at::kLong;
  args.out = out.mutable_data_ptr();
  args.sizes = {weights.size(0), weights.size(1), weights.size(2), weights.size(3), num_buckets};
  at::Tensor workspace;
  if (bucket_sum_workspace_bytes(args.sizes, args.dtype) > 0) {
    // K too large for shared memory: accumulate in global rows (float32 for 16-bit inputs),
    // directly in the output when it already has the accumulation type.
    if (args.dtype == FloatType::kFloat || args.dtype == FloatType::kDouble) {
      args.workspace = args.out;
    } else {
      workspace = at::empty(out.sizes(), weights.options().dtype(at::kFloat));
      args.workspace = workspace.mutable_data_ptr();
    }
  }
  launch_bucket_sum(args, c10::cuda::getCurrentCUDAStream(weights.device().index()).stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(irpe_ops, CUDA, m) {
  m.impl("rpe_index", &rpe_index_cuda);
  m.impl("bucket_sum", &bucket_sum_cuda);
}

}  // namespace irpe_ops::cuda
