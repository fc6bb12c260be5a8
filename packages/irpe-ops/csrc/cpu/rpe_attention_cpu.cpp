// CPU kernels of irpe_ops::rpe_attention (fused iRPE attention) and its backward.
//
// Per (batch b, head h), with s = D**-0.5 and q already scaled by s:
//   logits[i, j] = q_i . k_j + QWk[i, ids[i, j]] + KWq[j, ids[j, i]] (- inf where key j is padded)
//     with QWk = q @ Wk and KWq = (s k) @ Wq, both (L, K);
//   P = softmax_j(logits), P' = P * M / (1 - p) (M: the counter-based keep mask, rpe_dropout.h);
//   out_i = sum_j P'_ij v_j + sum_c PB[i, c] Wv[c], PB[i, c] = sum_j P'_ij [ids[i, j] == c].
//
// Flash-attention style: tiles of kBlock queries x kBlock keys, an online softmax, float32
// accumulation (float64 for float64 inputs); nothing of size (L, L) per plane is ever allocated
// (only the input ids and their transpose). The (L, K) products QWk, KWq and dO @ Wv^T, and the
// (L, K) -> table reductions, are whole-tensor matmuls around the tiled loops.
//
// Backward, with Z = M / (1 - p), dP'_ij = dO_i . (v_j + Wv[ids[i, j]]) and
// Dr_i = dO_i . out_i = sum_j P'_ij dP'_ij:
//   dlogits_ij = dS_ij = P_ij (Z_ij dP'_ij - Dr_i).
// Every gradient is written by one task only (deterministic, no atomics). With enough planes for
// the threads, one task per plane walks the query-major tiles once and accumulates both sides;
// otherwise two passes, each writing only the rows it owns:
//   A, per query block (over all key blocks): dq += dS k, dQWk[i, ids[i, j]] += dS_ij,
//      PB[i, ids[i, j]] += P'_ij;
//   B, per key block (over all query blocks): dk += dS^T q, dv += P'^T dO,
//      dKWq[j, ids[j, i]] += dS_ij;
// then dq += dQWk Wk^T, dk += s dKWq Wq^T, dWk = sum q^T dQWk, dWq = s sum k^T dKWq,
// dWv = sum PB^T dO (sums over batch, and heads for a shared table, in a fixed order).
//
// A row whose keys are all padded has out = 0 and logsumexp = +inf (and zero gradients).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <optional>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define IRPE_AVX512_GATHER 1
#endif

#include "checks.h"
#include "cpu/rpe_dropout.h"

// The element-wise tile loops are compiled for AVX-512, AVX2 and the baseline, chosen at load time
// by CPU features (GCC function multi-versioning; not by "arch=" CPU models, which a virtual
// machine's generic CPU does not match): the extension itself is built for the baseline ISA.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define IRPE_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define IRPE_CLONES
#endif

namespace irpe_ops::cpu::attn {

constexpr const char* kOp = "irpe_ops.rpe_attention";
constexpr const char* kOpBackward = "irpe_ops.rpe_attention_backward";
constexpr int64_t kBlock = 64;  // queries and keys per tile

// ---------------------------------------------------------------------------------------------
// Scalar helpers
// ---------------------------------------------------------------------------------------------

// exp for float: 2**n * exp(r), n = round(x log2(e)), |r| <= ln(2)/2, degree-6 Taylor polynomial
// (relative error below 2e-7); branch-free so that it vectorises. x < -87 (and -inf) gives 0.
C10_ALWAYS_INLINE float exp_acc(float x) {
  const float xc = std::min(std::max(x, -87.0f), 88.0f);
  const float t = xc * 1.44269504088896341f + 12582912.0f;  // 1.5 * 2**23: round to integer
  const float n = t - 12582912.0f;
  const int32_t ni = std::bit_cast<int32_t>(t) - 0x4B400000;
  float r = xc - n * 0.693359375f;  // Cody-Waite: ln(2) = 0.693359375 - 2.12194440e-4
  r = r + n * 2.12194440e-4f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const float scale = std::bit_cast<float>((ni + 127) << 23);
  return x < -87.0f ? 0.0f : p * scale;
}

C10_ALWAYS_INLINE double exp_acc(double x) {
  return std::exp(x);
}

// C[m, n] (ldc) = (accumulate ? C : 0) + A[m, kd] (lda) @ B[kd, n] (ldb), all row-major.
inline void gemm(int64_t m, int64_t n, int64_t kd, const float* a, int64_t lda, const float* b,
                 int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  at::native::cpublas::brgemm(m, n, kd, lda, ldb, ldc, accumulate, a, b, c, /*is_vnni=*/false);
}

// float64 (gradcheck, tests): plain loops.
inline void gemm(int64_t m, int64_t n, int64_t kd, const double* a, int64_t lda, const double* b,
                 int64_t ldb, double* c, int64_t ldc, bool accumulate) {
  for (int64_t i = 0; i < m; ++i) {
    double* crow = c + i * ldc;
    if (!accumulate) {
      std::fill(crow, crow + n, 0.0);
    }
    for (int64_t p = 0; p < kd; ++p) {
      const double av = a[i * lda + p];
      const double* brow = b + p * ldb;
      for (int64_t j = 0; j < n; ++j) {
        crow[j] += av * brow[j];
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Tile loops. A tile has `rows` x `cols` entries, row-major with leading dimension kBlock.
// ---------------------------------------------------------------------------------------------

// The position terms of a tile: s[r, c] += row_tab[r, X[r, c]] + col_tab[c, Y[r, c]].
// Query-major tiles (rows = queries i, cols = keys j): row_tab = QWk, X = ids, col_tab = KWq,
// Y = ids^T. Key-major tiles (rows = keys, cols = queries): row_tab = KWq, X = ids,
// col_tab = QWk, Y = ids^T, X and Y taken at (j0, i0).
template <typename acc_t>
struct Terms {
  const acc_t* row_tab = nullptr;  // (rows, K) or null
  const int32_t* X = nullptr;      // (rows, cols), leading dimension ldx
  const acc_t* col_tab = nullptr;  // (cols, K) or null
  const int32_t* Y = nullptr;
  int64_t ldx = 0;
  int64_t K = 0;
};

// s[c] += a[x[c]] and s[c] += tab[c * K + y[c]]. The compiler, tuned for a generic x86-64,
// emulates these gathers with scalar loads and inserts even in the AVX-512 clones; explicit
// AVX-512 gathers (chosen at run time) are several times faster.
#ifdef IRPE_AVX512_GATHER
// The first min(n, 16) lanes of a vector.
inline __mmask16 first_lanes(int64_t n) {
  return static_cast<__mmask16>(n >= 16 ? 0xFFFFU : (1U << n) - 1U);
}

// Lane l of the result is l * stride: the offsets of 16 consecutive rows of a row-major table.
__attribute__((target("avx512f"))) inline __m512i lane_offsets(int32_t stride) {
  return _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                            _mm512_set1_epi32(stride));
}

__attribute__((target("avx512f"))) void gather_add_avx512(float* s, const float* a,
                                                          const int32_t* x, int64_t n,
                                                          int32_t stride) {
  const __m512i step = _mm512_set1_epi32(16 * stride);
  __m512i base = lane_offsets(stride);
  int64_t c = 0;
  for (; c + 16 <= n; c += 16) {
    const __m512i idx = _mm512_add_epi32(_mm512_loadu_si512(x + c), base);
    const __m512 g = _mm512_i32gather_ps(idx, a, 4);
    _mm512_storeu_ps(s + c, _mm512_add_ps(_mm512_loadu_ps(s + c), g));
    base = _mm512_add_epi32(base, step);
  }
  if (c < n) {
    const __mmask16 m = first_lanes(n - c);
    const __m512i idx = _mm512_add_epi32(_mm512_maskz_loadu_epi32(m, x + c), base);
    const __m512 g = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, idx, a, 4);
    _mm512_mask_storeu_ps(s + c, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, s + c), g));
  }
}

const bool kHaveAvx512 = __builtin_cpu_supports("avx512f");
#endif

// s[c] += a[c * stride + x[c]], c < n.
template <typename acc_t>
C10_ALWAYS_INLINE void gather_add(acc_t* __restrict s, const acc_t* __restrict a,
                                  const int32_t* __restrict x, int64_t n, int64_t stride) {
#ifdef IRPE_AVX512_GATHER
  if constexpr (std::is_same_v<acc_t, float>) {
    if (kHaveAvx512) {
      gather_add_avx512(s, a, x, n, static_cast<int32_t>(stride));
      return;
    }
  }
#endif
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) {
    s[c] += a[c * stride + x[c]];
  }
}

