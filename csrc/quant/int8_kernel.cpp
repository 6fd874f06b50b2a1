// int8 quantization and GEMM kernels (CPU). Algorithms and rounding: int8_kernel.h.
#include "quant/int8_kernel.h"
#include "common/cpu_features.h"
#include "common/threads.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>

#if PYSERVE_AVX2
#include <immintrin.h>
#endif

namespace pyserve {
namespace quant {

namespace {

// Below this many multiply-adds a call stays on one thread: a BERT-sized B = 1 layer takes ~0.1 ms
// on one core, the second vCPU adds little (ENVIRONMENT.md), and on a busy machine waiting for a
// descheduled OpenMP worker costs a whole scheduler time slice (measured: ~16 ms per call).
constexpr int64_t kParallelMinMacs = int64_t{1} << 22;

// --- quantization --------------------------------------------------------------------------------

// Returns false when the row holds a non-finite value.
bool quantize_row_portable(const float* r, int64_t K, int8_t* q, float* scale_out) {
  float amax = 0.0f;
  bool finite = true;
  for (int64_t k = 0; k < K; ++k) {
    const float a = std::fabs(r[k]);
    finite &= std::isfinite(a);
    amax = a > amax ? a : amax;
  }
  if (!finite) return false;
  float scale = amax / 127.0f;
  if (scale == 0.0f) {
    *scale_out = 1.0f;
    for (int64_t k = 0; k < K; ++k) q[k] = 0;
    return true;
  }
  *scale_out = scale;
  for (int64_t k = 0; k < K; ++k) {
    float v = std::nearbyint(r[k] / scale);
    v = std::min(127.0f, std::max(-127.0f, v));
    q[k] = static_cast<int8_t>(v);
  }
  return true;
}

#if PYSERVE_AVX2
__attribute__((target("avx2,fma"))) bool quantize_row_avx2(const float* r, int64_t K, int8_t* q, float* scale_out) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  // Two chains of 1-cycle ops (max, or) instead of one chain of vaddps (3 cycles of latency per 8
  // values): quantize_rows at B = 128, K = 1536 took 56.7 -> 43.9 us (2026-11-30). r * 0 is +-0 for a
  // finite r and NaN otherwise, so the OR of those bit patterns has an all-ones exponent iff some r
  // is inf or NaN.
  __m256 vmax0 = _mm256_setzero_ps(), vmax1 = _mm256_setzero_ps();
  __m256 vbad0 = _mm256_setzero_ps(), vbad1 = _mm256_setzero_ps();
  const __m256 zero = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    const __m256 v0 = _mm256_loadu_ps(r + k), v1 = _mm256_loadu_ps(r + k + 8);
    vmax0 = _mm256_max_ps(vmax0, _mm256_and_ps(v0, abs_mask));
    vmax1 = _mm256_max_ps(vmax1, _mm256_and_ps(v1, abs_mask));
    vbad0 = _mm256_or_ps(vbad0, _mm256_mul_ps(v0, zero));
    vbad1 = _mm256_or_ps(vbad1, _mm256_mul_ps(v1, zero));
  }
  for (; k + 8 <= K; k += 8) {
    const __m256 v = _mm256_loadu_ps(r + k);
    vmax0 = _mm256_max_ps(vmax0, _mm256_and_ps(v, abs_mask));
    vbad0 = _mm256_or_ps(vbad0, _mm256_mul_ps(v, zero));
  }
  alignas(32) float lanes[8];
  alignas(32) uint32_t checks[8];
  _mm256_store_ps(lanes, _mm256_max_ps(vmax0, vmax1));
  _mm256_store_si256(reinterpret_cast<__m256i*>(checks), _mm256_castps_si256(_mm256_or_ps(vbad0, vbad1)));
  float amax = 0.0f;
  bool finite = true;
  for (int i = 0; i < 8; ++i) {
    amax = std::max(amax, lanes[i]);
    finite &= (checks[i] & 0x7f800000u) != 0x7f800000u;
  }
  for (; k < K; ++k) {
    const float a = std::fabs(r[k]);
    finite &= std::isfinite(a);
    amax = a > amax ? a : amax;
  }
  if (!finite) return false;
  const float scale = amax / 127.0f;
  if (scale == 0.0f) {
    *scale_out = 1.0f;
    for (int64_t j = 0; j < K; ++j) q[j] = 0;
    return true;
  }
  *scale_out = scale;
  const __m256 vs = _mm256_set1_ps(scale);
  const __m256 lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
  k = 0;
  for (; k + 32 <= K; k += 32) {
    __m256i i32[4];
    for (int j = 0; j < 4; ++j) {
      __m256 v = _mm256_div_ps(_mm256_loadu_ps(r + k + 8 * j), vs);
      v = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      v = _mm256_min_ps(hi, _mm256_max_ps(lo, v));
      i32[j] = _mm256_cvtps_epi32(v);
    }
    // packs work per 128-bit lane; a final dword permute restores the order.
    const __m256i i16a = _mm256_packs_epi32(i32[0], i32[1]);
    const __m256i i16b = _mm256_packs_epi32(i32[2], i32[3]);
    __m256i i8 = _mm256_packs_epi16(i16a, i16b);
    i8 = _mm256_permutevar8x32_epi32(i8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + k), i8);
  }
  for (; k < K; ++k) {
    float v = std::nearbyint(r[k] / scale);
    v = std::min(127.0f, std::max(-127.0f, v));
    q[k] = static_cast<int8_t>(v);
  }
  return true;
}
#endif


