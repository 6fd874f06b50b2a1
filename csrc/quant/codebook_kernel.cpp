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

// x reordered for the fused 4-bit path (vpshufb byte planes, see BytePlanes4): within each chunk
// of 64 codes (32 packed bytes; byte i holds codes 2i (low nibble) and 2i + 1 (high nibble)), the
// low nibbles come first (s = 0), then the high ones (s = 1); each half yields four vectors q of 8
// fp32 weights whose lanes l come from bytes pos = 4q + l (l < 4) and 16 + 4q + l - 4 (l >= 4),
// the order vpunpck{l,h}{bw,wd} leave them in. So xp[64c + 32s + 8q + l] = x[64c + 2 pos + s].
// Codes past the last whole chunk keep their order (xp[k] = x[k]).
void permute_x_4bit(const float* x, int64_t K, float* xp) {
  const int64_t chunks = K / 64;
  for (int64_t c = 0; c < chunks; ++c)
    for (int s = 0; s < 2; ++s)
      for (int q = 0; q < 4; ++q)
        for (int l = 0; l < 8; ++l) {
          const int pos = l < 4 ? 4 * q + l : 16 + 4 * q + (l - 4);
          xp[64 * c + 32 * s + 8 * q + l] = x[64 * c + 2 * pos + s];
        }
  for (int64_t k = 64 * chunks; k < K; ++k) xp[k] = x[k];
}

// A 16-entry fp32 codebook as four byte planes (plane j: byte j of entries 0..15), each repeated in
// both 128-bit lanes, so one vpshufb looks up byte j of 32 codes at once. The lookup is exact (it
// moves bits), and 12 shuffles per 32 weights (4 vpshufb, 8 unpacks) replace the 4 vpermps and 4
// vblendvps of the register-table lookup: 1.7-1.9x faster at B = 1 on Zen 3
// (benchmarks/native/codebook_lut.cpp).
struct BytePlanes4 {
  __m256i p[4];
};

__attribute__((target("avx2,fma"))) inline BytePlanes4 byte_planes4(const float* cbp) {
  // Gather byte j of each of 4 floats into dword j, then transpose the 4 x 4 dword block.
  const __m128i gather = _mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  __m128i r[4];
  for (int i = 0; i < 4; ++i)
    r[i] = _mm_shuffle_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(cbp + 4 * i)), gather);
  const __m128i t0 = _mm_unpacklo_epi32(r[0], r[1]), t1 = _mm_unpackhi_epi32(r[0], r[1]);
  const __m128i t2 = _mm_unpacklo_epi32(r[2], r[3]), t3 = _mm_unpackhi_epi32(r[2], r[3]);
  BytePlanes4 bp;
  bp.p[0] = _mm256_broadcastsi128_si256(_mm_unpacklo_epi64(t0, t2));
  bp.p[1] = _mm256_broadcastsi128_si256(_mm_unpackhi_epi64(t0, t2));
  bp.p[2] = _mm256_broadcastsi128_si256(_mm_unpacklo_epi64(t1, t3));
  bp.p[3] = _mm256_broadcastsi128_si256(_mm_unpackhi_epi64(t1, t3));
  return bp;
}

// The 32 weights of 32 codes (one per byte, values 0..15) as four fp32 vectors in xp order.
__attribute__((target("avx2,fma"))) inline void lookup_planes4(const BytePlanes4& bp, __m256i codes, __m256 f[4]) {
  const __m256i b0 = _mm256_shuffle_epi8(bp.p[0], codes), b1 = _mm256_shuffle_epi8(bp.p[1], codes);
  const __m256i b2 = _mm256_shuffle_epi8(bp.p[2], codes), b3 = _mm256_shuffle_epi8(bp.p[3], codes);
  const __m256i t0 = _mm256_unpacklo_epi8(b0, b1), t1 = _mm256_unpackhi_epi8(b0, b1);
  const __m256i t2 = _mm256_unpacklo_epi8(b2, b3), t3 = _mm256_unpackhi_epi8(b2, b3);
  f[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(t0, t2));
  f[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(t0, t2));
  f[2] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(t1, t3));
  f[3] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(t1, t3));
}

