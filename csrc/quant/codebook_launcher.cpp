// Codebook launchers: every argument check happens here, once; the kernels trust their inputs.
#include "quant/codebook_launcher.h"

#include "common/checks.h"
#include "quant/array_checks.h"
#include "quant/codebook_kernel.h"
#if PYSERVE_WITH_CUDA
#include "quant/codebook_kernel_cuda.h"
#endif

namespace py = pybind11;

namespace pyserve {

namespace {
constexpr char kPackOp[] = "pack_indices";
constexpr char kUnpackOp[] = "unpack_indices";
constexpr char kLinearOp[] = "codebook_linear";
constexpr char kLinearCudaOp[] = "codebook_linear_cuda";
using quant_checks::check_array;
using quant_checks::shape_text;

void check_bits(int bits, const char* op) {
  PYSERVE_CHECK_ARG(bits >= 2 && bits <= 8, op, "bits", "expected an integer in 2..8, got ", bits);
}

void check_packed(const py::array& packed, int64_t K, int bits, int64_t N, const char* op) {
  const int64_t rb = quant::packed_row_bytes(K, bits);
  PYSERVE_CHECK_ARG(packed.shape(1) == rb, op, "packed", "expected rows of ceil(K * bits / 8) = ", rb,
                    " bytes (K = ", K, ", bits = ", bits, "), got shape ", shape_text(packed),
                    packed.shape(1) < rb ? " (rows too short)" : " (rows too long)");
  if (N >= 0)
    PYSERVE_CHECK_ARG(packed.shape(0) == N, op, "packed", "expected ", N, " rows, got shape ", shape_text(packed));
}
}  // namespace

py::array pack_indices(const py::array& idx, int bits) {
  check_bits(bits, kPackOp);
  check_array<uint8_t>(idx, kPackOp, "idx", 2, "uint8");
  const int64_t N = idx.shape(0), K = idx.shape(1);
  const uint8_t* src = static_cast<const uint8_t*>(idx.data());
  int64_t bad;
  {
    py::gil_scoped_release release;
    bad = quant::first_code_out_of_range(src, N * K, bits);
  }
  if (bad >= 0)
    throw_argument_error(kPackOp, "idx",
                         str_cat("expected values in 0..", (1 << bits) - 1, " for bits = ", bits, ", got ",
                                 static_cast<int>(src[bad]), " at [", bad / K, ", ", bad % K, "]"));
  const int64_t rb = quant::packed_row_bytes(K, bits);
  py::array_t<uint8_t> out({static_cast<py::ssize_t>(N), static_cast<py::ssize_t>(rb)});
  uint8_t* dst = out.mutable_data();
  {
    py::gil_scoped_release release;
    quant::pack_indices(src, N, K, bits, dst);
  }
  return out;
}

py::array unpack_indices(const py::array& packed, int bits, int64_t K) {
  check_bits(bits, kUnpackOp);
  PYSERVE_CHECK_ARG(K >= 0, kUnpackOp, "K", "expected K >= 0, got ", K);
  check_array<uint8_t>(packed, kUnpackOp, "packed", 2, "uint8");
  check_packed(packed, K, bits, -1, kUnpackOp);
  const int64_t N = packed.shape(0);
  py::array_t<uint8_t> out({static_cast<py::ssize_t>(N), static_cast<py::ssize_t>(K)});
  const uint8_t* src = static_cast<const uint8_t*>(packed.data());
  uint8_t* dst = out.mutable_data();
  {
    py::gil_scoped_release release;
    quant::unpack_indices(src, N, K, bits, dst);
  }
  return out;
}

py::array codebook_linear(const py::array& x, const py::array& packed, const py::array& codebook, int bits,
                          const std::optional<py::array>& bias) {
  check_bits(bits, kLinearOp);
  check_array<float>(x, kLinearOp, "x", 2, "float32");
  check_array<uint8_t>(packed, kLinearOp, "packed", 2, "uint8");
  const int64_t B = x.shape(0), K = x.shape(1), N = packed.shape(0);
  check_packed(packed, K, bits, -1, kLinearOp);
  const int64_t C = int64_t{1} << bits;
  PYSERVE_CHECK_ARG(codebook.dtype().equal(py::dtype::of<float>()), kLinearOp, "codebook",
                    "expected dtype float32 (native byte order), got ", quant_checks::dtype_text(codebook));
  bool per_channel;
  if (codebook.ndim() == 1) {
    per_channel = false;
    PYSERVE_CHECK_ARG(codebook.shape(0) == C, kLinearOp, "codebook", "expected shape (", C, ",) (2**bits entries for bits = ",
                      bits, ") or (", N, ", ", C, ") per channel, got shape ", shape_text(codebook));
  } else if (codebook.ndim() == 2) {
    per_channel = true;
    PYSERVE_CHECK_ARG(codebook.shape(0) == N && codebook.shape(1) == C, kLinearOp, "codebook", "expected shape (", N,
                      ", ", C, ") (one codebook of 2**bits entries per row of packed) or (", C, ",), got shape ",
                      shape_text(codebook));
  } else {
    throw_argument_error(kLinearOp, "codebook",
                         str_cat("expected a 1-D [2**bits] or 2-D [N, 2**bits] array, got ndim=", codebook.ndim(),
                                 " with shape ", shape_text(codebook)));
  }
  PYSERVE_CHECK_ARG((codebook.flags() & py::array::c_style) != 0, kLinearOp, "codebook",
                    "expected a C-contiguous array");
  const float* bias_ptr = nullptr;
  if (bias) {
    check_array<float>(*bias, kLinearOp, "bias", 1, "float32");
    PYSERVE_CHECK_ARG(bias->shape(0) == N, kLinearOp, "bias", "expected shape (", N, ",) (N = packed.shape[0]), got shape ",
                      shape_text(*bias));
    bias_ptr = static_cast<const float*>(bias->data());
  }
  py::array_t<float> y({static_cast<py::ssize_t>(B), static_cast<py::ssize_t>(N)});
  const float* xp = static_cast<const float*>(x.data());
  const uint8_t* pp = static_cast<const uint8_t*>(packed.data());
  const float* cp = static_cast<const float*>(codebook.data());
  float* yp = y.mutable_data();
  {
    py::gil_scoped_release release;
    quant::codebook_linear(xp, B, K, pp, N, bits, cp, per_channel, bias_ptr, yp);
  }
  return y;
}

void codebook_linear_cuda(std::uintptr_t x, std::uintptr_t packed, std::uintptr_t codebook, std::uintptr_t bias,
                          std::uintptr_t y, int64_t B, int64_t K, int64_t N, int bits, bool per_channel,
                          std::uintptr_t stream) {
  check_bits(bits, kLinearCudaOp);
  PYSERVE_CHECK_ARG(B >= 0 && K >= 0 && N >= 0, kLinearCudaOp, "B, K, N", "expected non-negative sizes, got ", B, ", ",
                    K, ", ", N);
#if PYSERVE_WITH_CUDA
  std::string error;
  bool ok;
  {
    py::gil_scoped_release release;
    ok = quant::codebook_linear_cuda(reinterpret_cast<const float*>(x), reinterpret_cast<const uint8_t*>(packed),
                                     reinterpret_cast<const float*>(codebook), reinterpret_cast<const float*>(bias),
                                     reinterpret_cast<float*>(y), B, K, N, bits, per_channel, stream, &error);
  }
  PYSERVE_CHECK_INTERNAL(ok, kLinearCudaOp, error);
#else
  (void)x, (void)packed, (void)codebook, (void)bias, (void)y, (void)per_channel, (void)stream;
  throw_internal_error(kLinearCudaOp, "pyserve was built without CUDA (PYSERVE_CUDA=OFF or no nvcc)");
#endif
}

}  // namespace pyserve