// --- GEMM ----------------------------------------------------------------------------------------

inline float dequant(int32_t acc, float sx, float sw, const float* bias, int64_t n) {
  float v = static_cast<float>(acc) * (sx * sw);
  __asm__("" : "+x"(v));  // no FMA contraction: two roundings, as int8_gemm_packed and the docs
  return bias ? v + bias[n] : v;
}

void gemm_block_portable(const int8_t* xq, const float* sx, int64_t B, int64_t K, const int8_t* wq, const float* sw,
                         const float* bias, int64_t N, int64_t n0, int64_t n1, float* y) {
  for (int64_t b = 0; b < B; ++b) {
    const int8_t* xr = xq + b * K;
    for (int64_t n = n0; n < n1; ++n) {
      const int8_t* wr = wq + n * K;
      int32_t acc = 0;
      for (int64_t k = 0; k < K; ++k) acc += static_cast<int32_t>(xr[k]) * static_cast<int32_t>(wr[k]);
      y[b * N + n] = dequant(acc, sx[b], sw[n], bias, n);
    }
  }
}

#if PYSERVE_AVX2
__attribute__((target("avx2,fma"))) inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(s);
}

// MB activation rows x NB weight rows; 32 products per step per pair:
//   u = |w| (unsigned, 0..128), s = x * sign(w) (signed, -127..127)
//   vpmaddubsw(u, s): pairs u0*s0 + u1*s1, |.| <= 2 * 128 * 127 = 32512, no int16 saturation
//   vpmaddwd(., 1): int32 sums of 4 products, added to the accumulators.
template <int MB, int NB>
__attribute__((target("avx2,fma"))) inline void tile_avx2(const int8_t* xq, const float* sx, int64_t b0, int64_t K,
                                                          const int8_t* wq, const float* sw, const float* bias,
                                                          int64_t N, int64_t n0, float* y) {
  __m256i acc[MB][NB];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm256_setzero_si256();
  const __m256i ones = _mm256_set1_epi16(1);
  const int8_t* xr[MB];
  const int8_t* wr[NB];
  for (int i = 0; i < MB; ++i) xr[i] = xq + (b0 + i) * K;
  for (int j = 0; j < NB; ++j) wr[j] = wq + (n0 + j) * K;
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m256i w[NB], u[NB];
    for (int j = 0; j < NB; ++j) {
      w[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr[j] + k));
      u[j] = _mm256_abs_epi8(w[j]);
    }
    for (int i = 0; i < MB; ++i) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr[i] + k));
      for (int j = 0; j < NB; ++j) {
        const __m256i p16 = _mm256_maddubs_epi16(u[j], _mm256_sign_epi8(xv, w[j]));
        acc[i][j] = _mm256_add_epi32(acc[i][j], _mm256_madd_epi16(p16, ones));
      }
    }
  }
  for (int i = 0; i < MB; ++i) {
    for (int j = 0; j < NB; ++j) {
      int32_t s = hsum_epi32(acc[i][j]);
      for (int64_t t = k; t < K; ++t) s += static_cast<int32_t>(xr[i][t]) * static_cast<int32_t>(wr[j][t]);
      y[(b0 + i) * N + n0 + j] = dequant(s, sx[b0 + i], sw[n0 + j], bias, n0 + j);
    }
  }
}

