// CUDA int8 linear (int8_kernel.cu): same quantization and dequantization as int8_kernel.h.
// Plain C++ declarations so the launcher (.cpp) can call them without CUDA headers.
#pragma once

#include <cstdint>
#include <string>

namespace pyserve {
namespace quant {

// All pointers are device pointers to contiguous arrays: x [B, K], w [N, K], w_scale [N],
// bias [N] or null, y [B, N], workspace xq [B, K] and x_scale [B]. Returns false with *error set
// when a CUDA call fails. Non-finite activations are not detected on the GPU (they give NaN).
bool int8_linear_cuda(const float* x, const int8_t* w, const float* w_scale, const float* bias, float* y, int8_t* xq,
                      float* x_scale, int64_t B, int64_t K, int64_t N, std::string* error);

}  // namespace quant
}  // namespace pyserve
