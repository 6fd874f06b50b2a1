// Multi-head attention from a fused Q|K|V projection (CPU, fp32): attention_kernel.h.
//
// Per (batch, head): K^T of the head is packed once ([D][Sp], Sp = S rounded up to 16, zero columns
// after S), then each tile of 4 query rows computes its 4 x Sp scores with a 4 x 16 FMA micro-kernel
// (the scores of a tile stay in L1), adds the mask, takes the softmax row by row (maximum, exp, sum)
// and the weighted sum of the value rows (copied together once per head), two query rows at a time with D / 8
// accumulators each; the sum is divided out at the end. Measured against torch's
// scaled_dot_product_attention at MiniLM's shape (B = 1, S = 128, H = 12, D = 32, one thread):
// benchmarks/bert_attention.py.
#include "quant/attention_kernel.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "common/cpu_features.h"
#include "common/threads.h"

#if PYSERVE_AVX2
#include <immintrin.h>
#endif

namespace pyserve {
namespace quant {

namespace {

constexpr int64_t kParallelMinMacs = int64_t{1} << 21;
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

void fill_nan(float* o, int64_t D) {
  for (int64_t d = 0; d < D; ++d) o[d] = kNaN;
}

// One head of one batch row, scalar. qkv_b, out_b: the batch row's [S, 3E] and [S, E]; mask_b: its
// mask rows (or null).
void head_portable(const float* qkv_b, int64_t S, int64_t H, int64_t D, int64_t h, const float* mask_b, int64_t mq,
                   float scale, float* out_b, std::vector<float>& s) {
  const int64_t E = H * D, row = 3 * E;
  if (static_cast<int64_t>(s.size()) < S) s.resize(static_cast<size_t>(S));
  for (int64_t i = 0; i < S; ++i) {
    const float* q = qkv_b + i * row + h * D;
    const float* m = mask_b ? mask_b + i * mq : nullptr;
    float* o = out_b + i * E + h * D;
    float mx = -std::numeric_limits<float>::infinity();
    bool nan = false;
    for (int64_t j = 0; j < S; ++j) {
      const float* k = qkv_b + j * row + E + h * D;
      float acc = 0.0f;
      for (int64_t d = 0; d < D; ++d) acc += q[d] * k[d];
      const float v = acc * scale + (m ? m[j] : 0.0f);
      s[j] = v;
      nan |= std::isnan(v);
      mx = v > mx ? v : mx;
    }
    if (nan || !(mx > -std::numeric_limits<float>::infinity())) {
      fill_nan(o, D);
      continue;
    }
    float sum = 0.0f;
    for (int64_t j = 0; j < S; ++j) {
      s[j] = std::exp(s[j] - mx);
      sum += s[j];
    }
    for (int64_t d = 0; d < D; ++d) o[d] = 0.0f;
    for (int64_t j = 0; j < S; ++j) {
      const float* v = qkv_b + j * row + 2 * E + h * D;
      for (int64_t d = 0; d < D; ++d) o[d] += s[j] * v[d];
    }
    const float inv = 1.0f / sum;
    for (int64_t d = 0; d < D; ++d) o[d] *= inv;
  }
}

#if PYSERVE_AVX2
// exp(x) for 8 floats, x <= 0 (scores minus their row maximum): x = n ln2 + r with n = round(x / ln2)
// by the 1.5 * 2^23 addition (n in the low mantissa bits, no round or convert instruction),
// |r| <= ln2 / 2, e^r by Cephes' expf polynomial (degree 5 for (e^r - 1 - r) / r^2), and 2^n added
// into the exponent field. Within 2 ulp of std::exp down to x = -87; below (masked scores: about
// -3.4e38 after the maximum is subtracted, or -inf) exactly 0, as expf underflows. NaN does not
// reach here (rows with a NaN score are filled with NaN first).
__attribute__((target("avx2,fma"))) inline __m256 exp256(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.0f);
  const __m256 keep = _mm256_cmp_ps(x, lo, _CMP_GE_OQ);
  x = _mm256_max_ps(x, lo);
  const __m256 magic = _mm256_set1_ps(12582912.0f);  // 1.5 * 2^23
  const __m256 t = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), magic);
  const __m256 n = _mm256_sub_ps(t, magic);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500E-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507E-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073E-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894E-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459E-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201E-1f));
  __m256 y = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r);
  y = _mm256_add_ps(y, _mm256_set1_ps(1.0f));
  // 2^n: n (|n| <= 126) sits in the low bits of t as n + 2^22 + 2^23 mantissa offset; shifting it
  // into the exponent field and adding multiplies y in [0.7, 1.5) by 2^n (normal results only).
  const __m256i e = _mm256_slli_epi32(_mm256_castps_si256(t), 23);
  y = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(y), e));
  return _mm256_and_ps(y, keep);
}

