// Packed (SELL-8-sigma) CSR linear kernels on the CPU. Layout, algorithms and contract:
// csr_packed_kernel.h.
#include "sparse/csr_packed_kernel.h"
#include "sparse/csr_kernel.h"

#include <algorithm>
#include <cstring>
#include <numeric>
#include <type_traits>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define PYSERVE_PK_X86 1
#else
#define PYSERVE_PK_X86 0
#endif

#if PYSERVE_PK_X86 && defined(__GNUC__)
#define PYSERVE_PK_AVX2_PATH 1
#define PYSERVE_PK_AVX2 __attribute__((target("avx2,fma")))
#else
#define PYSERVE_PK_AVX2_PATH 0
#endif

namespace pyserve {
namespace sparse {

namespace {

constexpr int64_t C = kPackedLanes;
constexpr int64_t kMaxVectors = 8;               // SpMM: batch columns per pass = 8 * 8 = 64
constexpr int64_t kTileCols = C * kMaxVectors;
constexpr int64_t kSpmvSlicesPerItem = 8;        // OpenMP work item: 64 rows (SpMV)
constexpr int64_t kWindowRows = kPackedSortWindow;  // SpMM: rows per tile and OpenMP work item
constexpr int64_t kSpmmSlicesPerItem = kWindowRows / C;  // rows are only sorted within such a window
constexpr int64_t kMinParallelWork = int64_t{1} << 18;  // multiply-adds below which one thread runs

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

template <typename Idx>
const Idx* idx_data(const CsrPacked& w);
template <>
const uint16_t* idx_data<uint16_t>(const CsrPacked& w) { return w.idx16.data(); }
template <>
const int32_t* idx_data<int32_t>(const CsrPacked& w) { return w.idx32.data(); }

// Real (non-padding) lanes of slice s.
inline int64_t real_lanes(const CsrPacked& w, int64_t s) { return std::min<int64_t>(C, w.N - s * C); }

// ---- portable ------------------------------------------------------------------------------

template <typename Idx>
void spmv_slices_portable(const float* x, const CsrPacked& w, const float* bias, int64_t s0, int64_t s1, float* y) {
  const Idx* idx = idx_data<Idx>(w);
  for (int64_t s = s0; s < s1; ++s) {
    const int64_t base = w.slice_ptr[s];
    for (int64_t r = 0, real = real_lanes(w, s); r < real; ++r) {
      const int64_t len = w.row_len[s * C + r], n = w.row_of[s * C + r];
      float a0 = 0.f, a1 = 0.f;
      int64_t j = 0;
      for (; j + 2 <= len; j += 2) {
        a0 += w.val[base + C * j + r] * x[idx[base + C * j + r]];
        a1 += w.val[base + C * (j + 1) + r] * x[idx[base + C * (j + 1) + r]];
      }
      if (j < len) a0 += w.val[base + C * j + r] * x[idx[base + C * j + r]];
      y[n] = (a0 + a1) + (bias ? bias[n] : 0.f);
    }
  }
}

// xt [K, Bp]; y [B, N].
template <typename Idx>
void spmm_slices_portable(const float* xt, int64_t B, int64_t Bp, const CsrPacked& w, const float* bias, int64_t s0,
                          int64_t s1, float* y) {
  const Idx* idx = idx_data<Idx>(w);
  float acc[kTileCols];
  for (int64_t s = s0; s < s1; ++s) {
    const int64_t base = w.slice_ptr[s];
    for (int64_t r = 0, real = real_lanes(w, s); r < real; ++r) {
      const int64_t len = w.row_len[s * C + r], n = w.row_of[s * C + r];
      for (int64_t c0 = 0; c0 < B; c0 += kTileCols) {
        const int64_t width = std::min<int64_t>(Bp - c0, kTileCols);
        std::fill(acc, acc + width, bias ? bias[n] : 0.f);
        for (int64_t j = 0; j < len; ++j) {
          const float v = w.val[base + C * j + r];
          const float* row = xt + static_cast<int64_t>(idx[base + C * j + r]) * Bp + c0;
          for (int64_t c = 0; c < width; ++c) acc[c] += v * row[c];
        }
        for (int64_t c = 0, cols = std::min<int64_t>(B - c0, width); c < cols; ++c) y[(c0 + c) * w.N + n] = acc[c];
      }
    }
  }
}

void transpose_pad_portable(const float* x, int64_t B, int64_t K, int64_t Bp, float* xt) {
  constexpr int64_t kTile = 32;
  for (int64_t k0 = 0; k0 < K; k0 += kTile) {
    const int64_t k1 = std::min(K, k0 + kTile);
    for (int64_t b0 = 0; b0 < B; b0 += kTile) {
      const int64_t b1 = std::min(B, b0 + kTile);
      for (int64_t k = k0; k < k1; ++k)
        for (int64_t b = b0; b < b1; ++b) xt[k * Bp + b] = x[b * K + k];
    }
    for (int64_t k = k0; k < k1; ++k) std::fill(xt + k * Bp + B, xt + k * Bp + Bp, 0.f);
  }
}

// ---- AVX2 + FMA ----------------------------------------------------------------------------
#if PYSERVE_PK_AVX2_PATH

// r[i] <- column i of the 8 x 8 matrix whose rows are r[0..7].
PYSERVE_PK_AVX2 inline void transpose8(__m256 r[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
  r[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
  r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
  r[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
  r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
  r[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
  r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
  r[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
  r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

// x [B, K] -> xt [K, Bp] (columns B..Bp-1 zero) in 8 x 8 register blocks; the edges scalar.
// Rows of x in groups of 16 outside, K inside: x is read as 16 sequential streams and every xt
// row gets one whole 64-byte line (two 8 x 8 blocks) per step. (K outside, the order before, read
// 64 rows of x 8 floats at a time at a stride of 4 K bytes: for K = 3072 all of them fall in one
// L1 set, and the copy of a [64, 3072] x took 1.5x as long; benchmarks/native/csr_spmm.cpp.)
PYSERVE_PK_AVX2 void transpose_pad_avx2(const float* x, int64_t B, int64_t K, int64_t Bp, float* xt) {
  const int64_t B8 = B / C * C, K8 = K / C * C;
  for (int64_t b0 = 0; b0 < B8; b0 += 2 * C) {
    const int64_t halves = std::min<int64_t>(2, (B8 - b0) / C);
    for (int64_t k0 = 0; k0 < K8; k0 += C) {
      for (int64_t h = 0; h < halves; ++h) {
        __m256 r[8];
        for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(x + (b0 + h * C + i) * K + k0);
        transpose8(r);
        for (int i = 0; i < 8; ++i) _mm256_storeu_ps(xt + (k0 + i) * Bp + b0 + h * C, r[i]);
      }
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t b = k < K8 ? B8 : 0; b < B; ++b) xt[k * Bp + b] = x[b * K + k];
    for (int64_t b = B; b < Bp; ++b) xt[k * Bp + b] = 0.f;
  }
}

// x[q[0..7]] as one vector from 8 scalar loads (vmovss + vinsertps): on Zen 3 this is faster than
// vgatherdps (benchmarks/native/csr_spmv.cpp measures both). 16-bit indices are read 4 at a time
// as one 64-bit load and split by shifts (ALU work instead of 4 loads: loads are the bottleneck).
PYSERVE_PK_AVX2 inline __m256 load_x8(const float* x, const int32_t* q) {
  const __m128 lo = _mm_set_ps(x[q[3]], x[q[2]], x[q[1]], x[q[0]]);
  const __m128 hi = _mm_set_ps(x[q[7]], x[q[6]], x[q[5]], x[q[4]]);
  return _mm256_set_m128(hi, lo);
}
PYSERVE_PK_AVX2 inline __m256 load_x8(const float* x, const uint16_t* q) {
  uint64_t a, b;
  std::memcpy(&a, q, 8);
  std::memcpy(&b, q + 4, 8);
  const __m128 lo = _mm_set_ps(x[a >> 48], x[(a >> 32) & 0xffff], x[(a >> 16) & 0xffff], x[a & 0xffff]);
  const __m128 hi = _mm_set_ps(x[b >> 48], x[(b >> 32) & 0xffff], x[(b >> 16) & 0xffff], x[b & 0xffff]);
  return _mm256_set_m128(hi, lo);
}

template <typename Idx>
PYSERVE_PK_AVX2 void spmv_slices_avx2(const float* x, const CsrPacked& w, const float* bias, int64_t s0, int64_t s1,
                                      float* y) {
  const Idx* idx = idx_data<Idx>(w);
  const float* val = w.val.data();
  for (int64_t s = s0; s < s1; ++s) {
    const int64_t base = w.slice_ptr[s];
    const int64_t width = (w.slice_ptr[s + 1] - base) / C, m = w.slice_min[s];
    const float* v = val + base;
    const Idx* ix = idx + base;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 2 <= m; j += 2) {
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(v + C * j), load_x8(x, ix + C * j), a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(v + C * j + C), load_x8(x, ix + C * j + C), a1);
    }
    if (j < m) {
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(v + C * j), load_x8(x, ix + C * j), a0);
      ++j;
    }
    if (j < width) {
      // Lanes past their row's end hold value 0 and index 0 (in bounds: a slice this wide has a
      // nonzero, so K >= 1); their x is masked to 0 so that 0 * x[0] never adds a NaN for inf x[0].
      const __m256i lens = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.row_len.data() + s * C));
      for (; j < width; ++j) {
        const __m256 mask = _mm256_castsi256_ps(_mm256_cmpgt_epi32(lens, _mm256_set1_epi32(static_cast<int>(j))));
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(v + C * j), _mm256_and_ps(mask, load_x8(x, ix + C * j)), a0);
      }
    }
    __m256 acc = _mm256_add_ps(a0, a1);
    const int64_t real = real_lanes(w, s);
    if (w.natural_order && real == C) {
      if (bias) acc = _mm256_add_ps(acc, _mm256_loadu_ps(bias + s * C));
      _mm256_storeu_ps(y + s * C, acc);
    } else {
      alignas(32) float t[C];
      _mm256_store_ps(t, acc);
      for (int64_t r = 0; r < real; ++r) {
        const int64_t n = w.row_of[s * C + r];
        y[n] = t[r] + (bias ? bias[n] : 0.f);
      }
    }
  }
}

// One lane's row over batch columns [c0, c0 + 8V) of xt [K, Bp]: out[0:8V] = bn + sum_j v[8j] *
// xt[ix[8j], c0:c0+8V]. U accumulator sets keep >= 4 independent FMA chains when V is small.
template <int V, typename Idx>
PYSERVE_PK_AVX2 inline void row_pass_avx2(const float* xt, int64_t Bp, int64_t c0, const Idx* ix, const float* v,
                                          int64_t len, float bn, float* out) {
  constexpr int U = V >= 4 ? 1 : (V == 1 ? 4 : 2);
  __m256 acc[U][V];
  for (int u = 0; u < U; ++u)
    for (int q = 0; q < V; ++q) acc[u][q] = _mm256_setzero_ps();
  const float* base = xt + c0;
  int64_t j = 0;
  for (; j + U <= len; j += U) {
    for (int u = 0; u < U; ++u) {
      const __m256 wv = _mm256_broadcast_ss(v + C * (j + u));
      const float* row = base + static_cast<int64_t>(ix[C * (j + u)]) * Bp;
      for (int q = 0; q < V; ++q) acc[u][q] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(row + C * q), acc[u][q]);
    }
  }
  for (; j < len; ++j) {
    const __m256 wv = _mm256_broadcast_ss(v + C * j);
    const float* row = base + static_cast<int64_t>(ix[C * j]) * Bp;
    for (int q = 0; q < V; ++q) acc[0][q] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(row + C * q), acc[0][q]);
  }
  const __m256 b = _mm256_set1_ps(bn);
  for (int q = 0; q < V; ++q) {
    __m256 sum = acc[0][q];
    for (int u = 1; u < U; ++u) sum = _mm256_add_ps(sum, acc[u][q]);
    _mm256_store_ps(out + C * q, _mm256_add_ps(sum, b));
  }
}

// G lanes of one slice at once (ix, v point at the first lane's entry 0; lane g's entry j at
// C * j + g), batch columns [c0, c0 + 8V): G x V independent accumulators, and the G lanes' entries
// of column j are read side by side (the slice's storage order). For small V, where a single lane
// would leave the entries of the other 7 lanes of each cache line for later passes. The lanes'
// ragged ends (j past the shortest of the G) are skipped lane by lane.
template <int V, int G, typename Idx>
PYSERVE_PK_AVX2 inline void group_pass_avx2(const float* xt, int64_t Bp, int64_t c0, const Idx* ix, const float* v,
                                            const int32_t* lens, const float* bn, float (*out)[kTileCols]) {
  __m256 acc[G][V];
  for (int g = 0; g < G; ++g)
    for (int q = 0; q < V; ++q) acc[g][q] = _mm256_setzero_ps();
  int64_t m = lens[0], L = lens[0];
  for (int g = 1; g < G; ++g) {
    m = std::min<int64_t>(m, lens[g]);
    L = std::max<int64_t>(L, lens[g]);
  }
  const float* base = xt + c0;
  int64_t j = 0;
  for (; j < m; ++j) {
    for (int g = 0; g < G; ++g) {
      const __m256 wv = _mm256_broadcast_ss(v + C * j + g);
      const float* row = base + static_cast<int64_t>(ix[C * j + g]) * Bp;
      for (int q = 0; q < V; ++q) acc[g][q] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(row + C * q), acc[g][q]);
    }
  }
  for (; j < L; ++j) {
    for (int g = 0; g < G; ++g) {
      if (j >= lens[g]) continue;
      const __m256 wv = _mm256_broadcast_ss(v + C * j + g);
      const float* row = base + static_cast<int64_t>(ix[C * j + g]) * Bp;
      for (int q = 0; q < V; ++q) acc[g][q] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(row + C * q), acc[g][q]);
    }
  }
  for (int g = 0; g < G; ++g)
    for (int q = 0; q < V; ++q) _mm256_store_ps(out[g] + C * q, _mm256_add_ps(acc[g][q], _mm256_set1_ps(bn[g])));
}

