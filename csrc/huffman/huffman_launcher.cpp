// Huffman launchers: every argument check happens here, once; the kernel trusts its inputs.
#include "huffman/huffman_launcher.h"

#include <string>

#include "common/checks.h"
#include "huffman/huffman_kernel.h"

namespace py = pybind11;

namespace pyserve {

namespace {

constexpr char kEncodeOp[] = "huffman_encode";
constexpr char kDecodeOp[] = "huffman_decode";

std::string shape_text(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

// Holds a PyBUF_C_CONTIGUOUS view of a bytes-like object for the duration of a call.
class BufferView {
 public:
  BufferView(const py::handle& obj, const char* op, const char* arg) {
    if (!PyObject_CheckBuffer(obj.ptr()))
      throw_argument_error(op, arg, str_cat("expected a bytes-like object (bytes, bytearray, memoryview), got ",
                                            py::str(py::type::handle_of(obj).attr("__name__")).cast<std::string>()));
    if (PyObject_GetBuffer(obj.ptr(), &view_, PyBUF_C_CONTIGUOUS) != 0) {
      PyErr_Clear();
      throw_argument_error(op, arg, "expected a C-contiguous bytes-like object, got a non-contiguous buffer");
    }
  }
  ~BufferView() { PyBuffer_Release(&view_); }
  BufferView(const BufferView&) = delete;
  BufferView& operator=(const BufferView&) = delete;
  const uint8_t* data() const { return static_cast<const uint8_t*>(view_.buf); }
  std::size_t size() const { return static_cast<std::size_t>(view_.len); }

 private:
  Py_buffer view_{};
};

}  // namespace

py::bytes huffman_encode(const py::array& symbols) {
  PYSERVE_CHECK_ARG(symbols.ndim() == 1, kEncodeOp, "symbols", "expected a 1-D array, got ndim=", symbols.ndim(),
                    " with shape ", shape_text(symbols));
  huffman::SymbolType type;
  if (symbols.dtype().equal(py::dtype::of<uint8_t>())) {
    type = huffman::SymbolType::kUint8;
  } else if (symbols.dtype().equal(py::dtype::of<uint16_t>())) {
    type = huffman::SymbolType::kUint16;
  } else {
    throw_argument_error(kEncodeOp, "symbols",
                         str_cat("expected dtype uint8 or uint16 (native byte order), got ",
                                 py::str(symbols.dtype()).cast<std::string>()));
  }
  PYSERVE_CHECK_ARG(symbols.shape(0) <= 1 || symbols.strides(0) == symbols.itemsize(), kEncodeOp, "symbols",
                    "expected a contiguous array, got a stride of ", symbols.strides(0), " bytes for itemsize ",
                    symbols.itemsize());
  const void* data = symbols.data();
  const uint64_t count = static_cast<uint64_t>(symbols.shape(0));

  huffman::EncodePlan plan;
  {
    py::gil_scoped_release release;
    huffman::plan_encode(data, count, type, &plan);
  }
  py::bytes out(nullptr, plan.total_bytes);  // uninitialised, filled below
  auto* dst = reinterpret_cast<uint8_t*>(PyBytes_AsString(out.ptr()));
  PYSERVE_CHECK_INTERNAL(dst != nullptr, kEncodeOp, "PyBytes_AsString failed");
  bool ok;
  {
    py::gil_scoped_release release;
    ok = huffman::write_encoded(data, plan, dst, plan.total_bytes);
  }
  PYSERVE_CHECK_INTERNAL(ok, kEncodeOp, "output buffer smaller than planned");
  return out;
}

py::array huffman_decode(const py::typing::Union<py::bytes, py::bytearray, py::memoryview>& stream) {
  BufferView view(stream, kDecodeOp, "stream");
  huffman::StreamInfo info;
  std::string error;
  bool ok;
  {
    py::gil_scoped_release release;
    ok = huffman::parse_stream(view.data(), view.size(), &info, &error);
  }
  if (!ok) throw_argument_error(kDecodeOp, "stream", error);
  // parse_stream guarantees count <= 8 * stream size: the allocation is bounded by the input.
  const auto n = static_cast<py::ssize_t>(info.count);
  py::array out = info.type == huffman::SymbolType::kUint8 ? py::array(py::array_t<uint8_t>(n))
                                                           : py::array(py::array_t<uint16_t>(n));
  void* dst = out.mutable_data();
  {
    py::gil_scoped_release release;
    ok = huffman::decode_symbols(view.data(), view.size(), info, dst, &error);
  }
  if (!ok) throw_argument_error(kDecodeOp, "stream", error);
  return out;
}

}  // namespace pyserve