// exp(x) for x <= 0 to about 3e-6 relative, for the bfloat16 kernel (whose exponentials are then
// rounded to bfloat16, 2^-9): x log2(e) = n + f, |f| <= 1/2, 2^f by a degree-4 polynomial with
// constant term 1 (a near-minimax fit on [-1/2, 1/2], relative error 2.9e-6 in float32), 2^n added into the exponent
// field. 6 FMA-class ops per 8 values against exp256's 10. Exactly 0 below -87, as exp256.
__attribute__((target("avx2,fma"))) inline __m256 exp256_fast(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.0f);
  const __m256 keep = _mm256_cmp_ps(x, lo, _CMP_GE_OQ);
  x = _mm256_max_ps(x, lo);
  const __m256 log2e = _mm256_set1_ps(1.44269504088896341f);
  const __m256 magic = _mm256_set1_ps(12582912.0f);  // 1.5 * 2^23: n in the low mantissa bits of t
  const __m256 t = _mm256_fmadd_ps(x, log2e, magic);
  const __m256 n = _mm256_sub_ps(t, magic);
  const __m256 f = _mm256_fmsub_ps(x, log2e, n);
  __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(0.009582852944731712f), f, _mm256_set1_ps(0.055906426161527634f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.24024099111557007f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.6931241750717163f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));  // exp(0) = 1 exactly: a lone key's weight is 1
  const __m256i e = _mm256_slli_epi32(_mm256_castps_si256(t), 23);
  p = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), e));
  return _mm256_and_ps(p, keep);
}

__attribute__((target("avx2,fma"))) inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

__attribute__((target("avx2,fma"))) inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Softmax of one score row in place (unnormalized: the exponentials), after adding the mask row m
// (null: none) to its first S scores; the row is padded to Sp (a multiple of 16) with -inf. Returns
// the sum of the exponentials, or NaN when the row holds a NaN or no score above -inf.
// FAST: exp256_fast (the bfloat16 kernel) instead of exp256.
template <bool FAST = false>
__attribute__((target("avx2,fma"))) float softmax_row(float* s, const float* m, int64_t S, int64_t Sp) {
  for (int64_t j = S; j < Sp; ++j) s[j] = -std::numeric_limits<float>::infinity();
  __m256 vmax = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 unord = _mm256_setzero_ps();
  int64_t j = 0;
  if (m) {
    for (; j + 8 <= S; j += 8) {
      const __m256 v = _mm256_add_ps(_mm256_loadu_ps(s + j), _mm256_loadu_ps(m + j));
      _mm256_storeu_ps(s + j, v);
      vmax = _mm256_max_ps(vmax, v);
      unord = _mm256_or_ps(unord, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    for (int64_t t = j; t < S; ++t) s[t] += m[t];
  }
  for (; j < Sp; j += 8) {
    const __m256 v = _mm256_loadu_ps(s + j);
    vmax = _mm256_max_ps(vmax, v);
    unord = _mm256_or_ps(unord, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  }
  const float mx = hmax(vmax);
  if (_mm256_movemask_ps(unord) != 0 || !(mx > -std::numeric_limits<float>::infinity())) return kNaN;
  const __m256 mv = _mm256_set1_ps(mx);
  __m256 sum0 = _mm256_setzero_ps(), sum1 = _mm256_setzero_ps();
  for (j = 0; j + 16 <= Sp; j += 16) {
    const __m256 x0 = _mm256_sub_ps(_mm256_loadu_ps(s + j), mv), x1 = _mm256_sub_ps(_mm256_loadu_ps(s + j + 8), mv);
    const __m256 e0 = FAST ? exp256_fast(x0) : exp256(x0);
    const __m256 e1 = FAST ? exp256_fast(x1) : exp256(x1);
    _mm256_storeu_ps(s + j, e0);
    _mm256_storeu_ps(s + j + 8, e1);
    sum0 = _mm256_add_ps(sum0, e0);
    sum1 = _mm256_add_ps(sum1, e1);
  }
  return hsum(_mm256_add_ps(sum0, sum1));
}

// dst[c * lds + r] = src[r * ls + c] for an 8 x 8 block.
__attribute__((target("avx2,fma"))) inline void transpose8(const float* src, int64_t ls, float* dst, int64_t lds) {
  __m256 r0 = _mm256_loadu_ps(src), r1 = _mm256_loadu_ps(src + ls), r2 = _mm256_loadu_ps(src + 2 * ls),
         r3 = _mm256_loadu_ps(src + 3 * ls), r4 = _mm256_loadu_ps(src + 4 * ls), r5 = _mm256_loadu_ps(src + 5 * ls),
         r6 = _mm256_loadu_ps(src + 6 * ls), r7 = _mm256_loadu_ps(src + 7 * ls);
  const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1), t2 = _mm256_unpacklo_ps(r2, r3),
               t3 = _mm256_unpackhi_ps(r2, r3), t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5),
               t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE),
               u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE),
               u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE),
               u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r0 = _mm256_permute2f128_ps(u0, u4, 0x20);
  r1 = _mm256_permute2f128_ps(u1, u5, 0x20);
  r2 = _mm256_permute2f128_ps(u2, u6, 0x20);
  r3 = _mm256_permute2f128_ps(u3, u7, 0x20);
  r4 = _mm256_permute2f128_ps(u0, u4, 0x31);
  r5 = _mm256_permute2f128_ps(u1, u5, 0x31);
  r6 = _mm256_permute2f128_ps(u2, u6, 0x31);
  r7 = _mm256_permute2f128_ps(u3, u7, 0x31);
  _mm256_storeu_ps(dst, r0);
  _mm256_storeu_ps(dst + lds, r1);
  _mm256_storeu_ps(dst + 2 * lds, r2);
  _mm256_storeu_ps(dst + 3 * lds, r3);
  _mm256_storeu_ps(dst + 4 * lds, r4);
  _mm256_storeu_ps(dst + 5 * lds, r5);
  _mm256_storeu_ps(dst + 6 * lds, r6);
  _mm256_storeu_ps(dst + 7 * lds, r7);
}

