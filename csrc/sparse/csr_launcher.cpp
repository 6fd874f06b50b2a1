// CSR sparse linear launcher: every argument check happens here, once; the kernels trust their
// inputs. Validation of the CSR structure is O(N + nnz) and runs before any x or y access.
#include "sparse/csr_launcher.h"

#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "common/checks.h"
#include "common/threads.h"
#include "sparse/csr_kernel.h"

namespace py = pybind11;

namespace pyserve {

namespace {

constexpr char kOp[] = "csr_linear";

enum class DType { kFloat32, kInt32, kInt64, kOther };

// A host numpy array or a device array described by __cuda_array_interface__ (version 2/3).
struct View {
  const void* data = nullptr;
  void* mutable_data = nullptr;
  std::vector<int64_t> shape;
  DType dtype = DType::kOther;
  std::string dtype_text;  // CUDA arrays: the typestr
  py::object dtype_obj;     // numpy arrays: the dtype, formatted only for an error message
  bool contiguous = true;
  bool cuda = false;
  py::object keep;  // keeps a numpy array alive

  int64_t ndim() const { return static_cast<int64_t>(shape.size()); }
  std::string shape_text() const {
    std::string s = "(";
    for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
    return s + (shape.size() == 1 ? ",)" : ")");
  }
};

std::string type_name(const py::handle& obj) {
  return py::str(py::type::handle_of(obj).attr("__name__")).cast<std::string>();
}

bool has_cuda_interface(const py::handle& obj) { return py::hasattr(obj, "__cuda_array_interface__"); }

// The interface dict of obj, or None when it has none. torch computes it in Python on every access
// (about 2 us on the CI CPU), so each array's is read once per call.
py::object cuda_interface(const py::handle& obj) { return py::getattr(obj, "__cuda_array_interface__", py::none()); }

View host_view(const py::object& obj, const char* arg) {
  if (!py::isinstance<py::array>(obj))
    throw_argument_error(kOp, arg, str_cat("expected a numpy.ndarray (or a torch.Tensor through pyserve.ops), got ",
                                           type_name(obj)));
  py::array a = py::reinterpret_borrow<py::array>(obj);
  View v;
  v.keep = a;
  v.data = a.data();
  if (a.writeable()) v.mutable_data = a.mutable_data();
  for (py::ssize_t i = 0; i < a.ndim(); ++i) v.shape.push_back(a.shape(i));
  const py::dtype dt = a.dtype();
  v.dtype_obj = dt;
  // dtype equality includes the byte order, so a byte-swapped array stays kOther.
  if (dt.equal(py::dtype::of<float>())) v.dtype = DType::kFloat32;
  else if (dt.equal(py::dtype::of<int32_t>())) v.dtype = DType::kInt32;
  else if (dt.equal(py::dtype::of<int64_t>())) v.dtype = DType::kInt64;
  v.contiguous = (a.flags() & py::array::c_style) != 0;
  return v;
}

#if PYSERVE_WITH_CUDA
View cuda_view(const py::object& obj, const char* arg, py::object iface_obj = py::object()) {
  if (!iface_obj) iface_obj = cuda_interface(obj);
  if (iface_obj.is_none())
    throw_argument_error(kOp, arg, str_cat("expected a CUDA array (with __cuda_array_interface__) like x, got ",
                                           type_name(obj)));
  py::dict iface = iface_obj;
  View v;
  v.cuda = true;
  py::tuple data = iface["data"];
  const auto ptr = static_cast<uintptr_t>(data[0].cast<unsigned long long>());
  v.data = reinterpret_cast<const void*>(ptr);
  if (!data[1].cast<bool>()) v.mutable_data = reinterpret_cast<void*>(ptr);
  for (auto d : iface["shape"].cast<py::tuple>()) v.shape.push_back(d.cast<int64_t>());
  v.dtype_text = iface["typestr"].cast<std::string>();
  if (v.dtype_text == "<f4") v.dtype = DType::kFloat32;
  else if (v.dtype_text == "<i4") v.dtype = DType::kInt32;
  else if (v.dtype_text == "<i8") v.dtype = DType::kInt64;
  if (iface.contains("strides") && !iface["strides"].is_none()) {
    const auto strides = iface["strides"].cast<py::tuple>();
    int64_t expect = v.dtype == DType::kInt64 ? 8 : 4;
    for (int64_t i = v.ndim() - 1; i >= 0; --i) {
      if (v.shape[i] > 1 && strides[i].cast<int64_t>() != expect) v.contiguous = false;
      expect *= v.shape[i];
    }
  }
  return v;
}
#endif

void check_rank(const View& v, const char* arg, int64_t ndim, const char* shape_hint, const char* op = kOp) {
  PYSERVE_CHECK_ARG(v.ndim() == ndim, op, arg, "expected a ", ndim, "-D array ", shape_hint, ", got ndim=", v.ndim(),
                    " with shape ", v.shape_text());
}
void check_dtype(const View& v, const char* arg, bool ok, const char* expected, const char* op = kOp) {
  if (ok) return;
  const std::string got = v.dtype_obj ? py::str(v.dtype_obj.attr("str")).cast<std::string>() + " (" +
                                            py::str(v.dtype_obj).cast<std::string>() + ")"
                                      : v.dtype_text;
  throw_argument_error(op, arg, str_cat("expected dtype ", expected, " (native byte order), got ", got));
}
void check_contiguous(const View& v, const char* arg, const char* op = kOp) {
  PYSERVE_CHECK_ARG(v.contiguous, op, arg, "expected a C-contiguous array, got a non-contiguous one with shape ",
                    v.shape_text());
}

// indptr [N+1] int64: indptr[0] == 0, non-decreasing, indptr[N] == nnz.
void check_indptr(const int64_t* p, int64_t N, int64_t nnz, const char* op = kOp) {
  PYSERVE_CHECK_ARG(p[0] == 0, op, "indptr", "expected indptr[0] == 0, got ", p[0]);
  int64_t descents = 0;
  for (int64_t i = 0; i < N; ++i) descents |= p[i + 1] < p[i];
  if (descents) {
    for (int64_t i = 0; i < N; ++i)
      PYSERVE_CHECK_ARG(p[i + 1] >= p[i], op, "indptr", "expected non-decreasing values, got indptr[", i, "] = ", p[i],
                        " > indptr[", i + 1, "] = ", p[i + 1]);
  }
  PYSERVE_CHECK_ARG(p[N] == nnz, op, "indptr", "expected indptr[-1] == nnz == len(indices) == ", nnz, ", got ", p[N]);
}

// indptr [N+1] (int32 or int64, host) -> checked int64 copy.
std::vector<int64_t> checked_indptr(const void* data, DType dtype, int64_t N, int64_t nnz, const char* op = kOp) {
  std::vector<int64_t> p(static_cast<std::size_t>(N + 1));
  if (dtype == DType::kInt32) {
    const auto* s = static_cast<const int32_t*>(data);
    for (int64_t i = 0; i <= N; ++i) p[i] = s[i];
  } else {
    std::memcpy(p.data(), data, p.size() * sizeof(int64_t));
  }
  check_indptr(p.data(), N, nnz, op);
  return p;
}

// Raises the ValueError for the offending nonzero `bad` (a position found by the kernel or by
// sparse::csr_first_bad_index).
template <typename Index>
[[noreturn]] void throw_bad_index(const int64_t* indptr, const Index* indices, int64_t K, int64_t bad,
                                  const char* op = kOp, const char* k_name = "K = x.shape[1]") {
  int64_t row = 0;
  while (indptr[row + 1] <= bad) ++row;
  const int64_t value = indices[bad];
  if (value < 0 || value >= K)
    throw_argument_error(op, "indices", str_cat("expected column indices in [0, K) = [0, ", K, ") with ", k_name, ", got indices[", bad,
                                                 "] = ", value, " (row ", row, ")"));
  throw_argument_error(op, "indices",
                       str_cat("expected strictly increasing column indices within each row (canonical CSR; "
                               "scipy: sort_indices() and sum_duplicates()), got indices[", bad - 1, "] = ",
                               indices[bad - 1], " then indices[", bad, "] = ", value, " in row ", row));
}

template <typename Index>
void check_indices(const std::vector<int64_t>& indptr, int64_t N, const Index* indices, int64_t K) {
  int64_t bad;
  {
    py::gil_scoped_release release;
    bad = sparse::csr_first_bad_index(indptr.data(), N, indices, K);
  }
  if (bad >= 0) throw_bad_index(indptr.data(), indices, K, bad);
}

struct Checked {
  View x, indptr, indices, values, bias;
  bool has_bias = false;
  int64_t B = 0, K = 0, N = 0, nnz = 0;
};

// Shape, dtype and contiguity checks common to both devices.
Checked check_all(View x, View indptr, View indices, View values, View* bias) {
  Checked c;
  check_rank(x, "x", 2, "[B, K]");
  check_dtype(x, "x", x.dtype == DType::kFloat32, "float32");
  check_rank(indptr, "indptr", 1, "[N + 1]");
  check_dtype(indptr, "indptr", indptr.dtype == DType::kInt32 || indptr.dtype == DType::kInt64, "int32 or int64");
  check_rank(indices, "indices", 1, "[nnz]");
  check_dtype(indices, "indices", indices.dtype == DType::kInt32 || indices.dtype == DType::kInt64, "int32 or int64");
  check_rank(values, "values", 1, "[nnz]");
  check_dtype(values, "values", values.dtype == DType::kFloat32, "float32");
  PYSERVE_CHECK_ARG(indptr.shape[0] >= 1, kOp, "indptr", "expected shape [N + 1] with at least 1 element, got shape ",
                    indptr.shape_text());
  c.B = x.shape[0];
  c.K = x.shape[1];
  c.N = indptr.shape[0] - 1;
  c.nnz = indices.shape[0];
  PYSERVE_CHECK_ARG(values.shape[0] == c.nnz, kOp, "values", "expected shape [nnz] = (", c.nnz,
                    ",) like indices, got shape ", values.shape_text());
  if (bias) {
    check_rank(*bias, "bias", 1, "[N]");
    check_dtype(*bias, "bias", bias->dtype == DType::kFloat32, "float32");
    PYSERVE_CHECK_ARG(bias->shape[0] == c.N, kOp, "bias", "expected shape [N] = (", c.N,
                      ",) with N = len(indptr) - 1, got shape ", bias->shape_text());
    check_contiguous(*bias, "bias");
    c.bias = std::move(*bias);
    c.has_bias = true;
  }
  check_contiguous(x, "x");
  check_contiguous(indptr, "indptr");
  check_contiguous(indices, "indices");
  check_contiguous(values, "values");
  c.x = std::move(x);
  c.indptr = std::move(indptr);
  c.indices = std::move(indices);
  c.values = std::move(values);
  return c;
}

template <typename Index>
py::object csr_linear_host_typed(const Checked& c, const int64_t* indptr, bool force_portable) {
  const auto* indices = static_cast<const Index*>(c.indices.data);
  py::array_t<float> y({c.B, c.N});
  float* out = y.mutable_data();
  const int threads = num_threads();
  int64_t bad;
  {
    py::gil_scoped_release release;
    const int64_t scratch_floats = sparse::csr_scratch_floats(c.B, c.K);
    std::unique_ptr<float[]> scratch(scratch_floats > 0 ? new float[static_cast<std::size_t>(scratch_floats)] : nullptr);
    bad = sparse::csr_linear_cpu(static_cast<const float*>(c.x.data), c.B, c.K, indptr, indices,
                                 static_cast<const float*>(c.values.data),
                                 c.has_bias ? static_cast<const float*>(c.bias.data) : nullptr, c.N, out,
                                 scratch.get(), threads, force_portable);
  }
  if (bad >= 0) throw_bad_index(indptr, indices, c.K, bad);
  return std::move(y);
}

py::object csr_linear_host(const Checked& c, bool force_portable) {
  // indptr: validated in place when it is int64, else widened to an int64 copy (N + 1 values).
  std::vector<int64_t> widened;
  const int64_t* indptr;
  if (c.indptr.dtype == DType::kInt64) {
    indptr = static_cast<const int64_t*>(c.indptr.data);
    check_indptr(indptr, c.N, c.nnz);
  } else {
    widened = checked_indptr(c.indptr.data, c.indptr.dtype, c.N, c.nnz);
    indptr = widened.data();
  }
  return c.indices.dtype == DType::kInt32 ? csr_linear_host_typed<int32_t>(c, indptr, force_portable)
                                          : csr_linear_host_typed<int64_t>(c, indptr, force_portable);
}

#if PYSERVE_WITH_CUDA
py::object csr_linear_device(const Checked& c, const py::object& out_obj, std::uintptr_t stream) {
  PYSERVE_CHECK_ARG(!out_obj.is_none(), kOp, "out", "expected a [B, N] float32 CUDA array for a CUDA x, got None");
  View out = cuda_view(out_obj, "out");
  check_rank(out, "out", 2, "[B, N]");
  check_dtype(out, "out", out.dtype == DType::kFloat32, "float32");
  PYSERVE_CHECK_ARG(out.shape[0] == c.B && out.shape[1] == c.N, kOp, "out", "expected shape (", c.B, ", ", c.N,
                    "), got ", out.shape_text());
  check_contiguous(out, "out");
  PYSERVE_CHECK_ARG(out.mutable_data != nullptr || c.B * c.N == 0, kOp, "out", "expected a writable array, got a read-only one");

  // The kernel validates the structure on the device while it computes and reports only whether
  // (and roughly where) it is malformed; then, and only then, indptr and indices come back to the
  // host so that the usual checks raise the usual message. N == 0: indptr is one value, checked here.
  const auto* x = static_cast<const float*>(c.x.data);
  const auto* values = static_cast<const float*>(c.values.data);
  const auto* bias = c.has_bias ? static_cast<const float*>(c.bias.data) : nullptr;
  auto* y = static_cast<float*>(out.mutable_data);
  const bool ip32 = c.indptr.dtype == DType::kInt32, ix32 = c.indices.dtype == DType::kInt32;
  std::string err;
  int64_t first_bad = -1;
  if (c.N > 0) {
    py::gil_scoped_release release;
    const void* ip = c.indptr.data;
    const void* ix = c.indices.data;
    if (ip32 && ix32)
      err = sparse::csr_linear_cuda(x, c.B, c.K, static_cast<const int32_t*>(ip), static_cast<const int32_t*>(ix),
                                    values, bias, c.N, c.nnz, y, &first_bad, stream);
    else if (ip32)
      err = sparse::csr_linear_cuda(x, c.B, c.K, static_cast<const int32_t*>(ip), static_cast<const int64_t*>(ix),
                                    values, bias, c.N, c.nnz, y, &first_bad, stream);
    else if (ix32)
      err = sparse::csr_linear_cuda(x, c.B, c.K, static_cast<const int64_t*>(ip), static_cast<const int32_t*>(ix),
                                    values, bias, c.N, c.nnz, y, &first_bad, stream);
    else
      err = sparse::csr_linear_cuda(x, c.B, c.K, static_cast<const int64_t*>(ip), static_cast<const int64_t*>(ix),
                                    values, bias, c.N, c.nnz, y, &first_bad, stream);
  }
  PYSERVE_CHECK_INTERNAL(err.empty(), kOp, "CUDA kernel failed: ", err);
  if (c.N > 0 && first_bad < 0) return out_obj;

  // Malformed (or N == 0): copy indptr (and, when indptr passes, indices) back and check on the host.
  const std::size_t ip_bytes = static_cast<std::size_t>(c.N + 1) * (ip32 ? 4 : 8);
  const std::size_t ix_bytes = static_cast<std::size_t>(c.nnz) * (ix32 ? 4 : 8);
  std::vector<unsigned char> ip_host(ip_bytes);
  {
    py::gil_scoped_release release;
    err = sparse::cuda_copy_to_host(ip_host.data(), c.indptr.data, ip_bytes);
  }
  PYSERVE_CHECK_INTERNAL(err.empty(), kOp, "copying indptr to the host: ", err);
  const auto indptr = checked_indptr(ip_host.data(), c.indptr.dtype, c.N, c.nnz);
  if (c.N == 0) return out_obj;  // indptr == [0] and nnz == 0: nothing to compute
  std::vector<unsigned char> ix_host(ix_bytes);
  {
    py::gil_scoped_release release;
    err = sparse::cuda_copy_to_host(ix_host.data(), c.indices.data, ix_bytes);
  }
  PYSERVE_CHECK_INTERNAL(err.empty(), kOp, "copying indices to the host: ", err);
  if (ix32)
    check_indices(indptr, c.N, reinterpret_cast<const int32_t*>(ix_host.data()), c.K);
  else
    check_indices(indptr, c.N, reinterpret_cast<const int64_t*>(ix_host.data()), c.K);
  throw InternalError(str_cat(kOp, ": the CUDA kernel flagged position ", first_bad,
                              " of the CSR structure as malformed but the host checks found nothing (a bug)"));
}
#endif

}  // namespace

bool csr_linear_has_avx2() { return sparse::csr_has_avx2(); }

py::object csr_linear(const py::object& x, const py::object& indptr, const py::object& indices,
                      const py::object& values, const py::object& bias, const py::object& out, bool force_portable,
                      std::uintptr_t stream) {
  py::object x_iface = cuda_interface(x);
  if (!x_iface.is_none()) {
#if PYSERVE_WITH_CUDA
    View b;
    if (!bias.is_none()) b = cuda_view(bias, "bias");
    Checked c = check_all(cuda_view(x, "x", x_iface), cuda_view(indptr, "indptr"), cuda_view(indices, "indices"),
                          cuda_view(values, "values"), bias.is_none() ? nullptr : &b);
    return csr_linear_device(c, out, stream);
#else
    (void)stream;
    throw InternalError(str_cat(kOp, ": x is a CUDA array but this build of pyserve._C has no CUDA kernels "
                                     "(build_info()['cuda'] is False); rebuild with nvcc and PYSERVE_CUDA=ON, or pass a CPU array"));
#endif
  }
  PYSERVE_CHECK_ARG(out.is_none(), kOp, "out", "expected None for a CPU x (the result is a new array), got ",
                    type_name(out));
  View b;
  if (!bias.is_none()) b = host_view(bias, "bias");
  Checked c = check_all(host_view(x, "x"), host_view(indptr, "indptr"), host_view(indices, "indices"),
                        host_view(values, "values"), bias.is_none() ? nullptr : &b);
  return csr_linear_host(c, force_portable);
}

namespace {
constexpr char kPackOp[] = "pack_csr_weight";

template <typename Index>
std::shared_ptr<const sparse::CsrPacked> pack_typed(const std::vector<int64_t>& indptr, int64_t N, const View& indices,
                                                     const View& values, int64_t K, int sort_rows) {
  const auto* ix = static_cast<const Index*>(indices.data);
  int64_t bad;
  std::shared_ptr<sparse::CsrPacked> w;
  {
    py::gil_scoped_release release;
    bad = sparse::csr_first_bad_index(indptr.data(), N, ix, K);
    if (bad < 0)
      w = std::make_shared<sparse::CsrPacked>(
          sparse::csr_pack(indptr.data(), N, ix, static_cast<const float*>(values.data), K, sort_rows));
  }
  if (bad >= 0) throw_bad_index(indptr.data(), ix, K, bad, kPackOp, "K the number of columns");
  return w;
}
}  // namespace

CsrPackedWeight csr_pack_weight(const py::object& indptr_obj, const py::object& indices_obj,
                                const py::object& values_obj, int64_t K, int sort_rows) {
  View indptr = host_view(indptr_obj, "indptr"), indices = host_view(indices_obj, "indices"),
       values = host_view(values_obj, "values");
  check_rank(indptr, "indptr", 1, "[N + 1]", kPackOp);
  check_dtype(indptr, "indptr", indptr.dtype == DType::kInt32 || indptr.dtype == DType::kInt64, "int32 or int64",
              kPackOp);
  check_rank(indices, "indices", 1, "[nnz]", kPackOp);
  check_dtype(indices, "indices", indices.dtype == DType::kInt32 || indices.dtype == DType::kInt64, "int32 or int64",
              kPackOp);
  check_rank(values, "values", 1, "[nnz]", kPackOp);
  check_dtype(values, "values", values.dtype == DType::kFloat32, "float32", kPackOp);
  check_contiguous(indptr, "indptr", kPackOp);
  check_contiguous(indices, "indices", kPackOp);
  check_contiguous(values, "values", kPackOp);
  PYSERVE_CHECK_ARG(K >= 0 && K < sparse::kPackedMaxK, kPackOp, "K", "expected 0 <= K < 2**31 (the number of columns of W), got ",
                    K);
  PYSERVE_CHECK_ARG(indptr.shape[0] >= 1, kPackOp, "indptr", "expected shape [N + 1] with at least 1 element, got shape ",
                    indptr.shape_text());
  const int64_t N = indptr.shape[0] - 1, nnz = indices.shape[0];
  PYSERVE_CHECK_ARG(N <= INT32_MAX, kPackOp, "indptr", "expected at most 2**31 - 1 rows, got N = ", N);
  PYSERVE_CHECK_ARG(values.shape[0] == nnz, kPackOp, "values", "expected shape [nnz] = (", nnz,
                    ",) like indices, got shape ", values.shape_text());
  const auto ip = checked_indptr(indptr.data, indptr.dtype, N, nnz, kPackOp);
  auto w = indices.dtype == DType::kInt32 ? pack_typed<int32_t>(ip, N, indices, values, K, sort_rows)
                                          : pack_typed<int64_t>(ip, N, indices, values, K, sort_rows);
  return CsrPackedWeight(std::move(w));
}

py::object csr_linear_packed(const py::object& x_obj, const CsrPackedWeight& packed, const py::object& bias_obj,
                             bool force_portable) {
  if (has_cuda_interface(x_obj))
    throw_argument_error(kOp, "x", "expected a CPU numpy array: a CsrPackedWeight (pack_csr_weight) runs on the CPU "
                                   "only; pass indptr, indices and values on x's device instead");
  const sparse::CsrPacked& w = packed.get();
  View x = host_view(x_obj, "x");
  check_rank(x, "x", 2, "[B, K]");
  check_dtype(x, "x", x.dtype == DType::kFloat32, "float32");
  check_contiguous(x, "x");
  PYSERVE_CHECK_ARG(x.shape[1] == w.K, kOp, "x", "expected shape [B, K] with K = ", w.K,
                    " (the packed weight's columns), got shape ", x.shape_text());
  View bias;
  const float* b = nullptr;
  if (!bias_obj.is_none()) {
    bias = host_view(bias_obj, "bias");
    check_rank(bias, "bias", 1, "[N]");
    check_dtype(bias, "bias", bias.dtype == DType::kFloat32, "float32");
    PYSERVE_CHECK_ARG(bias.shape[0] == w.N, kOp, "bias", "expected shape [N] = (", w.N,
                      ",) with N the packed weight's rows, got shape ", bias.shape_text());
    check_contiguous(bias, "bias");
    b = static_cast<const float*>(bias.data);
  }
  const int64_t B = x.shape[0];
  py::array_t<float> y({B, w.N});
  float* out = y.mutable_data();
  const auto* xp = static_cast<const float*>(x.data);
  const int threads = num_threads();
  {
    py::gil_scoped_release release;
    const int64_t scratch_floats = sparse::csr_packed_scratch_floats(B, w.K);
    std::unique_ptr<float[]> scratch(scratch_floats > 0 ? new float[static_cast<std::size_t>(scratch_floats)] : nullptr);
    sparse::csr_packed_linear_cpu(xp, B, w, b, out, scratch.get(), threads, force_portable);
  }
  return std::move(y);
}

}  // namespace pyserve
