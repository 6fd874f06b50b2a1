// Entry points of the int8 family: argument checks, GIL handling, dispatch to the kernels.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <optional>

namespace pyserve {

// w: [N, K] float32 C-contiguous -> (w_int8 [N, K] int8, w_scale [N] float32).
pybind11::tuple quantize_per_channel(const pybind11::array& w);

// x [B, K] float32, w_int8 [N, K] int8, w_scale [N] float32, bias [N] float32 or None -> y [B, N].
pybind11::array int8_linear(const pybind11::array& x, const pybind11::array& w_int8, const pybind11::array& w_scale,
                            const std::optional<pybind11::array>& bias);

// CUDA path on device pointers (the Python face checks the torch tensors): x [B, K] fp32,
// w [N, K] int8, w_scale [N] fp32, bias [N] fp32 or 0, y [B, N] fp32, workspace xq [B, K] int8 and
// x_scale [B] fp32; all contiguous on the current device. Runs on the legacy default stream and
// synchronizes. Raises RuntimeError when pyserve was built without CUDA or a CUDA call fails.
void int8_linear_cuda(std::uintptr_t x, std::uintptr_t w, std::uintptr_t w_scale, std::uintptr_t bias,
                      std::uintptr_t y, std::uintptr_t xq, std::uintptr_t x_scale, int64_t B, int64_t K, int64_t N);

}  // namespace pyserve
