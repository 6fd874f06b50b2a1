// CSR sparse linear kernel (CPU). Algorithms and contract: csr_kernel.h.
#include "sparse/csr_kernel.h"
#include "sparse/csr_packed_kernel.h"

#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define PYSERVE_X86 1
#else
#define PYSERVE_X86 0
#endif

#if PYSERVE_X86 && defined(__GNUC__)
#define PYSERVE_HAVE_AVX2_PATH 1
#define PYSERVE_AVX2_TARGET __attribute__((target("avx2,fma")))
#else
#define PYSERVE_HAVE_AVX2_PATH 0
#endif

namespace pyserve {
namespace sparse {

namespace {

constexpr int64_t kLanes = 8;       // floats per AVX2 register; xt rows are padded to this
constexpr int64_t kMaxVectors = 8;  // batch columns per pass = kLanes * kMaxVectors = 64
constexpr int64_t kRowChunk = 16;   // output rows per OpenMP work item
constexpr int64_t kCheckNonzeros = 2048;  // B == 1: nonzeros per validate-then-compute chunk (8 KB of int32 indices)
constexpr int64_t kNoBad = std::numeric_limits<int64_t>::max();
constexpr int64_t kMinParallelWork = int64_t{1} << 18;  // multiply-adds; ~100 us on one core

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// True when the column indices of nonzeros [b, e) are strictly increasing and inside [0, K).
// Branch-free so that it vectorises; inlined into each caller, so the AVX2 callers get AVX2 code.
// Strictly increasing means the two ends bound every index.
template <typename Index>
__attribute__((always_inline)) inline bool row_ok(const Index* indices, int64_t b, int64_t e, int64_t K) {
  if (b == e) return true;
  int descents = 0;
  for (int64_t j = b + 1; j < e; ++j) descents |= indices[j] <= indices[j - 1];
  return !descents && indices[b] >= 0 && static_cast<int64_t>(indices[e - 1]) < K;
}

// First offending position in a row that failed row_ok.
template <typename Index>
int64_t first_bad_in_row(const Index* indices, int64_t b, int64_t e, int64_t K) {
  for (int64_t j = b; j < e; ++j)
    if (indices[j] < 0 || indices[j] >= K || (j > b && indices[j] <= indices[j - 1])) return j;
  return b;  // unreachable for a row that failed row_ok
}

// True when every row in [n0, n1) passes row_ok, tested in one branch-free pass over the chunk's
// nonzeros (short rows make per-row loops mostly prologue): no index outside [0, K), and every
// descent idx[j] <= idx[j-1] sits on a row boundary.
template <typename Index>
__attribute__((always_inline)) inline bool chunk_ok(const int64_t* indptr, const Index* indices, int64_t K,
                                                    int64_t n0, int64_t n1) {
  const int64_t b = indptr[n0], e = indptr[n1];
  if (b == e) return true;
  if (e - b > INT32_MAX) return false;  // the 32-bit count below could overflow: check row by row
  constexpr int64_t kMax = std::numeric_limits<Index>::max();
  const Index hi = static_cast<Index>(K > kMax ? kMax : K - 1);  // K >= 1 here: a nonzero exists
  // 32-bit lanes (no widening to 64 bits), so 8 int32 indices per AVX2 compare.
  int32_t descents = 0, outside = 0;
  for (int64_t j = b; j < e; ++j) outside |= (indices[j] < 0) | (indices[j] > hi);
  for (int64_t j = b + 1; j < e; ++j) descents += indices[j] <= indices[j - 1];
  if (outside) return false;
  for (int64_t n = n0 + 1; n < n1; ++n) {
    const int64_t j = indptr[n];
    if (j != indptr[n - 1] && j > b && j < e) descents -= indices[j] <= indices[j - 1];
  }
  return descents == 0;
}

// Validates rows [n0, n1) (at most kRowChunk); ok[r] says whether row n0 + r may be computed.
template <typename Index>
__attribute__((always_inline)) inline int64_t check_rows(const int64_t* indptr, const Index* indices, int64_t K,
                                                         int64_t n0, int64_t n1, bool* ok) {
  if (chunk_ok(indptr, indices, K, n0, n1)) {
    for (int64_t n = n0; n < n1; ++n) ok[n - n0] = true;
    return kNoBad;
  }
  int64_t bad = kNoBad;
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t b = indptr[n], e = indptr[n + 1];
    ok[n - n0] = row_ok(indices, b, e, K);
    if (!ok[n - n0]) bad = std::min(bad, first_bad_in_row(indices, b, e, K));
  }
  return bad;
}

// Number of neighbour pairs (j - 1, j) inside the nonzeros [indptr[n0], indptr[n1]) that straddle
// a row boundary (j = indptr[n] for n0 < n < n1) with idx[j] <= idx[j - 1]; each position once.
template <typename Index>
int64_t boundary_nonincreasing(const int64_t* indptr, int64_t n0, int64_t n1, const Index* ix) {
  const int64_t b = indptr[n0], e = indptr[n1];
  int64_t count = 0;
  for (int64_t n = n0 + 1; n < n1; ++n) {
    const int64_t j = indptr[n];
    if (j > b && j < e && j != indptr[n - 1]) count += ix[j] <= ix[j - 1];
  }
  return count;
}

// True when the column indices of rows [n0, n1) are in [0, K) and strictly increasing within each
// row, in one branch-free pass over the rows' nonzeros: no index outside [0, K), and the
// non-increasing neighbour pairs (idx[j] <= idx[j-1]) are exactly those that straddle a row
// boundary. The B == 1 kernel runs it on chunks of rows holding ~kCheckNonzeros nonzeros, just
// before computing them (the indices are then in L1 for the SpMV); the per-16-row check that B > 1
// uses cost more than the SpMV itself for short rows (benchmarks/native/csr_spmv.cpp). A false
// answer is followed by the exact (slower) search of csr_first_bad_index for the error message.
template <typename Index>
bool rows_ok_portable(const int64_t* indptr, int64_t n0, int64_t n1, const Index* ix, int64_t K) {
  const int64_t b = indptr[n0], e = indptr[n1];
  if (b == e) return true;
  int64_t outside = 0, nonincreasing = 0;
  for (int64_t j = b; j < e; ++j) outside |= (ix[j] < 0) | (static_cast<int64_t>(ix[j]) >= K);
  for (int64_t j = b + 1; j < e; ++j) nonincreasing += ix[j] <= ix[j - 1];
  if (outside) return false;
  return nonincreasing == boundary_nonincreasing(indptr, n0, n1, ix);
}

// ---- portable fallback ---------------------------------------------------------------------

template <typename Index>
int64_t spmv_rows_portable(const float* x, int64_t K, const int64_t* indptr, const Index* indices,
                           const float* values, const float* bias, int64_t n0, int64_t n1, float* y) {
  (void)K;  // indices were validated for the whole matrix before the kernel (csr_linear_cpu)
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t b = indptr[n], e = indptr[n + 1];
    float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
    int64_t j = b;
    for (; j + 4 <= e; j += 4) {
      s0 += values[j] * x[indices[j]];
      s1 += values[j + 1] * x[indices[j + 1]];
      s2 += values[j + 2] * x[indices[j + 2]];
      s3 += values[j + 3] * x[indices[j + 3]];
    }
    for (; j < e; ++j) s0 += values[j] * x[indices[j]];
    y[n] = (s0 + s1) + (s2 + s3) + (bias ? bias[n] : 0.f);
  }
  return kNoBad;
}

// tile [rows][kTileCols] (row r = output row n0 + r, columns = batch c0..c0+cols) -> y [B, N]:
// each batch row receives `rows` contiguous floats, so stores stay sequential (writing y column by
// column would put every store of a row in the same L1 set: the stride N*4 is a multiple of 4 KiB
// for N = 1024, 3072, ...).
constexpr int64_t kTileCols = kLanes * kMaxVectors;
inline void store_tile(const float (*tile)[kTileCols], int64_t rows, int64_t cols, int64_t c0, int64_t N, int64_t n0,
                       float* y) {
  for (int64_t c = 0; c < cols; ++c) {
    float* dst = y + (c0 + c) * N + n0;
    for (int64_t r = 0; r < rows; ++r) dst[r] = tile[r][c];
  }
}

// xt [K, Bp]; writes y[b, n] for b < B and n in [n0, n1).
template <typename Index>
int64_t spmm_rows_portable(const float* xt, int64_t K, int64_t B, int64_t Bp, const int64_t* indptr,
                           const Index* indices, const float* values, const float* bias, int64_t N, int64_t n0,
                           int64_t n1, float* y) {
  bool ok[kRowChunk];
  const int64_t bad = check_rows(indptr, indices, K, n0, n1, ok);
  alignas(32) float tile[kRowChunk][kTileCols];
  for (int64_t c0 = 0; c0 < B; c0 += kTileCols) {
    const int64_t width = std::min<int64_t>(Bp - c0, kTileCols);
    for (int64_t n = n0; n < n1; ++n) {
      float* acc = tile[n - n0];
      const float bn = bias ? bias[n] : 0.f;
      std::fill(acc, acc + width, bn);
      if (!ok[n - n0]) continue;
      for (int64_t j = indptr[n], e = indptr[n + 1]; j < e; ++j) {
        const float w = values[j];
        const float* row = xt + static_cast<int64_t>(indices[j]) * Bp + c0;
        for (int64_t c = 0; c < width; ++c) acc[c] += w * row[c];
      }
    }
    store_tile(tile, n1 - n0, std::min<int64_t>(B - c0, width), c0, N, n0, y);
  }
  return bad;
}

// ---- AVX2 + FMA ----------------------------------------------------------------------------
#if PYSERVE_HAVE_AVX2_PATH

PYSERVE_AVX2_TARGET inline float hsum256(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

// rows_ok_portable for int32 indices, 8 per step: the largest index as unsigned (a negative one
// is larger than any K) and a count of increasing neighbour pairs (each lane counts at most
// (e - b) / 8 + 1 pairs: no overflow below 2**33 nonzeros).
PYSERVE_AVX2_TARGET bool rows_ok_avx2(const int64_t* indptr, int64_t n0, int64_t n1, const int32_t* ix, int64_t K) {
  const int64_t b = indptr[n0], e = indptr[n1];
  if (b == e) return true;
  if (e - b >= (int64_t{1} << 33) || K > INT32_MAX) return rows_ok_portable(indptr, n0, n1, ix, K);
  __m256i vmax = _mm256_set1_epi32(ix[b]), inc = _mm256_setzero_si256();
  int64_t j = b + 1;
  for (; j + 8 <= e; j += 8) {
    const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ix + j));
    const __m256i p = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ix + j - 1));
    vmax = _mm256_max_epu32(vmax, a);
    inc = _mm256_sub_epi32(inc, _mm256_cmpgt_epi32(a, p));
  }
  alignas(32) uint32_t mx[8];
  alignas(32) int32_t ic[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(mx), vmax);
  _mm256_store_si256(reinterpret_cast<__m256i*>(ic), inc);
  uint64_t hi = 0;
  int64_t increasing = 0;
  for (int i = 0; i < 8; ++i) {
    hi = std::max<uint64_t>(hi, mx[i]);
    increasing += static_cast<uint32_t>(ic[i]);
  }
  for (; j < e; ++j) {
    hi = std::max<uint64_t>(hi, static_cast<uint32_t>(ix[j]));
    increasing += ix[j] > ix[j - 1];
  }
  if (hi >= static_cast<uint64_t>(K)) return false;  // negative indices too: as uint32 they are >= 2**31 > K
  return (e - b - 1) - increasing == boundary_nonincreasing(indptr, n0, n1, ix);
}

