// Codebook linear and index packing kernels (CPU). Layout and algorithm: codebook_kernel.h.
#include "quant/codebook_kernel.h"
#include "common/cpu_features.h"
#include "common/threads.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#if PYSERVE_AVX2
#include <immintrin.h>
#endif

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "codebook_kernel.cpp unpacks with little-endian 64-bit loads"
#endif

namespace pyserve {
namespace quant {

namespace {

// Below this many multiply-adds a call stays on one thread: a BERT-sized B = 1 layer takes ~0.1 ms
// on one core, the second vCPU adds little (ENVIRONMENT.md), and on a busy machine waiting for a
// descheduled OpenMP worker costs a whole scheduler time slice (measured: ~16 ms per call).
constexpr int64_t kParallelMinMacs = int64_t{1} << 22;


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

// Groups of 8 codes fill exactly `bits` bytes: one 64-bit load, eight independent shifts. The
// last group(s) that could not take an 8-byte load and the K % 8 tail go through the bit buffer.
void unpack_row_groups(const uint8_t* src, int64_t K, int bits, uint8_t* dst) {
  const uint64_t mask = (uint64_t{1} << bits) - 1u;
  const int64_t row_bytes = (K * bits + 7) / 8;
  int64_t g = 0;
  for (; (g + 1) * 8 <= K && g * bits + 8 <= row_bytes; ++g) {
    uint64_t v;
    std::memcpy(&v, src + g * bits, 8);  // little-endian hosts only (x86-64, aarch64)
    uint8_t* d = dst + g * 8;
    for (int i = 0; i < 8; ++i) d[i] = static_cast<uint8_t>((v >> (bits * i)) & mask);
  }
  unpack_row_generic(src + g * bits, K - g * 8, bits, dst + g * 8);
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
    unpack_row_groups(src, K, bits, dst);
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
  // 2-bit codes: vpermps reads 3 index bits; repeat the table so the third (a neighbour's) is moot.
  if (BITS == 2) std::memcpy(padded + 4, cbp, sizeof(float) * 4);
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

// x reordered for the fused 4-bit path: within each chunk of 64 codes (32 packed bytes = 8 dwords,
// dword j holding codes 8j..8j+7 in its nibbles), xp[64c + 8i + j] = x[64c + 8j + i], so that
// shifting all dwords right by 4i lines nibble i of every dword up with 8 consecutive xp values.
// Codes past the last whole chunk keep their order (xp[k] = x[k]).
void permute_x_4bit(const float* x, int64_t K, float* xp) {
  const int64_t chunks = K / 64;
  for (int64_t c = 0; c < chunks; ++c)
    for (int i = 0; i < 8; ++i)
      for (int j = 0; j < 8; ++j) xp[64 * c + 8 * i + j] = x[64 * c + 8 * j + i];
  for (int64_t k = 64 * chunks; k < K; ++k) xp[k] = x[k];
}

// Decodes one 4-bit row into w in the order of permute_x_4bit (so dot(w, xp) = dot(W[n], x)).
__attribute__((target("avx2,fma"))) void decode_4bit_packed(const uint8_t* packed, int64_t K, const float* cbp,
                                                            float* w, uint8_t* tail) {
  RegCodebook cb;
  cb.t[0] = _mm256_loadu_ps(cbp);
  cb.t[1] = _mm256_loadu_ps(cbp + 8);
  const int64_t chunks = K / 64;
  for (int64_t c = 0; c < chunks; ++c) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(packed + 32 * c));
    float* wc = w + 64 * c;
    for (int i = 0; i < 8; ++i) _mm256_storeu_ps(wc + 8 * i, lookup<4>(cb, _mm256_srl_epi32(v, _mm_cvtsi32_si128(4 * i))));
  }
  const int64_t k0 = 64 * chunks;
  unpack_row_4bit_portable(packed + k0 / 2, K - k0, tail);
  for (int64_t k = k0; k < K; ++k) w[k] = cbp[tail[k - k0]];
}

// B == 1, bits == 4: decode straight from the packed bytes (no unpacked code buffer).
__attribute__((target("avx2,fma"))) float row_b1_4bit_packed(const float* x, const float* xp, int64_t K,
                                                             const uint8_t* packed, const float* cbp, uint8_t* tail) {
  RegCodebook cb;
  cb.t[0] = _mm256_loadu_ps(cbp);
  cb.t[1] = _mm256_loadu_ps(cbp + 8);
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  const int64_t chunks = K / 64;
  for (int64_t c = 0; c < chunks; ++c) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(packed + 32 * c));
    const float* xc = xp + 64 * c;
    acc[0] = _mm256_fmadd_ps(lookup<4>(cb, v), _mm256_loadu_ps(xc), acc[0]);
    acc[1] = _mm256_fmadd_ps(lookup<4>(cb, _mm256_srli_epi32(v, 4)), _mm256_loadu_ps(xc + 8), acc[1]);
    acc[2] = _mm256_fmadd_ps(lookup<4>(cb, _mm256_srli_epi32(v, 8)), _mm256_loadu_ps(xc + 16), acc[2]);
    acc[3] = _mm256_fmadd_ps(lookup<4>(cb, _mm256_srli_epi32(v, 12)), _mm256_loadu_ps(xc + 24), acc[3]);
    acc[0] = _mm256_fmadd_ps(lookup<4>(cb, _mm256_srli_epi32(v, 16)), _mm256_loadu_ps(xc + 32), acc[0]);
    acc[1] = _mm256_fmadd_ps(lookup<4>(cb, _mm256_srli_epi32(v, 20)), _mm256_loadu_ps(xc + 40), acc[1]);
    acc[2] = _mm256_fmadd_ps(lookup<4>(cb, _mm256_srli_epi32(v, 24)), _mm256_loadu_ps(xc + 48), acc[2]);
    acc[3] = _mm256_fmadd_ps(lookup<4>(cb, _mm256_srli_epi32(v, 28)), _mm256_loadu_ps(xc + 56), acc[3]);
  }
  float s = hsum_ps(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
  const int64_t k0 = 64 * chunks;
  unpack_row_4bit_portable(packed + k0 / 2, K - k0, tail);
  for (int64_t k = k0; k < K; ++k) s += x[k] * cbp[tail[k - k0]];
  return s;
}

// x reordered for the fused group path (bits 2, 3, 5): a block of 32 codes is four groups of 8
// codes (`bits` bytes each, one per 64-bit lane); step s (0..3) yields codes 2s and 2s + 1 of each
// group in dword lanes (2t, 2t + 1) for group t. So xp[32b + 8s + 2t + e] = x[32b + 8t + 2s + e].
// Blocks of 32 codes the group path decodes in registers: block blk reads 8 bytes at each of groups
// 4blk..4blk+3, which must stay inside the row of ceil(K * bits / 8) bytes.
int64_t group_block_count(int64_t K, int bits) {
  const int64_t rb = (K * bits + 7) / 8;
  int64_t blk = 0;
  while (32 * (blk + 1) <= K && (4 * blk + 3) * bits + 8 <= rb) ++blk;
  return blk;
}

// Codes past the decoded blocks keep their order (xp[k] = x[k]).
void permute_x_groups(const float* x, int64_t K, int bits, float* xp) {
  const int64_t blocks = group_block_count(K, bits);
  for (int64_t b = 0; b < blocks; ++b)
    for (int s = 0; s < 4; ++s)
      for (int t = 0; t < 4; ++t)
        for (int e = 0; e < 2; ++e) xp[32 * b + 8 * s + 2 * t + e] = x[32 * b + 8 * t + 2 * s + e];
  for (int64_t k = 32 * blocks; k < K; ++k) xp[k] = x[k];
}

// Codes 2s and 2s + 1 of the four 8-code groups held in the 64-bit lanes of v, as dword lanes.
template <int BITS>
__attribute__((target("avx2,fma"))) inline __m256i group_codes(__m256i v, int s2) {
  const __m256i a = _mm256_srl_epi64(v, _mm_cvtsi32_si128(BITS * 2 * s2));
  const __m256i c = _mm256_slli_epi64(_mm256_srl_epi64(v, _mm_cvtsi32_si128(BITS * (2 * s2 + 1))), 32);
  return _mm256_blend_epi32(a, c, 0xAA);
}

__attribute__((target("avx2,fma"))) inline __m256i load_groups(const uint8_t* g, int bits) {
  int64_t q[4];
  for (int t = 0; t < 4; ++t) std::memcpy(&q[t], g + t * bits, 8);
  return _mm256_setr_epi64x(q[0], q[1], q[2], q[3]);
}

// Decodes one row (bits 2, 3, 5) into w in the order of permute_x_groups.
template <int BITS>
__attribute__((target("avx2,fma"))) void decode_groups_packed(const uint8_t* packed, int64_t K, int64_t blocks,
                                                              const float* cbp, float* w, uint8_t* tail) {
  RegCodebook cb;
  alignas(32) float padded[32] = {0};
  std::memcpy(padded, cbp, sizeof(float) * (size_t{1} << BITS));
  if (BITS == 2) std::memcpy(padded + 4, cbp, sizeof(float) * 4);
  for (int i = 0; i < 4; ++i) cb.t[i] = _mm256_load_ps(padded + 8 * i);
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const __m256i v = load_groups(packed + 4 * blk * BITS, BITS);
    for (int s2 = 0; s2 < 4; ++s2) _mm256_storeu_ps(w + 32 * blk + 8 * s2, lookup<BITS>(cb, group_codes<BITS>(v, s2)));
  }
  const int64_t k0 = 32 * blocks;
  unpack_row_generic(packed + 4 * blocks * BITS, K - k0, BITS, tail);
  for (int64_t k = k0; k < K; ++k) w[k] = cbp[tail[k - k0]];
}