// K^T of head h ([D][Sp], zero columns from S) and a contiguous copy of V ([S][D]): the value rows in
// place sit 3 E floats apart, which maps them to a few L1 sets (at E = 384: 8 of 64), so the passes
// over them would come from L2.
__attribute__((target("avx2,fma"))) void pack_kv(const float* qkv_b, int64_t S, int64_t H, int64_t D, int64_t h,
                                                 float* kt, float* vc) {
  const int64_t E = H * D, row = 3 * E, Sp = (S + 15) / 16 * 16;
  int64_t j = 0;
  for (; j + 8 <= S; j += 8) {  // 8 x 8 blocks of K transposed in registers
    const float* k = qkv_b + j * row + E + h * D;
    for (int64_t d = 0; d < D; d += 8) transpose8(k + d, row, kt + d * Sp + j, Sp);
  }
  for (; j < S; ++j) {
    const float* k = qkv_b + j * row + E + h * D;
    for (int64_t d = 0; d < D; ++d) kt[d * Sp + j] = k[d];
  }
  for (int64_t t = 0; t < S; ++t) std::memcpy(vc + t * D, qkv_b + t * row + 2 * E + h * D, sizeof(float) * static_cast<size_t>(D));
  for (int64_t d = 0; d < D; ++d)
    for (int64_t j = S; j < Sp; ++j) kt[d * Sp + j] = 0.0f;
}