PYSERVE_AVX2_TARGET inline __m256 gather8(const float* x, const int32_t* idx) {
  return _mm256_i32gather_ps(x, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx)), 4);
}
PYSERVE_AVX2_TARGET inline __m256 gather8(const float* x, const int64_t* idx) {
  const __m128 lo = _mm256_i64gather_ps(x, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx)), 4);
  const __m128 hi = _mm256_i64gather_ps(x, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx + 4)), 4);
  return _mm256_insertf128_ps(_mm256_castps128_ps256(lo), hi, 1);
}

// values[j:j+rem] * x[indices[j:j+rem]] for rem in 1..7, zero in the other lanes; masked loads and
// gathers never touch the lanes past rem.
PYSERVE_AVX2_TARGET inline __m256 tail_product(const float* x, const int32_t* indices, const float* values, int64_t j,
                                               int64_t rem) {
  const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(rem)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  const __m256 v = _mm256_maskload_ps(values + j, mask);
  const __m256i idx = _mm256_maskload_epi32(indices + j, mask);
  const __m256 g = _mm256_mask_i32gather_ps(_mm256_setzero_ps(), x, idx, _mm256_castsi256_ps(mask), 4);
  return _mm256_mul_ps(v, g);
}
PYSERVE_AVX2_TARGET inline __m256 tail_product(const float* x, const int64_t* indices, const float* values, int64_t j,
                                               int64_t rem) {
  alignas(32) float p[kLanes] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  for (int64_t r = 0; r < rem; ++r) p[r] = values[j + r] * x[indices[j + r]];
  return _mm256_load_ps(p);
}