__attribute__((target("avx2,fma"))) void gemm_block_avx2(const int8_t* xq, const float* sx, int64_t B, int64_t K,
                                                         const int8_t* wq, const float* sw, const float* bias,
                                                         int64_t N, int64_t n0, int64_t n1, float* y) {
  // 4 activation rows x 2 channels: 8 accumulators + 2 weights + 2 |w| + 1 x + ones = 14 ymm,
  // no spills (2 x 4 needs 18 and spills).
  int64_t n = n0;
  for (; n + 2 <= n1; n += 2) {
    int64_t b = 0;
    for (; b + 4 <= B; b += 4) tile_avx2<4, 2>(xq, sx, b, K, wq, sw, bias, N, n, y);
    for (; b < B; ++b) tile_avx2<1, 2>(xq, sx, b, K, wq, sw, bias, N, n, y);
  }
  for (; n < n1; ++n) {
    int64_t b = 0;
    for (; b + 4 <= B; b += 4) tile_avx2<4, 1>(xq, sx, b, K, wq, sw, bias, N, n, y);
    for (; b < B; ++b) tile_avx2<1, 1>(xq, sx, b, K, wq, sw, bias, N, n, y);
  }
}
#endif

}  // namespace

bool int8_avx2_active() { return cpu_has_avx2_fma(); }

bool quantize_row(const float* src, int64_t K, int8_t* q, float* scale) {
#if PYSERVE_AVX2
  if (cpu_has_avx2_fma()) return quantize_row_avx2(src, K, q, scale);
#endif
  return quantize_row_portable(src, K, q, scale);
}

bool quantize_rows(const float* src, int64_t rows, int64_t K, int8_t* q, float* scale, int64_t* bad_row) {
  const bool avx2 = cpu_has_avx2_fma();
  int64_t first_bad = rows;
#pragma omp parallel for schedule(static) num_threads(pyserve::num_threads()) reduction(min : first_bad) if (rows * K >= (int64_t{1} << 20))
  for (int64_t r = 0; r < rows; ++r) {
    bool ok;
#if PYSERVE_AVX2
    if (avx2)
      ok = quantize_row_avx2(src + r * K, K, q + r * K, scale + r);
    else
#endif
      ok = quantize_row_portable(src + r * K, K, q + r * K, scale + r);
    (void)avx2;
    if (!ok && r < first_bad) first_bad = r;
  }
  if (first_bad < rows) {
    if (bad_row) *bad_row = first_bad;
    return false;
  }
  return true;
}

void int8_gemm(const int8_t* xq, const float* x_scale, int64_t B, int64_t K, const int8_t* wq, const float* w_scale,
               const float* bias, int64_t N, float* y) {
  if (B == 0 || N == 0) return;
  const bool avx2 = cpu_has_avx2_fma();
  // Blocks of output channels: a block's weights (block * K bytes) stay in L1/L2 while all B
  // activation rows stream past them.
  constexpr int64_t kBlock = 16;
  const int64_t blocks = (N + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static) num_threads(pyserve::num_threads()) if (B * N * K >= kParallelMinMacs)
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t n0 = blk * kBlock, n1 = std::min(N, n0 + kBlock);
#if PYSERVE_AVX2
    if (avx2) {
      gemm_block_avx2(xq, x_scale, B, K, wq, w_scale, bias, N, n0, n1, y);
      continue;
    }
#endif
    (void)avx2;
    gemm_block_portable(xq, x_scale, B, K, wq, w_scale, bias, N, n0, n1, y);
  }
}