// C[r][0..16) = rs[r] * sum_k A[r][k] B[k][0..16) for the first `rows` (1..6) of 6 rows: 12
// accumulators, so the FMA latency (4 cycles on Zen 3, 2 per cycle) is covered; with 8 (4 rows) the
// loop ran at ~55% of the FMA rate. Rows past `rows` repeat the last one (computed, not stored).
// Named accumulators: in an array GCC 12 kept them on the stack (a store per FMA). QK^T (A = query
// rows, B = K^T) and PV (A = softmax rows, B = V) both run on it.
__attribute__((target("avx2,fma"))) void micro_rows(int rows, const float* a, int64_t lda, const float* b,
                                                    int64_t ldb, int64_t kn, float* c, int64_t ldc, const float* rs) {
  const float* a0 = a;
  const float* a1 = a + std::min(1, rows - 1) * lda;
  const float* a2 = a + std::min(2, rows - 1) * lda;
  const float* a3 = a + std::min(3, rows - 1) * lda;
  const float* a4 = a + std::min(4, rows - 1) * lda;
  const float* a5 = a + std::min(5, rows - 1) * lda;
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00,
         c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  for (int64_t k = 0; k < kn; ++k, b += ldb) {
    const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
    __m256 ab = _mm256_broadcast_ss(a0 + k);
    c00 = _mm256_fmadd_ps(ab, b0, c00);
    c01 = _mm256_fmadd_ps(ab, b1, c01);
    ab = _mm256_broadcast_ss(a1 + k);
    c10 = _mm256_fmadd_ps(ab, b0, c10);
    c11 = _mm256_fmadd_ps(ab, b1, c11);
    ab = _mm256_broadcast_ss(a2 + k);
    c20 = _mm256_fmadd_ps(ab, b0, c20);
    c21 = _mm256_fmadd_ps(ab, b1, c21);
    ab = _mm256_broadcast_ss(a3 + k);
    c30 = _mm256_fmadd_ps(ab, b0, c30);
    c31 = _mm256_fmadd_ps(ab, b1, c31);
    ab = _mm256_broadcast_ss(a4 + k);
    c40 = _mm256_fmadd_ps(ab, b0, c40);
    c41 = _mm256_fmadd_ps(ab, b1, c41);
    ab = _mm256_broadcast_ss(a5 + k);
    c50 = _mm256_fmadd_ps(ab, b0, c50);
    c51 = _mm256_fmadd_ps(ab, b1, c51);
  }
  const __m256 out[6][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
  for (int r = 0; r < rows; ++r) {
    const __m256 s = _mm256_set1_ps(rs[r]);
    _mm256_storeu_ps(c + r * ldc, _mm256_mul_ps(out[r][0], s));
    _mm256_storeu_ps(c + r * ldc + 8, _mm256_mul_ps(out[r][1], s));
  }
}

constexpr int kRows = 6;  // query rows per tile

// One head of one batch row (D % 16 == 0). kt: [D][Sp] scratch; vc: [S][D] scratch; sc: [6][Sp] scratch.
__attribute__((target("avx2,fma"))) void head_avx2(const float* qkv_b, int64_t S, int64_t H, int64_t D, int64_t h,
                                                   const float* mask_b, int64_t mq, float scale, float* out_b,
                                                   float* kt, float* vc, float* sc) {
  const int64_t E = H * D, row = 3 * E, Sp = (S + 15) / 16 * 16;
  pack_kv(qkv_b, S, H, D, h, kt, vc);
  float scales[kRows];
  for (int r = 0; r < kRows; ++r) scales[r] = scale;
  for (int64_t i0 = 0; i0 < S; i0 += kRows) {
    const int R = static_cast<int>(std::min<int64_t>(kRows, S - i0));
    const float* q = qkv_b + i0 * row + h * D;
    for (int64_t j = 0; j < Sp; j += 16) micro_rows(R, q, row, kt + j, Sp, D, sc + j, Sp, scales);
    float inv[kRows];
    for (int r = 0; r < R; ++r) {
      const float sum = softmax_row(sc + r * Sp, mask_b ? mask_b + (i0 + r) * mq : nullptr, S, Sp);
      inv[r] = std::isnan(sum) ? kNaN : 1.0f / sum;  // a NaN row: every output NaN
    }
    float* o = out_b + i0 * E + h * D;
    for (int64_t c = 0; c < D; c += 16) micro_rows(R, sc, Sp, vc + c, D, S, o + c, E, inv);
  }
}
#endif

#if PYSERVE_AVX512_BF16
#define PYSERVE_BF16 __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512bf16")))

// n fp32 (n % 16 == 0) -> n / 2 words of two bfloat16 (round to nearest even): word p holds x[2p] in
// its low half and x[2p + 1] in its high half, the operand layout of vdpbf16ps.
PYSERVE_BF16 inline void to_pairs(const float* x, int64_t n, uint32_t* w) {
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + i + 16), _mm512_loadu_ps(x + i));
    _mm512_storeu_si512(w + i / 2, (__m512i)v);
  }
  if (i < n) _mm256_storeu_si256(reinterpret_cast<__m256i*>(w + i / 2), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(x + i)));
}

// 16 words from rows a (low halves) and b (high halves), 16 columns each.
PYSERVE_BF16 inline __m512i pair_rows(const float* a, const float* b) {
  const __m512i lo = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(a)));
  const __m512i hi = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(b)));
  return _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16));
}