// Row reductions. A `#pragma omp simd reduction` loop ends in a serial scalar sum of the vector
// lanes (from the stack); the AVX-512 versions reduce the lanes with a shuffle tree.
#ifdef IRPE_AVX512_GATHER
__attribute__((target("avx512f"))) float row_max_avx512(const float* s, int64_t n) {
  __m512 m = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t c = 0; c < n; c += 16) {
    const __mmask16 k = first_lanes(n - c);
    m = _mm512_mask_max_ps(m, k, m, _mm512_maskz_loadu_ps(k, s + c));
  }
  return _mm512_reduce_max_ps(m);
}

__attribute__((target("avx512f"))) float row_sum_avx512(const float* s, int64_t n) {
  __m512 sum = _mm512_setzero_ps();
  for (int64_t c = 0; c < n; c += 16) {
    const __mmask16 k = first_lanes(n - c);
    sum = _mm512_add_ps(sum, _mm512_maskz_loadu_ps(k, s + c));
  }
  return _mm512_reduce_add_ps(sum);
}
#endif

template <typename acc_t>
C10_ALWAYS_INLINE acc_t row_max(const acc_t* __restrict s, int64_t n) {
#ifdef IRPE_AVX512_GATHER
  if constexpr (std::is_same_v<acc_t, float>) {
    if (kHaveAvx512) {
      return row_max_avx512(s, n);
    }
  }
#endif
  acc_t mx = -std::numeric_limits<acc_t>::infinity();
#pragma omp simd reduction(max : mx)
  for (int64_t c = 0; c < n; ++c) {
    mx = s[c] > mx ? s[c] : mx;
  }
  return mx;
}

template <typename acc_t>
C10_ALWAYS_INLINE acc_t row_sum(const acc_t* __restrict s, int64_t n) {
#ifdef IRPE_AVX512_GATHER
  if constexpr (std::is_same_v<acc_t, float>) {
    if (kHaveAvx512) {
      return row_sum_avx512(s, n);
    }
  }
#endif
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t c = 0; c < n; ++c) {
    sum += s[c];
  }
  return sum;
}

template <typename acc_t>
C10_ALWAYS_INLINE void add_terms_row(acc_t* __restrict s, int64_t r, int64_t cols,
                                     const Terms<acc_t>& t) {
  if (t.row_tab != nullptr) {
    gather_add(s, t.row_tab + r * t.K, t.X + r * t.ldx, cols, 0);
  }
  if (t.col_tab != nullptr) {
    gather_add(s, t.col_tab, t.Y + r * t.ldx, cols, t.K);
  }
}

// Dropout of one tile: the keep test of element (query, key) and the 1 / (1 - p) scale.
struct Dropout {
  bool on = false;
  uint32_t threshold = 0;
  double keep_scale = 1.0;
};

template <typename acc_t>
struct FwdTile {
  acc_t* s = nullptr;  // in: q k^T; out: P' (unnormalised, dropout applied)
  int64_t rows = 0;
  int64_t cols = 0;
  Terms<acc_t> terms;
  const acc_t* col_bias = nullptr;  // (cols) 0 or -inf (key padding), or null
  acc_t* m = nullptr;               // running max per row
  acc_t* l = nullptr;               // running sum per row
  acc_t* alpha = nullptr;           // out: rescale factor of the row's accumulators
  const uint32_t* key_lo = nullptr;  // dropout row keys per row
  const uint32_t* key_hi = nullptr;
  uint32_t j0 = 0;  // first key of the tile
  Dropout dropout;
};

template <typename acc_t>
C10_ALWAYS_INLINE void fwd_tile_body(const FwdTile<acc_t>& t) {
  constexpr acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  const int64_t cols = t.cols;
  for (int64_t r = 0; r < t.rows; ++r) {
    acc_t* __restrict s = t.s + r * kBlock;
    add_terms_row(s, r, cols, t.terms);
    if (t.col_bias != nullptr) {
      const acc_t* __restrict bias = t.col_bias;
#pragma omp simd
      for (int64_t c = 0; c < cols; ++c) {
        s[c] += bias[c];
      }
    }
    const acc_t m_new = std::max(t.m[r], row_max(s, cols));
    if (m_new == ninf) {  // every key so far padded
      t.alpha[r] = acc_t(1);
      std::fill(s, s + cols, acc_t(0));
      continue;
    }
    const acc_t alpha = exp_acc(t.m[r] - m_new);
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) {
      s[c] = exp_acc(s[c] - m_new);
    }
    t.alpha[r] = alpha;
    t.l[r] = t.l[r] * alpha + row_sum(s, cols);
    t.m[r] = m_new;
    if (t.dropout.on) {
      const uint32_t lo = t.key_lo[r];
      const uint32_t hi = t.key_hi[r];
      const uint32_t thr = t.dropout.threshold;
      const uint32_t j0 = t.j0;
      const acc_t scale = static_cast<acc_t>(t.dropout.keep_scale);
#pragma omp simd
      for (int64_t c = 0; c < cols; ++c) {
        const uint32_t bits = dropout_bits(lo, hi, j0 + static_cast<uint32_t>(c));
        s[c] = bits >= thr ? s[c] * scale : acc_t(0);
      }
    }
  }
}

