// CUDA kernel of irpe_ops::bucket_sum:
//   out[b, h, i, k] = sum_j weights[b, h, i, j] * [index[i, j] == k]
//
// Deterministic, without global atomics: one warp owns one row (b, h, i) and its K accumulators
// (in shared memory when they fit, else in a global workspace row that no other warp touches).
// The warp walks the row in chunks of 32 columns, in order. In each chunk __match_any_sync groups
// the lanes holding the same bucket; the group's lowest lane sums the group's values in ascending
// lane order and adds the sum to the bucket's accumulator. Groups of one chunk hold distinct
// buckets, so no two lanes ever update the same accumulator at once, and the order of every
// addition is fixed by (chunk, lane): the result is bitwise reproducible and independent of the
// launch configuration. 16-bit inputs accumulate in float32, float32 in float32, float64 in
// float64.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cstdint>
#include <type_traits>

#include "cuda/kernels.h"

namespace irpe_ops::cuda {
namespace {

constexpr int kWarpSize = 32;
constexpr int kMaxWarpsPerBlock = 8;
// Static shared memory limit every CUDA GPU grants without an opt-in.
constexpr int64_t kSharedBytes = 48 * 1024;

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }

template <typename T>
__device__ __forceinline__ T from_acc(typename AccOf<T>::type v);
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ float from_acc<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ double from_acc<double>(double v) {
  return v;
}

// Shared memory per warp: 32 scratch values for the chunk plus (in shared mode) K accumulators.
template <typename acc_t>
int64_t shared_bytes_per_warp(int64_t K, bool accumulators_in_shared) {
  return (kWarpSize + (accumulators_in_shared ? K : 0)) * static_cast<int64_t>(sizeof(acc_t));
}

template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kMaxWarpsPerBlock* kWarpSize)
    bucket_sum_kernel(const scalar_t* __restrict__ weights, int64_t sB, int64_t sH, int64_t sQ,
                      int64_t sJ, const index_t* __restrict__ index, scalar_t* out,
                      typename AccOf<scalar_t>::type* workspace, int64_t H, int64_t Lq, int64_t Lk,
                      int64_t K, int64_t rows, bool accumulators_in_shared) {
  using acc_t = typename AccOf<scalar_t>::type;
  // double-aligned raw buffer, carved per warp below
  extern __shared__ double shared_raw[];
  const int warps = blockDim.x / kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  acc_t* shared = reinterpret_cast<acc_t*>(shared_raw);
  acc_t* scratch = shared + warp * kWarpSize;
  acc_t* shared_acc = shared + warps * kWarpSize + warp * K;

  const int64_t warp_stride = static_cast<int64_t>(gridDim.x) * warps;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * warps + warp; row < rows;
       row += warp_stride) {
    const int64_t plane = row / Lq;
    const int64_t i = row - plane * Lq;
    const int64_t b = plane / H;
    const int64_t h = plane - b * H;
    const scalar_t* w = weights + b * sB + h * sH + i * sQ;
    const index_t* ix = index + i * Lk;
    acc_t* acc = accumulators_in_shared ? shared_acc : workspace + row * K;

    for (int64_t k = lane; k < K; k += kWarpSize) {
      acc[k] = acc_t(0);
    }
    __syncwarp();

    for (int64_t j0 = 0; j0 < Lk; j0 += kWarpSize) {
      const int64_t j = j0 + lane;
      const bool active = j < Lk;
      // Inactive lanes get bucket -1, which no valid index holds, and are never leaders.
      const index_t bucket = active ? __ldg(ix + j) : index_t(-1);
      scratch[lane] = active ? to_acc(w[j * sJ]) : acc_t(0);
      const unsigned group = __match_any_sync(0xffffffffu, bucket);
      __syncwarp();
      if (active && lane == __ffs(group) - 1) {
        acc_t sum = scratch[lane];
        for (unsigned rest = group & (group - 1); rest != 0; rest &= rest - 1) {
          sum += scratch[__ffs(rest) - 1];
        }
        acc[bucket] += sum;
      }
      __syncwarp();
    }

    scalar_t* dst = out + row * K;
    for (int64_t k = lane; k < K; k += kWarpSize) {
      dst[k] = from_acc<scalar_t>(acc[k]);
    }
    // The next row reuses the shared accumulators and scratch.
    __syncwarp();
  }
}

template <typename scalar_t, typename index_t>
void launch_typed(const BucketSumArgs& a, cudaStream_t stream) {
  using acc_t = typename AccOf<scalar_t>::type;
  const Sizes& s = a.sizes;
  const int64_t rows = s.B * s.H * s.Lq;
  const bool in_shared = a.workspace == nullptr;
  // As many warps per block as the shared memory allows (at most 8); one row per warp.
  int warps = kMaxWarpsPerBlock;
  while (warps > 1 && warps * shared_bytes_per_warp<acc_t>(s.K, in_shared) > kSharedBytes) {
    warps /= 2;
  }
  const size_t shared = static_cast<size_t>(warps * shared_bytes_per_warp<acc_t>(s.K, in_shared));
  const int64_t blocks = (rows + warps - 1) / warps;
  const unsigned grid = static_cast<unsigned>(blocks < INT_MAX ? blocks : INT_MAX);
  bucket_sum_kernel<scalar_t, index_t><<<grid, warps * kWarpSize, shared, stream>>>(
      static_cast<const scalar_t*>(a.weights), a.weights_strides[0], a.weights_strides[1],
      a.weights_strides[2], a.weights_strides[3], static_cast<const index_t*>(a.index),
      static_cast<scalar_t*>(a.out), static_cast<acc_t*>(a.workspace), s.H, s.Lq, s.Lk, s.K, rows,
      in_shared);
}

template <typename scalar_t>
void launch_index(const BucketSumArgs& a, cudaStream_t stream) {
  if (a.index_is_int64) {
    launch_typed<scalar_t, long long>(a, stream);
  } else {
    launch_typed<scalar_t, int>(a, stream);
  }
}

}  // namespace

int64_t bucket_sum_workspace_bytes(const Sizes& sizes, FloatType dtype) {
  const int64_t acc_size = dtype == FloatType::kDouble ? 8 : 4;
  // One warp with its scratch and K accumulators must fit.
  if ((kWarpSize + sizes.K) * acc_size <= kSharedBytes) {
    return 0;
  }
  return sizes.B * sizes.H * sizes.Lq * sizes.K * acc_size;
}

void launch_bucket_sum(const BucketSumArgs& args, cudaStream_t stream) {
  switch (args.dtype) {
    case FloatType::kHalf:
      launch_index<__half>(args, stream);
      break;
    case FloatType::kBFloat16:
      launch_index<__nv_bfloat16>(args, stream);
      break;
    case FloatType::kFloat:
      launch_index<float>(args, stream);
      break;
    case FloatType::kDouble:
      launch_index<double>(args, stream);
      break;
  }
}

}  // namespace irpe_ops::cuda
