// int8 GEMM on pre-packed weights (CPU). Layout, exactness and the activation split:
// int8_kernel.h ("pre-packed weights"). Micro-kernel: 4 activation rows x 16 channels (two ymm of
// 8 int32 accumulators per row), the packed block streamed once per 4-row tile; the remaining 1-3
// rows take the same kernel with fewer rows. With AVX-512 VNNI (cpu_has_avx512_vnni): one vpdpbusd
// per activation row and 16 channels per 4 k, on the rows as given (no split); tiles of 8 rows x 32
// channels.
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "common/cpu_features.h"
#include "common/threads.h"
#include "quant/int8_kernel.h"

#if PYSERVE_AVX2
#include <immintrin.h>
#endif

namespace pyserve {
namespace quant {

namespace {

constexpr int64_t kParallelMinMacs = int64_t{1} << 22;  // as int8_gemm (int8_kernel.cpp)
constexpr int64_t NR = kInt8PackNR;
// Rows per register tile. 5 and 6 (12 accumulators, no spills with GCC 12) measured within noise of
// 4 on this CPU (benchmarks/native/int8_gemm.cpp, 2026-11-30); 4 leaves registers to spare.
constexpr int kTileRows = 4;

// Keeps the compiler from fusing the dequantization's multiply and add into an FMA (the unpacked
// kernel rounds twice; the outputs must agree bit for bit).
template <class T>
inline void opaque(T& v) {
  __asm__("" : "+x"(v));
}

inline float dequant(int32_t acc, float sx, float sw, const float* bias, int64_t n) {
  float v = static_cast<float>(acc) * (sx * sw);
  opaque(v);
  return bias ? v + bias[n] : v;
}

// Per-call activation data: rows padded to Kp = 4 Kq bytes with zeros. One buffer for both paths:
// a row that split (count >= 0) holds xa and its residuals, so x = xa + residuals in either path;
// a row that did not (count = -1) holds the activations as given.
struct Prepared {
  int64_t Kp = 0, cap = 0;
  std::vector<int8_t> xa;      // [B][Kp] split activations (aligned pairs with |x0 + x1| <= 128) or as given
  std::vector<int32_t> xsum;   // [B] sum of xa (wrapping)
  std::vector<int32_t> rsum;   // [B] sum of the row's residuals (wrapping; 0 for a row that did not split)
  std::vector<int32_t> count;  // [B] residuals of the row, or -1: the row did not split (vpsignb path)
  std::vector<int32_t> rk;     // [B][cap] residual positions
  std::vector<int32_t> rv;     // [B][cap] residual values
  // AVX2 path, per residual of rk/rv: the byte offset of its 4-k group in a channel block of wu
  // (64 * (k / 4)) and its value placed in byte k % 4 of a 4-byte group (the other bytes 0).
  std::vector<int32_t> roff;   // [B][cap]
  std::vector<int32_t> rx4;    // [B][cap]
  std::vector<float> sx;       // [B] row scales (int8_linear_packed_f32)
};

// Grows v to at least n elements (never shrinks; no element is read before it is written).
template <class T>
void grow(std::vector<T>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(static_cast<size_t>(n));
}

// A range of k / 4 steps of one channel block: the first starts the accumulators at zero, the
// others resume them from `part` ([B][16] int32); all but the last store them back there.
struct Chunk {
  int64_t kq0, kq1;
  bool first, last;
  int32_t* part;
};

// Split one padded row. Returns the residual count, or -1 when there are more than `cap`.
int32_t split_row(const int8_t* xo, int64_t Kp, int8_t* xa, int32_t* rk, int32_t* rv, int64_t cap, int32_t* xsum) {
  int32_t n = 0;
  uint32_t sum = 0;
  for (int64_t k = 0; k < Kp; k += 2) {
    int32_t x0 = xo[k], x1 = xo[k + 1];
    const int32_t a0 = x0 < 0 ? -x0 : x0, a1 = x1 < 0 ? -x1 : x1;
    if (x0 + x1 > 128 || x0 + x1 < -128) {  // then x0 and x1 have the same sign: |x0 + x1| = a0 + a1
      if (n >= cap) return -1;
      const bool first = a0 >= a1;
      const int32_t big = first ? x0 : x1, keep = 128 - (first ? a1 : a0);
      const int32_t cut = big < 0 ? -keep : keep;
      rk[n] = static_cast<int32_t>(first ? k : k + 1);
      rv[n] = big - cut;
      ++n;
      (first ? x0 : x1) = cut;
    }
    xa[k] = static_cast<int8_t>(x0);
    xa[k + 1] = static_cast<int8_t>(x1);
    sum += static_cast<uint32_t>(x0) + static_cast<uint32_t>(x1);
  }
  *xsum = static_cast<int32_t>(sum);
  return n;
}

#if PYSERVE_AVX2
// As split_row (the same xa, residuals in the same ascending order, the same sum); 32 activations at a
// time, and only the violating pairs (typically 0-2 of a 32-byte chunk) cut one by one, in place, as
// the movemask lists them. (Running split_row over every chunk that held a violating pair made the
// split cost as much as the row's quantization: ~150 cycles per such chunk, 2026-11-30.)
__attribute__((target("avx2,fma"))) int32_t split_row_avx2(const int8_t* xo, int64_t Kp, int8_t* xa, int32_t* rk,
                                                           int32_t* rv, int64_t cap, int32_t* xsum) {
  const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1), lim = _mm256_set1_epi16(128);
  __m256i vsum = _mm256_setzero_si256();
  int32_t n = 0;
  uint32_t tail_sum = 0;  // the scalar tail's sum, less every residual cut off
  int64_t k = 0;
  for (; k + 32 <= Kp; k += 32) {
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xo + k));
    const __m256i pair = _mm256_maddubs_epi16(ones8, x);  // x0 + x1 as int16 (exact: |x0 + x1| <= 256)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(xa + k), x);
    vsum = _mm256_add_epi32(vsum, _mm256_madd_epi16(pair, ones16));
    // one bit per violating pair, at the byte index of its first activation
    uint32_t m = static_cast<uint32_t>(_mm256_movemask_epi8(_mm256_cmpgt_epi16(_mm256_abs_epi16(pair), lim))) &
                 0x55555555u;
    while (m != 0) {
      const int64_t kk = k + __builtin_ctz(m);
      m &= m - 1;
      if (n >= cap) return -1;
      const int32_t x0 = xa[kk], x1 = xa[kk + 1];  // one sign: |x0 + x1| > 128
      const int32_t a0 = x0 < 0 ? -x0 : x0, a1 = x1 < 0 ? -x1 : x1;
      const bool first = a0 >= a1;
      const int32_t big = first ? x0 : x1, keep = 128 - (first ? a1 : a0);
      const int32_t cut = big < 0 ? -keep : keep;
      const int64_t at = first ? kk : kk + 1;
      rk[n] = static_cast<int32_t>(at);
      rv[n] = big - cut;
      tail_sum -= static_cast<uint32_t>(big - cut);
      xa[at] = static_cast<int8_t>(cut);
      ++n;
    }
  }
  if (k < Kp) {
    int32_t part = 0;
    const int32_t m = split_row(xo + k, Kp - k, xa + k, rk + n, rv + n, cap - n, &part);
    if (m < 0) return -1;
    for (int32_t t = 0; t < m; ++t) rk[n + t] += static_cast<int32_t>(k);
    n += m;
    tail_sum += static_cast<uint32_t>(part);
  }
  alignas(32) int32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), vsum);
  for (int i = 0; i < 8; ++i) tail_sum += static_cast<uint32_t>(lanes[i]);
  *xsum = static_cast<int32_t>(tail_sum);
  return n;
}
#endif

