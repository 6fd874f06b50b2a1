// Multi-head attention from a fused Q|K|V projection (CPU, fp32): attention_kernel.h.
//
// Per (batch, head): K^T of the head is packed once ([D][Sp], Sp = S rounded up to 16, zero columns
// after S), then each tile of 4 query rows computes its 4 x Sp scores with a 4 x 16 FMA micro-kernel
// (the scores of a tile stay in L1), adds the mask, takes the softmax row by row (maximum, exp, sum)
// and the weighted sum of the value rows (copied together once per head), two query rows at a time with D / 8
// accumulators each; the sum is divided out at the end. Measured against torch's
// scaled_dot_product_attention at MiniLM's shape (B = 1, S = 128, H = 12, D = 32, one thread):
// benchmarks/bert_attention.py.
//
// With AVX-512 (head_avx512): the same arithmetic 16 lanes wide, 8 query rows a tile and 16
// accumulators (32 registers), the scaling, mask, padding and row maximum done in the score
// kernel's epilogue instead of a second pass over the scores. MiniLM's shape on a Zen 4 (which
// splits each 512-bit op in two 256-bit halves, so the gain is fewer instructions and passes, not
// wider arithmetic): 342 -> 310 us per layer; both matrix products at ~97% of the FMA peak, the
// exponentials ~17% of the time.
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
// exp256's and exp512's constants (one set: the two give the same result bit for bit): the clamp,
// log2(e), the 1.5 * 2^23 rounding offset, ln 2 split in a high part exact in float and the rest,
// and Cephes' expf polynomial, highest degree first.
constexpr float kExpLo = -87.0f, kLog2e = 1.44269504088896341f, kExpMagic = 12582912.0f, kLn2Hi = 0.693359375f,
                kLn2Lo = -2.12194440e-4f;
constexpr float kExpPoly[6] = {1.9875691500E-4f, 1.3981999507E-3f, 8.3334519073E-3f,
                               4.1665795894E-2f, 1.6666665459E-1f, 5.0000001201E-1f};

__attribute__((target("avx2,fma"))) inline __m256 exp256(__m256 x) {
  const __m256 lo = _mm256_set1_ps(kExpLo);
  const __m256 keep = _mm256_cmp_ps(x, lo, _CMP_GE_OQ);
  x = _mm256_max_ps(x, lo);
  const __m256 magic = _mm256_set1_ps(kExpMagic);
  const __m256 t = _mm256_fmadd_ps(x, _mm256_set1_ps(kLog2e), magic);
  const __m256 n = _mm256_sub_ps(t, magic);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
  __m256 p = _mm256_set1_ps(kExpPoly[0]);
  for (int i = 1; i < 6; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpPoly[i]));
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

#if PYSERVE_AVX512
#define PYSERVE_AVX512F __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl")))

// exp256 on 16 floats: the same operations in the same order, so the same result bit for bit.
PYSERVE_AVX512F inline __m512 exp512(__m512 x) {
  const __m512 lo = _mm512_set1_ps(kExpLo);
  const __mmask16 keep = _mm512_cmp_ps_mask(x, lo, _CMP_GE_OQ);
  x = _mm512_max_ps(x, lo);
  const __m512 magic = _mm512_set1_ps(kExpMagic);
  const __m512 t = _mm512_fmadd_ps(x, _mm512_set1_ps(kLog2e), magic);
  const __m512 n = _mm512_sub_ps(t, magic);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  __m512 p = _mm512_set1_ps(kExpPoly[0]);
  for (int i = 1; i < 6; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpPoly[i]));
  __m512 y = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r);
  y = _mm512_add_ps(y, _mm512_set1_ps(1.0f));
  const __m512i e = _mm512_slli_epi32(_mm512_castps_si512(t), 23);
  y = _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(y), e));
  return _mm512_maskz_mov_ps(keep, y);
}

constexpr int kRows512 = 8;  // query rows per tile of the AVX-512 kernel

// Round to nearest, stated: such a multiply is never fused with the add that follows (GCC contracts
// _mm512_mul_ps + _mm512_add_ps into one FMA, rounded once, unlike head_avx2's two passes).
constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

