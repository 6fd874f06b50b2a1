// CUDA codebook linear (codebook_kernel.cu): same layout and result as codebook_kernel.h.
#pragma once

#include <cstdint>
#include <string>

namespace pyserve {
namespace quant {

// Device pointers to contiguous arrays on the current device: x [B, K], packed
// [N, ceil(K*bits/8)], codebook [2**bits] or [N, 2**bits] (per_channel), bias [N] or null,
// y [B, N]; bits in 2..8. Queued on `stream` (a cudaStream_t as an integer, 0 = the legacy default
// stream) and NOT waited for: y is ready in stream order. Returns false with *error set when the
// launch fails.
bool codebook_linear_cuda(const float* x, const uint8_t* packed, const float* codebook, const float* bias, float* y,
                          int64_t B, int64_t K, int64_t N, int bits, bool per_channel, std::uintptr_t stream,
                          std::string* error);

}  // namespace quant
}  // namespace pyserve