#if PYSERVE_AVX512
#define PYSERVE_VNNI __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")))

// Sum of a padded row's Kp bytes (int8), wrapping int32: vpdpbusd of ones (u8) and x (s8).
PYSERVE_VNNI int32_t row_sum_vnni(const int8_t* x, int64_t Kp) {
  const __m512i ones = _mm512_set1_epi8(1);
  __m512i s = _mm512_setzero_si512();
  int64_t k = 0;
  for (; k + 64 <= Kp; k += 64) s = _mm512_dpbusd_epi32(s, ones, _mm512_loadu_si512(x + k));
  if (k < Kp) {
    const __mmask64 m = (uint64_t{1} << (Kp - k)) - 1;  // Kp - k < 64
    s = _mm512_dpbusd_epi32(s, ones, _mm512_maskz_loadu_epi8(m, x + k));
  }
  return _mm512_reduce_add_epi32(s);
}
#endif

// Sizes P's buffers for B rows of K (rows are filled by prepare_row); contents are not cleared.
void prepare_alloc(int64_t B, int64_t K, bool avx2, Prepared* P) {
  const int64_t Kp = 4 * int8_pack_kq(K);
  P->Kp = Kp;
  P->cap = std::max<int64_t>(1, Kp / 16);
  grow(P->xa, B * Kp);
  grow(P->xsum, B);
  grow(P->rsum, B);
  grow(P->count, B);
  grow(P->rk, B * P->cap);
  grow(P->rv, B * P->cap);
  grow(P->roff, avx2 ? B * P->cap : 0);
  grow(P->rx4, avx2 ? B * P->cap : 0);
  grow(P->sx, B);
}

// The calling thread's buffers, kept between calls: allocating and zeroing them on every call cost
// as much as splitting the rows (B = 128, K = 384-1536: about half of the 19-70 us per call spent
// before the GEMM; benchmarks/native/int8_ab.cpp, 2026-11-30). A call needing more than
// kInt8ScratchKeepBytes uses buffers of its own (`local`), freed when it returns.
Prepared& scratch(int64_t B, int64_t K, bool avx2, Prepared* local) {
  thread_local Prepared kept;
  const int64_t Kp = 4 * int8_pack_kq(K);
  const int64_t bytes = B * (Kp + 4 * 4 * std::max<int64_t>(1, Kp / 16) + 16);
  Prepared& P = bytes <= kInt8ScratchKeepBytes ? kept : *local;
  prepare_alloc(B, K, avx2, &P);
  return P;
}

