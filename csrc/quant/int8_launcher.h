// Entry points of the int8 family: argument checks, GIL handling, dispatch to the kernels.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <optional>
#include <string>
#include <utility>

namespace pyserve {

// w: [N, K] float32 C-contiguous -> (w_int8 [N, K] int8, w_scale [N] float32).
pybind11::tuple quantize_per_channel(const pybind11::array& w);

// x [B, K] float32, w_int8 [N, K] int8, w_scale [N] float32, bias [N] float32 or None -> y [B, N].
pybind11::array int8_linear(const pybind11::array& x, const pybind11::array& w_int8, const pybind11::array& w_scale,
                            const std::optional<pybind11::array>& bias);

// Weights packed once for int8_linear_packed (layout: quant/int8_kernel.h). Immutable: the packed
// bytes are a copy, so later writes to the source array do not reach them.
class Int8PackedWeight {
 public:
  Int8PackedWeight(pybind11::array_t<uint8_t> wu, int64_t N, int64_t K) : wu_(std::move(wu)), N_(N), K_(K) {}
  int64_t rows() const { return N_; }
  int64_t cols() const { return K_; }
  pybind11::tuple shape() const { return pybind11::make_tuple(N_, K_); }
  int64_t nbytes() const { return static_cast<int64_t>(wu_.nbytes()); }
  const uint8_t* wu() const { return wu_.data(); }

 private:
  pybind11::array_t<uint8_t> wu_;
  int64_t N_, K_;
};

// w_int8 [N, K] int8 C-contiguous -> packed copy (K <= kInt8MaxK).
Int8PackedWeight int8_pack_weight(const pybind11::array& w_int8);

// As int8_linear, the weights given packed; the same output bit for bit. activation "gelu": GELU
// (quant::gelu_erf_inplace) applied to y before it is returned ("none": y as is). norm_weight and
// norm_bias [N] (together): then y = LayerNorm(y + residual) * norm_weight + norm_bias
// (quant::add_layer_norm_inplace; residual [B, N] float32 or None: no add; eps in the variance).
pybind11::array int8_linear_packed(const pybind11::array& x, const Int8PackedWeight& w, const pybind11::array& w_scale,
                                   const std::optional<pybind11::array>& bias, const std::string& activation = "none",
                                   const std::optional<pybind11::array>& residual = std::nullopt,
                                   const std::optional<pybind11::array>& norm_weight = std::nullopt,
                                   const std::optional<pybind11::array>& norm_bias = std::nullopt, double eps = 1e-5);

// y = LayerNorm(x + residual) * weight + bias over the last dim N of x (any rank >= 1, float32,
// C-contiguous; residual: the same shape, or None), a new array of x's shape; eps in the variance.
// quant::add_layer_norm_inplace (the int8 layers' add & LayerNorm epilogue) on a copy of x.
pybind11::array layer_norm(const pybind11::array& x, const pybind11::array& weight, const pybind11::array& bias,
                           double eps, const std::optional<pybind11::array>& residual = std::nullopt);

// CUDA path on device pointers (the Python face checks the torch tensors): x [B, K] fp32,
// w [N, K] int8, w_scale [N] fp32, bias [N] fp32 or 0, y [B, N] fp32, workspace xq [B, K] int8 and
// x_scale [B] fp32; all contiguous on the current device. Queued on `stream` (a
// cudaStream_t as an integer, 0 = the legacy default stream) without waiting for it. Raises
// RuntimeError when pyserve was built without CUDA or a launch fails.
void int8_linear_cuda(std::uintptr_t x, std::uintptr_t w, std::uintptr_t w_scale, std::uintptr_t bias,
                      std::uintptr_t y, std::uintptr_t xq, std::uintptr_t x_scale, int64_t B, int64_t K, int64_t N,
                      std::uintptr_t stream = 0);

}  // namespace pyserve
