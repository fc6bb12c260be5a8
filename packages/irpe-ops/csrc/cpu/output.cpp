// The cache of large CPU output blocks behind empty_output() (see output.h for why).
#include "cpu/output.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/util/Exception.h>
#include <c10/util/accumulate.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <utility>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace irpe_ops::cpu {
namespace {

// Smaller outputs are recycled by malloc itself (below its mmap threshold).
constexpr int64_t kMinCachedBytes = int64_t{4} << 20;
// Blocks are aligned to, and sized in multiples of, a transparent huge page.
constexpr size_t kAlignment = size_t{2} << 20;
// A reused block may be at most this many times larger than the request.
constexpr size_t kMaxOversize = 2;
// Few outputs are alive at once (an attention layer adds each to its logits and drops it).
constexpr size_t kMaxBlocks = 16;

int64_t cache_limit_bytes() {
  static const int64_t limit = [] {
    const char* env = std::getenv("IRPE_OPS_CPU_CACHE_MB");
    if (env == nullptr || *env == '\0') {
      return int64_t{256} << 20;
    }
    char* end = nullptr;
    const long long mb = std::strtoll(env, &end, 10);
    TORCH_CHECK(end != env && *end == '\0' && mb >= 0,
                "irpe_ops: IRPE_OPS_CPU_CACHE_MB must be a whole number of MiB >= 0, got '", env,
                "'");
    return static_cast<int64_t>(mb) << 20;
  }();
  return limit;
}

struct Block {
  void* ptr;
  size_t bytes;
};

void free_blocks(const std::vector<Block>& blocks) {
  for (const Block& block : blocks) {
    std::free(block.ptr);
  }
}

class BlockCache {
 public:
  // A cached block of [bytes, kMaxOversize * bytes] bytes (the smallest such), or {nullptr, 0}.
  Block take(size_t bytes) {
    const std::lock_guard<std::mutex> lock(mutex_);
    size_t best = blocks_.size();
    for (size_t i = 0; i < blocks_.size(); ++i) {
      const size_t size = blocks_[i].bytes;
      if (size >= bytes && size <= kMaxOversize * bytes &&
          (best == blocks_.size() || size < blocks_[best].bytes)) {
        best = i;
      }
    }
    if (best == blocks_.size()) {
      return {nullptr, 0};
    }
    const Block block = blocks_[best];
    blocks_.erase(blocks_.begin() + static_cast<std::ptrdiff_t>(best));
    cached_bytes_ -= block.bytes;
    return block;
  }

  // Keeps a released block, evicting the oldest ones beyond the limits.
  void give(Block block) {
    std::vector<Block> evicted;
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      blocks_.push_back(block);
      cached_bytes_ += block.bytes;
      const auto limit = static_cast<size_t>(cache_limit_bytes());
      while (!blocks_.empty() && (cached_bytes_ > limit || blocks_.size() > kMaxBlocks)) {
        evicted.push_back(blocks_.front());
        cached_bytes_ -= blocks_.front().bytes;
        blocks_.erase(blocks_.begin());
      }
    }
    free_blocks(evicted);
  }

  int64_t release() {
    std::vector<Block> all;
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      all.swap(blocks_);
      cached_bytes_ = 0;
    }
    int64_t bytes = 0;
    for (const Block& block : all) {
      bytes += static_cast<int64_t>(block.bytes);
    }
    free_blocks(all);
    return bytes;
  }

  int64_t cached() {
    const std::lock_guard<std::mutex> lock(mutex_);
    return static_cast<int64_t>(cached_bytes_);
  }

 private:
  std::mutex mutex_;
  std::vector<Block> blocks_;  // oldest first
  size_t cached_bytes_ = 0;
};

// Never destroyed: a tensor may be freed during interpreter shutdown, after static destructors.
BlockCache& cache() {
  static auto* instance = new BlockCache();
  return *instance;
}

Block allocate_block(size_t bytes) {
  void* ptr = nullptr;
  if (posix_memalign(&ptr, kAlignment, bytes) != 0) {
    TORCH_CHECK(false, "irpe_ops: out of memory allocating an output of ", bytes, " bytes");
  }
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  // Best effort: one page fault per 2 MiB instead of per 4 KiB on the first use; ignored where
  // transparent huge pages are disabled.
  (void)madvise(ptr, bytes, MADV_HUGEPAGE);
#endif
  return {ptr, bytes};
}

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const int64_t nbytes =
      c10::multiply_integers(sizes) * static_cast<int64_t>(options.dtype().itemsize());
  if (nbytes < kMinCachedBytes || nbytes > cache_limit_bytes()) {
    return at::empty(sizes, options);
  }
  const size_t bytes = (static_cast<size_t>(nbytes) + kAlignment - 1) / kAlignment * kAlignment;
  Block block = cache().take(bytes);
  if (block.ptr == nullptr) {
    block = allocate_block(bytes);
  }
  return at::from_blob(
      block.ptr, sizes, [block](void*) { cache().give(block); }, options);
}

int64_t release_cached_outputs() { return cache().release(); }

int64_t cached_output_bytes() { return cache().cached(); }

}  // namespace irpe_ops::cpu