// Decodes one 4-bit row into w in the order of permute_x_4bit (so dot(w, xp) = dot(W[n], x)).
__attribute__((target("avx2,fma"))) void decode_4bit_packed(const uint8_t* packed, int64_t K, const float* cbp,
                                                            float* w, uint8_t* tail) {
  const BytePlanes4 bp = byte_planes4(cbp);
  const __m256i low = _mm256_set1_epi8(0x0f);
  const int64_t chunks = K / 64;
  for (int64_t c = 0; c < chunks; ++c) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(packed + 32 * c));
    float* wc = w + 64 * c;
    __m256 f[4];
    lookup_planes4(bp, _mm256_and_si256(v, low), f);
    for (int q = 0; q < 4; ++q) _mm256_storeu_ps(wc + 8 * q, f[q]);
    lookup_planes4(bp, _mm256_and_si256(_mm256_srli_epi16(v, 4), low), f);
    for (int q = 0; q < 4; ++q) _mm256_storeu_ps(wc + 32 + 8 * q, f[q]);
  }
  const int64_t k0 = 64 * chunks;
  unpack_row_4bit_portable(packed + k0 / 2, K - k0, tail);
  for (int64_t k = k0; k < K; ++k) w[k] = cbp[tail[k - k0]];
}

// B == 1, bits == 4: decode straight from the packed bytes (no unpacked code buffer).
__attribute__((target("avx2,fma"))) float row_b1_4bit_packed(const float* x, const float* xp, int64_t K,
                                                             const uint8_t* packed, const float* cbp, uint8_t* tail) {
  const BytePlanes4 bp = byte_planes4(cbp);
  const __m256i low = _mm256_set1_epi8(0x0f);
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  const int64_t chunks = K / 64;
  for (int64_t c = 0; c < chunks; ++c) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(packed + 32 * c));
    const float* xc = xp + 64 * c;
    __m256 f[4];
    lookup_planes4(bp, _mm256_and_si256(v, low), f);
    for (int q = 0; q < 4; ++q) acc[q] = _mm256_fmadd_ps(f[q], _mm256_loadu_ps(xc + 8 * q), acc[q]);
    lookup_planes4(bp, _mm256_and_si256(_mm256_srli_epi16(v, 4), low), f);
    for (int q = 0; q < 4; ++q) acc[q] = _mm256_fmadd_ps(f[q], _mm256_loadu_ps(xc + 32 + 8 * q), acc[q]);
  }
  float s = hsum_ps(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
  const int64_t k0 = 64 * chunks;
  unpack_row_4bit_portable(packed + k0 / 2, K - k0, tail);
  for (int64_t k = k0; k < K; ++k) s += x[k] * cbp[tail[k - k0]];
  return s;
}

// --- 5 bits: codes to bytes, then byte planes of the two 16-entry halves ----------------------------
// A block of 32 codes is 20 packed bytes (four 8-code groups of 5 bytes). One 32-byte load, two
// vpermd put group g's bytes in a 128-bit lane at offset g (lanes: A = groups 0, 1; B = 2, 3), a
// vpshufb makes each code's 16-bit window a word, vpmullw by 2**(8 - shift) moves the code to bits
// 8..12, and vpsrlw + vpackuswb leave the 32 codes as bytes (upper 3 bits masked off). The byte
// at position pos (lane pos / 16, i = pos % 16) then holds code 8 lane + i (i < 8) or
// 16 + 8 lane + i - 8 (i >= 8) of the block.
int code_of_byte_5bit(int pos) {
  const int lane = pos / 16, i = pos % 16;
  return i < 8 ? 8 * lane + i : 16 + 8 * lane + (i - 8);
}

// x reordered for the 5-bit path: xp[32b + 8q + l] = x[32b + code_of_byte_5bit(pos)] with pos as in
// permute_x_4bit (the unpack order of lookup_planes). Codes past the last whole block keep their order.
void permute_x_5bit(const float* x, int64_t K, float* xp) {
  const int64_t blocks = K / 32;
  for (int64_t b = 0; b < blocks; ++b)
    for (int q = 0; q < 4; ++q)
      for (int l = 0; l < 8; ++l) {
        const int pos = l < 4 ? 4 * q + l : 16 + 4 * q + (l - 4);
        xp[32 * b + 8 * q + l] = x[32 * b + code_of_byte_5bit(pos)];
      }
  for (int64_t k = 32 * blocks; k < K; ++k) xp[k] = x[k];
}

// The 32 codes of the block at src (reads src[0..32); only src[0..21) affect the result).
__attribute__((target("avx2,fma"))) inline __m256i codes_5bit(const uint8_t* src) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
  const __m256i a = _mm256_permutevar8x32_epi32(v, _mm256_setr_epi32(0, 1, 2, 3, 1, 2, 3, 4));
  const __m256i b = _mm256_permutevar8x32_epi32(v, _mm256_setr_epi32(2, 3, 4, 5, 3, 4, 5, 6));
  // Code i of a group starts at bit 5i: byte 5i / 8, shift 5i % 8 (0, 5, 2, 7, 4, 1, 6, 3).
