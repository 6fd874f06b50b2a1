// B = 1 codebook GEMV variants, one thread, CPU-time medians: pyserve's kernel (codebook_linear as
// built from csrc/), a plain AVX2 dense fp32 GEMV on the decoded weights (the "dense hot" proxy),
// and activation-side lookup tables as in LUT-GEMM (Park et al. 2022, arXiv 2206.09557): one table
// per pair of activations, T[p][pair code] = cb[c0] * x[2p] + cb[c1] * x[2p + 1] (4 bits: a pair is
// one packed byte, 256 entries; 5 bits: 10 bits, 1024 entries), then one lookup-and-add per pair,
// scalar with four accumulators or with AVX2 gathers, K blocked so a block's tables stay in cache.
// Build and run from the repository root:
//   g++ -std=c++17 -O3 -march=haswell -Wno-unknown-pragmas -DPYSERVE_AVX2=1 -Icsrc \
//       benchmarks/native/codebook_lut.cpp csrc/quant/codebook_kernel.cpp csrc/common/threads.cpp \
//       -o /tmp/codebook_lut && /tmp/codebook_lut
#include <immintrin.h>
#include <time.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "quant/codebook_kernel.h"
using namespace pyserve::quant;

static double cpu_us() {
  timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return t.tv_sec * 1e6 + t.tv_nsec * 1e-3;
}
template <class F>
static double median_us(F f, int reps = 41) {
  std::vector<double> ts;
  f();
  for (int r = 0; r < reps; ++r) {
    double t0 = cpu_us();
    f();
    ts.push_back(cpu_us() - t0);
  }
  std::sort(ts.begin(), ts.end());
  return ts[ts.size() / 2];
}

static float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

static void dense(const float* x, const float* W, int64_t N, int64_t K, float* y) {
  for (int64_t n = 0; n < N; ++n) {
    const float* w = W + n * K;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t k = 0; k < K; k += 32) {
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_loadu_ps(x + k), a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 8), _mm256_loadu_ps(x + k + 8), a1);
      a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 16), _mm256_loadu_ps(x + k + 16), a2);
      a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 24), _mm256_loadu_ps(x + k + 24), a3);
    }
    y[n] = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  }
}

// 4-bit tables: T[p][b] = cb[b & 15] * x[2p] + cb[b >> 4] * x[2p + 1], 32 vectors per pair.
static void build4(const float* x, int64_t P, const float* cb, float* T) {
  alignas(32) float lo[256], hi[256];
  for (int b = 0; b < 256; ++b) lo[b] = cb[b & 15], hi[b] = cb[b >> 4];
  for (int64_t p = 0; p < P; ++p) {
    const __m256 x0 = _mm256_set1_ps(x[2 * p]), x1 = _mm256_set1_ps(x[2 * p + 1]);
    for (int i = 0; i < 256; i += 8)
      _mm256_storeu_ps(T + p * 256 + i,
                      _mm256_fmadd_ps(_mm256_load_ps(hi + i), x1, _mm256_mul_ps(_mm256_load_ps(lo + i), x0)));
  }
}

static void lut4_scalar(const float* x, const uint8_t* packed, int64_t N, int64_t K, const float* cb, float* T,
                        int64_t KB, float* y) {
  const int64_t rb = K / 2, PB = KB / 2;
  for (int64_t n = 0; n < N; ++n) y[n] = 0;
  for (int64_t p0 = 0; p0 < rb; p0 += PB) {
    const int64_t P = std::min(PB, rb - p0);
    build4(x + 2 * p0, P, cb, T);
    for (int64_t n = 0; n < N; ++n) {
      const uint8_t* r = packed + n * rb + p0;
      float a0 = 0, a1 = 0, a2 = 0, a3 = 0;
      for (int64_t p = 0; p < P; p += 8) {
        uint64_t v;
        std::memcpy(&v, r + p, 8);
        const float* t = T + p * 256;
        a0 += t[v & 255];
        a1 += t[256 + ((v >> 8) & 255)];
        a2 += t[512 + ((v >> 16) & 255)];
        a3 += t[768 + ((v >> 24) & 255)];
        a0 += t[1024 + ((v >> 32) & 255)];
        a1 += t[1280 + ((v >> 40) & 255)];
        a2 += t[1536 + ((v >> 48) & 255)];
        a3 += t[1792 + (v >> 56)];
      }
      y[n] += (a0 + a1) + (a2 + a3);
    }
  }
}

