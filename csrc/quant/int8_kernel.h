// int8 linear layer on the CPU: symmetric per-row quantization and an int8 x int8 -> int32 GEMM.
//
// Algorithm: Jacob et al. 2018, "Quantization and Training of Neural Networks for Efficient
// Integer-Arithmetic-Only Inference", section 2 (affine quantization; here symmetric, zero point 0)
// and section 2.3 (int32 accumulation, one rescale per output).
//
// Quantization of one row r of length K (weights per output channel, activations per batch row):
//   amax  = max_k |r[k]|                                   (fp32)
//   scale = amax / 127                                     (fp32 division, IEEE round to nearest)
//   scale = 1 when that is 0 (an all-zero row, or amax so small that amax / 127 underflows)
//   q[k]  = clamp(rint(r[k] / scale), -127, 127)           (fp32 division; rint = round half to
//                                                           even, the default FP rounding mode)
// Output: y[b, n] = float(acc[b, n]) * (sx[b] * sw[n]) + bias[n], acc = sum_k xq[b, k] * wq[n, k]
// accumulated exactly in int32 (exact for K <= kInt8MaxK; the launcher enforces that).
// Weights may use the full int8 range -128..127 (the AVX2 path takes |w| as the unsigned operand
// of vpmaddubsw, which holds 128, and moves w's sign onto the activation with vpsignb).
#pragma once

#include <cstdint>