#define PYSERVE_W5(o) o, o + 1, o, o + 1, o + 1, o + 2, o + 1, o + 2, o + 2, o + 3, o + 3, o + 4, o + 3, o + 4, o + 4, o + 5
  const __m256i wa = _mm256_setr_epi8(PYSERVE_W5(0), PYSERVE_W5(1));
  const __m256i wb = _mm256_setr_epi8(PYSERVE_W5(2), PYSERVE_W5(3));
#undef PYSERVE_W5
  const __m256i mul = _mm256_setr_epi16(256, 8, 64, 2, 16, 128, 4, 32, 256, 8, 64, 2, 16, 128, 4, 32);
  const __m256i ca = _mm256_srli_epi16(_mm256_mullo_epi16(_mm256_shuffle_epi8(a, wa), mul), 8);
  const __m256i cb = _mm256_srli_epi16(_mm256_mullo_epi16(_mm256_shuffle_epi8(b, wb), mul), 8);
  return _mm256_and_si256(_mm256_packus_epi16(ca, cb), _mm256_set1_epi8(0x1f));
}

// 32-entry codebook: byte planes of entries 0..15 and 16..31, chosen per byte by code bit 4.
struct BytePlanes5 {
  BytePlanes4 lo, hi;
};

__attribute__((target("avx2,fma"))) inline void lookup_planes5(const BytePlanes5& bp, __m256i codes, __m256 f[4]) {
  const __m256i sel = _mm256_slli_epi16(codes, 3);  // bit 4 of each byte to bit 7 (vpblendvb's)
  __m256i b[4];
  for (int j = 0; j < 4; ++j)
    b[j] = _mm256_blendv_epi8(_mm256_shuffle_epi8(bp.lo.p[j], codes), _mm256_shuffle_epi8(bp.hi.p[j], codes), sel);
  const __m256i t0 = _mm256_unpacklo_epi8(b[0], b[1]), t1 = _mm256_unpackhi_epi8(b[0], b[1]);
  const __m256i t2 = _mm256_unpacklo_epi8(b[2], b[3]), t3 = _mm256_unpackhi_epi8(b[2], b[3]);
  f[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(t0, t2));
  f[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(t0, t2));
  f[2] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(t1, t3));
  f[3] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(t1, t3));
}

// Source of block blk of a 5-bit row of rb bytes: the row itself while a 32-byte load stays inside
// it, else a copy of the row's remaining bytes in buf (zero-padded to 32 bytes).
inline const uint8_t* block_src_5bit(const uint8_t* row, int64_t rb, int64_t blk, uint8_t* buf) {
  const int64_t off = 20 * blk;
  if (off + 32 <= rb) return row + off;
  std::memset(buf, 0, 32);
  std::memcpy(buf, row + off, static_cast<size_t>(std::min<int64_t>(32, rb - off)));
  return buf;
}

// Decodes one 5-bit row into w in the order of permute_x_5bit.
__attribute__((target("avx2,fma"))) void decode_5bit_packed(const uint8_t* packed, int64_t K, const float* cbp,
                                                            float* w, uint8_t* tail) {
  const BytePlanes5 bp{byte_planes4(cbp), byte_planes4(cbp + 16)};
  const int64_t rb = packed_row_bytes(K, 5), blocks = K / 32;
  alignas(32) uint8_t buf[32];
  for (int64_t blk = 0; blk < blocks; ++blk) {
    __m256 f[4];
    lookup_planes5(bp, codes_5bit(block_src_5bit(packed, rb, blk, buf)), f);
    for (int q = 0; q < 4; ++q) _mm256_storeu_ps(w + 32 * blk + 8 * q, f[q]);
  }
  const int64_t k0 = 32 * blocks;
  unpack_row_generic(packed + 20 * blocks, K - k0, 5, tail);
  for (int64_t k = k0; k < K; ++k) w[k] = cbp[tail[k - k0]];
}

