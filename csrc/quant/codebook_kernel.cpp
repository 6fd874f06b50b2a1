// Codebook linear and index packing kernels (CPU). Layout and algorithm: codebook_kernel.h.
#include "quant/codebook_kernel.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#if PYSERVE_AVX2
#include <immintrin.h>
#endif

namespace pyserve {
namespace quant {

namespace {

bool cpu_has_avx2() {
#if PYSERVE_AVX2
  // PYSERVE_DISABLE_AVX2 (any value) forces the portable path, so tests can cover it on AVX2 CPUs.
  static const bool has =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && std::getenv("PYSERVE_DISABLE_AVX2") == nullptr;
  return has;
#else
  return false;
#endif
}

// Generic unpacking of one row through a 64-bit bit buffer (reads exactly ceil(K*bits/8) bytes).
void unpack_row_generic(const uint8_t* src, int64_t K, int bits, uint8_t* dst) {
  const uint32_t mask = (1u << bits) - 1u;
  uint64_t buf = 0;
  int have = 0;
  int64_t pos = 0;
  for (int64_t k = 0; k < K; ++k) {
    while (have < bits) {
      buf |= static_cast<uint64_t>(src[pos++]) << have;
      have += 8;
    }
    dst[k] = static_cast<uint8_t>(buf & mask);
    buf >>= bits;
    have -= bits;
  }
}

void unpack_row_4bit_portable(const uint8_t* src, int64_t K, uint8_t* dst) {
  int64_t k = 0;
  for (; k + 2 <= K; k += 2) {
    const uint8_t v = src[k / 2];
    dst[k] = v & 0x0f;
    dst[k + 1] = v >> 4;
  }
  if (k < K) dst[k] = src[k / 2] & 0x0f;
}

#if PYSERVE_AVX2
__attribute__((target("avx2,fma"))) void unpack_row_4bit_avx2(const uint8_t* src, int64_t K, uint8_t* dst) {
  const __m128i low = _mm_set1_epi8(0x0f);
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + k / 2));
    const __m128i lo = _mm_and_si128(v, low);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(v, 4), low);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + k), _mm_unpacklo_epi8(lo, hi));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + k + 16), _mm_unpackhi_epi8(lo, hi));
  }
  unpack_row_4bit_portable(src + k / 2, K - k, dst + k);
}
#endif

void unpack_row(const uint8_t* src, int64_t K, int bits, uint8_t* dst, bool avx2) {
  if (bits == 8) {
    std::memcpy(dst, src, static_cast<size_t>(K));
  } else if (bits == 4) {
#if PYSERVE_AVX2
    if (avx2) return unpack_row_4bit_avx2(src, K, dst);
#endif
    (void)avx2;
    unpack_row_4bit_portable(src, K, dst);
  } else {
    unpack_row_generic(src, K, bits, dst);
  }
}

void pack_row(const uint8_t* src, int64_t K, int bits, uint8_t* dst) {
  uint64_t buf = 0;
  int have = 0;
  int64_t pos = 0;
  for (int64_t k = 0; k < K; ++k) {
    buf |= static_cast<uint64_t>(src[k]) << have;
    have += bits;
    while (have >= 8) {
      dst[pos++] = static_cast<uint8_t>(buf & 0xff);
      buf >>= 8;
      have -= 8;
    }
  }
  if (have > 0) dst[pos++] = static_cast<uint8_t>(buf & 0xff);
}

// --- decode + dot ---------------------------------------------------------------------------------

void row_portable(const float* x, int64_t B, int64_t K, const uint8_t* codes, const float* cb, float* w,
                  float* out /* [B] */) {
  for (int64_t k = 0; k < K; ++k) w[k] = cb[codes[k]];
  for (int64_t b = 0; b < B; ++b) {
    const float* xr = x + b * K;
    float s = 0.0f;
    for (int64_t k = 0; k < K; ++k) s += xr[k] * w[k];
    out[b] = s;
  }
}

