// Multi-head attention of a transformer layer straight from its fused Q|K|V projection (CPU, fp32).
//
// out[b, i, h*D:(h+1)*D] = sum_j softmax_j(scale * q_i . k_j + mask[b, i, j]) v_j   (Vaswani et al.
// 2017, section 3.2.1 and 3.2.2), for every batch b, query i and head h, where q_i, k_j, v_j are the
// head-h slices of the rows of qkv [B, S, 3 E] (E = H D): q in columns [0, E), k in [E, 2 E), v in
// [2 E, 3 E) -- the layout of the fused query/key/value Linear (pyserve/artifact/kernels.py). The
// output is [B, S, E] (heads side by side): what `transpose(1, 2).reshape(B, S, E)` of
// torch's scaled_dot_product_attention gives, without the [B, H, S, D] views and copies.
//
// Numerics (the default): fp32 throughout, the softmax by its maximum-subtracted form, the weighted sum divided by
// the exponentials' sum at the end (as torch's CPU flash-attention kernel does); exp: AVX2, a
// Cephes-style polynomial (within 2 ulp of std::exp on [-87, 0]; below -87 it gives 0, as
// expf underflows); portable: std::exp. Within float rounding of torch's scaled_dot_product_attention,
// not bit-identical to it (a different summation order). A query whose mask excludes every key the way
// HF transformers do (adding the most negative float) gets the mean of the values, as in torch; a mask of -inf
// everywhere gives NaN, as in torch.
#pragma once

#include <cstdint>

namespace pyserve {
namespace quant {

// qkv: [B, S, 3 H D] fp32, C-contiguous. mask: additive fp32, element (b, i, j) at
// mask[b * mask_b_stride + i * mask_q_stride + j] (strides 0 broadcast), or null. out: [B, S, H D].
// Runs over (b, h) pairs with pyserve::num_threads() OpenMP threads when the work is large enough.
// The AVX2 path needs D % 16 == 0 and 16 <= D <= 256 (MiniLM and BERT-base: 32 and 64); else a scalar loop.
// Where the CPU has AVX-512 F/BW/VL (cpu_has_avx512) that path runs 16 lanes wide, with the same
// result bit for bit (the same operations in the same order per output; a NaN output's sign bit
// may differ).
// bf16: bfloat16 products where attention_qkv_bf16(D) (below), else the fp32 paths.
void attention_qkv(const float* qkv, int64_t B, int64_t S, int64_t H, int64_t D, const float* mask,
                   int64_t mask_b_stride, int64_t mask_q_stride, float scale, float* out, bool bf16 = false);

// Mean pooling over the tokens a mask keeps, then L2 normalisation (sentence-transformers' pooling of
// a sentence embedding model): d[b] = sum_s m[b, s] h[b, s, :] / max(sum_s m[b, s], eps_count), then
// d[b] / max(||d[b]||_2, eps_norm). h [B, S, E] fp32, m [B, S] fp32 (0 / 1 from a key mask, or
// weights), out [B, E]. Sums in fp32, tokens in order.
void mean_pool_normalize(const float* h, const float* m, int64_t B, int64_t S, int64_t E, float eps_count,
                         float eps_norm, float* out);

// Whether attention_qkv takes its AVX2 path for head size D on this CPU.
bool attention_qkv_fast(int64_t D);

// Whether attention_qkv(..., bf16 = true) runs the bfloat16 kernel for head size D on this CPU (the
// AVX2 conditions and AVX-512 BF16, cpu_has_avx512_bf16). Numerics of that kernel: Q, K, V and the
// softmax's exponentials (a degree-4 polynomial for 2^f, within about 3e-6 relative of exp: far
// below the rounding that follows) rounded to bfloat16 (round to nearest even; 8 significant bits), their
// products exact in fp32 and summed in fp32 (vdpbf16ps, which treats subnormals as zero); the scores'
// scaling, the mask, the softmax's maximum and sum and the final division in fp32.
bool attention_qkv_bf16(int64_t D);

}  // namespace quant
}  // namespace pyserve