namespace pyserve {
namespace quant {

// Largest K for which sum_k |xq| * |wq| <= K * 127 * 128 cannot overflow int32.
constexpr int64_t kInt8MaxK = 131072;

// Quantize `rows` rows of K fp32 values (row stride K) to int8 with one fp32 scale per row, as
// described above. Returns false, writing nothing useful, when a value is not finite; then
// *bad_row gets the first row holding one. OpenMP over rows.
bool quantize_rows(const float* src, int64_t rows, int64_t K, int8_t* q, float* scale, int64_t* bad_row);

// Quantize one row of K fp32 values exactly as quantize_rows does (the same bytes and scale);
// false when it holds a non-finite value.
bool quantize_row(const float* src, int64_t K, int8_t* q, float* scale);

// y[B, N] = dequant(xq[B, K] . wq[N, K]^T) + bias (bias may be null). Row strides K and N.
// OpenMP over blocks of output channels; AVX2 when the CPU has it, else portable C++.
void int8_gemm(const int8_t* xq, const float* x_scale, int64_t B, int64_t K, const int8_t* wq, const float* w_scale,
               const float* bias, int64_t N, float* y);

// True when the AVX2 paths are compiled in and this CPU supports them.
bool int8_avx2_active();

// --- pre-packed weights (int8_packed_kernel.cpp) ---------------------------------------------------
// The same y as int8_gemm, bit for bit, from weights packed once (int8_pack) for a register-blocked
// outer-product micro-kernel (4 activation rows x 16 channels, 8 int32 accumulators):
//
//   wu[((nb * Kq + kq) * 16 + c) * 4 + e] = w[16 nb + c, 4 kq + e] + 128   (uint8; padding: 128,
//                                            i.e. w = 0; Kq = ceil(K / 4), nb < ceil(N / 16))
//
// AVX2, per 4 k and 8 channels, 3 vector ops per activation row (the count fbgemm needs, without its
// 7-bit activations): p16 = vpmaddubsw(wu, x4) with wu = w + 128 unsigned and x4 = four signed
// activations broadcast; p32 = vpmaddwd(p16, 1); acc += p32. Each int16 of p16 is
// wu[k] * x[k] + wu[k+1] * x[k+1], exact (no saturation) when |x[k] + x[k+1]| <= 128, since
// 0 <= wu <= 255: with x[k], x[k+1] of one sign the int16 is at most 255 |x[k] + x[k+1]| <= 32640
// in magnitude; with opposite signs (or a 0) its two products have opposite signs, so it is at most
// 255 * 128 = 32640 < 32767. So each activation row is split per call: x = xa + xr, xa keeping
// every aligned pair within that bound (a violating pair has one sign; its larger value is cut to
// 128 - |smaller|, sign kept) and xr the sparse remainder (residuals), and
//   acc = sum_k xa[k] * wu[k] + sum_{k in xr} xr[k] * wu[k] - 128 * (sum_k xa[k] + sum_k xr[k])
// in wrapping int32 arithmetic (the exact result fits int32 for K <= kInt8MaxK, so the wrap of the
// intermediate sum cancels). A residual r at k goes through the same vpmaddubsw as one more
// activation: r in byte k % 4 of an otherwise zero 4-byte group, against the 4-k group of wu that
// holds k (the chunk the main loop just streamed: L1 for K <= 1024, else L2). Exact too: an aligned
// pair holds at most one residual, and |r| = |x0 + x1| - 128 <= 126, so each int16 is wu * r,
// |wu * r| <= 255 * 126 < 32767.
// A row with more than K / 16 residuals (e.g. activations all near +-127) is left as given, and its
// 4-row tile takes the vpsignb path: |w| x (x * sign(w)), 4 ops, as int8_gemm (the tile's rows that
// did split add their residuals as above, less 128 * sum_k xr[k]). Without AVX2: scalar int32 sums
// over the packed layout.
// AVX-512 VNNI (cpu_has_avx512_vnni), per 4 k and 16 channels, one op per activation row:
// acc = vpdpbusd(acc, wu, x4) sums the four products wu[k] * x[k] (u8 x s8) into each int32 lane
// with no intermediate saturation, so the rows go in as given (no split) and
//   acc = sum_k x[k] * wu[k] - 128 * sum_k x[k]
// in wrapping int32, exact as above. Tiles of 8 rows x 32 channels (16 zmm accumulators); the same
// y bit for bit as the other paths (the same int32 sums, the same two fp32 roundings).
constexpr int64_t kInt8PackNR = 16;
inline int64_t int8_pack_kq(int64_t K) { return (K + 3) / 4; }
inline int64_t int8_pack_npad(int64_t N) { return (N + kInt8PackNR - 1) / kInt8PackNR * kInt8PackNR; }
// Bytes of wu for [N, K] weights (Npad = 16 ceil(N / 16)).
inline int64_t int8_pack_wu_bytes(int64_t N, int64_t K) { return int8_pack_npad(N) * int8_pack_kq(K) * 4; }

// Pack w [N, K] int8 (row stride K) into wu (size above). OpenMP over channel blocks.
void int8_pack(const int8_t* w, int64_t N, int64_t K, uint8_t* wu);

// int8_gemm's y from unpacked w [N, K]: w packed (int8_pack) into the calling thread's buffer, kept
// between calls up to kInt8ScratchKeepBytes (a fresh one costs its page faults, about as much as the
// packing), then int8_gemm_packed. Nothing outlives the call but the buffer's bytes.
void int8_gemm_packing(const int8_t* xq, const float* x_scale, int64_t B, int64_t K, const int8_t* w,
                       const float* w_scale, const float* bias, int64_t N, float* y);

// y[B, N] = dequant(xq[B, K] . w[N, K]^T) + bias from packed weights: equal to int8_gemm's output
// for the same arguments. OpenMP over blocks of 16 channels; within a block K runs in chunks of
// 4096 (64 KB of packed weights, resident in L2 while all rows pass), partial sums kept in int32.
void int8_gemm_packed(const int8_t* xq, const float* x_scale, int64_t B, int64_t K, const uint8_t* wu,
                      const float* w_scale, const float* bias, int64_t N, float* y);

// int8_linear on packed weights from fp32 x [B, K] (row stride K): quantize_rows then
// int8_gemm_packed, the same y bit for bit, in one pass over x: each row is quantized straight into
// the kernel's padded activation buffer and split there while it is in L1, and the per-call buffers
// are kept per thread between calls (up to kInt8ScratchKeepBytes) instead of allocated and zeroed.
// Returns false, writing no y, when x holds a non-finite value (*bad_row: the first such row).
bool int8_linear_packed_f32(const float* x, int64_t B, int64_t K, const uint8_t* wu, const float* w_scale,
                            const float* bias, int64_t N, float* y, int64_t* bad_row);
constexpr int64_t kInt8ScratchKeepBytes = int64_t{16} << 20;

// y[i] = GELU(y[i]) = 0.5 y (1 + erf(y / sqrt(2))) in place (Hendrycks & Gimpel 2016, the exact erf
// form), for n values; OpenMP for large n. erf: AVX2, the rational approximation of Eigen's
// generic_fast_erf_float (odd polynomial of degree 13 over an even one of degree 8, argument clamped
// to [-4, 4]); portable: std::erf. Within 2e-6 of the exact GELU (absolute; relative above |y| = 1),
// not bit-identical to torch's gelu(approximate='none'). Used as the epilogue of int8_linear_packed.
void gelu_erf_inplace(float* y, int64_t n);

// y[i] = LayerNorm(y[i] + residual[i]) * g + b for each of `rows` rows of N (Ba, Kiros & Hinton
// 2016; BERT's "add & norm"): mean and biased variance of the row (two passes, accumulated in
// double), rstd = 1 / sqrt(var + eps), y = (y - mean) rstd g + b (a constant row gives b exactly,
// as in torch, whatever eps). residual may be null (no
// add). Within float rounding of torch's layer_norm(y + residual), not bit-identical (its own
// reduction order). OpenMP over rows for large inputs. Used as the epilogue of int8_linear_packed.
void add_layer_norm_inplace(float* y, const float* residual, const float* g, const float* b, int64_t rows, int64_t N,
                            float eps);

}  // namespace quant
}  // namespace pyserve