// Splits row b into P (xa, residuals, sums); rows are independent. The row comes from xq [B, K]
// (int8, already quantized) or, when f32, from x [B, K] (fp32), quantized here into xa and its
// scale into P->sx[b]. Returns false (f32 only) when the row holds a non-finite value. xq or x may
// be null when K = 0.
bool prepare_row(const int8_t* xq, const float* x, bool f32, int64_t b, int64_t K, bool avx2, bool vnni, Prepared* P) {
  const int64_t Kp = P->Kp;
  int8_t* xa = P->xa.data() + b * Kp;
  const auto load = [&] {
    if (f32) return K == 0 ? (P->sx[b] = 1.0f, true) : quantize_row(x + b * K, K, xa, &P->sx[b]);
    if (K > 0) std::memcpy(xa, xq + b * K, static_cast<size_t>(K));
    return true;
  };
  if (!load()) return false;
  if (Kp > K) std::memset(xa + K, 0, static_cast<size_t>(Kp - K));  // xa is null at Kp = 0 (UB for memset)
#if PYSERVE_AVX512
  if (vnni) {  // vpdpbusd sums u8 x s8 products in int32: no pair bound, so no split
    P->xsum[b] = row_sum_vnni(xa, Kp);
    P->count[b] = 0;
    P->rsum[b] = 0;
    return true;
  }
#endif
  (void)vnni;
  int32_t* rk = P->rk.data() + b * P->cap;
  int32_t* rv = P->rv.data() + b * P->cap;
  int32_t n;  // split in place (each pair is read before it is written)
#if PYSERVE_AVX2
  if (avx2)
    n = split_row_avx2(xa, Kp, xa, rk, rv, P->cap, &P->xsum[b]);
  else
#endif
    n = split_row(xa, Kp, xa, rk, rv, P->cap, &P->xsum[b]);
  P->count[b] = n;
  if (n < 0 && K > 0) load();  // partly split: restore the row as given (quantizing is deterministic)
  uint32_t rs = 0;
  for (int32_t t = 0; t < n; ++t) rs += static_cast<uint32_t>(rv[t]);
  P->rsum[b] = static_cast<int32_t>(rs);  // 0 when the row did not split
  if (avx2) {
    int32_t* roff = P->roff.data() + b * P->cap;
    int32_t* rx4 = P->rx4.data() + b * P->cap;
    for (int32_t t = 0; t < n; ++t) {
      roff[t] = (rk[t] >> 2) * 64;
      rx4[t] = static_cast<int32_t>(static_cast<uint32_t>(static_cast<uint8_t>(rv[t])) << (8 * (rk[t] & 3)));
    }
  }
  return true;
}

// acc += the residuals of row b (count >= 0) times column k of W, from the packed block.
inline int32_t residual_sum(const Prepared& P, int64_t b, const uint8_t* wub, int64_t c) {
  uint32_t acc = 0;
  for (int32_t t = 0; t < P.count[b]; ++t) {
    const int64_t k = P.rk[b * P.cap + t];
    acc += static_cast<uint32_t>(P.rv[b * P.cap + t] * (static_cast<int32_t>(wub[((k / 4) * NR + c) * 4 + (k & 3)]) - 128));
  }
  return static_cast<int32_t>(acc);
}

// Portable: exact int32 sums of x . w over the packed layout (x = xa + residuals), one channel block.
void block_portable(const Prepared& P, int64_t r0, int64_t rows, int64_t K, const uint8_t* wub, const float* sx,
                    const float* sw, const float* bias, int64_t N, int64_t n0, float* y) {
  const int64_t n1 = std::min(N, n0 + NR);
  for (int64_t b = r0; b < r0 + rows; ++b) {
    const int8_t* x = P.xa.data() + b * P.Kp;
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t c = n - n0;
      uint32_t acc = static_cast<uint32_t>(residual_sum(P, b, wub, c));
      for (int64_t k = 0; k < K; ++k)
        acc += static_cast<uint32_t>(static_cast<int32_t>(x[k]) * (static_cast<int32_t>(wub[((k / 4) * NR + c) * 4 + (k & 3)]) - 128));
      y[b * N + n] = dequant(static_cast<int32_t>(acc), sx[b], sw[n], bias, n);
    }
  }
}