IRPE_CLONES void fwd_tile(const FwdTile<float>& t) {
  fwd_tile_body(t);
}
void fwd_tile(const FwdTile<double>& t) {
  fwd_tile_body(t);
}

template <typename acc_t>
struct BwdTile {
  acc_t* s = nullptr;   // in: logits without position terms; out: P'
  acc_t* dp = nullptr;  // in: dO . v part of dP'; out: dS
  int64_t rows = 0;
  int64_t cols = 0;
  Terms<acc_t> terms;
  // Per query (rows of pass A, columns of pass B), from the tile's first query.
  const acc_t* lse = nullptr;
  const acc_t* dr = nullptr;
  const uint32_t* key_lo = nullptr;
  const uint32_t* key_hi = nullptr;
  const acc_t* dowv = nullptr;  // (queries, K): dO @ Wv^T, or null
  // Key padding: pass A, per column 0 / -inf (or null); pass B, per row skip flags (or null).
  const acc_t* col_bias = nullptr;
  const bool* row_skip = nullptr;
  uint32_t j0 = 0;  // first key of the tile
  Dropout dropout;
};

// Pass A: rows = queries, cols = keys.
template <typename acc_t>
C10_ALWAYS_INLINE void bwd_tile_query_major_body(const BwdTile<acc_t>& t) {
  const int64_t cols = t.cols;
  const int64_t K = t.terms.K;
  for (int64_t r = 0; r < t.rows; ++r) {
    acc_t* __restrict s = t.s + r * kBlock;
    acc_t* __restrict d = t.dp + r * kBlock;
    add_terms_row(s, r, cols, t.terms);
    if (t.col_bias != nullptr) {
      const acc_t* __restrict bias = t.col_bias;
#pragma omp simd
      for (int64_t c = 0; c < cols; ++c) {
        s[c] += bias[c];
      }
    }
    if (t.dowv != nullptr) {
      gather_add(d, t.dowv + r * K, t.terms.X + r * t.terms.ldx, cols, 0);
    }
    const acc_t lse = t.lse[r];
    const acc_t dr = t.dr[r];
    if (t.dropout.on) {
      const uint32_t lo = t.key_lo[r];
      const uint32_t hi = t.key_hi[r];
      const uint32_t thr = t.dropout.threshold;
      const uint32_t j0 = t.j0;
      const acc_t scale = static_cast<acc_t>(t.dropout.keep_scale);
#pragma omp simd
      for (int64_t c = 0; c < cols; ++c) {
        const acc_t p = exp_acc(s[c] - lse);
        const uint32_t bits = dropout_bits(lo, hi, j0 + static_cast<uint32_t>(c));
        const acc_t z = bits >= thr ? scale : acc_t(0);
        s[c] = p * z;
        d[c] = p * (z * d[c] - dr);
      }
    } else {
#pragma omp simd
      for (int64_t c = 0; c < cols; ++c) {
        const acc_t p = exp_acc(s[c] - lse);
        s[c] = p;
        d[c] = p * (d[c] - dr);
      }
    }
  }
}

// Pass B: rows = keys, cols = queries.
template <typename acc_t>
C10_ALWAYS_INLINE void bwd_tile_key_major_body(const BwdTile<acc_t>& t) {
  const int64_t cols = t.cols;
  const int64_t K = t.terms.K;
  for (int64_t r = 0; r < t.rows; ++r) {
    acc_t* __restrict s = t.s + r * kBlock;
    acc_t* __restrict d = t.dp + r * kBlock;
    if (t.row_skip != nullptr && t.row_skip[r]) {  // padded key: P = 0 for every query
      std::fill(s, s + cols, acc_t(0));
      std::fill(d, d + cols, acc_t(0));
      continue;
    }
    add_terms_row(s, r, cols, t.terms);
    if (t.dowv != nullptr) {
      gather_add(d, t.dowv, t.terms.Y + r * t.terms.ldx, cols, K);
    }
    const acc_t* __restrict lse = t.lse;
    const acc_t* __restrict dr = t.dr;
    if (t.dropout.on) {
      const uint32_t* __restrict lo = t.key_lo;
      const uint32_t* __restrict hi = t.key_hi;
      const uint32_t thr = t.dropout.threshold;
      const uint32_t j = t.j0 + static_cast<uint32_t>(r);
      const acc_t scale = static_cast<acc_t>(t.dropout.keep_scale);
#pragma omp simd
      for (int64_t c = 0; c < cols; ++c) {
        const acc_t p = exp_acc(s[c] - lse[c]);
        const uint32_t bits = dropout_bits(lo[c], hi[c], j);
        const acc_t z = bits >= thr ? scale : acc_t(0);
        s[c] = p * z;
        d[c] = p * (z * d[c] - dr[c]);
      }
    } else {
#pragma omp simd
      for (int64_t c = 0; c < cols; ++c) {
        const acc_t p = exp_acc(s[c] - lse[c]);
        s[c] = p;
        d[c] = p * (d[c] - dr[c]);
      }
    }
  }
}

IRPE_CLONES void bwd_tile_query_major(const BwdTile<float>& t) {
  bwd_tile_query_major_body(t);
}
void bwd_tile_query_major(const BwdTile<double>& t) {
  bwd_tile_query_major_body(t);
}
IRPE_CLONES void bwd_tile_key_major(const BwdTile<float>& t) {
  bwd_tile_key_major_body(t);
}
void bwd_tile_key_major(const BwdTile<double>& t) {
  bwd_tile_key_major_body(t);
}

// dst[r, X[r, c]] += src[r, c] (dst (rows, K), src leading dimension kBlock). Bucket ids come in
// runs along a row (clipped offsets), so a run is summed in a register before its one store.
template <typename acc_t>
void scatter_rows(acc_t* dst, int64_t K, const acc_t* src, const int32_t* X, int64_t ldx,
                  int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) {
    acc_t* __restrict o = dst + r * K;
    const acc_t* __restrict v = src + r * kBlock;
    const int32_t* __restrict x = X + r * ldx;
    int32_t cur = x[0];
    acc_t run = v[0];
    for (int64_t c = 1; c < cols; ++c) {
      if (x[c] == cur) {
        run += v[c];
      } else {
        o[cur] += run;
        cur = x[c];
        run = v[c];
      }
    }
    o[cur] += run;
  }
}