static void lut4_gather(const float* x, const uint8_t* packed, int64_t N, int64_t K, const float* cb, float* T,
                        int64_t KB, float* y) {
  const int64_t rb = K / 2, PB = KB / 2;
  const __m256i off = _mm256_setr_epi32(0, 256, 512, 768, 1024, 1280, 1536, 1792);
  for (int64_t n = 0; n < N; ++n) y[n] = 0;
  for (int64_t p0 = 0; p0 < rb; p0 += PB) {
    const int64_t P = std::min(PB, rb - p0);
    build4(x + 2 * p0, P, cb, T);
    for (int64_t n = 0; n < N; ++n) {
      const uint8_t* r = packed + n * rb + p0;
      __m256 a0 = _mm256_setzero_ps(), a1 = a0;
      int64_t p = 0;
      for (; p + 16 <= P; p += 16) {
        __m256i i0 = _mm256_add_epi32(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(r + p))), off);
        __m256i i1 = _mm256_add_epi32(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(r + p + 8))), off);
        a0 = _mm256_add_ps(a0, _mm256_i32gather_ps(T + p * 256, i0, 4));
        a1 = _mm256_add_ps(a1, _mm256_i32gather_ps(T + (p + 8) * 256, i1, 4));
      }
      y[n] += hsum(_mm256_add_ps(a0, a1));
    }
  }
}

// 5-bit tables over 10-bit pair codes, 1024 entries per pair.
static void build5(const float* x, int64_t P, const float* cb, float* T) {
  alignas(32) float lo[1024], hi[1024];
  for (int b = 0; b < 1024; ++b) lo[b] = cb[b & 31], hi[b] = cb[b >> 5];
  for (int64_t p = 0; p < P; ++p) {
    const __m256 x0 = _mm256_set1_ps(x[2 * p]), x1 = _mm256_set1_ps(x[2 * p + 1]);
    for (int i = 0; i < 1024; i += 8)
      _mm256_storeu_ps(T + p * 1024 + i,
                      _mm256_fmadd_ps(_mm256_load_ps(hi + i), x1, _mm256_mul_ps(_mm256_load_ps(lo + i), x0)));
  }
}

// K a multiple of KB, KB a multiple of 8 (one 5-byte group = 4 pairs).
static void lut5_scalar(const float* x, const uint8_t* packed, int64_t N, int64_t K, const float* cb, float* T,
                        int64_t KB, float* y) {
  const int64_t rb = K * 5 / 8, PB = KB / 2;
  for (int64_t n = 0; n < N; ++n) y[n] = 0;
  for (int64_t k0 = 0; k0 < K; k0 += KB) {
    const int64_t P = std::min(PB, (K - k0) / 2);
    build5(x + k0, P, cb, T);
    for (int64_t n = 0; n < N; ++n) {
      const uint8_t* r = packed + n * rb + k0 * 5 / 8;
      float a0 = 0, a1 = 0, a2 = 0, a3 = 0;
      for (int64_t p = 0; p < P; p += 4) {  // over-reads 3 bytes past the row at its end (bench only)
        uint64_t v;
        std::memcpy(&v, r + p / 4 * 5, 8);
        const float* t = T + p * 1024;
        a0 += t[v & 1023];
        a1 += t[1024 + ((v >> 10) & 1023)];
        a2 += t[2048 + ((v >> 20) & 1023)];
        a3 += t[3072 + ((v >> 30) & 1023)];
      }
      y[n] += (a0 + a1) + (a2 + a3);
    }
  }
}

// Byte-plane lookup with vpshufb (4 bits): plane j holds byte j of the 16 codebook entries; 4
// shuffles give the 4 bytes of 32 weights, 8 unpacks assemble them into 4 vectors of fp32 (order
// folded into a once-per-call permutation of x, xp).
static void permute_x_pshufb(const float* x, int64_t K, float* xp) {
  for (int64_t c = 0; c < K / 64; ++c)
    for (int s = 0; s < 2; ++s)
      for (int q = 0; q < 4; ++q)
        for (int l = 0; l < 8; ++l) {
          const int pos = l < 4 ? 4 * q + l : 16 + 4 * q + (l - 4);
          xp[64 * c + 32 * s + 8 * q + l] = x[64 * c + 2 * pos + s];
        }
}
static inline __m256 fma4(__m256i codes, const __m256i* P, const float* xq, __m256& a0, __m256& a1, __m256& a2, __m256& a3) {
  const __m256i b0 = _mm256_shuffle_epi8(P[0], codes), b1 = _mm256_shuffle_epi8(P[1], codes);
  const __m256i b2 = _mm256_shuffle_epi8(P[2], codes), b3 = _mm256_shuffle_epi8(P[3], codes);
  const __m256i t0 = _mm256_unpacklo_epi8(b0, b1), t1 = _mm256_unpackhi_epi8(b0, b1);
  const __m256i t2 = _mm256_unpacklo_epi8(b2, b3), t3 = _mm256_unpackhi_epi8(b2, b3);
  a0 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_unpacklo_epi16(t0, t2)), _mm256_loadu_ps(xq), a0);
  a1 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_unpackhi_epi16(t0, t2)), _mm256_loadu_ps(xq + 8), a1);
  a2 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_unpacklo_epi16(t1, t3)), _mm256_loadu_ps(xq + 16), a2);
  a3 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_unpackhi_epi16(t1, t3)), _mm256_loadu_ps(xq + 24), a3);
  return a0;
}
static void pshufb4(const float* x, const uint8_t* packed, int64_t N, int64_t K, const float* cb, float* xp, float* y) {
  permute_x_pshufb(x, K, xp);
  alignas(16) uint8_t planes[4][16];
  for (int c = 0; c < 16; ++c) {
    uint32_t u;
    std::memcpy(&u, cb + c, 4);
    for (int j = 0; j < 4; ++j) planes[j][c] = (u >> (8 * j)) & 255;
  }
  __m256i P[4];
  for (int j = 0; j < 4; ++j) P[j] = _mm256_broadcastsi128_si256(_mm_load_si128((const __m128i*)planes[j]));
  const __m256i low = _mm256_set1_epi8(0x0f);
  const int64_t rb = K / 2;
  for (int64_t n = 0; n < N; ++n) {
    const uint8_t* r = packed + n * rb;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t c = 0; c < K / 64; ++c) {
      const __m256i v = _mm256_loadu_si256((const __m256i*)(r + 32 * c));
      fma4(_mm256_and_si256(v, low), P, xp + 64 * c, a0, a1, a2, a3);
      fma4(_mm256_and_si256(_mm256_srli_epi16(v, 4), low), P, xp + 64 * c + 32, a0, a1, a2, a3);
    }
    y[n] = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  }
}