template <typename Index>
PYSERVE_AVX2_TARGET int64_t spmv_rows_avx2(const float* x, int64_t K, const int64_t* indptr, const Index* indices,
                                           const float* values, const float* bias, int64_t n0, int64_t n1, float* y) {
  (void)K;  // indices were validated for the whole matrix before the kernel (csr_linear_cpu)
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t b = indptr[n], e = indptr[n + 1];
    if (e - b < 16) {  // short rows (>= 99% sparsity): scalar loads beat gathers and masked tails
      float s0 = 0.f, s1 = 0.f;
      int64_t j = b;
      for (; j + 2 <= e; j += 2) {
        s0 = std::fma(values[j], x[indices[j]], s0);
        s1 = std::fma(values[j + 1], x[indices[j + 1]], s1);
      }
      if (j < e) s0 = std::fma(values[j], x[indices[j]], s0);
      y[n] = (s0 + s1) + (bias ? bias[n] : 0.f);
      continue;
    }
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int64_t j = b;
    for (; j + 16 <= e; j += 16) {
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(values + j), gather8(x, indices + j), a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(values + j + 8), gather8(x, indices + j + 8), a1);
    }
    if (j + 8 <= e) {
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(values + j), gather8(x, indices + j), a0);
      j += 8;
    }
    a0 = _mm256_add_ps(a0, a1);
    if (j < e) a0 = _mm256_add_ps(a0, tail_product(x, indices, values, j, e - j));
    const float s = hsum256(a0);
    y[n] = s + (bias ? bias[n] : 0.f);
  }
  return kNoBad;
}