// Lanes processed together for V vectors of batch columns: G * V <= 8 accumulators.
template <int V>
constexpr int lane_group() { return V == 1 ? 8 : V == 2 ? 4 : V <= 4 ? 2 : 1; }

// Window of slices [s0, s1) (at most kWindowRows rows), batch columns [c0, c0 + 8V): tile row
// p - 8 s0 = lane p's output row.
template <int V, typename Idx>
PYSERVE_PK_AVX2 void window_pass_avx2(const float* xt, int64_t Bp, int64_t c0, const CsrPacked& w, const float* bias,
                                      int64_t s0, int64_t s1, float (*tile)[kTileCols]) {
  const Idx* idx = idx_data<Idx>(w);
  const float* val = w.val.data();
  constexpr int G = lane_group<V>();
  for (int64_t s = s0; s < s1; ++s) {
    const int64_t base = w.slice_ptr[s], real = real_lanes(w, s);
    int64_t r = 0;
    if (G > 1 && real == C) {
      for (; r < C; r += G) {
        const int64_t p = s * C + r;
        float bn[G];
        for (int g = 0; g < G; ++g) bn[g] = bias ? bias[w.row_of[p + g]] : 0.f;
        group_pass_avx2<V, G>(xt, Bp, c0, idx + base + r, val + base + r, w.row_len.data() + p, bn,
                              tile + (p - s0 * C));
      }
    }
    for (; r < real; ++r) {
      const int64_t p = s * C + r, n = w.row_of[p];
      row_pass_avx2<V>(xt, Bp, c0, idx + base + r, val + base + r, w.row_len[p], bias ? bias[n] : 0.f,
                       tile[p - s0 * C]);
    }
  }
}

