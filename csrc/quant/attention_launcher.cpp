// Fused-QKV attention launcher: every argument check happens here, once; the kernel trusts its inputs.
#include "quant/attention_launcher.h"

#include <cmath>
#include <string>
#include <vector>

#include "common/checks.h"
#include "quant/array_checks.h"
#include "quant/attention_kernel.h"

namespace py = pybind11;

namespace pyserve {

namespace {
constexpr char kOp[] = "attention_qkv";
using quant_checks::check_array;
using quant_checks::shape_text;
}  // namespace

py::array attention_qkv(const py::array& qkv, int64_t heads, const std::optional<py::array>& mask, double scale,
                        const std::string& precision) {
  PYSERVE_CHECK_ARG(precision == "fp32" || precision == "bf16", kOp, "precision", "expected 'fp32' or 'bf16', got '",
                    precision, "'");
  check_array<float>(qkv, kOp, "qkv", 3, "float32");
  const int64_t B = qkv.shape(0), S = qkv.shape(1), C = qkv.shape(2);
  PYSERVE_CHECK_ARG(heads >= 1, kOp, "heads", "expected >= 1, got ", heads);
  PYSERVE_CHECK_ARG(C % (3 * heads) == 0 && C > 0, kOp, "qkv",
                    "expected a last dim of 3 * heads * head_size (Q, K, V side by side) with heads = ", heads,
                    ", got shape ", shape_text(qkv));
  PYSERVE_CHECK_ARG(std::isfinite(scale) && std::isfinite(static_cast<float>(scale)), kOp, "scale",
                    "expected a finite number in float32 range, got ", scale);
  const int64_t D = C / (3 * heads), E = heads * D;
  const float* mp = nullptr;
  int64_t mb = 0, mq = 0;
  if (mask) {
    check_array<float>(*mask, kOp, "mask", 3, "float32");
    const int64_t Bm = mask->shape(0), Sq = mask->shape(1), Sk = mask->shape(2);
    PYSERVE_CHECK_ARG((Bm == 1 || Bm == B) && (Sq == 1 || Sq == S) && Sk == S, kOp, "mask",
                      "expected shape (B or 1, S or 1, S) = (", B, " or 1, ", S, " or 1, ", S, "), got shape ",
                      shape_text(*mask));
    mp = static_cast<const float*>(mask->data());
    mq = Sq == 1 ? 0 : S;
    mb = Bm == 1 ? 0 : Sq * S;
  }
  py::array_t<float> out({static_cast<py::ssize_t>(B), static_cast<py::ssize_t>(S), static_cast<py::ssize_t>(E)});
  const float* xp = static_cast<const float*>(qkv.data());
  float* yp = out.mutable_data();
  {
    py::gil_scoped_release release;
    quant::attention_qkv(xp, B, S, heads, D, mp, mb, mq, static_cast<float>(scale), yp, precision == "bf16");
  }
  return out;
}

py::array mean_pool_normalize(const py::array& h, const py::array& mask, double eps_count, double eps_norm) {
  constexpr char kPool[] = "mean_pool_normalize";
  check_array<float>(h, kPool, "h", 3, "float32");
  const int64_t B = h.shape(0), S = h.shape(1), E = h.shape(2);
  const bool ints = mask.dtype().equal(py::dtype::of<int64_t>());
  if (ints)
    check_array<int64_t>(mask, kPool, "mask", 2, "int64");
  else
    check_array<float>(mask, kPool, "mask", 2, "float32 or int64");
  PYSERVE_CHECK_ARG(mask.shape(0) == B && mask.shape(1) == S, kPool, "mask", "expected shape (", B, ", ", S,
                    ") (h's first two dims), got shape ", shape_text(mask));
  const auto floor_ok = [](double eps) { return std::isfinite(eps) && eps >= 0 && std::isfinite(static_cast<float>(eps)); };
  PYSERVE_CHECK_ARG(floor_ok(eps_count), kPool, "eps_count", "expected a finite number >= 0 in float32 range, got ",
                    eps_count);
  PYSERVE_CHECK_ARG(floor_ok(eps_norm), kPool, "eps_norm", "expected a finite number >= 0 in float32 range, got ",
                    eps_norm);
  std::vector<float> weights;
  const float* mp = static_cast<const float*>(mask.data());
  if (ints) {
    const int64_t* ip = static_cast<const int64_t*>(mask.data());
    weights.assign(ip, ip + B * S);  // int64 -> float, as mask.float()
    mp = weights.data();
  }
  py::array_t<float> out({static_cast<py::ssize_t>(B), static_cast<py::ssize_t>(E)});
  const float* hp = static_cast<const float*>(h.data());
  float* op = out.mutable_data();
  {
    py::gil_scoped_release release;
    quant::mean_pool_normalize(hp, mp, B, S, E, static_cast<float>(eps_count), static_cast<float>(eps_norm), op);
  }
  return out;
}

bool attention_qkv_fast(int64_t head_size) { return quant::attention_qkv_fast(head_size); }

bool attention_qkv_bf16(int64_t head_size) { return quant::attention_qkv_bf16(head_size); }

}  // namespace pyserve
