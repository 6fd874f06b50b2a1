// pyserve._C: the one binding file. Nothing but m.def lines with docstrings; checks live in the
// launchers (csrc/<family>/*_launcher.cpp), kernels in csrc/<family>/*_kernel.*.
#include <pybind11/pybind11.h>

#include "common/build_info.h"
#include "common/cuda_device.h"
#include "huffman/huffman_launcher.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyserve native kernels (C++/CUDA). Use the Python faces in pyserve.ops.";

  m.def("build_info", &pyserve::build_info,
        R"doc(What this build compiled in.

Returns
-------
dict
    ``{"version": str, "compiler": str, "avx2": bool, "openmp": bool, "cuda": bool,
    "cuda_archs": list[int]}``; ``cuda_archs`` is empty when CUDA was not compiled.
)doc");

  m.def("cuda_device_count", &pyserve::cuda_device_count,
        R"doc(Number of CUDA devices visible to the CUDA runtime.

Returns 0 when pyserve was built without CUDA and on any runtime error (no driver, no device).
Never raises.
)doc");

  m.def("huffman_encode", &pyserve::huffman_encode, py::arg("symbols"),
        R"doc(Canonical Huffman encode of a 1-D uint8 or uint16 array (see pyserve.ops.huffman_encode).

Parameters
----------
symbols : numpy.ndarray
    ``[n]`` uint8 or uint16, C-contiguous, native byte order.

Returns
-------
bytes
    Self-describing stream (format version 1; layout in csrc/huffman/huffman_kernel.h).

Raises
------
ValueError
    If ``symbols`` is not 1-D, not uint8/uint16 or not contiguous.
)doc");

  m.def("huffman_decode", &pyserve::huffman_decode, py::arg("stream"),
        R"doc(Decode a stream written by huffman_encode (see pyserve.ops.huffman_decode).

Parameters
----------
stream : bytes-like
    bytes, bytearray, memoryview or any C-contiguous buffer holding exactly one stream.

Returns
-------
numpy.ndarray
    ``[n]`` uint8 or uint16, the dtype recorded in the stream.

Raises
------
ValueError
    If ``stream`` is not bytes-like, or is malformed, truncated, corrupt or has trailing bytes.
)doc");
}