// The tile of the rows [n0, n1) (= lanes [n0, n1), in some order) -> y [B, N], columns
// [c0, c0 + cols): 8 consecutive rows x 8 batch columns at a time through an 8 x 8 register
// transpose. Batch-column blocks outside, rows inside: each y row [c0 + cb + i] is then written
// as one run of 32-byte stores, n0 .. n1, 8 runs at a time. (Rows outside, the order before,
// left 64 y rows half-written at once: 1.2-1.4x slower at 99% sparsity, B = 64, where y is most
// of the bytes a call moves; benchmarks/native/csr_spmm.cpp.)
PYSERVE_PK_AVX2 void store_window_avx2(const CsrPacked& w, int64_t n0, int64_t n1, const float (*tile)[kTileCols],
                                       int64_t c0, int64_t cols, float* y) {
  const int64_t N = w.N;
  const int32_t* pos = w.pos_of.data();
  const int64_t full = n0 + (n1 - n0) / C * C;  // rows [n0, full) in blocks of 8
  int64_t cb = 0;
  for (; cb + C <= cols; cb += C) {
    for (int64_t n = n0; n < full; n += C) {
      __m256 r[8];
      for (int i = 0; i < 8; ++i) r[i] = _mm256_load_ps(tile[pos[n + i] - n0] + cb);
      transpose8(r);
      for (int i = 0; i < 8; ++i) _mm256_storeu_ps(y + (c0 + cb + i) * N + n, r[i]);
    }
  }
  for (int64_t c = cb; c < cols; ++c)
    for (int64_t n = n0; n < full; ++n) y[(c0 + c) * N + n] = tile[pos[n] - n0][c];
  for (int64_t c = 0; c < cols; ++c)
    for (int64_t n = full; n < n1; ++n) y[(c0 + c) * N + n] = tile[pos[n] - n0][c];
}