// The micro-kernel both products of head_avx512 run: declares the 16 accumulators c<r><col> (8 rows
// a, 16 NC columns of b) and adds a[r][k] * b[k][16 col ..] for k in [0, kn), b advancing ldb floats
// per k, k ascending (as micro_rows). A macro, not a function: named accumulators stay in registers
// (in an array, or passed by reference, GCC 12 spilled the b vectors every step: 424 us a layer).
#define PYSERVE_FMA_8ROWS(a, bstart, ldb, kn)                                                             \
  const __m512 z_ = _mm512_setzero_ps();                                                                  \
  __m512 c00 = z_, c01 = z_, c10 = z_, c11 = z_, c20 = z_, c21 = z_, c30 = z_, c31 = z_, c40 = z_, c41 = z_, \
         c50 = z_, c51 = z_, c60 = z_, c61 = z_, c70 = z_, c71 = z_;                                         \
  {                                                                                                       \
    const float* b_ = (bstart);                                                                           \
    for (int64_t k = 0; k < (kn); ++k, b_ += (ldb)) {                                                     \
      const __m512 b0 = _mm512_loadu_ps(b_);                                                              \
      const __m512 b1 = NC > 1 ? _mm512_loadu_ps(b_ + 16) : b0;                                           \
      PYSERVE_FMA_ROW(a, 0) PYSERVE_FMA_ROW(a, 1) PYSERVE_FMA_ROW(a, 2) PYSERVE_FMA_ROW(a, 3)             \
      PYSERVE_FMA_ROW(a, 4) PYSERVE_FMA_ROW(a, 5) PYSERVE_FMA_ROW(a, 6) PYSERVE_FMA_ROW(a, 7)             \
    }                                                                                                     \
  }
#define PYSERVE_FMA_ROW(a, r)                                                \
  {                                                                          \
    const __m512 ab = _mm512_set1_ps(a[r][k]);                               \
    c##r##0 = _mm512_fmadd_ps(ab, b0, c##r##0);                              \
    if constexpr (NC > 1) c##r##1 = _mm512_fmadd_ps(ab, b1, c##r##1);        \
  }

// Scores of R (1..8) query rows against 16 NC keys from column j: acc = q . k (k ascending, as
// micro_rows), then acc * scale + mask (a multiply and an add, as head_avx2's two passes), keys from S
// set to -inf; stored to sc and folded into each row's running maximum and NaN mask.
template <int NC>
PYSERVE_AVX512F inline void scores512(int R, const float* q, int64_t row, const float* kt, int64_t Sp, int64_t D,
                                      int64_t j, int64_t S, const float* mask_i, int64_t mq, float scale, float* sc,
                                      __m512* vmax, __mmask16* nan) {
  const float* a[kRows512];
  for (int r = 0; r < kRows512; ++r) a[r] = q + std::min(r, R - 1) * row;
  PYSERVE_FMA_8ROWS(a, kt + j, Sp, D)
  const __m512 vs = _mm512_set1_ps(scale), ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
#define PYSERVE_QSTORE1(r, col)                                                                                  \
  {                                                                                                            \
    const int64_t j0 = j + 16 * col;                                                                           \
    const __mmask16 in = j0 + 16 <= S ? __mmask16(0xFFFF) : j0 >= S ? __mmask16(0) : __mmask16((1u << (S - j0)) - 1); \
    __m512 v = _mm512_mul_round_ps(c##r##col, vs, kRound);                                                                 \
    if (mask_i) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(in, mask_i + r * mq + j0));                         \
    v = _mm512_mask_mov_ps(ninf, in, v);                                                                       \
    _mm512_storeu_ps(sc + r * Sp + j0, v);                                                                     \
    vmax[r] = _mm512_max_ps(vmax[r], v);                                                                       \
    nan[r] |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);                                                          \
  }
#define PYSERVE_QSTORE(r)                        \
  if (r < R) {                                   \
    PYSERVE_QSTORE1(r, 0)                        \
    if constexpr (NC > 1) PYSERVE_QSTORE1(r, 1)  \
  }
  PYSERVE_QSTORE(0) PYSERVE_QSTORE(1) PYSERVE_QSTORE(2) PYSERVE_QSTORE(3) PYSERVE_QSTORE(4) PYSERVE_QSTORE(5)
  PYSERVE_QSTORE(6) PYSERVE_QSTORE(7)
#undef PYSERVE_QSTORE1
#undef PYSERVE_QSTORE
}