// dst[c, Y[r, c]] += src[r, c] (dst (cols, K), src leading dimension kBlock): the key-side
// table gradient of a query-major tile. Each column adds into its own row of dst, in the order
// of the tile's rows (queries); the lanes of a vector hit distinct rows, so the AVX-512 path's
// gather-add-scatter has no conflicts.
#ifdef IRPE_AVX512_GATHER
__attribute__((target("avx512f"))) void scatter_cols_avx512(float* dst, int32_t K,
                                                            const float* src, const int32_t* Y,
                                                            int64_t ldy, int64_t rows,
                                                            int64_t cols) {
  const __m512i lane = lane_offsets(K);
  const __m512i step = _mm512_set1_epi32(16 * K);
  for (int64_t r = 0; r < rows; ++r) {
    const float* v = src + r * kBlock;
    const int32_t* y = Y + r * ldy;
    __m512i base = lane;
    for (int64_t c = 0; c < cols; c += 16) {
      const __mmask16 m = first_lanes(cols - c);
      const __m512i idx = _mm512_add_epi32(_mm512_maskz_loadu_epi32(m, y + c), base);
      const __m512 old = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, idx, dst, 4);
      const __m512 sum = _mm512_add_ps(old, _mm512_maskz_loadu_ps(m, v + c));
      _mm512_mask_i32scatter_ps(dst, m, idx, sum, 4);
      base = _mm512_add_epi32(base, step);
    }
  }
}
#endif

template <typename acc_t>
void scatter_cols(acc_t* dst, int64_t K, const acc_t* src, const int32_t* Y, int64_t ldy,
                  int64_t rows, int64_t cols) {
#ifdef IRPE_AVX512_GATHER
  if constexpr (std::is_same_v<acc_t, float>) {
    if (kHaveAvx512) {
      scatter_cols_avx512(dst, static_cast<int32_t>(K), src, Y, ldy, rows, cols);
      return;
    }
  }
#endif
  for (int64_t r = 0; r < rows; ++r) {
    const acc_t* __restrict v = src + r * kBlock;
    const int32_t* __restrict y = Y + r * ldy;
    for (int64_t c = 0; c < cols; ++c) {
      dst[c * K + y[c]] += v[c];
    }
  }
}

// The gemm operand of a tile: the accumulation type itself, or a bfloat16 copy.
template <typename scalar_t, typename acc_t>
const scalar_t* as_operand(const acc_t* tile, scalar_t* buffer, int64_t rows, int64_t cols) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return tile;
  } else {
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = 0; c < cols; ++c) {
        buffer[r * kBlock + c] = static_cast<scalar_t>(tile[r * kBlock + c]);
      }
    }
    return buffer;
  }
}

// Dropout row keys of queries [i0, i0 + n) of a plane.
inline void row_keys(uint64_t plane_key, int64_t i0, int64_t n, uint32_t* lo, uint32_t* hi) {
  for (int64_t r = 0; r < n; ++r) {
    const uint64_t key = dropout_row_key(plane_key, i0 + r);
    lo[r] = static_cast<uint32_t>(key);
    hi[r] = static_cast<uint32_t>(key >> 32);
  }
}

// ---------------------------------------------------------------------------------------------
// Operands shared by the forward and the backward.
// ---------------------------------------------------------------------------------------------

struct Problem {
  int64_t B = 0, H = 0, L = 0, D = 0, K = 0;
  double scale = 1.0;  // s = D**-0.5
  at::ScalarType acc = at::kFloat;
  at::Tensor q, k, v;         // (B, H, L, D) contiguous, input dtype
  at::Tensor ids;             // (L, L) int32 contiguous
  at::Tensor qwk, kwq;        // (B, H, L, K) acc: q @ Wk, s k @ Wq (undefined without table)
  at::Tensor wq, wk, wv;      // tables in acc dtype (undefined when absent)
  at::Tensor mask;            // (B, L) bool contiguous or undefined
  Dropout dropout;
  int64_t seed = 0, offset = 0;
};

Problem prepare(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                const at::Tensor& ids, const std::optional<at::Tensor>& wq,
                const std::optional<at::Tensor>& wk, const std::optional<at::Tensor>& wv,
                const std::optional<at::Tensor>& key_padding_mask, double dropout_p,
                int64_t seed, int64_t offset) {
  Problem pb;
  pb.K = check_rpe_attention_args(q, k, v, ids, wq, wk, wv, key_padding_mask, dropout_p);
  TORCH_CHECK(q.device().is_cpu(), op, ": expected CPU tensors, got q on ", q.device());
  pb.B = q.size(0);
  pb.H = q.size(1);
  pb.L = q.size(2);
  pb.D = q.size(3);
  pb.scale = 1.0 / std::sqrt(static_cast<double>(pb.D));
  pb.acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  pb.q = q.contiguous();
  pb.k = k.contiguous();
  pb.v = v.contiguous();
  pb.ids = ids.contiguous();
  if (pb.K > 0) {
    check_index_range(op, pb.ids, pb.K);
  }
  if (wq.has_value()) {
    pb.wq = wq->to(pb.acc).contiguous();
    pb.kwq = pb.k.to(pb.acc).matmul(pb.wq).mul_(pb.scale).contiguous();
  }
  if (wk.has_value()) {
    pb.wk = wk->to(pb.acc).contiguous();
    pb.qwk = pb.q.to(pb.acc).matmul(pb.wk).contiguous();
  }
  if (wv.has_value()) {
    pb.wv = wv->to(pb.acc).contiguous();
  }
  if (key_padding_mask.has_value()) {
    pb.mask = key_padding_mask->contiguous();
  }
  pb.dropout.on = dropout_p > 0.0;
  pb.dropout.threshold = dropout_threshold(dropout_p);
  pb.dropout.keep_scale = 1.0 / (1.0 - dropout_p);
  pb.seed = seed;
  pb.offset = offset;
  return pb;
}