#if PYSERVE_AVX2
__attribute__((target("avx2,fma"))) inline __m256i load_x4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// MR rows b0.. x the 16 channels of one packed block. SPLIT: the 3-op path on xa with the
// residual corrections; otherwise the vpsignb path (on xa too, plus the residuals of rows that split).
template <int MR, bool SPLIT>
__attribute__((target("avx2,fma"))) void tile_packed(const Prepared& P, int64_t b0, const Chunk& ch, const uint8_t* wub,
                                                     const float* sx, const float* sw,
                                                     const float* bias, int64_t N, int64_t n0, float* y) {
  __m256i acc[MR][2];
  for (int i = 0; i < MR; ++i) {
    if (ch.first) {
      acc[i][0] = acc[i][1] = _mm256_setzero_si256();
    } else {
      acc[i][0] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ch.part + (b0 + i) * NR));
      acc[i][1] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ch.part + (b0 + i) * NR + 8));
    }
  }
  const int64_t kq0 = ch.kq0, kq1 = ch.kq1;
  const __m256i ones = _mm256_set1_epi16(1);
  const int8_t* xr[MR];
  for (int i = 0; i < MR; ++i) xr[i] = P.xa.data() + (b0 + i) * P.Kp;
  if (SPLIT && MR >= 4) {
    // Named accumulators: with an array GCC 12 copied every accumulator and spilled two per step.
    __m256i a00 = acc[0][0], a01 = acc[0][1], a10 = acc[MR > 1][0], a11 = acc[MR > 1][1], a20 = acc[MR > 2 ? 2 : 0][0],
            a21 = acc[MR > 2 ? 2 : 0][1], a30 = acc[MR > 3 ? 3 : 0][0], a31 = acc[MR > 3 ? 3 : 0][1],
            a40 = acc[MR > 4 ? 4 : 0][0], a41 = acc[MR > 4 ? 4 : 0][1], a50 = acc[MR > 5 ? 5 : 0][0],
            a51 = acc[MR > 5 ? 5 : 0][1];
    const int8_t* xs[6];
    for (int i = 0; i < 6; ++i) xs[i] = xr[i < MR ? i : 0];
#define PYSERVE_ROW(i)                                                                     \
  xb = load_x4(xs[i] + 4 * kq);                                                            \
  a##i##0 = _mm256_add_epi32(a##i##0, _mm256_madd_epi16(_mm256_maddubs_epi16(w0, xb), ones)); \
  a##i##1 = _mm256_add_epi32(a##i##1, _mm256_madd_epi16(_mm256_maddubs_epi16(w1, xb), ones));
    for (int64_t kq = kq0; kq < kq1; ++kq) {
      const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wub + kq * 64));
      const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wub + kq * 64 + 32));
      __m256i xb;
      PYSERVE_ROW(0) PYSERVE_ROW(1) PYSERVE_ROW(2) PYSERVE_ROW(3)
      if constexpr (MR > 4) {
        PYSERVE_ROW(4)
      }
      if constexpr (MR > 5) {
        PYSERVE_ROW(5)
      }
    }
#undef PYSERVE_ROW
    const __m256i named[6][2] = {{a00, a01}, {a10, a11}, {a20, a21}, {a30, a31}, {a40, a41}, {a50, a51}};
    for (int i = 0; i < MR; ++i) acc[i][0] = named[i][0], acc[i][1] = named[i][1];
  } else if (SPLIT) {
    for (int64_t kq = kq0; kq < kq1; ++kq) {
      const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wub + kq * 64));
      const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wub + kq * 64 + 32));
      for (int i = 0; i < MR; ++i) {
        const __m256i xb = load_x4(xr[i] + 4 * kq);
        acc[i][0] = _mm256_add_epi32(acc[i][0], _mm256_madd_epi16(_mm256_maddubs_epi16(w0, xb), ones));
        acc[i][1] = _mm256_add_epi32(acc[i][1], _mm256_madd_epi16(_mm256_maddubs_epi16(w1, xb), ones));
      }
    }
  } else if (MR == 4) {  // the vpsignb path, named accumulators as above
    const __m256i bias8 = _mm256_set1_epi8(static_cast<char>(0x80));
    __m256i a00 = acc[0][0], a01 = acc[0][1], a10 = acc[MR > 1][0], a11 = acc[MR > 1][1], a20 = acc[MR > 2 ? 2 : 0][0],
            a21 = acc[MR > 2 ? 2 : 0][1], a30 = acc[MR > 3 ? 3 : 0][0], a31 = acc[MR > 3 ? 3 : 0][1];
    const int8_t* xs[4];
    for (int i = 0; i < 4; ++i) xs[i] = xr[i < MR ? i : 0];
#define PYSERVE_ROW(i)                                                                                            \
  xb = load_x4(xs[i] + 4 * kq);                                                                                   \
  a##i##0 = _mm256_add_epi32(a##i##0, _mm256_madd_epi16(_mm256_maddubs_epi16(u0, _mm256_sign_epi8(xb, s0)), ones)); \
  a##i##1 = _mm256_add_epi32(a##i##1, _mm256_madd_epi16(_mm256_maddubs_epi16(u1, _mm256_sign_epi8(xb, s1)), ones));
    for (int64_t kq = kq0; kq < kq1; ++kq) {
      const __m256i s0 = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wub + kq * 64)), bias8);
      const __m256i s1 =
          _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wub + kq * 64 + 32)), bias8);
      const __m256i u0 = _mm256_abs_epi8(s0), u1 = _mm256_abs_epi8(s1);
      __m256i xb;
      PYSERVE_ROW(0) PYSERVE_ROW(1) PYSERVE_ROW(2) PYSERVE_ROW(3)
    }