template <typename Idx>
PYSERVE_PK_AVX2 void spmm_window_avx2(const float* xt, int64_t B, int64_t Bp, const CsrPacked& w, const float* bias,
                                      int64_t s0, int64_t s1, float* y) {
  alignas(32) float tile[kWindowRows][kTileCols];
  const int64_t n0 = s0 * C, n1 = std::min(w.N, s1 * C);
  for (int64_t c0 = 0; c0 < B; c0 += kTileCols) {
    const int64_t vectors = std::min<int64_t>((Bp - c0) / C, kMaxVectors);
    switch (vectors) {
#define PYSERVE_PK_CASE(V) \
  case V: window_pass_avx2<V, Idx>(xt, Bp, c0, w, bias, s0, s1, tile); break;
      PYSERVE_PK_CASE(1) PYSERVE_PK_CASE(2) PYSERVE_PK_CASE(3) PYSERVE_PK_CASE(4)
      PYSERVE_PK_CASE(5) PYSERVE_PK_CASE(6) PYSERVE_PK_CASE(7) PYSERVE_PK_CASE(8)
#undef PYSERVE_PK_CASE
      default: break;
    }
    store_window_avx2(w, n0, n1, tile, c0, std::min<int64_t>(B - c0, C * vectors), y);
  }
}
#endif  // PYSERVE_PK_AVX2_PATH