// out[r][c0 .. c0 + 16 NC) = inv[r] * sum_{k < S} p[r][k] v[k][c0 ..]: R (1..8) rows of exponentials p
// (Sp apart) against the value rows vc ([S][D]), k ascending (as micro_rows).
template <int NC>
PYSERVE_AVX512F inline void weighted512(int R, const float* p, int64_t Sp, const float* vc, int64_t D, int64_t S,
                                        int64_t c0, float* o, int64_t E, const float* inv) {
  const float* a[kRows512];
  for (int r = 0; r < kRows512; ++r) a[r] = p + std::min(r, R - 1) * Sp;
  PYSERVE_FMA_8ROWS(a, vc + c0, D, S)
#define PYSERVE_PSTORE(r)                                                              \
  if (r < R) {                                                                         \
    const __m512 sv = _mm512_set1_ps(inv[r]);                                          \
    _mm512_storeu_ps(o + r * E + c0, _mm512_mul_ps(c##r##0, sv));                      \
    if constexpr (NC > 1) _mm512_storeu_ps(o + r * E + c0 + 16, _mm512_mul_ps(c##r##1, sv)); \
  }
  PYSERVE_PSTORE(0) PYSERVE_PSTORE(1) PYSERVE_PSTORE(2) PYSERVE_PSTORE(3) PYSERVE_PSTORE(4) PYSERVE_PSTORE(5)
  PYSERVE_PSTORE(6) PYSERVE_PSTORE(7)
#undef PYSERVE_PSTORE
}

// head_avx2 on AVX-512 (D % 16 == 0), the same result bit for bit (NaN outputs: maybe another sign): 8 query rows a tile, 32 keys (QK^T)
// or 32 value columns (PV) a micro-kernel step, 16 accumulators; the scaling, mask and maximum in the
// score kernel's epilogue (one pass less over the scores); 16-lane exponentials.
PYSERVE_AVX512F void head_avx512(const float* qkv_b, int64_t S, int64_t H, int64_t D, int64_t h, const float* mask_b,
                                 int64_t mq, float scale, float* out_b, float* kt, float* vc, float* sc) {
  const int64_t E = H * D, row = 3 * E, Sp = (S + 15) / 16 * 16;
  pack_kv(qkv_b, S, H, D, h, kt, vc);
  for (int64_t i0 = 0; i0 < S; i0 += kRows512) {
    const int R = static_cast<int>(std::min<int64_t>(kRows512, S - i0));
    const float* q = qkv_b + i0 * row + h * D;
    const float* mask_i = mask_b ? mask_b + i0 * mq : nullptr;
    __m512 vmax[kRows512];
    __mmask16 nan[kRows512];
    for (int r = 0; r < kRows512; ++r) {
      vmax[r] = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
      nan[r] = 0;
    }
    int64_t j = 0;
    for (; j + 32 <= Sp; j += 32) scores512<2>(R, q, row, kt, Sp, D, j, S, mask_i, mq, scale, sc, vmax, nan);
    if (j < Sp) scores512<1>(R, q, row, kt, Sp, D, j, S, mask_i, mq, scale, sc, vmax, nan);
    float inv[kRows512];
    for (int r = 0; r < R; ++r) {
      const float mx = _mm512_reduce_max_ps(vmax[r]);
      if (nan[r] != 0 || !(mx > -std::numeric_limits<float>::infinity())) {
        inv[r] = kNaN;  // a NaN row: every output NaN
        continue;
      }
      float* s = sc + r * Sp;
      const __m512 mv = _mm512_set1_ps(mx);
      __m512 sum = _mm512_setzero_ps();
      for (int64_t t = 0; t < Sp; t += 16) {
        const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(s + t), mv));
        _mm512_storeu_ps(s + t, e);
        sum = _mm512_add_ps(sum, e);
      }
      // lanes 0-7 and 8-15 are head_avx2's two 8-lane sums: added, then summed as hsum does
      inv[r] = 1.0f / hsum(_mm256_add_ps(_mm512_castps512_ps256(sum), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(sum), 1))));
    }
    float* o = out_b + i0 * E + h * D;
    int64_t c = 0;
    for (; c + 32 <= D; c += 32) weighted512<2>(R, sc, Sp, vc, D, S, c, o, E, inv);
    if (c < D) weighted512<1>(R, sc, Sp, vc, D, S, c, o, E, inv);
  }
}
#undef PYSERVE_FMA_ROW
#undef PYSERVE_FMA_8ROWS
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

void mean_pool_normalize(const float* h, const float* m, int64_t B, int64_t S, int64_t E, float eps_count,
                         float eps_norm, float* out) {
  for (int64_t b = 0; b < B; ++b) {
    float* d = out + b * E;
    for (int64_t e = 0; e < E; ++e) d[e] = 0.0f;
    float count = 0.0f;
    for (int64_t s = 0; s < S; ++s) {
      const float w = m[b * S + s];
      count += w;
      if (w == 0.0f) continue;  // a masked token adds nothing (its values may be anything)
      const float* hs = h + (b * S + s) * E;
      for (int64_t e = 0; e < E; ++e) d[e] += w * hs[e];
    }
    const float inv = 1.0f / std::max(count, eps_count);
    float sq = 0.0f;
    for (int64_t e = 0; e < E; ++e) {
      d[e] *= inv;
      sq += d[e] * d[e];
    }
    const float norm = std::max(std::sqrt(sq), eps_norm);
    for (int64_t e = 0; e < E; ++e) d[e] /= norm;
  }
}

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
  const bool wide = fast && cpu_has_avx512();
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
#if PYSERVE_AVX512
    if (wide) {
      const size_t need = static_cast<size_t>((2 * D + kRows512) * Sp);
      if (buf.size() < need) buf.resize(need);
      float* kt = buf.data();
      float* vc = kt + D * Sp;
      float* sc = vc + D * Sp;
      head_avx512(qkv_b, S, H, D, h, mask_b, mask_q_stride, scale, out_b, kt, vc, sc);
      continue;
    }
#endif
    (void)wide;
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