// ids^T, contiguous, where the tiles read it: for the query-side term of query-major tiles, and
// for every term of key-major ones.
at::Tensor transposed_ids(const Problem& pb, bool key_major_tiles) {
  const bool needed = pb.wq.defined() || (key_major_tiles && pb.K > 0);
  return needed ? pb.ids.t().contiguous() : at::Tensor();
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

template <typename T>
T* mut_ptr_or_null(at::Tensor& t) {
  return t.defined() ? t.mutable_data_ptr<T>() : nullptr;
}

// Sums per-plane table gradients (B, H, a, b) into a table's shape (Ht, a, b), in a fixed order.
at::Tensor reduce_table_grad(const at::Tensor& per_plane, int64_t table_heads,
                             at::ScalarType dtype) {
  at::Tensor g = per_plane.sum(0);  // (H, a, b)
  if (table_heads == 1) {
    g = g.sum(0, /*keepdim=*/true);
  }
  return g.to(dtype);
}

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor> forward_impl(const Problem& pb, const at::Tensor& q_in) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t B = pb.B, H = pb.H, L = pb.L, D = pb.D, K = pb.K;
  const auto acc_opts = pb.q.options().dtype(pb.acc);
  at::Tensor out_acc = at::zeros({B, H, L, D}, acc_opts);
  at::Tensor lse = at::empty({B, H, L}, acc_opts);
  at::Tensor pbk;  // (B, H, L, K): normalised bucket sums of P' (with Wv)
  if (pb.wv.defined()) {
    pbk = at::zeros({B, H, L, K}, acc_opts);
  }
  const at::Tensor k_t = pb.k.transpose(2, 3).contiguous();  // (B, H, D, L)

  const scalar_t* q = pb.q.const_data_ptr<scalar_t>();
  const scalar_t* v = pb.v.const_data_ptr<scalar_t>();
  const scalar_t* kt = k_t.const_data_ptr<scalar_t>();
  const int32_t* ids = pb.ids.const_data_ptr<int32_t>();
  const at::Tensor ids_t_tensor = transposed_ids(pb, /*key_major_tiles=*/false);
  const int32_t* ids_t = ptr_or_null<int32_t>(ids_t_tensor);
  const acc_t* qwk = ptr_or_null<acc_t>(pb.qwk);
  const acc_t* kwq = ptr_or_null<acc_t>(pb.kwq);
  const bool* mask = ptr_or_null<bool>(pb.mask);
  acc_t* out = out_acc.mutable_data_ptr<acc_t>();
  acc_t* lse_p = lse.mutable_data_ptr<acc_t>();
  acc_t* pbk_p = mut_ptr_or_null<acc_t>(pbk);
  const int64_t nblocks = (L + kBlock - 1) / kBlock;

  at::parallel_for(0, B * H * nblocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> s_buf(kBlock * kBlock);
    std::vector<scalar_t> p_buf(std::is_same_v<scalar_t, acc_t> ? 0 : kBlock * kBlock);
    std::vector<acc_t> m(kBlock), l(kBlock), alpha(kBlock), bias(kBlock);
    std::vector<uint32_t> key_lo(kBlock), key_hi(kBlock);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / nblocks;
      const int64_t b = bh / H;
      const int64_t i0 = (task % nblocks) * kBlock;
      const int64_t mq = std::min(kBlock, L - i0);
      const scalar_t* q_blk = q + (bh * L + i0) * D;
      acc_t* o_blk = out + (bh * L + i0) * D;
      acc_t* pb_blk = pbk_p != nullptr ? pbk_p + (bh * L + i0) * K : nullptr;
      std::fill(m.begin(), m.end(), -std::numeric_limits<acc_t>::infinity());
      std::fill(l.begin(), l.end(), acc_t(0));
      if (pb.dropout.on) {
        row_keys(dropout_plane_key(pb.seed, pb.offset, b, bh % H), i0, mq, key_lo.data(),
                 key_hi.data());
      }
      FwdTile<acc_t> tile;
      tile.s = s_buf.data();
      tile.rows = mq;
      tile.m = m.data();
      tile.l = l.data();
      tile.alpha = alpha.data();
      tile.key_lo = key_lo.data();
      tile.key_hi = key_hi.data();
      tile.dropout = pb.dropout;
      tile.terms.ldx = L;
      tile.terms.K = K;
      for (int64_t j0 = 0; j0 < L; j0 += kBlock) {
        const int64_t nk = std::min(kBlock, L - j0);
        gemm(mq, nk, D, q_blk, D, kt + bh * D * L + j0, L, s_buf.data(), kBlock, false);
        tile.cols = nk;
        tile.j0 = static_cast<uint32_t>(j0);
        tile.terms.X = ids + i0 * L + j0;
        tile.terms.Y = ids_t != nullptr ? ids_t + i0 * L + j0 : nullptr;
        tile.terms.row_tab = qwk != nullptr ? qwk + (bh * L + i0) * K : nullptr;
        tile.terms.col_tab = kwq != nullptr ? kwq + (bh * L + j0) * K : nullptr;
        tile.col_bias = nullptr;
        if (mask != nullptr) {
          const bool* mrow = mask + b * L + j0;
          for (int64_t c = 0; c < nk; ++c) {
            bias[c] = mrow[c] ? -std::numeric_limits<acc_t>::infinity() : acc_t(0);
          }
          tile.col_bias = bias.data();
        }
        fwd_tile(tile);
        for (int64_t r = 0; r < mq; ++r) {
          const acc_t a = alpha[r];
          if (a != acc_t(1)) {
            for (int64_t d = 0; d < D; ++d) {
              o_blk[r * D + d] *= a;
            }
            if (pb_blk != nullptr) {
              for (int64_t c = 0; c < K; ++c) {
                pb_blk[r * K + c] *= a;
              }
            }
          }
        }
        if (pb_blk != nullptr) {
          scatter_rows(pb_blk, K, s_buf.data(), ids + i0 * L + j0, L, mq, nk);
        }
        const scalar_t* p_op = as_operand<scalar_t>(s_buf.data(), p_buf.data(), mq, nk);
        gemm(mq, D, nk, p_op, kBlock, v + (bh * L + j0) * D, D, o_blk, D, true);
      }
      for (int64_t r = 0; r < mq; ++r) {
        const bool empty = l[r] == acc_t(0);  // every key padded: out = 0, lse = +inf
        const acc_t inv = empty ? acc_t(0) : acc_t(1) / l[r];
        for (int64_t d = 0; d < D; ++d) {
          o_blk[r * D + d] *= inv;
        }
        if (pb_blk != nullptr) {
          for (int64_t c = 0; c < K; ++c) {
            pb_blk[r * K + c] *= inv;
          }
        }
        lse_p[bh * L + i0 + r] =
            empty ? std::numeric_limits<acc_t>::infinity() : m[r] + std::log(l[r]);
      }
    }
  });
  if (pbk.defined()) {
    out_acc.add_(pbk.matmul(pb.wv));
  }
  return {out_acc.to(q_in.scalar_type()), lse};
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