// B == 1, bits == 5: decode in registers and multiply.
__attribute__((target("avx2,fma"))) float row_b1_5bit_packed(const float* x, const float* xp, int64_t K,
                                                             const uint8_t* packed, const float* cbp, uint8_t* tail) {
  const BytePlanes5 bp{byte_planes4(cbp), byte_planes4(cbp + 16)};
  const int64_t rb = packed_row_bytes(K, 5), blocks = K / 32;
  alignas(32) uint8_t buf[32];
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  for (int64_t blk = 0; blk < blocks; ++blk) {
    __m256 f[4];
    lookup_planes5(bp, codes_5bit(block_src_5bit(packed, rb, blk, buf)), f);
    const float* xb = xp + 32 * blk;
    for (int q = 0; q < 4; ++q) acc[q] = _mm256_fmadd_ps(f[q], _mm256_loadu_ps(xb + 8 * q), acc[q]);
  }
  float s = hsum_ps(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
  const int64_t k0 = 32 * blocks;
  unpack_row_generic(packed + 20 * blocks, K - k0, 5, tail);
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

// out0[b] = dot(x[b, :], w0), out1[b] = dot(x[b, :], w1): a 4 x 2 register tile (8 accumulators,
// 6 loads per 8 FMAs against 3 per 2 for dots_avx2), so B > 1 is bound by FMAs, not loads.
__attribute__((target("avx2,fma"))) void dots2_avx2(const float* x, int64_t B, int64_t K, const float* w0,
                                                    const float* w1, float* out0, float* out1) {
  int64_t b = 0;
  for (; b + 4 <= B; b += 4) {
    const float* xr[4] = {x + b * K, x + (b + 1) * K, x + (b + 2) * K, x + (b + 3) * K};
    __m256 a[4][2];
    for (int i = 0; i < 4; ++i) a[i][0] = a[i][1] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
      const __m256 v0 = _mm256_loadu_ps(w0 + k), v1 = _mm256_loadu_ps(w1 + k);
      for (int i = 0; i < 4; ++i) {
        const __m256 xv = _mm256_loadu_ps(xr[i] + k);
        a[i][0] = _mm256_fmadd_ps(v0, xv, a[i][0]);
        a[i][1] = _mm256_fmadd_ps(v1, xv, a[i][1]);
      }
    }
    for (int i = 0; i < 4; ++i) {
      float s0 = hsum_ps(a[i][0]), s1 = hsum_ps(a[i][1]);
      for (int64_t t = k; t < K; ++t) {
        s0 += xr[i][t] * w0[t];
        s1 += xr[i][t] * w1[t];
      }
      out0[b + i] = s0;
      out1[b + i] = s1;
    }
  }
  if (b < B) {
    dots_avx2(x + b * K, B - b, K, w0, out0 + b);
    dots_avx2(x + b * K, B - b, K, w1, out1 + b);
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
    blocks = bits >= 4 ? 0 : group_block_count(K, bits);
    xp.resize(static_cast<size_t>(B * K));
    for (int64_t b = 0; b < B; ++b) {
      if (bits == 4)
        permute_x_4bit(x + b * K, K, xp.data() + b * K);
      else if (bits == 5)
        permute_x_5bit(x + b * K, K, xp.data() + b * K);
      else
        permute_x_groups(x + b * K, K, bits, xp.data() + b * K);
    }
  }
#endif
#if PYSERVE_AVX2
  if (fused && B > 1) {
    // Two weight rows at a time: each decoded once, then a 4 x 2 tile of dot products.
    const auto decode = [&](int64_t n, float* w, uint8_t* tail) {
      const float* cb = per_channel ? codebook + n * C : codebook;
      const uint8_t* row = packed + n * rb;
      switch (bits) {
        case 2: decode_groups_packed<2>(row, K, blocks, cb, w, tail); break;
        case 3: decode_groups_packed<3>(row, K, blocks, cb, w, tail); break;
        case 4: decode_4bit_packed(row, K, cb, w, tail); break;
        default: decode_5bit_packed(row, K, cb, w, tail); break;
      }
    };
#pragma omp parallel num_threads(pyserve::num_threads()) if (B * N * K >= kParallelMinMacs)
    {
      std::vector<uint8_t> tail(static_cast<size_t>(K) + 8, 0);
      std::vector<float> w(static_cast<size_t>(2 * K));
      std::vector<float> out(static_cast<size_t>(2 * B));
      float *w0 = w.data(), *w1 = w.data() + K, *o0 = out.data(), *o1 = out.data() + B;
#pragma omp for schedule(static)
      for (int64_t pair = 0; pair < (N + 1) / 2; ++pair) {
        const int64_t n = 2 * pair;
        decode(n, w0, tail.data());
        if (n + 1 < N) {
          decode(n + 1, w1, tail.data());
          dots2_avx2(xp.data(), B, K, w0, w1, o0, o1);
        } else {
          dots_avx2(xp.data(), B, K, w0, o0);
        }
        for (int64_t r = n; r < std::min(n + 2, N); ++r) {
          const float* o = r == n ? o0 : o1;
          const float add = bias ? bias[r] : 0.0f;
          for (int64_t b = 0; b < B; ++b) y[b * N + r] = o[b] + add;
        }
      }
    }
    return;
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
            default: v = row_b1_5bit_packed(x, xp.data(), K, row, cb, codes.data()); break;
          }
          y[n] = v + (bias ? bias[n] : 0.0f);
          continue;
        }
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