namespace {

inline float gelu_scalar(float v) { return 0.5f * v * (1.0f + std::erf(v * 0.70710678118654752f)); }

#if PYSERVE_AVX2
// erf(x) as Eigen's generic_fast_erf_float: x clamped to [-4, 4], p(x^2) x / q(x^2).
__attribute__((target("avx2,fma"))) inline __m256 erf_avx2(__m256 x) {
  x = _mm256_min_ps(_mm256_set1_ps(4.0f), _mm256_max_ps(_mm256_set1_ps(-4.0f), x));
  const __m256 x2 = _mm256_mul_ps(x, x);
  __m256 p = _mm256_fmadd_ps(x2, _mm256_set1_ps(-2.72614225801306e-10f), _mm256_set1_ps(2.77068142495902e-08f));
  p = _mm256_fmadd_ps(x2, p, _mm256_set1_ps(-2.10102402082508e-06f));
  p = _mm256_fmadd_ps(x2, p, _mm256_set1_ps(-5.69250639462346e-05f));
  p = _mm256_fmadd_ps(x2, p, _mm256_set1_ps(-7.34990630326855e-04f));
  p = _mm256_fmadd_ps(x2, p, _mm256_set1_ps(-2.95459980854025e-03f));
  p = _mm256_fmadd_ps(x2, p, _mm256_set1_ps(-1.60960333262415e-02f));
  p = _mm256_mul_ps(x, p);
  __m256 q = _mm256_fmadd_ps(x2, _mm256_set1_ps(-1.45660718464996e-05f), _mm256_set1_ps(-2.13374055278905e-04f));
  q = _mm256_fmadd_ps(x2, q, _mm256_set1_ps(-1.68282697438203e-03f));
  q = _mm256_fmadd_ps(x2, q, _mm256_set1_ps(-7.37332916720468e-03f));
  q = _mm256_fmadd_ps(x2, q, _mm256_set1_ps(-1.42647390514189e-02f));
  return _mm256_div_ps(p, q);
}

__attribute__((target("avx2,fma"))) void gelu_range_avx2(float* y, int64_t n) {
  const __m256 half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.0f), rsqrt2 = _mm256_set1_ps(0.70710678118654752f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(y + i);
    const __m256 e = erf_avx2(_mm256_mul_ps(v, rsqrt2));
    _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_mul_ps(half, v), _mm256_add_ps(one, e)));
  }
  if (i < n) {  // the tail through the same vector code, so every element gets the same function
    alignas(32) float t[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    std::copy(y + i, y + n, t);
    const __m256 v = _mm256_load_ps(t);
    const __m256 e = erf_avx2(_mm256_mul_ps(v, rsqrt2));
    _mm256_store_ps(t, _mm256_mul_ps(_mm256_mul_ps(half, v), _mm256_add_ps(one, e)));
    std::copy(t, t + (n - i), y + i);
  }
}
#endif

}  // namespace

void gelu_erf_inplace(float* y, int64_t n) {
  if (n <= 0) return;
  const bool avx2 = cpu_has_avx2_fma();
  constexpr int64_t kChunk = 4096;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) num_threads(pyserve::num_threads()) if (n >= (int64_t{1} << 18))
  for (int64_t c = 0; c < chunks; ++c) {
    float* p = y + c * kChunk;
    const int64_t m = std::min(kChunk, n - c * kChunk);
#if PYSERVE_AVX2
    if (avx2) {
      gelu_range_avx2(p, m);
      continue;
    }
#endif
    (void)avx2;
    for (int64_t i = 0; i < m; ++i) p[i] = gelu_scalar(p[i]);
  }
}