// C[r][0 .. 16 NC) = rs[r] * sum_k A[r] . B[k] over kn word pairs: A rows of words (lda words apart),
// B [kn][ldb] words, 16 NC columns. Rows 1..6 (rows past `rows` repeat the last, not stored).
template <int NC>
PYSERVE_BF16 void micro_bf16(int rows, const uint32_t* a, int64_t lda, const uint32_t* b, int64_t ldb, int64_t kn,
                             float* c, int64_t ldc, const float* rs) {
  const uint32_t* ar[6];
  for (int r = 0; r < 6; ++r) ar[r] = a + std::min(r, rows - 1) * lda;
  const __m512 z = _mm512_setzero_ps();
  __m512 c00 = z, c01 = z, c10 = z, c11 = z, c20 = z, c21 = z, c30 = z, c31 = z, c40 = z, c41 = z, c50 = z, c51 = z;
#define PYSERVE_BROW(r)                                                                \
  {                                                                                    \
    const __m512bh ab = (__m512bh)_mm512_set1_epi32(static_cast<int>(ar[r][k]));       \
    c##r##0 = _mm512_dpbf16_ps(c##r##0, ab, b0);                                       \
    if constexpr (NC > 1) c##r##1 = _mm512_dpbf16_ps(c##r##1, ab, b1);                 \
  }
  for (int64_t k = 0; k < kn; ++k, b += ldb) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(b);
    const __m512bh b1 = NC > 1 ? (__m512bh)_mm512_loadu_si512(b + 16) : b0;
    PYSERVE_BROW(0) PYSERVE_BROW(1) PYSERVE_BROW(2) PYSERVE_BROW(3) PYSERVE_BROW(4) PYSERVE_BROW(5)
  }
#undef PYSERVE_BROW
  const __m512 out[6][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
  for (int r = 0; r < rows; ++r) {
    const __m512 s = _mm512_set1_ps(rs[r]);
    _mm512_storeu_ps(c + r * ldc, _mm512_mul_ps(out[r][0], s));
    if constexpr (NC > 1) _mm512_storeu_ps(c + r * ldc + 16, _mm512_mul_ps(out[r][1], s));
  }
}

// C = A B^T-style product over 16-column blocks: 32 columns at a time, a last 16 alone.
PYSERVE_BF16 void gemm_bf16(int rows, const uint32_t* a, int64_t lda, const uint32_t* b, int64_t ldb, int64_t kn,
                            int64_t cols, float* c, int64_t ldc, const float* rs) {
  int64_t j = 0;
  for (; j + 32 <= cols; j += 32) micro_bf16<2>(rows, a, lda, b + j, ldb, kn, c + j, ldc, rs);
  if (j < cols) micro_bf16<1>(rows, a, lda, b + j, ldb, kn, c + j, ldc, rs);
}

// head_avx2 with bfloat16 products (D % 16 == 0): Q, K, V and the softmax's exponentials rounded
// to bfloat16, every product summed in fp32 by vdpbf16ps (two per lane and instruction: twice the
// fp32 FMA's multiply-adds per op); the scores, the softmax and the final division in fp32.
// Scratch: kt [D][Sp] and vc [Sp][D] fp32 as head_avx2 (vc rows from S zeroed), sc [6][Sp] fp32,
// ktw [D/2][Sp], vw [Sp/2][D], qw [6][D/2], pw [6][Sp/2] words.
PYSERVE_BF16 void head_bf16(const float* qkv_b, int64_t S, int64_t H, int64_t D, int64_t h, const float* mask_b,
                            int64_t mq, float scale, float* out_b, float* kt, float* vc, float* sc, uint32_t* ktw,
                            uint32_t* vw, uint32_t* qw, uint32_t* pw) {
  const int64_t E = H * D, row = 3 * E, Sp = (S + 15) / 16 * 16;
  pack_kv(qkv_b, S, H, D, h, kt, vc);
  std::memset(vc + S * D, 0, sizeof(float) * static_cast<size_t>((Sp - S) * D));
  for (int64_t p = 0; p < D / 2; ++p)
    for (int64_t j = 0; j < Sp; j += 16)
      _mm512_storeu_si512(ktw + p * Sp + j, pair_rows(kt + 2 * p * Sp + j, kt + (2 * p + 1) * Sp + j));
  for (int64_t p = 0; p < Sp / 2; ++p)
    for (int64_t d = 0; d < D; d += 16) _mm512_storeu_si512(vw + p * D + d, pair_rows(vc + 2 * p * D + d, vc + (2 * p + 1) * D + d));
  float scales[kRows];
  for (int r = 0; r < kRows; ++r) scales[r] = scale;
  for (int64_t i0 = 0; i0 < S; i0 += kRows) {
    const int R = static_cast<int>(std::min<int64_t>(kRows, S - i0));
    for (int r = 0; r < R; ++r) to_pairs(qkv_b + (i0 + r) * row + h * D, D, qw + r * (D / 2));
    gemm_bf16(R, qw, D / 2, ktw, Sp, D / 2, Sp, sc, Sp, scales);
    float inv[kRows];
    for (int r = 0; r < R; ++r) {
      const float sum = softmax_row<true>(sc + r * Sp, mask_b ? mask_b + (i0 + r) * mq : nullptr, S, Sp);
      inv[r] = std::isnan(sum) ? kNaN : 1.0f / sum;
      to_pairs(sc + r * Sp, Sp, pw + r * (Sp / 2));
    }
    gemm_bf16(R, pw, Sp / 2, vw, D, Sp / 2, D, out_b + i0 * E + h * D, E, inv);
  }
}
#endif

}  // namespace

