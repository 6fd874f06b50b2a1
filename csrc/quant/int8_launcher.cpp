// int8 launchers: every argument check happens here, once; the kernels trust their inputs.
#include "quant/int8_launcher.h"

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

py::array int8_linear(const py::array& x, const py::array& w_int8, const py::array& w_scale,
                      const std::optional<py::array>& bias) {
  check_array<float>(x, kLinearOp, "x", 2, "float32");
  check_array<int8_t>(w_int8, kLinearOp, "w_int8", 2, "int8");
  check_array<float>(w_scale, kLinearOp, "w_scale", 1, "float32");
  const int64_t B = x.shape(0), K = x.shape(1), N = w_int8.shape(0);
  PYSERVE_CHECK_ARG(w_int8.shape(1) == K, kLinearOp, "w_int8", "expected shape (N, K) with K = ", K,
                    " (x.shape[1]), got shape ", shape_text(w_int8));
  PYSERVE_CHECK_ARG(K <= quant::kInt8MaxK, kLinearOp, "x", "expected K <= ", quant::kInt8MaxK,
                    " (exact int32 accumulation), got K = ", K);
  PYSERVE_CHECK_ARG(w_scale.shape(0) == N, kLinearOp, "w_scale", "expected shape (", N, ",) (one scale per row of w_int8), got shape ",
                    shape_text(w_scale));
  const float* bias_ptr = nullptr;
  if (bias) {
    check_array<float>(*bias, kLinearOp, "bias", 1, "float32");
    PYSERVE_CHECK_ARG(bias->shape(0) == N, kLinearOp, "bias", "expected shape (", N, ",) (N = w_int8.shape[0]), got shape ",
                      shape_text(*bias));
    bias_ptr = static_cast<const float*>(bias->data());
  }
  py::array_t<float> y({static_cast<py::ssize_t>(B), static_cast<py::ssize_t>(N)});
  const float* xp = static_cast<const float*>(x.data());
  const int8_t* wp = static_cast<const int8_t*>(w_int8.data());
  const float* sp = static_cast<const float*>(w_scale.data());
  float* yp = y.mutable_data();
  int64_t bad_row = -1;
  bool ok;
  {
    py::gil_scoped_release release;
    std::vector<int8_t> xq(static_cast<size_t>(B * K));
    std::vector<float> sx(static_cast<size_t>(B));
    ok = quant::quantize_rows(xp, B, K, xq.data(), sx.data(), &bad_row);
    if (ok) quant::int8_gemm(xq.data(), sx.data(), B, K, wp, sp, bias_ptr, N, yp);
  }
  PYSERVE_CHECK_ARG(ok, kLinearOp, "x", "expected finite values, got inf or NaN in row ", bad_row);
  return y;
}

void int8_linear_cuda(std::uintptr_t x, std::uintptr_t w, std::uintptr_t w_scale, std::uintptr_t bias,
                      std::uintptr_t y, std::uintptr_t xq, std::uintptr_t x_scale, int64_t B, int64_t K, int64_t N) {
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
                                 reinterpret_cast<float*>(x_scale), B, K, N, &error);
  }
  PYSERVE_CHECK_INTERNAL(ok, kLinearCudaOp, error);
#else
  (void)x, (void)w, (void)w_scale, (void)bias, (void)y, (void)xq, (void)x_scale;
  throw_internal_error(kLinearCudaOp, "pyserve was built without CUDA (PYSERVE_CUDA=OFF or no nvcc)");
#endif
}

}  // namespace pyserve