// Row n, batch columns [c0, c0 + 8*V) of xt [K, Bp]: out[0:8V] = bn + sum_j values[j] * xt[indices[j], c0:c0+8V].
// U independent accumulator sets (nonzeros j, j+1, .. j+U-1 go to different sets) keep at least 4
// FMA chains in flight when V is small: with one set and V = 1 every FMA would wait for the last
// (4-cycle latency), a quarter of the FMA throughput.
template <int V, typename Index>
PYSERVE_AVX2_TARGET inline void spmm_row_pass_avx2(const float* xt, int64_t Bp, int64_t c0, int64_t b, int64_t e,
                                                   const Index* indices, const float* values, float bn, float* out) {
  constexpr int U = V >= 4 ? 1 : (V == 1 ? 4 : 2);
  __m256 acc[U][V];
  for (int u = 0; u < U; ++u)
    for (int v = 0; v < V; ++v) acc[u][v] = _mm256_setzero_ps();
  const float* base = xt + c0;
  int64_t j = b;
  for (; j + U <= e; j += U) {
    for (int u = 0; u < U; ++u) {
      const __m256 w = _mm256_broadcast_ss(values + j + u);
      const float* row = base + static_cast<int64_t>(indices[j + u]) * Bp;
      for (int v = 0; v < V; ++v) acc[u][v] = _mm256_fmadd_ps(w, _mm256_loadu_ps(row + kLanes * v), acc[u][v]);
    }
  }
  for (; j < e; ++j) {
    const __m256 w = _mm256_broadcast_ss(values + j);
    const float* row = base + static_cast<int64_t>(indices[j]) * Bp;
    for (int v = 0; v < V; ++v) acc[0][v] = _mm256_fmadd_ps(w, _mm256_loadu_ps(row + kLanes * v), acc[0][v]);
  }
  const __m256 bias = _mm256_set1_ps(bn);
  for (int v = 0; v < V; ++v) {
    __m256 sum = acc[0][v];
    for (int u = 1; u < U; ++u) sum = _mm256_add_ps(sum, acc[u][v]);
    _mm256_store_ps(out + kLanes * v, _mm256_add_ps(sum, bias));
  }
}