#undef PYSERVE_ROW
    const __m256i named[4][2] = {{a00, a01}, {a10, a11}, {a20, a21}, {a30, a31}};
    for (int i = 0; i < MR; ++i) acc[i][0] = named[i][0], acc[i][1] = named[i][1];
  } else {
    const __m256i bias8 = _mm256_set1_epi8(static_cast<char>(0x80));
    for (int64_t kq = kq0; kq < kq1; ++kq) {
      const __m256i s0 = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wub + kq * 64)), bias8);
      const __m256i s1 =
          _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wub + kq * 64 + 32)), bias8);
      const __m256i u0 = _mm256_abs_epi8(s0), u1 = _mm256_abs_epi8(s1);
      for (int i = 0; i < MR; ++i) {
        const __m256i xb = load_x4(xr[i] + 4 * kq);
        acc[i][0] = _mm256_add_epi32(acc[i][0], _mm256_madd_epi16(_mm256_maddubs_epi16(u0, _mm256_sign_epi8(xb, s0)), ones));
        acc[i][1] = _mm256_add_epi32(acc[i][1], _mm256_madd_epi16(_mm256_maddubs_epi16(u1, _mm256_sign_epi8(xb, s1)), ones));
      }
    }
  }
  // This chunk's residuals (rows that split, in either path), from the packed block the main loop
  // just streamed (L1 for K <= 1024, else L2): a residual r at k is one more activation, r in byte
  // k & 3 of a 4-byte group (the other three 0), through the same vpmaddubsw on wu = w + 128. Exact: an aligned pair holds at most one
  // residual and |r| <= 126, so each int16 is wu * r with |wu * r| <= 255 * 126 < 2^15. Its 128 r
  // comes off at the end with rsum. (Reading them from a per-block copy of W^T instead, as before,
  // cost 15-40% of the whole call: scattered reads of a 12-48 KB slice outside L1, mostly from L3 at
  // B <= 8; benchmarks/native/int8_gemm.cpp, 2026-11-30.)
  for (int i = 0; i < MR; ++i) {
    const int64_t b = b0 + i;
    const int32_t cnt = P.count[b];
    if (cnt <= 0) continue;
    const int32_t* roff = P.roff.data() + b * P.cap;
    const int32_t* rx4 = P.rx4.data() + b * P.cap;
    const int64_t lo = ch.first ? 0 : std::lower_bound(roff, roff + cnt, static_cast<int32_t>(64 * kq0)) - roff;
    const int64_t hi = ch.last ? cnt : std::lower_bound(roff + lo, roff + cnt, static_cast<int32_t>(64 * kq1)) - roff;
    __m256i r0 = acc[i][0], r1 = acc[i][1];
    for (int64_t t = lo; t < hi; ++t) {
      const __m256i xb = _mm256_set1_epi32(rx4[t]);
      const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wub + roff[t]));
      const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wub + roff[t] + 32));
      r0 = _mm256_add_epi32(r0, _mm256_madd_epi16(_mm256_maddubs_epi16(w0, xb), ones));
      r1 = _mm256_add_epi32(r1, _mm256_madd_epi16(_mm256_maddubs_epi16(w1, xb), ones));
    }
    acc[i][0] = r0;
    acc[i][1] = r1;
  }
  if (!ch.last) {
    for (int i = 0; i < MR; ++i) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(ch.part + (b0 + i) * NR), acc[i][0]);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(ch.part + (b0 + i) * NR + 8), acc[i][1]);
    }
    return;
  }
  for (int i = 0; i < MR; ++i) {
    const int64_t b = b0 + i;
    __m256i v0 = acc[i][0], v1 = acc[i][1];
    {  // 128 * (everything that went through wu = w + 128): xa in the split path, residuals in both
      const uint32_t through_wu = (SPLIT ? static_cast<uint32_t>(P.xsum[b]) : 0u) + static_cast<uint32_t>(P.rsum[b]);
      const __m256i c = _mm256_set1_epi32(static_cast<int32_t>(through_wu * 128u));
      v0 = _mm256_sub_epi32(v0, c);
      v1 = _mm256_sub_epi32(v1, c);
    }
    float* yr = y + b * N;
    if (n0 + NR <= N) {
      const __m256 sxv = _mm256_set1_ps(sx[b]);
      __m256 f0 = _mm256_mul_ps(_mm256_cvtepi32_ps(v0), _mm256_mul_ps(sxv, _mm256_loadu_ps(sw + n0)));
      __m256 f1 = _mm256_mul_ps(_mm256_cvtepi32_ps(v1), _mm256_mul_ps(sxv, _mm256_loadu_ps(sw + n0 + 8)));
      if (bias) {
        opaque(f0);
        opaque(f1);
        f0 = _mm256_add_ps(f0, _mm256_loadu_ps(bias + n0));
        f1 = _mm256_add_ps(f1, _mm256_loadu_ps(bias + n0 + 8));
      }
      _mm256_storeu_ps(yr + n0, f0);
      _mm256_storeu_ps(yr + n0 + 8, f1);
    } else {
      alignas(32) int32_t t[16];
      _mm256_store_si256(reinterpret_cast<__m256i*>(t), v0);
      _mm256_store_si256(reinterpret_cast<__m256i*>(t + 8), v1);
      for (int64_t n = n0; n < N; ++n) yr[n] = dequant(t[n - n0], sx[b], sw[n], bias, n);
    }
  }
}

template <int MR>
__attribute__((target("avx2,fma"))) void tile_dispatch(const Prepared& P, int64_t b0, const Chunk& ch, const uint8_t* wub,
                                                       const float* sx, const float* sw,
                                                       const float* bias, int64_t N, int64_t n0, float* y) {
  bool split = true;
  for (int i = 0; i < MR; ++i) split &= P.count[b0 + i] >= 0;
  if (split)
    tile_packed<MR, true>(P, b0, ch, wub, sx, sw, bias, N, n0, y);
  else
    tile_packed<MR, false>(P, b0, ch, wub, sx, sw, bias, N, n0, y);
}