// B == 1, bits in {2, 3, 5}: codes come straight from the packed row, 32 per block, by 64-bit
// shifts (a code may straddle bytes; within its 8-code group it never straddles the 64-bit lane).
template <int BITS>
__attribute__((target("avx2,fma"))) float row_b1_groups_packed(const float* x, const float* xp, int64_t K,
                                                              int64_t blocks, const uint8_t* packed,
                                                              const float* cbp, uint8_t* tail) {
  RegCodebook cb;
  alignas(32) float padded[32] = {0};
  std::memcpy(padded, cbp, sizeof(float) * (size_t{1} << BITS));
  // 2-bit codes: vpermps reads 3 index bits; repeat the table so the third (a neighbour's) is moot.
  if (BITS == 2) std::memcpy(padded + 4, cbp, sizeof(float) * 4);
  for (int i = 0; i < 4; ++i) cb.t[i] = _mm256_load_ps(padded + 8 * i);
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  int64_t blk = 0;
  for (; blk < blocks; ++blk) {
    const __m256i v = load_groups(packed + 4 * blk * BITS, BITS);
    const float* xb = xp + 32 * blk;
    for (int s2 = 0; s2 < 4; ++s2)
      acc[s2] = _mm256_fmadd_ps(lookup<BITS>(cb, group_codes<BITS>(v, s2)), _mm256_loadu_ps(xb + 8 * s2), acc[s2]);
  }
  float s = hsum_ps(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
  const int64_t k0 = 32 * blk;  // 32 codes = 4 * BITS bytes: the tail starts on a byte boundary
  unpack_row_generic(packed + 4 * blk * BITS, K - k0, BITS, tail);
  for (int64_t k = k0; k < K; ++k) s += x[k] * cbp[tail[k - k0]];
  return s;
}

template <int BITS>
__attribute__((target("avx2,fma"))) void decode_row_avx2(const uint8_t* codes, int64_t K, const float* cbp, float* w) {
  RegCodebook cb;
  alignas(32) float padded[32] = {0};
  std::memcpy(padded, cbp, sizeof(float) * (size_t{1} << BITS));
  // 2-bit codes: vpermps reads 3 index bits; repeat the table so the third (a neighbour's) is moot.
  if (BITS == 2) std::memcpy(padded + 4, cbp, sizeof(float) * 4);
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
#pragma omp parallel for schedule(static) num_threads(pyserve::num_threads()) if (N * K >= (int64_t{1} << 21))
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
  const bool avx2 = cpu_has_avx2_fma();
#pragma omp parallel for schedule(static) num_threads(pyserve::num_threads()) if (N * K >= (int64_t{1} << 21))
  for (int64_t n = 0; n < N; ++n) unpack_row(packed + n * rb, K, bits, idx + n * K, avx2);
}

void codebook_linear(const float* x, int64_t B, int64_t K, const uint8_t* packed, int64_t N, int bits,
                     const float* codebook, bool per_channel, const float* bias, float* y) {
  if (B == 0 || N == 0) return;
  const int64_t rb = packed_row_bytes(K, bits);
  const int64_t C = int64_t{1} << bits;
  const bool avx2 = cpu_has_avx2_fma();
  // bits <= 5 with AVX2: decode from the packed row in registers, with x reordered once per call
  // to match the order the codes come out in (B == 1: fused with the dot product; B > 1: into a
  // decoded row shared by the B dot products).
  const bool fused = avx2 && bits <= 5;
  (void)fused;
  int64_t blocks = 0;
  std::vector<float> xp;
#if PYSERVE_AVX2
  if (fused) {
    blocks = bits == 4 ? K / 64 : group_block_count(K, bits);
    xp.resize(static_cast<size_t>(B * K));
    for (int64_t b = 0; b < B; ++b) {
      if (bits == 4)
        permute_x_4bit(x + b * K, K, xp.data() + b * K);
      else
        permute_x_groups(x + b * K, K, bits, xp.data() + b * K);
    }
  }
#endif
#pragma omp parallel num_threads(pyserve::num_threads()) if (B * N * K >= kParallelMinMacs)
  {
    // Per-thread scratch: codes padded by 8 so 8-byte code loads never leave the buffer.
    std::vector<uint8_t> codes(static_cast<size_t>(K) + 8, 0);
    std::vector<float> w(static_cast<size_t>(K));
    std::vector<float> out(static_cast<size_t>(B));
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
#if PYSERVE_AVX2
      if (fused) {
        const float* cb = per_channel ? codebook + n * C : codebook;
        const uint8_t* row = packed + n * rb;
        if (B == 1) {
          float v;
          switch (bits) {
            case 2: v = row_b1_groups_packed<2>(x, xp.data(), K, blocks, row, cb, codes.data()); break;
            case 3: v = row_b1_groups_packed<3>(x, xp.data(), K, blocks, row, cb, codes.data()); break;
            case 4: v = row_b1_4bit_packed(x, xp.data(), K, row, cb, codes.data()); break;
            default: v = row_b1_groups_packed<5>(x, xp.data(), K, blocks, row, cb, codes.data()); break;
          }
          y[n] = v + (bias ? bias[n] : 0.0f);
          continue;
        }
        switch (bits) {
          case 2: decode_groups_packed<2>(row, K, blocks, cb, w.data(), codes.data()); break;
          case 3: decode_groups_packed<3>(row, K, blocks, cb, w.data(), codes.data()); break;
          case 4: decode_4bit_packed(row, K, cb, w.data(), codes.data()); break;
          default: decode_groups_packed<5>(row, K, blocks, cb, w.data(), codes.data()); break;
        }
        dots_avx2(xp.data(), B, K, w.data(), out.data());
        const float add = bias ? bias[n] : 0.0f;
        for (int64_t b = 0; b < B; ++b) y[b * N + n] = out[b] + add;
        continue;
      }
#endif
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
