// Allocation of the CPU kernels' outputs.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace irpe_ops::cpu {

// A contiguous, uninitialised tensor of `sizes` with `options` (a CPU floating dtype).
//
// Large outputs (>= kMinCachedBytes) come from a small cache of blocks that earlier outputs
// released. rpe_index's output is typically tens of MB (DETR encoder: 2 x 8 x 850 x 850
// float32 = 46 MB), above glibc's mmap threshold, so the default allocator hands back fresh
// pages on every call and the kernel then pays one page fault per page on first touch:
// measured here, allocating and first-touching such a tensor costs about 9x a copy into
// existing memory, several times the gather itself. In training the output lives briefly
// (it is added to the logits) and the next call wants the same size again, so a released block
// is reused, already mapped. The cache is bounded (IRPE_OPS_CPU_CACHE_MB, default 256; 0
// disables it; an internal tuning knob, not public API), blocks are backed by transparent huge
// pages where the system allows, and the private irpe_ops._empty_cache() returns everything
// cached to the system.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);

// Frees every cached block; returns the number of bytes released.
int64_t release_cached_outputs();

// Bytes currently held in the cache (not in use by any tensor).
int64_t cached_output_bytes();

}  // namespace irpe_ops::cpu