bool attention_qkv_fast(int64_t D) {
#if PYSERVE_AVX2
  return cpu_has_avx2_fma() && D % 16 == 0 && D >= 16 && D <= 256;
#else
  (void)D;
  return false;
#endif
}

bool attention_qkv_bf16(int64_t D) {
#if PYSERVE_AVX512_BF16
  return attention_qkv_fast(D) && cpu_has_avx512_bf16();
#else
  (void)D;
  return false;
#endif
}

void attention_qkv(const float* qkv, int64_t B, int64_t S, int64_t H, int64_t D, const float* mask,
                   int64_t mask_b_stride, int64_t mask_q_stride, float scale, float* out, bool bf16) {
  if (B == 0 || S == 0 || H == 0 || D == 0) return;
  const bool fast = attention_qkv_fast(D);
  const bool use_bf16 = bf16 && attention_qkv_bf16(D);
  const int64_t E = H * D, Sp = (S + 15) / 16 * 16;
  const int64_t pairs = B * H;
#pragma omp parallel for schedule(static) num_threads(pyserve::num_threads()) if (pairs * S * S * D >= kParallelMinMacs)
  for (int64_t bh = 0; bh < pairs; ++bh) {
    const int64_t b = bh / H, h = bh % H;
    const float* qkv_b = qkv + b * S * 3 * E;
    const float* mask_b = mask ? mask + b * mask_b_stride : nullptr;
    float* out_b = out + b * S * E;
    thread_local std::vector<float> buf;
#if PYSERVE_AVX512_BF16
    if (use_bf16) {  // fp32 kt, vc, sc, then the words (4 bytes each, in the same buffer)
      const size_t need = static_cast<size_t>((2 * D + kRows) * Sp + D * Sp + kRows * D / 2 + kRows * Sp / 2);
      if (buf.size() < need) buf.resize(need);
      float* kt = buf.data();
      float* vc = kt + D * Sp;
      float* sc = vc + D * Sp;
      uint32_t* ktw = reinterpret_cast<uint32_t*>(sc + kRows * Sp);
      uint32_t* vw = ktw + (D / 2) * Sp;
      uint32_t* qw = vw + (Sp / 2) * D;
      uint32_t* pw = qw + kRows * (D / 2);
      head_bf16(qkv_b, S, H, D, h, mask_b, mask_q_stride, scale, out_b, kt, vc, sc, ktw, vw, qw, pw);
      continue;
    }
#endif
    (void)use_bf16;
#if PYSERVE_AVX2
    if (fast) {
      const size_t need = static_cast<size_t>((2 * D + kRows) * Sp);
      if (buf.size() < need) buf.resize(need);
      float* kt = buf.data();
      float* vc = kt + D * Sp;
      float* sc = vc + D * Sp;
      head_avx2(qkv_b, S, H, D, h, mask_b, mask_q_stride, scale, out_b, kt, vc, sc);
      continue;
    }
#endif
    (void)fast, (void)Sp;
    head_portable(qkv_b, S, H, D, h, mask_b, mask_q_stride, scale, out_b, buf);
  }
}

}  // namespace quant
}  // namespace pyserve