template <int V, typename Index>
PYSERVE_AVX2_TARGET void spmm_pass_avx2(const float* xt, int64_t Bp, int64_t c0, const int64_t* indptr,
                                        const Index* indices, const float* values, const float* bias, int64_t n0,
                                        int64_t n1, const bool* ok, float (*tile)[kTileCols]) {
  for (int64_t n = n0; n < n1; ++n)
    spmm_row_pass_avx2<V>(xt, Bp, c0, indptr[n], ok[n - n0] ? indptr[n + 1] : indptr[n], indices, values,
                          bias ? bias[n] : 0.f, tile[n - n0]);
}

template <typename Index>
PYSERVE_AVX2_TARGET int64_t spmm_rows_avx2(const float* xt, int64_t K, int64_t B, int64_t Bp, const int64_t* indptr,
                                           const Index* indices, const float* values, const float* bias, int64_t N,
                                           int64_t n0, int64_t n1, float* y) {
  bool ok[kRowChunk];
  const int64_t bad = check_rows(indptr, indices, K, n0, n1, ok);
  alignas(32) float tile[kRowChunk][kTileCols];
  for (int64_t c0 = 0; c0 < B; c0 += kTileCols) {
    const int64_t vectors = std::min<int64_t>((Bp - c0) / kLanes, kMaxVectors);
    switch (vectors) {
#define PYSERVE_CASE(V) \
  case V: spmm_pass_avx2<V>(xt, Bp, c0, indptr, indices, values, bias, n0, n1, ok, tile); break;
      PYSERVE_CASE(1) PYSERVE_CASE(2) PYSERVE_CASE(3) PYSERVE_CASE(4)
      PYSERVE_CASE(5) PYSERVE_CASE(6) PYSERVE_CASE(7) PYSERVE_CASE(8)
#undef PYSERVE_CASE
      default: break;
    }
    store_tile(tile, n1 - n0, std::min<int64_t>(B - c0, kLanes * vectors), c0, N, n0, y);
  }
  return bad;
}
#endif  // PYSERVE_HAVE_AVX2_PATH


void atomic_min(std::atomic<int64_t>& target, int64_t value) {
  int64_t cur = target.load(std::memory_order_relaxed);
  while (value < cur && !target.compare_exchange_weak(cur, value, std::memory_order_relaxed)) {
  }
}

}  // namespace

// B == 1: rows in chunks of about kCheckNonzeros nonzeros (at least kRowChunk rows), each chunk's
// indices validated in one vectorised pass (rows_ok_*) right before the chunk is computed.
template <typename Index>
int64_t spmv(const float* x, int64_t K, const int64_t* indptr, const Index* indices, const float* values,
             const float* bias, int64_t N, float* y, int threads, bool avx2) {
  (void)avx2;
  (void)threads;
  const int64_t nnz = indptr[N];
  const int64_t per_row = std::max<int64_t>(1, nnz / std::max<int64_t>(N, 1));
  const int64_t rows = std::max<int64_t>(kRowChunk, kCheckNonzeros / per_row);
  if (nnz + N < kMinParallelWork) threads = 1;
  std::atomic<bool> bad{false};
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t n0 = 0; n0 < N; n0 += rows) {
    if (bad.load(std::memory_order_relaxed)) continue;
    const int64_t n1 = std::min(N, n0 + rows);
    bool ok;
#if PYSERVE_HAVE_AVX2_PATH
    if (avx2 && std::is_same<Index, int32_t>::value)
      ok = rows_ok_avx2(indptr, n0, n1, reinterpret_cast<const int32_t*>(indices), K);
    else
#endif
      ok = rows_ok_portable(indptr, n0, n1, indices, K);
    if (!ok) {
      bad.store(true, std::memory_order_relaxed);
      continue;
    }
#if PYSERVE_HAVE_AVX2_PATH
    if (avx2)
      spmv_rows_avx2(x, K, indptr, indices, values, bias, n0, n1, y);
    else
#endif
      spmv_rows_portable(x, K, indptr, indices, values, bias, n0, n1, y);
  }
  return bad.load() ? csr_first_bad_index(indptr, N, indices, K) : -1;
}

