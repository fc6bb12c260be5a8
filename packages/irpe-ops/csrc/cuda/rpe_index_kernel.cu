// CUDA kernel of irpe_ops::rpe_index:  out[b, h, i, j] = input[b, h, i, index[i, j]].
//
// One warp per output row (b, h, i): the lanes write Lk consecutive outputs (coalesced), read the
// index row coalesced, and read the row's K inputs, which stay in L1. Row coordinates are derived
// once per row, never per element, and all offsets are 64-bit.
#include <climits>
#include <cstdint>

#include "cuda/kernels.h"

namespace irpe_ops::cuda {
namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int kWarpSize = 32;

// elem_t is an unsigned integer of the element's size: the kernel copies bits, so float16 and
// bfloat16 share one instantiation.
template <typename elem_t, typename index_t>
__global__ void __launch_bounds__(kWarpsPerBlock* kWarpSize)
    rpe_index_kernel(const elem_t* __restrict__ input, int64_t sB, int64_t sH, int64_t sQ,
                     int64_t sK, const index_t* __restrict__ index, elem_t* __restrict__ out,
                     int64_t H, int64_t Lq, int64_t Lk, int64_t rows) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t warp_stride = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
       row < rows; row += warp_stride) {
    // Output rows are (b, h, i) in memory order, so neighbouring warps write neighbouring rows.
    const int64_t plane = row / Lq;
    const int64_t i = row - plane * Lq;
    const int64_t b = plane / H;
    const int64_t h = plane - b * H;
    const elem_t* src = input + b * sB + h * sH + i * sQ;
    const index_t* ix = index + i * Lk;
    elem_t* dst = out + row * Lk;
#pragma unroll 4
    for (int64_t j = lane; j < Lk; j += kWarpSize) {
      dst[j] = __ldg(src + static_cast<int64_t>(__ldg(ix + j)) * sK);
    }
  }
}

template <typename elem_t, typename index_t>
void launch_typed(const RpeIndexArgs& a, cudaStream_t stream) {
  const Sizes& s = a.sizes;
  const int64_t rows = s.B * s.H * s.Lq;
  const int64_t blocks = (rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  // The grid-stride loop covers any rows beyond the largest grid.
  const unsigned grid = static_cast<unsigned>(blocks < INT_MAX ? blocks : INT_MAX);
  rpe_index_kernel<elem_t, index_t><<<grid, kWarpsPerBlock * kWarpSize, 0, stream>>>(
      static_cast<const elem_t*>(a.input), a.input_strides[0], a.input_strides[1],
      a.input_strides[2], a.input_strides[3], static_cast<const index_t*>(a.index),
      static_cast<elem_t*>(a.out), s.H, s.Lq, s.Lk, rows);
}

template <typename elem_t>
void launch_index(const RpeIndexArgs& a, cudaStream_t stream) {
  if (a.index_is_int64) {
    launch_typed<elem_t, long long>(a, stream);
  } else {
    launch_typed<elem_t, int>(a, stream);
  }
}

}  // namespace

void launch_rpe_index(const RpeIndexArgs& args, cudaStream_t stream) {
  switch (args.element_size) {
    case 2:
      launch_index<unsigned short>(args, stream);
      break;
    case 4:
      launch_index<unsigned int>(args, stream);
      break;
    default:  // 8: the launcher only passes 2, 4 or 8
      launch_index<unsigned long long>(args, stream);
      break;
  }
}

}  // namespace irpe_ops::cuda
