// Codebook (weight-sharing) linear layer on the CPU, and the packing of its 2..8-bit indices.
//
// Algorithm: Han, Mao & Dally 2016, "Deep Compression", section 3 (trained quantization and weight
// sharing): each weight is an index into a small fp32 codebook, W[n, k] = codebook[idx[n, k]], with
// one codebook per layer ([2**bits]) or one per output channel ([N, 2**bits]).
//
// Packed layout (little-endian bit order): row n of K codes takes row_bytes = ceil(K * bits / 8)
// bytes; code k occupies bits [k * bits, (k + 1) * bits) of the row, where bit j of the row is bit
// (j % 8) of byte j / 8, least significant bit of the code first. Unused high bits of the last byte
// are zero. Rows follow each other with no gap.
//
// codebook_linear computes y[b, n] = sum_k x[b, k] * W[n, k] (+ bias[n]) in fp32, one weight row
// per step, OpenMP over rows. AVX2, bits <= 5: the codebook sits in 1..4 registers and vpermps
// (+ vblendvps on the high code bits) looks up 8 codes taken straight from the packed row (4 bits:
// nibbles of 8 dwords; 2, 3, 5 bits: four 8-code groups in the 64-bit lanes); x is reordered once
// per call to the order the codes come out in. B = 1 fuses the lookup with the FMA; B > 1 decodes
// the row once and takes the B dot products. Bits 6..8 and the portable path unpack the row to
// bytes first (8 codes per 64-bit load) and look up with scalar loads. The summation order
// differs from a plain matmul, so results agree to fp32 rounding, not bit for bit.
#pragma once

#include <cstdint>

namespace pyserve {
namespace quant {

inline int64_t packed_row_bytes(int64_t K, int bits) { return (K * bits + 7) / 8; }

// Packs idx [N, K] (values < 2**bits, checked by the caller with first_code_out_of_range) into
// packed [N, packed_row_bytes(K, bits)].
void pack_indices(const uint8_t* idx, int64_t N, int64_t K, int bits, uint8_t* packed);

// Returns the flat position of the first idx value >= 2**bits, or -1 when all fit.
int64_t first_code_out_of_range(const uint8_t* idx, int64_t count, int bits);

// Unpacks packed [N, packed_row_bytes(K, bits)] into idx [N, K]. Reads exactly the packed bytes.
void unpack_indices(const uint8_t* packed, int64_t N, int64_t K, int bits, uint8_t* idx);

// y[B, N] = x[B, K] . W^T (+ bias), W from packed codes and codebook ([2**bits] when
// per_channel is false, else [N, 2**bits]); bias may be null. OpenMP over output rows.
void codebook_linear(const float* x, int64_t B, int64_t K, const uint8_t* packed, int64_t N, int bits,
                     const float* codebook, bool per_channel, const float* bias, float* y);

}  // namespace quant
}  // namespace pyserve