#if PYSERVE_AVX2
__attribute__((target("avx2,fma"))) inline float hsum_ps(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Codebook of up to 32 entries in four registers; LOOKUP_BITS levels of vpermps + blend.
struct RegCodebook {
  __m256 t[4];
};

template <int BITS>
__attribute__((target("avx2,fma"))) inline __m256 lookup(const RegCodebook& cb, __m256i idx) {
  if constexpr (BITS <= 3) {
    return _mm256_permutevar8x32_ps(cb.t[0], idx);
  } else if constexpr (BITS == 4) {
    const __m256 m3 = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(cb.t[0], idx), _mm256_permutevar8x32_ps(cb.t[1], idx), m3);
  } else {
    const __m256 m3 = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));
    const __m256 m4 = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 27));
    const __m256 a =
        _mm256_blendv_ps(_mm256_permutevar8x32_ps(cb.t[0], idx), _mm256_permutevar8x32_ps(cb.t[1], idx), m3);
    const __m256 c =
        _mm256_blendv_ps(_mm256_permutevar8x32_ps(cb.t[2], idx), _mm256_permutevar8x32_ps(cb.t[3], idx), m3);
    return _mm256_blendv_ps(a, c, m4);
  }
}

__attribute__((target("avx2,fma"))) inline __m256i load_codes8(const uint8_t* codes) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes)));
}

// B == 1: decode and multiply in registers, four accumulators.
template <int BITS>
__attribute__((target("avx2,fma"))) float row_b1_avx2(const float* x, int64_t K, const uint8_t* codes,
                                                      const float* cbp) {
  RegCodebook cb;
  alignas(32) float padded[32] = {0};
  std::memcpy(padded, cbp, sizeof(float) * (size_t{1} << BITS));
  for (int i = 0; i < 4; ++i) cb.t[i] = _mm256_load_ps(padded + 8 * i);
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps(), acc2 = _mm256_setzero_ps(),
         acc3 = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    acc0 = _mm256_fmadd_ps(lookup<BITS>(cb, load_codes8(codes + k)), _mm256_loadu_ps(x + k), acc0);
    acc1 = _mm256_fmadd_ps(lookup<BITS>(cb, load_codes8(codes + k + 8)), _mm256_loadu_ps(x + k + 8), acc1);
    acc2 = _mm256_fmadd_ps(lookup<BITS>(cb, load_codes8(codes + k + 16)), _mm256_loadu_ps(x + k + 16), acc2);
    acc3 = _mm256_fmadd_ps(lookup<BITS>(cb, load_codes8(codes + k + 24)), _mm256_loadu_ps(x + k + 24), acc3);
  }
  for (; k + 8 <= K; k += 8)
    acc0 = _mm256_fmadd_ps(lookup<BITS>(cb, load_codes8(codes + k)), _mm256_loadu_ps(x + k), acc0);
  float s = hsum_ps(_mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3)));
  for (; k < K; ++k) s += x[k] * cbp[codes[k]];
  return s;
}

template <int BITS>
__attribute__((target("avx2,fma"))) void decode_row_avx2(const uint8_t* codes, int64_t K, const float* cbp, float* w) {
  RegCodebook cb;
  alignas(32) float padded[32] = {0};
  std::memcpy(padded, cbp, sizeof(float) * (size_t{1} << BITS));
  for (int i = 0; i < 4; ++i) cb.t[i] = _mm256_load_ps(padded + 8 * i);
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) _mm256_storeu_ps(w + k, lookup<BITS>(cb, load_codes8(codes + k)));
  for (; k < K; ++k) w[k] = cbp[codes[k]];
}

// out[b] = dot(x[b, :], w) for B rows, two rows per pass over w.
__attribute__((target("avx2,fma"))) void dots_avx2(const float* x, int64_t B, int64_t K, const float* w, float* out) {
  int64_t b = 0;
  for (; b + 2 <= B; b += 2) {
    const float* x0 = x + b * K;
    const float* x1 = x0 + K;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), c0 = _mm256_setzero_ps(), c1 = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
      const __m256 w0 = _mm256_loadu_ps(w + k), w1 = _mm256_loadu_ps(w + k + 8);
      a0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x0 + k), a0);
      c0 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x0 + k + 8), c0);
      a1 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x1 + k), a1);
      c1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x1 + k + 8), c1);
    }
    float s0 = hsum_ps(_mm256_add_ps(a0, c0)), s1 = hsum_ps(_mm256_add_ps(a1, c1));
    for (; k < K; ++k) {
      s0 += x0[k] * w[k];
      s1 += x1[k] * w[k];
    }
    out[b] = s0;
    out[b + 1] = s1;
  }
  for (; b < B; ++b) {
    const float* x0 = x + b * K;
    __m256 a0 = _mm256_setzero_ps(), c0 = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_loadu_ps(x0 + k), a0);
      c0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 8), _mm256_loadu_ps(x0 + k + 8), c0);
    }
    float s0 = hsum_ps(_mm256_add_ps(a0, c0));
    for (; k < K; ++k) s0 += x0[k] * w[k];
    out[b] = s0;
  }
}

