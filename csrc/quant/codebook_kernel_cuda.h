// CUDA codebook linear (codebook_kernel.cu): same layout and result as codebook_kernel.h.
#pragma once

#include <cstdint>
#include <string>

namespace pyserve {
namespace quant {

// Device pointers to contiguous arrays: x [B, K], packed [N, ceil(K*bits/8)], codebook [2**bits]
// or [N, 2**bits] (per_channel), bias [N] or null, y [B, N]. Returns false with *error set when a
// CUDA call fails.
bool codebook_linear_cuda(const float* x, const uint8_t* packed, const float* codebook, const float* bias, float* y,
                          int64_t B, int64_t K, int64_t N, int bits, bool per_channel, std::string* error);

}  // namespace quant
}  // namespace pyserve