template <typename Idx>
void run(const float* x, int64_t B, const CsrPacked& w, const float* bias, float* y, float* xt, int threads,
         bool avx2) {
  const int64_t S = w.slices;
  const int64_t work = (w.nnz + w.N) * std::max<int64_t>(B, 1);
  if (work < kMinParallelWork) threads = 1;
  if (B == 1) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t s0 = 0; s0 < S; s0 += kSpmvSlicesPerItem) {
      const int64_t s1 = std::min(S, s0 + kSpmvSlicesPerItem);
#if PYSERVE_PK_AVX2_PATH
      if (avx2) {
        spmv_slices_avx2<Idx>(x, w, bias, s0, s1, y);
        continue;
      }
#endif
      spmv_slices_portable<Idx>(x, w, bias, s0, s1, y);
    }
    return;
  }
  const int64_t Bp = round_up(B, C);
  transpose_pad(x, B, w.K, Bp, xt, avx2);
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t s0 = 0; s0 < S; s0 += kSpmmSlicesPerItem) {
    const int64_t s1 = std::min(S, s0 + kSpmmSlicesPerItem);
#if PYSERVE_PK_AVX2_PATH
    if (avx2) {
      spmm_window_avx2<Idx>(xt, B, Bp, w, bias, s0, s1, y);
      continue;
    }
#endif
    spmm_slices_portable<Idx>(xt, B, Bp, w, bias, s0, s1, y);
  }
}

}  // namespace

void transpose_pad(const float* x, int64_t B, int64_t K, int64_t Bp, float* xt, bool avx2) {
#if PYSERVE_PK_AVX2_PATH
  if (avx2) return transpose_pad_avx2(x, B, K, Bp, xt);
#endif
  (void)avx2;
  transpose_pad_portable(x, B, K, Bp, xt);
}