__attribute__((target("avx2,fma"))) void row_avx2(const float* x, int64_t B, int64_t K, int bits,
                                                  const uint8_t* codes, const float* cb, float* w, float* out) {
  if (B == 1 && bits <= 5) {
    switch (bits) {
      case 2: out[0] = row_b1_avx2<2>(x, K, codes, cb); return;
      case 3: out[0] = row_b1_avx2<3>(x, K, codes, cb); return;
      case 4: out[0] = row_b1_avx2<4>(x, K, codes, cb); return;
      default: out[0] = row_b1_avx2<5>(x, K, codes, cb); return;
    }
  }
  switch (bits) {
    case 2: decode_row_avx2<2>(codes, K, cb, w); break;
    case 3: decode_row_avx2<3>(codes, K, cb, w); break;
    case 4: decode_row_avx2<4>(codes, K, cb, w); break;
    case 5: decode_row_avx2<5>(codes, K, cb, w); break;
    default:
      for (int64_t k = 0; k < K; ++k) w[k] = cb[codes[k]];
  }
  dots_avx2(x, B, K, w, out);
}
#endif

}  // namespace

void pack_indices(const uint8_t* idx, int64_t N, int64_t K, int bits, uint8_t* packed) {
  const int64_t rb = packed_row_bytes(K, bits);
#pragma omp parallel for schedule(static) if (N * K > 262144)
  for (int64_t n = 0; n < N; ++n) pack_row(idx + n * K, K, bits, packed + n * rb);
}

int64_t first_code_out_of_range(const uint8_t* idx, int64_t count, int bits) {
  if (bits >= 8) return -1;
  const uint8_t limit = static_cast<uint8_t>(1u << bits);
  for (int64_t i = 0; i < count; ++i)
    if (idx[i] >= limit) return i;
  return -1;
}

void unpack_indices(const uint8_t* packed, int64_t N, int64_t K, int bits, uint8_t* idx) {
  const int64_t rb = packed_row_bytes(K, bits);
  const bool avx2 = cpu_has_avx2();
#pragma omp parallel for schedule(static) if (N * K > 262144)
  for (int64_t n = 0; n < N; ++n) unpack_row(packed + n * rb, K, bits, idx + n * K, avx2);
}

void codebook_linear(const float* x, int64_t B, int64_t K, const uint8_t* packed, int64_t N, int bits,
                     const float* codebook, bool per_channel, const float* bias, float* y) {
  if (B == 0 || N == 0) return;
  const int64_t rb = packed_row_bytes(K, bits);
  const int64_t C = int64_t{1} << bits;
  const bool avx2 = cpu_has_avx2();
#pragma omp parallel if (B * N * K > 262144)
  {
    // Per-thread scratch: codes padded by 8 so 8-byte code loads never leave the buffer.
    std::vector<uint8_t> codes(static_cast<size_t>(K) + 8, 0);
    std::vector<float> w(static_cast<size_t>(K));
    std::vector<float> out(static_cast<size_t>(B));
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      unpack_row(packed + n * rb, K, bits, codes.data(), avx2);
      const float* cb = per_channel ? codebook + n * C : codebook;
#if PYSERVE_AVX2
      if (avx2)
        row_avx2(x, B, K, bits, codes.data(), cb, w.data(), out.data());
      else
#endif
        row_portable(x, B, K, codes.data(), cb, w.data(), out.data());
      const float add = bias ? bias[n] : 0.0f;
      for (int64_t b = 0; b < B; ++b) y[b * N + n] = out[b] + add;
    }
  }
}

}  // namespace quant
}  // namespace pyserve