__attribute__((target("avx2,fma"))) void block_avx2(const Prepared& P, int64_t r0, int64_t rows, const Chunk& ch,
                                                    const uint8_t* wub, const float* sx,
                                                    const float* sw, const float* bias, int64_t N, int64_t n0, float* y) {
  int64_t b = r0;
  const int64_t end = r0 + rows;
  for (; b + kTileRows <= end; b += kTileRows) tile_dispatch<kTileRows>(P, b, ch, wub, sx, sw, bias, N, n0, y);
  switch (end - b) {
    case 3: tile_dispatch<3>(P, b, ch, wub, sx, sw, bias, N, n0, y); break;
    case 2: tile_dispatch<2>(P, b, ch, wub, sx, sw, bias, N, n0, y); break;
    case 1: tile_dispatch<1>(P, b, ch, wub, sx, sw, bias, N, n0, y); break;
    default: break;
  }
}
#endif

#if PYSERVE_AVX512
// MR rows b0.. x NB channel blocks nb0.. (16 channels each), all of K: per 4 k, NB loads of 64 bytes
// of wu and MR broadcasts of 4 activations, MR x NB vpdpbusd (u8 wu x s8 x, four products summed
// into each int32 lane, no saturation). acc = sum_k wu[k] x[k] = sum_k w[k] x[k] + 128 sum_k x[k],
// wrapping; the 128 xsum comes off at the end, then the dequantization in the AVX2 path's order.
template <int MR, int NB>
PYSERVE_VNNI void tile_vnni(const Prepared& P, int64_t b0, int64_t Kq, const uint8_t* wu, int64_t nb0,
                            const float* sx, const float* sw, const float* bias, int64_t N, float* y) {
  static_assert(MR >= 1 && MR <= 8 && NB >= 1 && NB <= 2, "tile_vnni: 1-8 rows, 1-2 blocks");
  // Named accumulators (rows past MR and the second block when NB = 1 are never touched): with an
  // array GCC 12 copied every accumulator twice per step (32 register moves per 16 vpdpbusd).
  const __m512i z = _mm512_setzero_si512();
  __m512i a00 = z, a01 = z, a10 = z, a11 = z, a20 = z, a21 = z, a30 = z, a31 = z, a40 = z, a41 = z, a50 = z, a51 = z,
          a60 = z, a61 = z, a70 = z, a71 = z;
  const int8_t* xr[8];
  for (int i = 0; i < 8; ++i) xr[i] = P.xa.data() + (b0 + std::min(i, MR - 1)) * P.Kp;
  const uint8_t* w0p = wu + nb0 * Kq * NR * 4;
  const uint8_t* w1p = wu + (nb0 + NB - 1) * Kq * NR * 4;
#define PYSERVE_VROW(i)                                                 \
  if constexpr (MR > i) {                                               \
    int32_t x4;                                                         \
    std::memcpy(&x4, xr[i] + 4 * kq, 4);                                \
    const __m512i xb = _mm512_set1_epi32(x4);                           \
    a##i##0 = _mm512_dpbusd_epi32(a##i##0, w0, xb);                     \
    if constexpr (NB > 1) a##i##1 = _mm512_dpbusd_epi32(a##i##1, w1, xb); \
  }
  for (int64_t kq = 0; kq < Kq; ++kq) {
    const __m512i w0 = _mm512_loadu_si512(w0p + kq * 64);
    const __m512i w1 = NB > 1 ? _mm512_loadu_si512(w1p + kq * 64) : w0;
    PYSERVE_VROW(0) PYSERVE_VROW(1) PYSERVE_VROW(2) PYSERVE_VROW(3)
    PYSERVE_VROW(4) PYSERVE_VROW(5) PYSERVE_VROW(6) PYSERVE_VROW(7)
  }
#undef PYSERVE_VROW
  const __m512i acc[8][2] = {{a00, a01}, {a10, a11}, {a20, a21}, {a30, a31},
                             {a40, a41}, {a50, a51}, {a60, a61}, {a70, a71}};
  for (int i = 0; i < MR; ++i) {
    const int64_t b = b0 + i;
    const __m512i c = _mm512_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(P.xsum[b]) * 128u));
    const __m512 sxv = _mm512_set1_ps(sx[b]);
    float* yr = y + b * N;
    for (int j = 0; j < NB; ++j) {
      const int64_t n0 = (nb0 + j) * NR;
      const __m512i v = _mm512_sub_epi32(acc[i][j], c);
      if (n0 + NR <= N) {
        __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(v), _mm512_mul_ps(sxv, _mm512_loadu_ps(sw + n0)));
        if (bias) {
          __asm__("" : "+v"(f));  // no FMA contraction (see opaque)
          f = _mm512_add_ps(f, _mm512_loadu_ps(bias + n0));
        }
        _mm512_storeu_ps(yr + n0, f);
      } else {
        alignas(64) int32_t t[NR];
        _mm512_store_si512(t, v);
        for (int64_t n = n0; n < N; ++n) yr[n] = dequant(t[n - n0], sx[b], sw[n], bias, n);
      }
    }
  }
}

