// CPU kernel of irpe_ops::rpe_index:  out[b, h, i, j] = input[b, h, i, index[i, j]].
//
// The operation only moves values, so the kernel is instantiated per element *size* (2, 4 or 8
// bytes) rather than per dtype: float16 and bfloat16 share one copy loop, float32 another.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "checks.h"
#include "cpu/index_rows.h"
#include "cpu/output.h"

namespace irpe_ops::cpu {
namespace {

constexpr const char* kOp = "irpe_ops.rpe_index";

// Copies one output row. Split by the stride of K so the common contiguous case is a plain
// indexed load the compiler can unroll.
template <typename elem_t, typename index_t>
inline void gather_row(const elem_t* __restrict src, int64_t stride_k, const index_t* __restrict ix,
                       elem_t* __restrict dst, int64_t Lk) {
  if (stride_k == 1) {
    for (int64_t j = 0; j < Lk; ++j) {
      dst[j] = src[ix[j]];
    }
  } else {
    for (int64_t j = 0; j < Lk; ++j) {
      dst[j] = src[static_cast<int64_t>(ix[j]) * stride_k];
    }
  }
}

// Copies kGroup output rows that share one index row.
template <typename elem_t, typename index_t>
inline void gather_rows(const elem_t* const (&src)[kGroup], int64_t stride_k,
                        const index_t* __restrict ix, elem_t* const (&dst)[kGroup], int64_t Lk) {
  const elem_t* __restrict s0 = src[0];
  const elem_t* __restrict s1 = src[1];
  const elem_t* __restrict s2 = src[2];
  const elem_t* __restrict s3 = src[3];
  elem_t* __restrict d0 = dst[0];
  elem_t* __restrict d1 = dst[1];
  elem_t* __restrict d2 = dst[2];
  elem_t* __restrict d3 = dst[3];
  for (int64_t j = 0; j < Lk; ++j) {
    const int64_t k = static_cast<int64_t>(ix[j]) * stride_k;
    d0[j] = s0[k];
    d1[j] = s1[k];
    d2[j] = s2[k];
    d3[j] = s3[k];
  }
}

template <typename elem_t, typename index_t>
void rpe_index_kernel(const at::Tensor& input, const at::Tensor& index, at::Tensor& out) {
  static_assert(kGroup == 4, "gather_rows is written out for 4 rows");
  const int64_t B = input.size(0);
  const int64_t H = input.size(1);
  const int64_t Lq = input.size(2);
  const int64_t K = input.size(3);
  const int64_t Lk = index.size(1);
  const int64_t sB = input.stride(0);
  const int64_t sH = input.stride(1);
  const int64_t sQ = input.stride(2);
  const int64_t sK = input.stride(3);
  // Raw bytes reinterpreted as same-size unsigned integers: an exact copy for every dtype.
  const auto* in = static_cast<const elem_t*>(input.const_data_ptr());
  const auto* idx = index.const_data_ptr<index_t>();
  auto* o = static_cast<elem_t*>(out.mutable_data_ptr());
  const int64_t rows = Lq * B * H;

  at::parallel_for(0, rows, grain_rows(Lk), [&](int64_t begin, int64_t end) {
    const index_t* ix = nullptr;
    for_each_row_group(
        begin, end, B, H,
        [&](int64_t i) {
          ix = idx + i * Lk;
          check_index_row(kOp, ix, Lk, K, idx, Lq * Lk);
        },
        [&](const RowGroup& group) {
          const elem_t* src[kGroup] = {};
          elem_t* dst[kGroup] = {};
          for (int g = 0; g < group.count; ++g) {
            src[g] = in + group.b[g] * sB + group.h[g] * sH + group.i * sQ;
            dst[g] = o + (group.plane[g] * Lq + group.i) * Lk;
          }
          if (group.count == kGroup) {
            gather_rows(src, sK, ix, dst, Lk);
          } else {
            gather_row(src[0], sK, ix, dst[0], Lk);
          }
        });
  });
}

template <typename elem_t>
void dispatch_index(const at::Tensor& input, const at::Tensor& index, at::Tensor& out) {
  if (index.scalar_type() == at::kInt) {
    rpe_index_kernel<elem_t, int32_t>(input, index, out);
  } else {
    rpe_index_kernel<elem_t, int64_t>(input, index, out);
  }
}

at::Tensor rpe_index_cpu(const at::Tensor& input, const at::Tensor& index_arg) {
  check_rpe_index_args(input, index_arg);
  TORCH_CHECK(input.device().is_cpu(), kOp, ": expected CPU tensors, got input on ",
              input.device());
  const at::Tensor index = index_arg.contiguous();
  at::Tensor out = empty_output({input.size(0), input.size(1), input.size(2), index.size(1)},
                             input.options());
  if (out.numel() == 0) {
    check_index_range(kOp, index, input.size(3));  // nothing to copy, but still refuse bad ids
    return out;
  }
  switch (input.element_size()) {
    case 2:
      dispatch_index<uint16_t>(input, index, out);
      break;
    case 4:
      dispatch_index<uint32_t>(input, index, out);
      break;
    case 8:
      dispatch_index<uint64_t>(input, index, out);
      break;
    default:
      TORCH_CHECK(false, kOp, ": unsupported element size ", input.element_size());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(irpe_ops, CPU, m) {
  m.impl("rpe_index", &rpe_index_cpu);
}

}  // namespace irpe_ops::cpu