template <typename Index>
CsrPacked csr_pack(const int64_t* indptr, int64_t N, const Index* indices, const float* values, int64_t K,
                   int sort_rows) {
  CsrPacked w;
  w.N = N;
  w.K = K;
  w.nnz = indptr[N];
  w.slices = (N + C - 1) / C;
  w.index_bits = K <= kPackedMaxK16 ? 16 : 32;
  const int64_t S = w.slices;
  auto len_of = [&](int64_t n) { return indptr[n + 1] - indptr[n]; };
  if (sort_rows < 0) {  // auto: sort when slices of natural rows would pad the entries by > 5%
    int64_t padded = 0;
    for (int64_t s = 0; s < S; ++s) {
      int64_t longest = 0;
      for (int64_t n = s * C; n < std::min(N, s * C + C); ++n) longest = std::max(longest, len_of(n));
      padded += C * longest;
    }
    sort_rows = 20 * padded > 21 * w.nnz ? 1 : 0;
  }
  w.sorted_rows = sort_rows > 0;
  // Lane p (slice p / 8, lane p % 8) holds row order[p]; p >= N are padding lanes.
  std::vector<int64_t> order(static_cast<std::size_t>(N));
  std::iota(order.begin(), order.end(), int64_t{0});
  if (w.sorted_rows) {
    for (int64_t w0 = 0; w0 < N; w0 += kPackedSortWindow) {
      const int64_t w1 = std::min(N, w0 + kPackedSortWindow);
      std::stable_sort(order.begin() + w0, order.begin() + w1,
                       [&](int64_t a, int64_t b) { return len_of(a) > len_of(b); });
    }
  }
  w.natural_order = true;
  for (int64_t p = 0; p < N; ++p) w.natural_order = w.natural_order && order[p] == p;
  w.row_len.assign(static_cast<std::size_t>(S * C), 0);
  w.row_of.assign(static_cast<std::size_t>(S * C), -1);
  w.pos_of.assign(static_cast<std::size_t>(N), 0);
  w.slice_min.assign(static_cast<std::size_t>(S), 0);
  w.slice_ptr.assign(static_cast<std::size_t>(S + 1), 0);
  for (int64_t s = 0; s < S; ++s) {
    int64_t longest = 0, shortest = INT64_MAX;
    for (int64_t r = 0; r < C; ++r) {
      const int64_t p = s * C + r;
      int64_t len = 0;
      if (p < N) {
        len = len_of(order[p]);
        w.row_of[p] = static_cast<int32_t>(order[p]);
        w.pos_of[order[p]] = static_cast<int32_t>(p);
      }
      w.row_len[p] = static_cast<int32_t>(len);
      longest = std::max(longest, len);
      shortest = std::min(shortest, len);
    }
    w.slice_min[s] = static_cast<int32_t>(shortest);
    w.slice_ptr[s + 1] = w.slice_ptr[s] + C * longest;
  }
  const auto total = static_cast<std::size_t>(w.slice_ptr[S]);
  w.val.assign(total, 0.f);
  if (w.index_bits == 16) w.idx16.assign(total, 0);
  else w.idx32.assign(total, 0);
  for (int64_t p = 0; p < N; ++p) {
    const int64_t s = p / C, r = p % C, row = order[p];
    const int64_t b = indptr[row], len = len_of(row), base = w.slice_ptr[s];
    for (int64_t j = 0; j < len; ++j) {
      const auto pos = static_cast<std::size_t>(base + C * j + r);
      w.val[pos] = values[b + j];
      if (w.index_bits == 16) w.idx16[pos] = static_cast<uint16_t>(indices[b + j]);
      else w.idx32[pos] = static_cast<int32_t>(indices[b + j]);
    }
  }
  return w;
}

template CsrPacked csr_pack<int32_t>(const int64_t*, int64_t, const int32_t*, const float*, int64_t, int);
template CsrPacked csr_pack<int64_t>(const int64_t*, int64_t, const int64_t*, const float*, int64_t, int);

int64_t csr_packed_scratch_floats(int64_t B, int64_t K) { return B <= 1 ? 0 : K * round_up(B, C); }

void csr_packed_linear_cpu(const float* x, int64_t B, const CsrPacked& w, const float* bias, float* y,
                           float* xt_scratch, int threads, bool force_portable) {
  if (B == 0 || w.N == 0) return;
  const bool avx2 = !force_portable && csr_has_avx2();  // the raw kernel's check (same build condition)
  if (w.index_bits == 16) run<uint16_t>(x, B, w, bias, y, xt_scratch, threads, avx2);
  else run<int32_t>(x, B, w, bias, y, xt_scratch, threads, avx2);
}

}  // namespace sparse
}  // namespace pyserve