int main() {
  std::mt19937 rng(1);
  std::normal_distribution<float> g;
  for (auto NK : {std::pair<int64_t, int64_t>{3072, 768}, {768, 3072}, {768, 768}}) {
    const int64_t N = NK.first, K = NK.second;
    for (int bits : {4, 5}) {
      const int C = 1 << bits;
      std::vector<uint8_t> idx(N * K);
      for (auto& v : idx) v = rng() % C;
      std::vector<uint8_t> packed(N * packed_row_bytes(K, bits) + 8);
      pack_indices(idx.data(), N, K, bits, packed.data());
      std::vector<float> x(K), cb(C), W(N * K), y0(N), y(N);
      for (auto& v : x) v = g(rng);
      for (auto& v : cb) v = g(rng);
      for (int64_t i = 0; i < N * K; ++i) W[i] = cb[idx[i]];
      double td = median_us([&] { dense(x.data(), W.data(), N, K, y0.data()); });
      double tk = median_us([&] { codebook_linear(x.data(), 1, K, packed.data(), N, bits, cb.data(), false, nullptr, y.data()); });
      double ek = 0;
      for (int64_t n = 0; n < N; ++n) ek = std::max(ek, (double)std::fabs(y[n] - y0[n]));
      std::printf("[%lld,%lld] bits=%d  dense-avx2 %.1f us  pyserve %.1f us (%.2fx dense, err %.1g)\n", (long long)N,
                  (long long)K, bits, td, tk, td / tk, ek);
      std::vector<float> T(K / 2 * 1024 + 64);
      if (bits == 4) {
        double tp = median_us([&] { pshufb4(x.data(), packed.data(), N, K, cb.data(), T.data(), y.data()); });
        double e = 0;
        for (int64_t n = 0; n < N; ++n) e = std::max(e, (double)std::fabs(y[n] - y0[n]));
        std::printf("   pshufb byte planes %.1f us (%.2fx dense, %.2fx pyserve, err %.1g)\n", tp, td / tp, tk / tp, e);
      }
      auto err = [&] {
        double e = 0;
        for (int64_t n = 0; n < N; ++n) e = std::max(e, (double)std::fabs(y[n] - y0[n]));
        return e;
      };
      for (int64_t KB : {int64_t{64}, int64_t{128}, int64_t{256}, int64_t{512}, K}) {
        if (K % KB) continue;
        if (bits == 4) {
          double ts = median_us([&] { lut4_scalar(x.data(), packed.data(), N, K, cb.data(), T.data(), KB, y.data()); });
          double es = err();
          double tg = median_us([&] { lut4_gather(x.data(), packed.data(), N, K, cb.data(), T.data(), KB, y.data()); });
          std::printf("   KB=%4lld  lut-scalar %.1f us (%.2fx dense, err %.1g)  lut-gather %.1f us (%.2fx dense, err %.1g)\n",
                      (long long)KB, ts, td / ts, es, tg, td / tg, err());
        } else {
          double ts = median_us([&] { lut5_scalar(x.data(), packed.data(), N, K, cb.data(), T.data(), KB, y.data()); });
          std::printf("   KB=%4lld  lut-scalar %.1f us (%.2fx dense, err %.1g)\n", (long long)KB, ts, td / ts, err());
        }
      }
    }
  }
}