// Whether the backward runs one task per plane, where each dS tile is computed once and feeds
// both the query side (dq, dQWk) and the key side (dk, dv, dKWq), or two passes over
// (plane, block) tasks, which compute each tile twice but give B * H * L / kBlock tasks to share
// among threads. Two passes cost about 1.3x the work of one per plane (DETR encoder size, 2-core
// Intel Xeon: 69 against 52 ms forward + backward), so one task per plane wins unless rounding
// the planes up to whole rounds of threads idles more than that: ceil(P / T) <= 1.3 P / T.
// IRPE_OPS_ATTENTION_BACKWARD=per_plane|two_pass forces one (tests, benchmarks).
inline bool backward_per_plane(int64_t planes) {
  const char* env = std::getenv("IRPE_OPS_ATTENTION_BACKWARD");
  if (env != nullptr && *env != '\0') {
    const std::string_view choice(env);
    TORCH_CHECK(choice == "per_plane" || choice == "two_pass",
                "irpe_ops: IRPE_OPS_ATTENTION_BACKWARD must be 'per_plane' or 'two_pass', got '",
                env, "'");
    return choice == "per_plane";
  }
  const auto threads = static_cast<int64_t>(at::get_num_threads());
  const int64_t rounds = (planes + threads - 1) / threads;
  return rounds * threads * 10 <= planes * 13;
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_impl(
    const Problem& pb, const at::Tensor& grad_out, const at::Tensor& out,
    const at::Tensor& logsumexp, const at::Tensor& q_in, const std::optional<at::Tensor>& wq_in,
    const std::optional<at::Tensor>& wk_in, const std::optional<at::Tensor>& wv_in) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t B = pb.B, H = pb.H, L = pb.L, D = pb.D, K = pb.K;
  const auto acc_opts = pb.q.options().dtype(pb.acc);
  const at::ScalarType dtype = q_in.scalar_type();
  const at::Tensor dout =
      grad_out.to(dtype).to(c10::CppTypeToScalarType<scalar_t>::value).contiguous();
  const at::Tensor lse = logsumexp.to(pb.acc).contiguous();
  const at::Tensor dout_acc = dout.to(pb.acc);
  const at::Tensor dr = dout_acc.mul(out.to(pb.acc)).sum(-1).contiguous();  // (B, H, L)
  at::Tensor dowv;
  if (pb.wv.defined()) {
    dowv = dout_acc.matmul(pb.wv.transpose(1, 2)).contiguous();  // (B, H, L, K)
  }
  const at::Tensor k_t = pb.k.transpose(2, 3).contiguous();  // (B, H, D, L)
  const at::Tensor v_t = pb.v.transpose(2, 3).contiguous();
  const at::Tensor q_t = pb.q.transpose(2, 3).contiguous();
  const at::Tensor dout_t = dout.transpose(2, 3).contiguous();

  const bool per_plane = backward_per_plane(B * H);
  at::Tensor dq = at::zeros({B, H, L, D}, acc_opts);
  // dk and dv, accumulated transposed ((B, H, D, L)) by the per-plane schedule.
  const auto zeros_if = [&](bool wanted, at::IntArrayRef shape) {
    return wanted ? at::zeros(shape, acc_opts) : at::Tensor();
  };
  at::Tensor dk = zeros_if(!per_plane, {B, H, L, D});
  at::Tensor dv = zeros_if(!per_plane, {B, H, L, D});
  at::Tensor dk_t = zeros_if(per_plane, {B, H, D, L});
  at::Tensor dv_t = zeros_if(per_plane, {B, H, D, L});
  at::Tensor dqwk, dkwq, pbk;
  if (pb.wk.defined()) {
    dqwk = at::zeros({B, H, L, K}, acc_opts);
  }
  if (pb.wq.defined()) {
    dkwq = at::zeros({B, H, L, K}, acc_opts);
  }
  if (pb.wv.defined()) {
    pbk = at::zeros({B, H, L, K}, acc_opts);
  }

  const scalar_t* q = pb.q.const_data_ptr<scalar_t>();
  const scalar_t* k = pb.k.const_data_ptr<scalar_t>();
  const scalar_t* v = pb.v.const_data_ptr<scalar_t>();
  const scalar_t* go = dout.const_data_ptr<scalar_t>();
  const scalar_t* qt = q_t.const_data_ptr<scalar_t>();
  const scalar_t* kt = k_t.const_data_ptr<scalar_t>();
  const scalar_t* vt = v_t.const_data_ptr<scalar_t>();
  const scalar_t* got = dout_t.const_data_ptr<scalar_t>();
  const int32_t* ids = pb.ids.const_data_ptr<int32_t>();
  const at::Tensor ids_t_tensor = transposed_ids(pb, /*key_major_tiles=*/!per_plane);
  const int32_t* ids_t = ptr_or_null<int32_t>(ids_t_tensor);
  const acc_t* qwk = ptr_or_null<acc_t>(pb.qwk);
  const acc_t* kwq = ptr_or_null<acc_t>(pb.kwq);
  const acc_t* dowv_p = ptr_or_null<acc_t>(dowv);
  const bool* mask = ptr_or_null<bool>(pb.mask);
  const acc_t* lse_p = lse.const_data_ptr<acc_t>();
  const acc_t* dr_p = dr.const_data_ptr<acc_t>();
  acc_t* dq_p = dq.mutable_data_ptr<acc_t>();
  acc_t* dk_p = mut_ptr_or_null<acc_t>(dk);
  acc_t* dv_p = mut_ptr_or_null<acc_t>(dv);
  acc_t* dkt_p = mut_ptr_or_null<acc_t>(dk_t);
  acc_t* dvt_p = mut_ptr_or_null<acc_t>(dv_t);
  acc_t* dqwk_p = mut_ptr_or_null<acc_t>(dqwk);
  acc_t* dkwq_p = mut_ptr_or_null<acc_t>(dkwq);
  acc_t* pbk_p = mut_ptr_or_null<acc_t>(pbk);
  const int64_t nblocks = (L + kBlock - 1) / kBlock;
  constexpr bool kConvert = !std::is_same_v<scalar_t, acc_t>;

  // The query-major tiles of one (plane, query block), over every key block: dq, dQWk and PB
  // of the block's rows; with `key_side`, also dk, dv and dKWq of every key (the caller owns
  // the whole plane then).
  struct QueryBlockBuffers {
    std::vector<acc_t> s, d, bias;
    std::vector<scalar_t> op;
    std::vector<uint32_t> key_lo, key_hi;
    QueryBlockBuffers()
        : s(kBlock * kBlock), d(kBlock * kBlock), bias(kBlock), op(kBlock * kBlock),
          key_lo(kBlock), key_hi(kBlock) {}
  };
  const auto query_block = [&](int64_t bh, int64_t i0, QueryBlockBuffers& buf, bool key_side) {
    const int64_t b = bh / H;
    const int64_t mq = std::min(kBlock, L - i0);
    const scalar_t* q_blk = q + (bh * L + i0) * D;
    const scalar_t* go_blk = go + (bh * L + i0) * D;
    acc_t* dq_blk = dq_p + (bh * L + i0) * D;
    acc_t* dqwk_blk = dqwk_p != nullptr ? dqwk_p + (bh * L + i0) * K : nullptr;
    acc_t* pb_blk = pbk_p != nullptr ? pbk_p + (bh * L + i0) * K : nullptr;
    if (pb.dropout.on) {
      row_keys(dropout_plane_key(pb.seed, pb.offset, b, bh % H), i0, mq, buf.key_lo.data(),
               buf.key_hi.data());
    }
    BwdTile<acc_t> tile;
    tile.s = buf.s.data();
    tile.dp = buf.d.data();
    tile.rows = mq;
    tile.lse = lse_p + bh * L + i0;
    tile.dr = dr_p + bh * L + i0;
    tile.key_lo = buf.key_lo.data();
    tile.key_hi = buf.key_hi.data();
    tile.dowv = dowv_p != nullptr ? dowv_p + (bh * L + i0) * K : nullptr;
    tile.dropout = pb.dropout;
    tile.terms.ldx = L;
    tile.terms.K = K;
    tile.terms.row_tab = qwk != nullptr ? qwk + (bh * L + i0) * K : nullptr;
    for (int64_t j0 = 0; j0 < L; j0 += kBlock) {
      const int64_t nk = std::min(kBlock, L - j0);
      gemm(mq, nk, D, q_blk, D, kt + bh * D * L + j0, L, buf.s.data(), kBlock, false);
      gemm(mq, nk, D, go_blk, D, vt + bh * D * L + j0, L, buf.d.data(), kBlock, false);
      tile.cols = nk;
      tile.j0 = static_cast<uint32_t>(j0);
      tile.terms.X = ids + i0 * L + j0;
      tile.terms.Y = ids_t != nullptr ? ids_t + i0 * L + j0 : nullptr;
      tile.terms.col_tab = kwq != nullptr ? kwq + (bh * L + j0) * K : nullptr;
      tile.col_bias = nullptr;
      if (mask != nullptr) {
        const bool* mrow = mask + b * L + j0;
        for (int64_t c = 0; c < nk; ++c) {
          buf.bias[c] = mrow[c] ? -std::numeric_limits<acc_t>::infinity() : acc_t(0);
        }
        tile.col_bias = buf.bias.data();
      }
      bwd_tile_query_major(tile);
      if (dqwk_blk != nullptr) {
        scatter_rows(dqwk_blk, K, buf.d.data(), ids + i0 * L + j0, L, mq, nk);
      }
      if (pb_blk != nullptr) {
        scatter_rows(pb_blk, K, buf.s.data(), ids + i0 * L + j0, L, mq, nk);
      }
      const scalar_t* ds_op = as_operand<scalar_t>(buf.d.data(), buf.op.data(), mq, nk);
      gemm(mq, D, nk, ds_op, kBlock, k + (bh * L + j0) * D, D, dq_blk, D, true);
      if (key_side) {
        if (dkwq_p != nullptr) {
          scatter_cols(dkwq_p + (bh * L + j0) * K, K, buf.d.data(), ids_t + i0 * L + j0, L, mq,
                       nk);
        }
        // dk^T += q^T dS and dv^T += dO^T P', on the transposed inputs and accumulators, so
        // that the tiles are used as they are (no per-tile transposes).
        gemm(D, nk, mq, qt + bh * D * L + i0, L, ds_op, kBlock, dkt_p + bh * D * L + j0, L, true);
        const scalar_t* p_op = as_operand<scalar_t>(buf.s.data(), buf.op.data(), mq, nk);
        gemm(D, nk, mq, got + bh * D * L + i0, L, p_op, kBlock, dvt_p + bh * D * L + j0, L, true);
      }
    }
  };

  if (per_plane) {
    // One task per plane: each dS tile is computed once and feeds both sides.
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      QueryBlockBuffers buf;
      for (int64_t bh = begin; bh < end; ++bh) {
        for (int64_t i0 = 0; i0 < L; i0 += kBlock) {
          query_block(bh, i0, buf, /*key_side=*/true);
        }
      }
    });
    dk = dk_t.transpose(2, 3).contiguous();
    dv = dv_t.transpose(2, 3).contiguous();
  } else {
    // Few planes for the threads: two passes over finer tasks, each owning the rows it writes.
    // Pass A: one task per (plane, query block), over every key block.
    at::parallel_for(0, B * H * nblocks, 1, [&](int64_t begin, int64_t end) {
      QueryBlockBuffers buf;
      for (int64_t task = begin; task < end; ++task) {
        query_block(task / nblocks, (task % nblocks) * kBlock, buf, /*key_side=*/false);
      }
    });
    // Pass B: one task per (plane, key block), over every query block.
    at::parallel_for(0, B * H * nblocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> s_buf(kBlock * kBlock), d_buf(kBlock * kBlock);
      std::vector<scalar_t> op_buf(kConvert ? kBlock * kBlock : 0);
      std::vector<uint32_t> key_lo(kBlock), key_hi(kBlock);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t bh = task / nblocks;
        const int64_t b = bh / H;
        const int64_t j0 = (task % nblocks) * kBlock;
        const int64_t nk = std::min(kBlock, L - j0);
        const scalar_t* k_blk = k + (bh * L + j0) * D;
        const scalar_t* v_blk = v + (bh * L + j0) * D;
        acc_t* dk_blk = dk_p + (bh * L + j0) * D;
        acc_t* dv_blk = dv_p + (bh * L + j0) * D;
        acc_t* dkwq_blk = dkwq_p != nullptr ? dkwq_p + (bh * L + j0) * K : nullptr;
        const uint64_t plane_key =
            pb.dropout.on ? dropout_plane_key(pb.seed, pb.offset, b, bh % H) : 0;
        BwdTile<acc_t> tile;
        tile.s = s_buf.data();
        tile.dp = d_buf.data();
        tile.rows = nk;
        tile.key_lo = key_lo.data();
        tile.key_hi = key_hi.data();
        tile.dropout = pb.dropout;
        tile.row_skip = mask != nullptr ? mask + b * L + j0 : nullptr;
        tile.j0 = static_cast<uint32_t>(j0);
        tile.terms.ldx = L;
        tile.terms.K = K;
        tile.terms.row_tab = kwq != nullptr ? kwq + (bh * L + j0) * K : nullptr;
        for (int64_t i0 = 0; i0 < L; i0 += kBlock) {
          const int64_t mq = std::min(kBlock, L - i0);
          gemm(nk, mq, D, k_blk, D, qt + bh * D * L + i0, L, s_buf.data(), kBlock, false);
          gemm(nk, mq, D, v_blk, D, got + bh * D * L + i0, L, d_buf.data(), kBlock, false);
          if (pb.dropout.on) {
            row_keys(plane_key, i0, mq, key_lo.data(), key_hi.data());
          }
          tile.cols = mq;
          tile.lse = lse_p + bh * L + i0;
          tile.dr = dr_p + bh * L + i0;
          tile.dowv = dowv_p != nullptr ? dowv_p + (bh * L + i0) * K : nullptr;
          tile.terms.X = ids + j0 * L + i0;
          tile.terms.Y = ids_t != nullptr ? ids_t + j0 * L + i0 : nullptr;
          tile.terms.col_tab = qwk != nullptr ? qwk + (bh * L + i0) * K : nullptr;
          bwd_tile_key_major(tile);
          if (dkwq_blk != nullptr) {
            scatter_rows(dkwq_blk, K, d_buf.data(), ids + j0 * L + i0, L, nk, mq);
          }
          const scalar_t* ds_op = as_operand<scalar_t>(d_buf.data(), op_buf.data(), nk, mq);
          gemm(nk, D, mq, ds_op, kBlock, q + (bh * L + i0) * D, D, dk_blk, D, true);
          const scalar_t* p_op = as_operand<scalar_t>(s_buf.data(), op_buf.data(), nk, mq);
          gemm(nk, D, mq, p_op, kBlock, go + (bh * L + i0) * D, D, dv_blk, D, true);
        }
      }
    });
  }

  at::Tensor dwq, dwk, dwv;
  const auto empty_grad = [&]() { return at::empty({0}, q_in.options()); };
  if (pb.wk.defined()) {
    dq.add_(dqwk.matmul(pb.wk.transpose(1, 2)));
    dwk = reduce_table_grad(pb.q.to(pb.acc).transpose(2, 3).matmul(dqwk), wk_in->size(0), dtype);
  } else {
    dwk = empty_grad();
  }
  if (pb.wq.defined()) {
    dk.add_(dkwq.matmul(pb.wq.transpose(1, 2)), pb.scale);
    dwq = reduce_table_grad(pb.k.to(pb.acc).transpose(2, 3).matmul(dkwq).mul_(pb.scale),
                            wq_in->size(0), dtype);
  } else {
    dwq = empty_grad();
  }
  if (pb.wv.defined()) {
    dwv = reduce_table_grad(pbk.transpose(2, 3).matmul(dout_acc), wv_in->size(0), dtype);
  } else {
    dwv = empty_grad();
  }
  return {dq.to(dtype), dk.to(dtype), dv.to(dtype), dwq, dwk, dwv};
}