bool csr_has_avx2() {
#if PYSERVE_HAVE_AVX2_PATH
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

int64_t csr_scratch_floats(int64_t B, int64_t K) { return B <= 1 ? 0 : K * round_up(B, kLanes); }

template <typename Index>
int64_t csr_linear_cpu(const float* x, int64_t B, int64_t K, const int64_t* indptr, const Index* indices,
                       const float* values, const float* bias, int64_t N, float* y, float* xt_scratch, int threads,
                       bool force_portable) {
  (void)threads;
  const bool avx2 = !force_portable && csr_has_avx2();
  (void)avx2;
  std::atomic<int64_t> first_bad{kNoBad};
  if (B == 0) {
    // Nothing to compute, but the column indices are still validated.
    for (int64_t n = 0; n < N; ++n)
      if (!row_ok(indices, indptr[n], indptr[n + 1], K))
        return first_bad_in_row(indices, indptr[n], indptr[n + 1], K);
    return -1;
  }
  if (B == 1) return spmv(x, K, indptr, indices, values, bias, N, y, threads, avx2);
  const int64_t Bp = round_up(B, kLanes);
  if (B > 1) transpose_pad(x, B, K, Bp, xt_scratch, avx2);
  // Small products run on the calling thread: a fork-join costs ~5-10 us on an idle machine and
  // far more on a busy one, more than the work itself below ~kMinParallelWork multiply-adds.
  const int64_t work = (indptr[N] + N) * std::max<int64_t>(B, 1);
  if (work < kMinParallelWork) threads = 1;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t n0 = 0; n0 < N; n0 += kRowChunk) {
    const int64_t n1 = std::min(N, n0 + kRowChunk);
    int64_t bad;
#if PYSERVE_HAVE_AVX2_PATH
    if (avx2)
      bad = B == 1 ? spmv_rows_avx2(x, K, indptr, indices, values, bias, n0, n1, y)
                   : spmm_rows_avx2(xt_scratch, K, B, Bp, indptr, indices, values, bias, N, n0, n1, y);
    else
#endif
      bad = B == 1 ? spmv_rows_portable(x, K, indptr, indices, values, bias, n0, n1, y)
                   : spmm_rows_portable(xt_scratch, K, B, Bp, indptr, indices, values, bias, N, n0, n1, y);
    if (bad != kNoBad) atomic_min(first_bad, bad);
  }
  const int64_t bad = first_bad.load();
  return bad == kNoBad ? -1 : bad;
}

template int64_t csr_linear_cpu<int32_t>(const float*, int64_t, int64_t, const int64_t*, const int32_t*, const float*,
                                         const float*, int64_t, float*, float*, int, bool);
template int64_t csr_linear_cpu<int64_t>(const float*, int64_t, int64_t, const int64_t*, const int64_t*, const float*,
                                         const float*, int64_t, float*, float*, int, bool);

template <typename Index>
int64_t csr_first_bad_index(const int64_t* indptr, int64_t N, const Index* indices, int64_t K) {
  for (int64_t n = 0; n < N; ++n)
    if (!row_ok(indices, indptr[n], indptr[n + 1], K)) return first_bad_in_row(indices, indptr[n], indptr[n + 1], K);
  return -1;
}

template int64_t csr_first_bad_index<int32_t>(const int64_t*, int64_t, const int32_t*, int64_t);
template int64_t csr_first_bad_index<int64_t>(const int64_t*, int64_t, const int64_t*, int64_t);

}  // namespace sparse
}  // namespace pyserve
