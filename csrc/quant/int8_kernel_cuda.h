// CUDA int8 linear (int8_kernel.cu): same quantization and dequantization as int8_kernel.h.
// Plain C++ declarations so the launcher (.cpp) can call them without CUDA headers.
#pragma once

#include <cstdint>
#include <string>

namespace pyserve {
namespace quant {

// All pointers are device pointers to contiguous arrays on the current device: x [B, K], w [N, K],
// w_scale [N], bias [N] or null, y [B, N], workspace xq [B, K] and x_scale [B]. Any K >= 0 and any
// alignment of w / xq (unaligned rows take byte loads). The kernels are queued on `stream` (a
// cudaStream_t as an integer; 0 = the legacy default stream) and NOT waited for: y is ready in
// stream order. Returns false with *error set when a launch fails. Non-finite activations are not
// detected on the GPU (they give NaN).
bool int8_linear_cuda(const float* x, const int8_t* w, const float* w_scale, const float* bias, float* y, int8_t* xq,
                      float* x_scale, int64_t B, int64_t K, int64_t N, std::uintptr_t stream, std::string* error);

}  // namespace quant
}  // namespace pyserve