// ---------------------------------------------------------------------------------------------
// Operator entry points
// ---------------------------------------------------------------------------------------------

// bfloat16 inputs run the float32 kernels on float32 copies of q, k and v (exact conversions):
// the tile loops work in float32 either way, and the float32 tile gemms are faster than the
// bfloat16 ones at these tile sizes (no per-tile operand conversions). Results are rounded to
// bfloat16 at the end.
Problem as_float(Problem pb) {
  pb.q = pb.q.to(at::kFloat);
  pb.k = pb.k.to(at::kFloat);
  pb.v = pb.v.to(at::kFloat);
  return pb;
}

std::tuple<at::Tensor, at::Tensor> rpe_attention_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& ids,
    const std::optional<at::Tensor>& wq, const std::optional<at::Tensor>& wk,
    const std::optional<at::Tensor>& wv, const std::optional<at::Tensor>& key_padding_mask,
    double dropout_p, int64_t seed, int64_t offset) {
  // The kernel's own ATen calls (table products, casts) must run in the dtypes it chose, not
  // in whatever an enclosing torch.autocast region would cast them to.
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const Problem pb =
      prepare(kOp, q, k, v, ids, wq, wk, wv, key_padding_mask, dropout_p, seed, offset);
  if (q.numel() == 0) {
    const auto acc_opts = q.options().dtype(pb.acc);
    return {at::empty(q.sizes(), q.options()), at::empty({pb.B, pb.H, pb.L}, acc_opts)};
  }
  switch (q.scalar_type()) {
    case at::kFloat:
      return forward_impl<float>(pb, q);
    case at::kBFloat16:
      return forward_impl<float>(as_float(pb), q);
    case at::kDouble:
      return forward_impl<double>(pb, q);
    default:
      TORCH_CHECK(false, kOp, ": unsupported dtype ", q.scalar_type());
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
rpe_attention_backward_cpu(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                           const at::Tensor& v, const at::Tensor& ids,
                           const std::optional<at::Tensor>& wq,
                           const std::optional<at::Tensor>& wk,
                           const std::optional<at::Tensor>& wv,
                           const std::optional<at::Tensor>& key_padding_mask,
                           const at::Tensor& out, const at::Tensor& logsumexp, double dropout_p,
                           int64_t seed, int64_t offset) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);  // as forward
  const Problem pb =
      prepare(kOpBackward, q, k, v, ids, wq, wk, wv, key_padding_mask, dropout_p, seed, offset);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(), kOpBackward,
              ": grad_out and out must have q's shape ", q.sizes(), ", got ", grad_out.sizes(),
              " and ", out.sizes());
  TORCH_CHECK(logsumexp.dim() == 3 && logsumexp.size(0) == pb.B && logsumexp.size(1) == pb.H &&
                  logsumexp.size(2) == pb.L,
              kOpBackward, ": logsumexp must be (B, H, L), got ", logsumexp.sizes());
  if (q.numel() == 0) {
    const auto empty_or = [&](const std::optional<at::Tensor>& w) {
      return w.has_value() ? at::zeros(w->sizes(), q.options()) : at::empty({0}, q.options());
    };
    return {at::zeros(q.sizes(), q.options()), at::zeros(q.sizes(), q.options()),
            at::zeros(q.sizes(), q.options()), empty_or(wq), empty_or(wk), empty_or(wv)};
  }
  switch (q.scalar_type()) {
    case at::kFloat:
      return backward_impl<float>(pb, grad_out, out, logsumexp, q, wq, wk, wv);
    case at::kBFloat16:
      return backward_impl<float>(as_float(pb), grad_out, out, logsumexp, q, wq, wk, wv);
    case at::kDouble:
      return backward_impl<double>(pb, grad_out, out, logsumexp, q, wq, wk, wv);
    default:
      TORCH_CHECK(false, kOpBackward, ": unsupported dtype ", q.scalar_type());
  }
}

