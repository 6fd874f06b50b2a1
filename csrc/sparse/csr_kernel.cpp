// CSR sparse linear kernel (CPU). Algorithms and contract: csr_kernel.h.
#include "sparse/csr_kernel.h"

#include <algorithm>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define PYSERVE_X86 1
#else
#define PYSERVE_X86 0
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

namespace pyserve {
namespace sparse {

namespace {

constexpr int64_t kLanes = 8;         // floats per AVX2 register; xt rows are padded to this
constexpr int64_t kMaxVectors = 8;    // batch columns per pass = kLanes * kMaxVectors = 64
constexpr int64_t kRowChunk = 16;     // output rows per OpenMP work item

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// ---- portable fallback ---------------------------------------------------------------------

template <typename Index>
void spmv_rows_portable(const float* x, const int64_t* indptr, const Index* indices, const float* values,
                        const float* bias, int64_t n0, int64_t n1, float* y) {
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
}

// xt [K, Bp]; writes y[b, n] for b < B.
template <typename Index>
void spmm_rows_portable(const float* xt, int64_t B, int64_t Bp, const int64_t* indptr, const Index* indices,
                        const float* values, const float* bias, int64_t N, int64_t n0, int64_t n1, float* y) {
  float acc[kLanes * kMaxVectors];
  for (int64_t c0 = 0; c0 < B; c0 += kLanes * kMaxVectors) {
    const int64_t width = std::min<int64_t>(Bp - c0, kLanes * kMaxVectors);
    for (int64_t n = n0; n < n1; ++n) {
      std::fill(acc, acc + width, 0.f);
      for (int64_t j = indptr[n], e = indptr[n + 1]; j < e; ++j) {
        const float w = values[j];
        const float* row = xt + static_cast<int64_t>(indices[j]) * Bp + c0;
        for (int64_t c = 0; c < width; ++c) acc[c] += w * row[c];
      }
      const float bn = bias ? bias[n] : 0.f;
      const int64_t cols = std::min<int64_t>(B - c0, width);
      for (int64_t c = 0; c < cols; ++c) y[(c0 + c) * N + n] = acc[c] + bn;
    }
  }
}

// ---- AVX2 + FMA ----------------------------------------------------------------------------
#if PYSERVE_X86 && defined(__GNUC__)
#define PYSERVE_AVX2_TARGET __attribute__((target("avx2,fma")))

PYSERVE_AVX2_TARGET inline float hsum256(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

PYSERVE_AVX2_TARGET inline __m256 gather8(const float* x, const int32_t* idx) {
  return _mm256_i32gather_ps(x, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx)), 4);
}
PYSERVE_AVX2_TARGET inline __m256 gather8(const float* x, const int64_t* idx) {
  const __m128 lo = _mm256_i64gather_ps(x, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx)), 4);
  const __m128 hi = _mm256_i64gather_ps(x, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx + 4)), 4);
  return _mm256_insertf128_ps(_mm256_castps128_ps256(lo), hi, 1);
}

template <typename Index>
PYSERVE_AVX2_TARGET void spmv_rows_avx2(const float* x, const int64_t* indptr, const Index* indices,
                                        const float* values, const float* bias, int64_t n0, int64_t n1, float* y) {
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t b = indptr[n], e = indptr[n + 1];
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
    float s = hsum256(_mm256_add_ps(a0, a1));
    for (; j < e; ++j) s += values[j] * x[indices[j]];
    y[n] = s + (bias ? bias[n] : 0.f);
  }
}

// One pass over rows [n0, n1) for batch columns [c0, c0 + 8*V) of xt [K, Bp].
template <int V, typename Index>
PYSERVE_AVX2_TARGET void spmm_pass_avx2(const float* xt, int64_t B, int64_t Bp, int64_t c0, const int64_t* indptr,
                                        const Index* indices, const float* values, const float* bias, int64_t N,
                                        int64_t n0, int64_t n1, float* y) {
  alignas(32) float out[kLanes * V];
  for (int64_t n = n0; n < n1; ++n) {
    __m256 acc[V];
    for (int v = 0; v < V; ++v) acc[v] = _mm256_setzero_ps();
    const int64_t e = indptr[n + 1];
    for (int64_t j = indptr[n]; j < e; ++j) {
      const __m256 w = _mm256_broadcast_ss(values + j);
      const float* row = xt + static_cast<int64_t>(indices[j]) * Bp + c0;
      for (int v = 0; v < V; ++v) acc[v] = _mm256_fmadd_ps(w, _mm256_loadu_ps(row + kLanes * v), acc[v]);
    }
    const __m256 bn = _mm256_set1_ps(bias ? bias[n] : 0.f);
    for (int v = 0; v < V; ++v) _mm256_store_ps(out + kLanes * v, _mm256_add_ps(acc[v], bn));
    const int64_t cols = std::min<int64_t>(B - c0, kLanes * V);
    float* yc = y + c0 * N + n;
    for (int64_t c = 0; c < cols; ++c) yc[c * N] = out[c];
  }
}

