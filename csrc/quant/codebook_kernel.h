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
// per step, OpenMP over rows. AVX2, bits 4 and 5: the codebook is split into four byte planes
// (byte j of every entry; 5 bits: one set per 16-entry half, chosen with vpblendvb on code bit 4)
// and vpshufb looks up one byte of 32 weights at once; unpacks reassemble the fp32 values (the
// lookup moves bits, it is exact). 4-bit codes are the nibbles of 32 packed bytes; 5-bit codes
// of a 32-code block (20 bytes) are spread to bytes with vpermd/vpshufb/vpmullw/vpsrlw/vpackuswb.
// AVX2, bits 2, 3: the codebook sits in a register and vpermps looks up 8 codes taken from the
// 64-bit lanes of the packed row. In both cases x is reordered once per call to the order the
// weights come out in. B = 1 fuses the lookup with the FMA; B > 1 decodes the row once and takes
// the B dot products. Bits 6..8 and the portable path unpack the row to bytes first (8 codes per
// 64-bit load) and look up with scalar loads. The summation order differs from a plain matmul, so
// results agree to fp32 rounding, not bit for bit. An activation-side table (LUT-GEMM, Park et
// al. 2022: T[pair][two codes] = cb[c0] x[2p] + cb[c1] x[2p + 1]) measured 2-4x slower than the
// byte planes at B = 1 on Zen 3 (benchmarks/native/codebook_lut.cpp): one scalar or gathered
// lookup per two weights against 12 shuffles per 32.
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