at::Tensor keep_mask_cpu(const at::Tensor& q, double dropout_p, int64_t seed, int64_t offset) {
  constexpr const char* op = "irpe_ops._rpe_attention_keep_mask";
  TORCH_CHECK(q.dim() == 4, op, ": q must be 4-D (B, H, L, D), got shape ", q.sizes());
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1), got ",
              dropout_p);
  const int64_t B = q.size(0);
  const int64_t H = q.size(1);
  const int64_t L = q.size(2);
  at::Tensor mask = at::empty({B, H, L, L}, q.options().dtype(at::kBool));
  bool* m = mask.mutable_data_ptr<bool>();
  const uint32_t thr = dropout_threshold(dropout_p);
  at::parallel_for(0, B * H * L, 64, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t bh = row / L;
      const uint64_t key = dropout_row_key(dropout_plane_key(seed, offset, bh / H, bh % H), row % L);
      const auto lo = static_cast<uint32_t>(key);
      const auto hi = static_cast<uint32_t>(key >> 32);
      for (int64_t j = 0; j < L; ++j) {
        m[row * L + j] = dropout_bits(lo, hi, static_cast<uint32_t>(j)) >= thr;
      }
    }
  });
  return mask;
}

}  // namespace irpe_ops::cpu::attn

TORCH_LIBRARY_IMPL(irpe_ops, CPU, m) {
  m.impl("rpe_attention", &irpe_ops::cpu::attn::rpe_attention_cpu);
  m.impl("rpe_attention_backward", &irpe_ops::cpu::attn::rpe_attention_backward_cpu);
  m.impl("_rpe_attention_keep_mask", &irpe_ops::cpu::attn::keep_mask_cpu);
}