template <typename Index>
PYSERVE_AVX2_TARGET void spmm_rows_avx2(const float* xt, int64_t B, int64_t Bp, const int64_t* indptr,
                                        const Index* indices, const float* values, const float* bias, int64_t N,
                                        int64_t n0, int64_t n1, float* y) {
  for (int64_t c0 = 0; c0 < B; c0 += kLanes * kMaxVectors) {
    const int64_t vectors = std::min<int64_t>((Bp - c0) / kLanes, kMaxVectors);
    switch (vectors) {
#define PYSERVE_CASE(V) \
  case V: spmm_pass_avx2<V>(xt, B, Bp, c0, indptr, indices, values, bias, N, n0, n1, y); break;
      PYSERVE_CASE(1) PYSERVE_CASE(2) PYSERVE_CASE(3) PYSERVE_CASE(4)
      PYSERVE_CASE(5) PYSERVE_CASE(6) PYSERVE_CASE(7) PYSERVE_CASE(8)
#undef PYSERVE_CASE
      default: break;
    }
  }
}
#define PYSERVE_HAVE_AVX2_PATH 1
#else
#define PYSERVE_HAVE_AVX2_PATH 0
#endif

// x [B, K] -> xt [K, Bp], zero padded in columns B..Bp-1. Blocked for cache reuse.
void transpose_pad(const float* x, int64_t B, int64_t K, int64_t Bp, float* xt, int threads) {
  constexpr int64_t kTile = 32;
  (void)threads;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t k0 = 0; k0 < K; k0 += kTile) {
    const int64_t k1 = std::min(K, k0 + kTile);
    for (int64_t b0 = 0; b0 < B; b0 += kTile) {
      const int64_t b1 = std::min(B, b0 + kTile);
      for (int64_t k = k0; k < k1; ++k)
        for (int64_t b = b0; b < b1; ++b) xt[k * Bp + b] = x[b * K + k];
    }
    if (Bp > B)
      for (int64_t k = k0; k < k1; ++k) std::fill(xt + k * Bp + B, xt + k * Bp + Bp, 0.f);
  }
}

}  // namespace

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
void csr_linear_cpu(const float* x, int64_t B, int64_t K, const int64_t* indptr, const Index* indices,
                    const float* values, const float* bias, int64_t N, float* y, float* xt_scratch,
                    int threads, bool force_portable) {
  (void)threads;
  if (B == 0 || N == 0) return;
  const bool avx2 = !force_portable && csr_has_avx2();
  (void)avx2;
  if (B == 1) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t n0 = 0; n0 < N; n0 += kRowChunk) {
      const int64_t n1 = std::min(N, n0 + kRowChunk);
#if PYSERVE_HAVE_AVX2_PATH
      if (avx2) {
        spmv_rows_avx2(x, indptr, indices, values, bias, n0, n1, y);
        continue;
      }
#endif
      spmv_rows_portable(x, indptr, indices, values, bias, n0, n1, y);
    }
    return;
  }
  const int64_t Bp = round_up(B, kLanes);
  transpose_pad(x, B, K, Bp, xt_scratch, threads);
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t n0 = 0; n0 < N; n0 += kRowChunk) {
    const int64_t n1 = std::min(N, n0 + kRowChunk);
#if PYSERVE_HAVE_AVX2_PATH
    if (avx2) {
      spmm_rows_avx2(xt_scratch, B, Bp, indptr, indices, values, bias, N, n0, n1, y);
      continue;
    }
#endif
    spmm_rows_portable(xt_scratch, B, Bp, indptr, indices, values, bias, N, n0, n1, y);
  }
}

template <typename Index>
int64_t csr_first_bad_index(const int64_t* indptr, int64_t N, const Index* indices, int64_t K) {
  for (int64_t n = 0; n < N; ++n) {
    const int64_t b = indptr[n], e = indptr[n + 1];
    if (b == e) continue;
    // Strictly increasing within the row, so checking the ends bounds every index.
    bool increasing = true;
    for (int64_t j = b + 1; j < e; ++j) increasing &= indices[j] > indices[j - 1];
    if (!increasing || indices[b] < 0 || indices[e - 1] >= K) {
      for (int64_t j = b; j < e; ++j)
        if (indices[j] < 0 || indices[j] >= K || (j > b && indices[j] <= indices[j - 1])) return j;
    }
  }
  return -1;
}

template void csr_linear_cpu<int32_t>(const float*, int64_t, int64_t, const int64_t*, const int32_t*, const float*,
                                      const float*, int64_t, float*, float*, int, bool);
template void csr_linear_cpu<int64_t>(const float*, int64_t, int64_t, const int64_t*, const int64_t*, const float*,
                                      const float*, int64_t, float*, float*, int, bool);
template int64_t csr_first_bad_index<int32_t>(const int64_t*, int64_t, const int32_t*, int64_t);
template int64_t csr_first_bad_index<int64_t>(const int64_t*, int64_t, const int64_t*, int64_t);

}  // namespace sparse
}  // namespace pyserve