// Rows r0 .. r0 + rows x channel blocks nb0 .. nb0 + NB: tiles of 8 rows, then the 1-7 left.
template <int NB>
PYSERVE_VNNI void blocks_vnni(const Prepared& P, int64_t r0, int64_t rows, int64_t Kq, const uint8_t* wu, int64_t nb0,
                              const float* sx, const float* sw, const float* bias, int64_t N, float* y) {
  constexpr int kRows = 8;
  int64_t b = r0;
  const int64_t end = r0 + rows;
  for (; b + kRows <= end; b += kRows) tile_vnni<kRows, NB>(P, b, Kq, wu, nb0, sx, sw, bias, N, y);
  switch (end - b) {
    case 7: tile_vnni<7, NB>(P, b, Kq, wu, nb0, sx, sw, bias, N, y); break;
    case 6: tile_vnni<6, NB>(P, b, Kq, wu, nb0, sx, sw, bias, N, y); break;
    case 5: tile_vnni<5, NB>(P, b, Kq, wu, nb0, sx, sw, bias, N, y); break;
    case 4: tile_vnni<4, NB>(P, b, Kq, wu, nb0, sx, sw, bias, N, y); break;
    case 3: tile_vnni<3, NB>(P, b, Kq, wu, nb0, sx, sw, bias, N, y); break;
    case 2: tile_vnni<2, NB>(P, b, Kq, wu, nb0, sx, sw, bias, N, y); break;
    case 1: tile_vnni<1, NB>(P, b, Kq, wu, nb0, sx, sw, bias, N, y); break;
    default: break;
  }
}
#endif

#if PYSERVE_AVX2
// An 8 x 8 transpose of 32-bit lanes: r[j] gets lane j of r[0..7].
__attribute__((target("avx2,fma"))) inline void transpose8_epi32(__m256i r[8]) {
  __m256 v[8];
  for (int i = 0; i < 8; ++i) v[i] = _mm256_castsi256_ps(r[i]);
  const __m256 t0 = _mm256_unpacklo_ps(v[0], v[1]), t1 = _mm256_unpackhi_ps(v[0], v[1]),
               t2 = _mm256_unpacklo_ps(v[2], v[3]), t3 = _mm256_unpackhi_ps(v[2], v[3]),
               t4 = _mm256_unpacklo_ps(v[4], v[5]), t5 = _mm256_unpackhi_ps(v[4], v[5]),
               t6 = _mm256_unpacklo_ps(v[6], v[7]), t7 = _mm256_unpackhi_ps(v[6], v[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE),
               u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE),
               u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE),
               u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_castps_si256(_mm256_permute2f128_ps(u0, u4, 0x20));
  r[1] = _mm256_castps_si256(_mm256_permute2f128_ps(u1, u5, 0x20));
  r[2] = _mm256_castps_si256(_mm256_permute2f128_ps(u2, u6, 0x20));
  r[3] = _mm256_castps_si256(_mm256_permute2f128_ps(u3, u7, 0x20));
  r[4] = _mm256_castps_si256(_mm256_permute2f128_ps(u0, u4, 0x31));
  r[5] = _mm256_castps_si256(_mm256_permute2f128_ps(u1, u5, 0x31));
  r[6] = _mm256_castps_si256(_mm256_permute2f128_ps(u2, u6, 0x31));
  r[7] = _mm256_castps_si256(_mm256_permute2f128_ps(u3, u7, 0x31));
}

// The whole-register part of one full block (16 channels, rows w[0..16) of stride K): 8 steps of 4 k
// at a time, 32 bytes of each row -> two 8 x 8 transposes of 4-byte groups, + 128 as XOR 0x80.
// Returns how many 4-k steps it wrote (a multiple of 8; the caller does the rest).
__attribute__((target("avx2,fma"))) int64_t pack_block_avx2(const int8_t* w, int64_t K, uint8_t* dst) {
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
  const int64_t steps = K / 32 * 8;
  for (int64_t kq = 0; kq < steps; kq += 8) {
    __m256i a[8], b[8];
    for (int c = 0; c < 8; ++c) {
      a[c] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + c * K + 4 * kq));
      b[c] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + (8 + c) * K + 4 * kq));
    }
    transpose8_epi32(a);
    transpose8_epi32(b);
    for (int j = 0; j < 8; ++j) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + (kq + j) * 64), _mm256_xor_si256(a[j], flip));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + (kq + j) * 64 + 32), _mm256_xor_si256(b[j], flip));
    }
  }
  return steps;
}
#endif

}  // namespace

void int8_pack(const int8_t* w, int64_t N, int64_t K, uint8_t* wu) {
  const int64_t Kq = int8_pack_kq(K), Npad = int8_pack_npad(N), blocks = Npad / NR;
  const bool avx2 = cpu_has_avx2_fma();
#pragma omp parallel for schedule(static) num_threads(pyserve::num_threads()) if (N * K >= (int64_t{1} << 22))
  for (int64_t nb = 0; nb < blocks; ++nb) {
    uint8_t* dst = wu + nb * Kq * NR * 4;
    int64_t done = 0;
#if PYSERVE_AVX2
    if (avx2 && (nb + 1) * NR <= N) done = pack_block_avx2(w + nb * NR * K, K, dst);
#endif
    (void)avx2;
    for (int64_t kq = done; kq < Kq; ++kq)
      for (int64_t c = 0; c < NR; ++c)
        for (int64_t e = 0; e < 4; ++e) {
          const int64_t n = nb * NR + c, k = 4 * kq + e;
          const int32_t v = (n < N && k < K) ? w[n * K + k] : 0;
          dst[(kq * NR + c) * 4 + e] = static_cast<uint8_t>(v + 128);
        }
  }
}

