// Allocation of the CPU kernels' outputs.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cstdint>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace irpe_ops::cpu {

// at::empty(sizes, options), advising the kernel to back large outputs with transparent huge
// pages.
//
// rpe_index's output is typically tens of MB (DETR encoder: 2 x 8 x 850 x 850 float32 = 46 MB),
// which glibc serves from a fresh mmap on every call; first-touching it through 4 KiB pages costs
// one page fault per 4 KiB, which measured ~2x longer than the gather itself. One fault per
// 2 MiB page avoids that. The advice only changes how the memory is backed (the tensor keeps the
// default CPU allocator and its deleter), is skipped for small outputs, and is ignored when THP is
// disabled system-wide. torch offers the same for all allocations via THP_MEM_ALLOC_ENABLE=1.
inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t{2} << 20;
  const auto nbytes = static_cast<uintptr_t>(out.nbytes());
  if (nbytes >= 2 * kHugePage) {
    const auto begin = reinterpret_cast<uintptr_t>(out.mutable_data_ptr());
    const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
    const uintptr_t last = (begin + nbytes) & ~(kHugePage - 1);
    if (last > first) {
      // Best effort: failure (e.g. THP compiled out) just leaves ordinary pages.
      (void)madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
    }
  }
#endif
  return out;
}

}  // namespace irpe_ops::cpu
