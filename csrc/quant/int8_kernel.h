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

// y[B, N] = dequant(xq[B, K] . wq[N, K]^T) + bias (bias may be null). Row strides K and N.
// OpenMP over blocks of output channels; AVX2 when the CPU has it, else portable C++.
void int8_gemm(const int8_t* xq, const float* x_scale, int64_t B, int64_t K, const int8_t* wq, const float* w_scale,
               const float* bias, int64_t N, float* y);

// True when the AVX2 paths are compiled in and this CPU supports them.
bool int8_avx2_active();

}  // namespace quant
}  // namespace pyserve