namespace {

// The packed GEMM of one call, from rows xq (int8, scales x_scale) or, when f32, x (fp32, quantized
// per row here): returns the first row of x holding a non-finite value, or B.
int64_t run_packed(const int8_t* xq, const float* x, bool f32, const float* x_scale, int64_t B, int64_t K,
                   const uint8_t* wu, const float* w_scale, const float* bias, int64_t N, float* y) {
  if (B == 0) return B;
  const bool avx2 = cpu_has_avx2_fma();
  const bool vnni = cpu_has_avx512_vnni();
  const int64_t Kq = int8_pack_kq(K), blocks = int8_pack_npad(N) / NR;
  Prepared local;
  Prepared& P = scratch(B, K, avx2 && !vnni, &local);
  const float* sx = f32 ? P.sx.data() : x_scale;
  // K in chunks of 1024 steps of 4 (64 KB of a block's packed weights, L2-resident while every 4-row
  // tile of the call streams them). Chunks of 256 steps (16 KB, L1-resident) were 5-9% slower for
  // [768, 3072] at B = 8-128 (benchmarks/native/int8_ab.cpp, 2026-11-30): the hardware prefetcher
  // streams a block from L2 as fast as the micro-kernel reads it, and chunking adds a store and a
  // reload of the partial sums per tile and chunk. So K <= 4096 (BERT, MiniLM) runs unchunked.
  constexpr int64_t KC = 1024;
  const int64_t chunks = std::max<int64_t>(1, (Kq + KC - 1) / KC);
  int64_t first_bad = B;
  // One parallel region: the rows are quantized and split in parallel (over rows), then, unless a
  // row of x was not finite, the channel blocks are computed in parallel (over N, never over rows:
  // every thread streams its own weights once).
#pragma omp parallel num_threads(pyserve::num_threads()) if (B * std::max<int64_t>(N, 1) * K >= kParallelMinMacs)
  {
#pragma omp for schedule(static) reduction(min : first_bad)
    for (int64_t b = 0; b < B; ++b)
      if (!prepare_row(xq, x, f32, b, K, avx2, vnni, &P) && b < first_bad) first_bad = b;
#if PYSERVE_AVX512
    if (first_bad == B && vnni) {  // pairs of channel blocks (an odd last one alone), all of K at once
      const int64_t pairs = (blocks + 1) / 2;
#pragma omp for schedule(static)
      for (int64_t p = 0; p < pairs; ++p) {
        if (2 * p + 1 < blocks)
          blocks_vnni<2>(P, 0, B, Kq, wu, 2 * p, sx, w_scale, bias, N, y);
        else
          blocks_vnni<1>(P, 0, B, Kq, wu, 2 * p, sx, w_scale, bias, N, y);
      }
    } else
#endif
    if (first_bad == B) {
#pragma omp for schedule(static)
      for (int64_t nb = 0; nb < blocks; ++nb) {
        const uint8_t* wub = wu + nb * Kq * NR * 4;
#if PYSERVE_AVX2
        if (avx2) {
          std::vector<int32_t> part(chunks > 1 ? static_cast<size_t>(B * NR) : 0);
          for (int64_t c = 0; c < chunks; ++c) {
            const Chunk ch{c * KC, std::min(Kq, (c + 1) * KC), c == 0, c == chunks - 1, part.data()};
            block_avx2(P, 0, B, ch, wub, sx, w_scale, bias, N, nb * NR, y);
          }
          continue;
        }
#endif
        block_portable(P, 0, B, K, wub, sx, w_scale, bias, N, nb * NR, y);
      }
    }
  }
  return first_bad;
}

}  // namespace

void int8_gemm_packed(const int8_t* xq, const float* x_scale, int64_t B, int64_t K, const uint8_t* wu,
                      const float* w_scale, const float* bias, int64_t N, float* y) {
  run_packed(xq, nullptr, false, x_scale, B, K, wu, w_scale, bias, N, y);
}

void int8_gemm_packing(const int8_t* xq, const float* x_scale, int64_t B, int64_t K, const int8_t* w,
                       const float* w_scale, const float* bias, int64_t N, float* y) {
  thread_local std::vector<uint8_t> kept;
  const int64_t bytes = int8_pack_wu_bytes(N, K);
  std::vector<uint8_t> local;
  std::vector<uint8_t>& wu = bytes <= kInt8ScratchKeepBytes ? kept : local;
  grow(wu, bytes);
  int8_pack(w, N, K, wu.data());
  int8_gemm_packed(xq, x_scale, B, K, wu.data(), w_scale, bias, N, y);
}

bool int8_linear_packed_f32(const float* x, int64_t B, int64_t K, const uint8_t* wu, const float* w_scale,
                            const float* bias, int64_t N, float* y, int64_t* bad_row) {
  const int64_t bad = run_packed(nullptr, x, true, nullptr, B, K, wu, w_scale, bias, N, y);
  if (bad == B) return true;
  if (bad_row) *bad_row = bad;
  return false;
}

}  // namespace quant
}  // namespace pyserve
