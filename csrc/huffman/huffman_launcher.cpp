// Huffman launchers: every argument check happens here, once; the kernel trusts its inputs.
#include "huffman/huffman_launcher.h"

#include <string>

#include "common/checks.h"
#include "common/threads.h"
#include "huffman/huffman_kernel.h"
#if PYSERVE_WITH_CUDA
#include "huffman/huffman_kernel_cuda.h"
#endif

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

// parse_stream with the GIL released; ValueError naming `stream` on a malformed one.
huffman::StreamInfo parse_or_throw(const BufferView& view) {
  huffman::StreamInfo info;
  std::string error;
  bool ok;
  {
    py::gil_scoped_release release;
    ok = huffman::parse_stream(view.data(), view.size(), &info, &error);
  }
  if (!ok) throw_argument_error(kDecodeOp, "stream", error);
  return info;
}

}  // namespace

py::bytes huffman_encode(const py::array& symbols, const py::object& chunk_symbols) {
  uint64_t chunk = 0;
  if (!chunk_symbols.is_none()) {
    PYSERVE_CHECK_ARG(py::isinstance<py::int_>(chunk_symbols) && !py::isinstance<py::bool_>(chunk_symbols), kEncodeOp,
                      "chunk_symbols", "expected None or an int in 1..", huffman::kMaxChunkSymbols, ", got ",
                      py::str(py::type::handle_of(chunk_symbols).attr("__name__")).cast<std::string>());
    const auto v = chunk_symbols.cast<py::int_>();
    const bool in_range = py::int_(1) <= v && v <= py::int_(huffman::kMaxChunkSymbols);
    PYSERVE_CHECK_ARG(in_range, kEncodeOp, "chunk_symbols", "expected None or an int in 1..",
                      huffman::kMaxChunkSymbols, ", got ", py::str(v).cast<std::string>());
    chunk = v.cast<uint64_t>();
  }
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
    huffman::plan_encode(data, count, type, &plan, chunk);
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

py::dict huffman_stream_info(const py::typing::Union<py::bytes, py::bytearray, py::memoryview>& stream) {
  BufferView view(stream, kDecodeOp, "stream");
  const huffman::StreamInfo info = parse_or_throw(view);
  py::dict d;
  d["dtype"] = info.type == huffman::SymbolType::kUint8 ? "uint8" : "uint16";
  d["count"] = info.count;
  d["format_version"] = info.version;
  d["num_chunks"] = info.num_streams;
  d["chunk_symbols"] = info.chunk_symbols;
  return d;
}

void huffman_decode_cuda(const py::typing::Union<py::bytes, py::bytearray, py::memoryview>& stream, uintptr_t out,
                         uint64_t out_nbytes) {
#if PYSERVE_WITH_CUDA
  BufferView view(stream, kDecodeOp, "stream");
  const huffman::StreamInfo info = parse_or_throw(view);
  std::string error;
  bool ok;
  const uint64_t need = info.count * static_cast<uint64_t>(huffman::symbol_bytes(info.type));
  PYSERVE_CHECK_ARG(out_nbytes == need, kDecodeOp, "out", "expected ", need, " bytes for ", info.count, " ",
                    info.type == huffman::SymbolType::kUint8 ? "uint8" : "uint16", " symbols, got ", out_nbytes);
  if (info.count == 0) return;
  PYSERVE_CHECK_ARG(out != 0, kDecodeOp, "out", "expected a device pointer, got 0");
  bool corrupt = false;
  {
    py::gil_scoped_release release;
    ok = huffman::decode_symbols_cuda(view.data(), view.size(), info, reinterpret_cast<void*>(out), &corrupt, &error);
  }
  PYSERVE_CHECK_INTERNAL(ok, kDecodeOp, "CUDA decode failed: ", error);
  if (!corrupt) return;
  // Name the problem exactly as the host decoder does.
  std::vector<uint8_t> scratch(static_cast<std::size_t>(need));
  {
    py::gil_scoped_release release;
    ok = huffman::decode_symbols(view.data(), view.size(), info, scratch.data(), &error);
  }
  if (!ok) throw_argument_error(kDecodeOp, "stream", error);
  throw_internal_error(kDecodeOp, "the CUDA decoder rejected a stream that the host decoder accepts");
#else
  (void)stream;
  (void)out;
  (void)out_nbytes;
  throw InternalError(str_cat(kDecodeOp, ": this build of pyserve._C has no CUDA kernels (build_info()['cuda'] is "
                                         "False); rebuild with nvcc and PYSERVE_CUDA=ON, or decode on the CPU"));
#endif
}

py::array huffman_decode(const py::typing::Union<py::bytes, py::bytearray, py::memoryview>& stream) {
  BufferView view(stream, kDecodeOp, "stream");
  const huffman::StreamInfo info = parse_or_throw(view);
  std::string error;
  bool ok;
  // parse_stream guarantees count <= 8 * stream size: the allocation is bounded by the input.
  const auto n = static_cast<py::ssize_t>(info.count);
  py::array out = info.type == huffman::SymbolType::kUint8 ? py::array(py::array_t<uint8_t>(n))
                                                           : py::array(py::array_t<uint16_t>(n));
  void* dst = out.mutable_data();
  const int threads = num_threads();
  {
    py::gil_scoped_release release;
    ok = huffman::decode_symbols(view.data(), view.size(), info, dst, &error, threads);
  }
  if (!ok) throw_argument_error(kDecodeOp, "stream", error);
  return out;
}

}  // namespace pyserve
