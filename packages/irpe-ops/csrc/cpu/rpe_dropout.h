// The counter-based dropout mask of irpe_ops::rpe_attention.
//
// keep(b, h, i, j) is a pure function of (seed, offset, b, h, i, j), so the backward (and the
// debug op _rpe_attention_keep_mask) regenerate exactly the mask the forward used, in any order
// and on any thread, without storing it.
//
// Generator: a per-row key from SplitMix64 (Steele, Lea & Flood 2014; its output function is a
// full-avalanche 64-bit mixer and SplitMix64 passes BigCrush), chained over seed, offset, b, h
// and i; then, per element, two rounds of MurmurHash3's fmix32 finaliser (a bijection of 32-bit
// words with full avalanche) of the key column j mixed with the row key's two halves. 32 bits per
// element: the keep probability is 1 - p to within 2**-32. Not cryptographic, and not PyTorch's
// Philox stream (the masks differ from torch.nn.functional.dropout's), but uncorrelated enough
// for dropout: neighbouring (i, j) go through independent-looking keys, and the 32-bit per-element
// hash is cheap enough to vectorise (32-bit multiplies only) in the attention's inner loops.
#pragma once

#include <cstdint>

namespace irpe_ops::cpu {

inline uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ULL;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}

inline uint32_t fmix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x85EBCA6BU;
  x ^= x >> 13;
  x *= 0xC2B2AE35U;
  x ^= x >> 16;
  return x;
}

// Key of one (batch, head) plane.
inline uint64_t dropout_plane_key(int64_t seed, int64_t offset, int64_t b, int64_t h) {
  uint64_t key = splitmix64(static_cast<uint64_t>(seed));
  key = splitmix64(key ^ static_cast<uint64_t>(offset));
  key = splitmix64(key ^ static_cast<uint64_t>(b));
  return splitmix64(key ^ static_cast<uint64_t>(h));
}

// Key of query row i of a plane.
inline uint64_t dropout_row_key(uint64_t plane_key, int64_t i) {
  return splitmix64(plane_key ^ static_cast<uint64_t>(i));
}

// 32 random bits of element (row, j); `lo` and `hi` are the halves of the row key.
inline uint32_t dropout_bits(uint32_t lo, uint32_t hi, uint32_t j) {
  return fmix32(fmix32(j ^ lo) + hi);
}

// Elements with dropout_bits < threshold are dropped: threshold = round(p * 2**32).
inline uint32_t dropout_threshold(double p) {
  const double t = p * 4294967296.0;
  return t >= 4294967295.0 ? 0xFFFFFFFFU : static_cast<uint32_t>(t + 0.5);
}

}  // namespace irpe_ops::cpu
