// int8 launchers: every argument check happens here, once; the kernels trust their inputs.
#include "quant/int8_launcher.h"

#include <cmath>
#include <cstring>
#include <vector>

#include "common/checks.h"
#include "quant/array_checks.h"
#include "quant/int8_kernel.h"
#if PYSERVE_WITH_CUDA
#include "quant/int8_kernel_cuda.h"
#endif

namespace py = pybind11;

namespace pyserve {

namespace {
constexpr char kQuantizeOp[] = "quantize_per_channel";
constexpr char kLinearOp[] = "int8_linear";
constexpr char kLinearCudaOp[] = "int8_linear_cuda";
constexpr char kPackOp[] = "pack_int8_weight";
using quant_checks::check_array;
using quant_checks::shape_text;
}  // namespace

py::tuple quantize_per_channel(const py::array& w) {
  check_array<float>(w, kQuantizeOp, "w", 2, "float32");
  const int64_t N = w.shape(0), K = w.shape(1);
  py::array_t<int8_t> q({static_cast<py::ssize_t>(N), static_cast<py::ssize_t>(K)});
  py::array_t<float> scale(static_cast<py::ssize_t>(N));
  const float* src = static_cast<const float*>(w.data());
  int8_t* qp = q.mutable_data();
  float* sp = scale.mutable_data();
  int64_t bad_row = -1;
  bool ok;
  {
    py::gil_scoped_release release;
    ok = quant::quantize_rows(src, N, K, qp, sp, &bad_row);
  }
  PYSERVE_CHECK_ARG(ok, kQuantizeOp, "w", "expected finite values, got inf or NaN in row ", bad_row);
  return py::make_tuple(q, scale);
}

namespace {
// From this many rows int8_linear on unpacked weights packs them for the call (see int8_linear).
constexpr int64_t kPackRowsMin = 16;

// Checks x, w_scale and bias against N and K (w_int8's shape, checked by the caller); returns bias's
// data or null.
const float* check_linear_args(const py::array& x, int64_t N, int64_t K, const py::array& w_scale,
                               const std::optional<py::array>& bias, const char* w_arg) {
  PYSERVE_CHECK_ARG(x.shape(1) == K, kLinearOp, w_arg, "expected shape (N, K) with K = ", x.shape(1),
                    " (x.shape[1]), got shape (", N, ", ", K, ")");
  PYSERVE_CHECK_ARG(K <= quant::kInt8MaxK, kLinearOp, "x", "expected K <= ", quant::kInt8MaxK,
                    " (exact int32 accumulation), got K = ", K);
  check_array<float>(w_scale, kLinearOp, "w_scale", 1, "float32");
  PYSERVE_CHECK_ARG(w_scale.shape(0) == N, kLinearOp, "w_scale", "expected shape (", N, ",) (one scale per row of w_int8), got shape ",
                    shape_text(w_scale));
  if (!bias) return nullptr;
  check_array<float>(*bias, kLinearOp, "bias", 1, "float32");
  PYSERVE_CHECK_ARG(bias->shape(0) == N, kLinearOp, "bias", "expected shape (", N, ",) (N = w_int8.shape[0]), got shape ",
                    shape_text(*bias));
  return static_cast<const float*>(bias->data());
}

// Quantizes x per row and runs `gemm(xq, sx, y)` with the GIL released; ValueError on a non-finite x.
template <class Gemm>
py::array run_linear(const py::array& x, int64_t N, Gemm gemm) {
  const int64_t B = x.shape(0), K = x.shape(1);
  py::array_t<float> y({static_cast<py::ssize_t>(B), static_cast<py::ssize_t>(N)});
  const float* xp = static_cast<const float*>(x.data());
  float* yp = y.mutable_data();
  int64_t bad_row = -1;
  bool ok;
  {
    py::gil_scoped_release release;
    std::vector<int8_t> xq(static_cast<size_t>(B * K));
    std::vector<float> sx(static_cast<size_t>(B));
    ok = quant::quantize_rows(xp, B, K, xq.data(), sx.data(), &bad_row);
    if (ok) gemm(xq.data(), sx.data(), yp);
  }
  PYSERVE_CHECK_ARG(ok, kLinearOp, "x", "expected finite values, got inf or NaN in row ", bad_row);
  return y;
}
}  // namespace

py::array int8_linear(const py::array& x, const py::array& w_int8, const py::array& w_scale,
                      const std::optional<py::array>& bias) {
  check_array<float>(x, kLinearOp, "x", 2, "float32");
  check_array<int8_t>(w_int8, kLinearOp, "w_int8", 2, "int8");
  const int64_t B = x.shape(0), K = w_int8.shape(1), N = w_int8.shape(0);
  const float* bias_ptr = check_linear_args(x, N, K, w_scale, bias, "w_int8");
  const int8_t* wp = static_cast<const int8_t*>(w_int8.data());
  const float* sp = static_cast<const float*>(w_scale.data());
  if (B >= kPackRowsMin) {
    // packed for this call, then the packed kernel: the same y bit for bit, 2-3x faster at such B
    return run_linear(x, N, [&](const int8_t* xq, const float* sx, float* yp) {
      quant::int8_gemm_packing(xq, sx, B, K, wp, sp, bias_ptr, N, yp);
    });
  }
  return run_linear(x, N, [&](const int8_t* xq, const float* sx, float* yp) {
    quant::int8_gemm(xq, sx, B, K, wp, sp, bias_ptr, N, yp);
  });
}

Int8PackedWeight int8_pack_weight(const py::array& w_int8) {
  check_array<int8_t>(w_int8, kPackOp, "w_int8", 2, "int8");
  const int64_t N = w_int8.shape(0), K = w_int8.shape(1);
  PYSERVE_CHECK_ARG(K <= quant::kInt8MaxK, kPackOp, "w_int8", "expected K = w_int8.shape[1] <= ", quant::kInt8MaxK,
                    " (exact int32 accumulation), got K = ", K);
  py::array_t<uint8_t> wu(static_cast<py::ssize_t>(quant::int8_pack_wu_bytes(N, K)));
  const int8_t* wp = static_cast<const int8_t*>(w_int8.data());
  uint8_t* up = wu.mutable_data();
  {
    py::gil_scoped_release release;
    quant::int8_pack(wp, N, K, up);
  }
  return Int8PackedWeight(std::move(wu), N, K);
}

py::array int8_linear_packed(const py::array& x, const Int8PackedWeight& w, const py::array& w_scale,
                             const std::optional<py::array>& bias, const std::string& activation,
                             const std::optional<py::array>& residual, const std::optional<py::array>& norm_weight,
                             const std::optional<py::array>& norm_bias, double eps) {
  PYSERVE_CHECK_ARG(activation == "none" || activation == "gelu", kLinearOp, "activation",
                    "expected 'none' or 'gelu', got '", activation, "'");
  const bool gelu = activation == "gelu";
  check_array<float>(x, kLinearOp, "x", 2, "float32");
  const int64_t B = x.shape(0), K = w.cols(), N = w.rows();
  const float* bias_ptr = check_linear_args(x, N, K, w_scale, bias, "w_int8");
  const float* sp = static_cast<const float*>(w_scale.data());
  PYSERVE_CHECK_ARG(norm_weight.has_value() == norm_bias.has_value(), kLinearOp, norm_weight ? "norm_bias" : "norm_weight",
                    "expected norm_weight and norm_bias together (the LayerNorm epilogue), got one of them");
  PYSERVE_CHECK_ARG(!residual || norm_weight, kLinearOp, "residual",
                    "expected norm_weight and norm_bias with a residual (the add & LayerNorm epilogue)");
  const float *res_ptr = nullptr, *g_ptr = nullptr, *b_ptr = nullptr;
  if (norm_weight) {
    for (const auto* arg : {&*norm_weight, &*norm_bias}) {
      const char* name = arg == &*norm_weight ? "norm_weight" : "norm_bias";
      check_array<float>(*arg, kLinearOp, name, 1, "float32");
      PYSERVE_CHECK_ARG(arg->shape(0) == N, kLinearOp, name, "expected shape (", N, ",) (N = w.shape[0]), got shape ",
                        shape_text(*arg));
    }
    g_ptr = static_cast<const float*>(norm_weight->data());
    b_ptr = static_cast<const float*>(norm_bias->data());
    PYSERVE_CHECK_ARG(std::isfinite(eps) && eps >= 0 && std::isfinite(static_cast<float>(eps)), kLinearOp, "eps",
                      "expected a finite number >= 0 in float32 range, got ", eps);
  }
  if (residual) {
    check_array<float>(*residual, kLinearOp, "residual", 2, "float32");
    PYSERVE_CHECK_ARG(residual->shape(0) == B && residual->shape(1) == N, kLinearOp, "residual", "expected shape (", B,
                      ", ", N, ") (the output's), got shape ", shape_text(*residual));
    res_ptr = static_cast<const float*>(residual->data());
  }
  py::array_t<float> y({static_cast<py::ssize_t>(B), static_cast<py::ssize_t>(N)});
  const float* xp = static_cast<const float*>(x.data());
  float* yp = y.mutable_data();
  int64_t bad_row = -1;
  bool ok;
  {
    py::gil_scoped_release release;  // quantization fused into the kernel's row preparation
    ok = quant::int8_linear_packed_f32(xp, B, K, w.wu(), sp, bias_ptr, N, yp, &bad_row);
    if (ok && gelu) quant::gelu_erf_inplace(yp, B * N);
    if (ok && g_ptr) quant::add_layer_norm_inplace(yp, res_ptr, g_ptr, b_ptr, B, N, static_cast<float>(eps));
  }
  PYSERVE_CHECK_ARG(ok, kLinearOp, "x", "expected finite values, got inf or NaN in row ", bad_row);
  return y;
}

py::array layer_norm(const py::array& x, const py::array& weight, const py::array& bias, double eps,
                     const std::optional<py::array>& residual) {
  constexpr char kOp[] = "layer_norm";
  PYSERVE_CHECK_ARG(x.dtype().equal(py::dtype::of<float>()), kOp, "x", "expected dtype float32 (native byte order), got ",
                    quant_checks::dtype_text(x));
  PYSERVE_CHECK_ARG(x.ndim() >= 1, kOp, "x", "expected at least 1 dim (the normalized one last), got a 0-D array");
  PYSERVE_CHECK_ARG((x.flags() & py::array::c_style) != 0, kOp, "x",
                    "expected a C-contiguous array, got strides that are not C order for shape ", shape_text(x));
  const int64_t N = x.shape(x.ndim() - 1);
  const int64_t rows = N == 0 ? 0 : x.size() / N;
  for (const auto* arg : {&weight, &bias}) {
    const char* name = arg == &weight ? "weight" : "bias";
    check_array<float>(*arg, kOp, name, 1, "float32");
    PYSERVE_CHECK_ARG(arg->shape(0) == N, kOp, name, "expected shape (", N, ",) (x's last dim), got shape ",
                      shape_text(*arg));
  }
  PYSERVE_CHECK_ARG(std::isfinite(eps) && eps >= 0 && std::isfinite(static_cast<float>(eps)), kOp, "eps",
                    "expected a finite number >= 0 in float32 range, got ", eps);
  const float* res_ptr = nullptr;
  if (residual) {
    check_array<float>(*residual, kOp, "residual", static_cast<int>(x.ndim()), "float32");
    bool same = true;
    for (py::ssize_t d = 0; d < x.ndim(); ++d) same &= residual->shape(d) == x.shape(d);
    PYSERVE_CHECK_ARG(same, kOp, "residual", "expected x's shape ", shape_text(x), ", got shape ", shape_text(*residual));
    res_ptr = static_cast<const float*>(residual->data());
  }
  std::vector<py::ssize_t> shape(x.shape(), x.shape() + x.ndim());
  py::array_t<float> y(shape);
  const float* xp = static_cast<const float*>(x.data());
  float* yp = y.mutable_data();
  const float* gp = static_cast<const float*>(weight.data());
  const float* bp = static_cast<const float*>(bias.data());
  {
    py::gil_scoped_release release;
    if (rows > 0) {
      std::memcpy(yp, xp, sizeof(float) * static_cast<size_t>(rows * N));
      quant::add_layer_norm_inplace(yp, res_ptr, gp, bp, rows, N, static_cast<float>(eps));
    }
  }
  return y;
}

void int8_linear_cuda(std::uintptr_t x, std::uintptr_t w, std::uintptr_t w_scale, std::uintptr_t bias,
                      std::uintptr_t y, std::uintptr_t xq, std::uintptr_t x_scale, int64_t B, int64_t K, int64_t N,
                      std::uintptr_t stream) {
  PYSERVE_CHECK_ARG(B >= 0 && K >= 0 && N >= 0, kLinearCudaOp, "B, K, N", "expected non-negative sizes, got ", B, ", ",
                    K, ", ", N);
  PYSERVE_CHECK_ARG(K <= quant::kInt8MaxK, kLinearCudaOp, "K", "expected K <= ", quant::kInt8MaxK, ", got ", K);
#if PYSERVE_WITH_CUDA
  std::string error;
  bool ok;
  {
    py::gil_scoped_release release;
    ok = quant::int8_linear_cuda(reinterpret_cast<const float*>(x), reinterpret_cast<const int8_t*>(w),
                                 reinterpret_cast<const float*>(w_scale), reinterpret_cast<const float*>(bias),
                                 reinterpret_cast<float*>(y), reinterpret_cast<int8_t*>(xq),
                                 reinterpret_cast<float*>(x_scale), B, K, N, stream, &error);
  }
  PYSERVE_CHECK_INTERNAL(ok, kLinearCudaOp, error);
#else
  (void)x, (void)w, (void)w_scale, (void)bias, (void)y, (void)xq, (void)x_scale, (void)stream;
  throw_internal_error(kLinearCudaOp, "pyserve was built without CUDA (PYSERVE_CUDA=OFF or no nvcc)");
#endif
}

}  // namespace pyserve