namespace {

// One row: y += r (when r), then y = (y - mean) * rstd * g + b; mean and variance (biased, two
// passes) accumulated in double.
void add_layer_norm_row_portable(float* y, const float* r, const float* g, const float* b, int64_t N, float eps) {
  double sum = 0.0;
  for (int64_t n = 0; n < N; ++n) {
    if (r) y[n] += r[n];
    sum += y[n];
  }
  const double mean = sum / static_cast<double>(N);
  double sq = 0.0;
  for (int64_t n = 0; n < N; ++n) sq += (y[n] - mean) * (y[n] - mean);
  const float rstd = static_cast<float>(1.0 / std::sqrt(sq / static_cast<double>(N) + static_cast<double>(eps)));
  // (y - mean) * rstd, as torch: y * rstd - mean * rstd cancelled badly on (near-)constant rows,
  // where rstd is about 1 / sqrt(eps) (1e6 at BERT's 1e-12): a constant row of 0.3 gave 0.0119
  // instead of 0 on the AVX2 path (its FMA kept y * rstd exact against a rounded mean * rstd).
  const float meanf = static_cast<float>(mean);
  for (int64_t n = 0; n < N; ++n) y[n] = (y[n] - meanf) * rstd * g[n] + b[n];
}

#if PYSERVE_AVX2
__attribute__((target("avx2,fma"))) inline double hsum_pd(__m256d v) {
  __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
  return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
}

__attribute__((target("avx2,fma"))) void add_layer_norm_row_avx2(float* y, const float* r, const float* g,
                                                                 const float* b, int64_t N, float eps) {
  __m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd();
  int64_t n = 0;
  for (; n + 8 <= N; n += 8) {
    __m256 v = _mm256_loadu_ps(y + n);
    if (r) {
      v = _mm256_add_ps(v, _mm256_loadu_ps(r + n));
      _mm256_storeu_ps(y + n, v);
    }
    s0 = _mm256_add_pd(s0, _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
    s1 = _mm256_add_pd(s1, _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
  }
  double sum = hsum_pd(_mm256_add_pd(s0, s1));
  for (int64_t t = n; t < N; ++t) {
    if (r) y[t] += r[t];
    sum += y[t];
  }
  const double mean = sum / static_cast<double>(N);
  const __m256d vm = _mm256_set1_pd(mean);
  s0 = s1 = _mm256_setzero_pd();
  for (n = 0; n + 8 <= N; n += 8) {
    const __m256 v = _mm256_loadu_ps(y + n);
    const __m256d d0 = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(v)), vm);
    const __m256d d1 = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)), vm);
    s0 = _mm256_fmadd_pd(d0, d0, s0);
    s1 = _mm256_fmadd_pd(d1, d1, s1);
  }
  double sq = hsum_pd(_mm256_add_pd(s0, s1));
  for (int64_t t = n; t < N; ++t) sq += (y[t] - mean) * (y[t] - mean);
  const float rstd = static_cast<float>(1.0 / std::sqrt(sq / static_cast<double>(N) + static_cast<double>(eps)));
  const float meanf = static_cast<float>(mean);  // (y - mean) * rstd: see add_layer_norm_row_portable
  const __m256 vr = _mm256_set1_ps(rstd), vmf = _mm256_set1_ps(meanf);
  for (n = 0; n + 8 <= N; n += 8) {
    const __m256 v = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(y + n), vmf), vr);
    _mm256_storeu_ps(y + n, _mm256_fmadd_ps(v, _mm256_loadu_ps(g + n), _mm256_loadu_ps(b + n)));
  }
  for (int64_t t = n; t < N; ++t) y[t] = (y[t] - meanf) * rstd * g[t] + b[t];
}
#endif

}  // namespace

void add_layer_norm_inplace(float* y, const float* residual, const float* g, const float* b, int64_t rows, int64_t N,
                            float eps) {
  if (rows <= 0 || N <= 0) return;
  const bool avx2 = cpu_has_avx2_fma();
#pragma omp parallel for schedule(static) num_threads(pyserve::num_threads()) if (rows * N >= (int64_t{1} << 18))
  for (int64_t i = 0; i < rows; ++i) {
    const float* r = residual ? residual + i * N : nullptr;
#if PYSERVE_AVX2
    if (avx2) {
      add_layer_norm_row_avx2(y + i * N, r, g, b, N, eps);
      continue;
    }
#endif
    (void)avx2;
    add_layer_norm_row_portable(y + i * N, r, g, b, N, eps);
  }
}

}  // namespace quant
}  // namespace pyserve
