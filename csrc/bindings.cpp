// pyserve._C: the one binding file. Nothing but m.def lines with docstrings; checks live in the
// launchers (csrc/<family>/*_launcher.cpp), kernels in csrc/<family>/*_kernel.*.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "common/build_info.h"
#include "common/cuda_device.h"
#include "huffman/huffman_launcher.h"
#include "common/threads.h"
#include "sparse/csr_launcher.h"
#include "quant/codebook_launcher.h"
#include "quant/int8_launcher.h"
#include "quant/attention_launcher.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyserve native kernels (C++/CUDA). Use the Python faces in pyserve.ops.";

  m.def("build_info", &pyserve::build_info,
        R"doc(What this build compiled in.

Returns
-------
dict
    ``{"version": str, "compiler": str, "avx2": bool, "avx512_vnni": bool, "avx512_bf16": bool,
    "openmp": bool, "cuda": bool, "cuda_archs": list[int]}``; ``cuda_archs`` is empty when CUDA was not compiled.
)doc");

  m.def("cpu_kernels", &pyserve::cpu_kernels,
        R"doc(The CPU code paths this process runs.

Returns
-------
dict
    ``{"avx2": bool, "avx512": bool, "avx512_vnni": bool, "avx512_bf16": bool}``: compiled in,
    supported by this CPU and not turned off by the environment variables ``PYSERVE_DISABLE_AVX2``
    (all off) or ``PYSERVE_DISABLE_AVX512`` (the AVX-512 paths off), each read once per path and process: set
    them before the process starts.
)doc");

  m.def("cuda_device_count", &pyserve::cuda_device_count,
        R"doc(Number of CUDA devices visible to the CUDA runtime.

Returns 0 when pyserve was built without CUDA and on any runtime error (no driver, no device).
Never raises.
)doc");

  m.def("huffman_encode", &pyserve::huffman_encode, py::arg("symbols"), py::arg("chunk_symbols") = py::none(),
        R"doc(Canonical Huffman encode of a 1-D uint8 or uint16 array (see pyserve.ops.huffman_encode).

Parameters
----------
symbols : numpy.ndarray
    ``[n]`` uint8 or uint16, C-contiguous, native byte order.
chunk_symbols : int, optional
    None: format version 1 (1 or 4 bitstreams). 1..2**24: format version 2, independently
    decodable chunks of that many symbols (layout in csrc/huffman/huffman_kernel.h).

Returns
-------
bytes
    Self-describing stream.

Raises
------
ValueError
    If ``symbols`` is not 1-D, not uint8/uint16 or not contiguous, or ``chunk_symbols`` is out of range.
)doc");

  m.def("huffman_stream_info", &pyserve::huffman_stream_info, py::arg("stream"),
        R"doc(Validate a stream's header, code lengths and bitstream sizes and describe it.

Returns
-------
dict
    ``dtype`` ("uint8" or "uint16"), ``count`` (symbols), ``format_version`` (1 or 2),
    ``num_chunks`` (bitstreams or chunks), ``chunk_symbols`` (symbols per chunk; the last may hold fewer).

Raises
------
ValueError
    If ``stream`` is not bytes-like or its structure is malformed.
)doc");

  m.def("huffman_decode_cuda", &pyserve::huffman_decode_cuda, py::arg("stream"), py::arg("out"), py::arg("out_nbytes"),
        R"doc(Decode a stream on the GPU into the device buffer at address ``out`` (see pyserve.ops.huffman_decode).

Parameters
----------
stream : bytes-like
    Exactly one stream, in host memory.
out : int
    Device address of ``count`` contiguous uint8 or uint16 elements (``data_ptr()`` of a CUDA tensor).
out_nbytes : int
    Size of that buffer in bytes; must equal ``count * itemsize``.

Raises
------
ValueError
    Malformed or corrupt stream (the same message as the CPU decoder), or a wrong ``out_nbytes``.
RuntimeError
    A build without CUDA, or a CUDA error.
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

  m.def("set_num_threads", &pyserve::set_num_threads, py::arg("n"),
        R"doc(Set the number of OpenMP threads every pyserve kernel uses (see pyserve.ops.set_num_threads).

Process-wide (not per calling thread). Raises ValueError if ``n < 1``.
)doc");

  m.def("get_num_threads", &pyserve::get_num_threads,
        R"doc(Number of OpenMP threads the pyserve kernels use (default: omp_get_max_threads()).)doc");

  m.def("csr_linear", &pyserve::csr_linear, py::arg("x"), py::arg("indptr"), py::arg("indices"), py::arg("values"),
        py::arg("bias") = py::none(), py::arg("out") = py::none(), py::arg("force_portable") = false,
        py::arg("stream") = 0,
        R"doc(y = x @ W.T + bias with W [N, K] in CSR form (see pyserve.ops.csr_linear).

Parameters
----------
x : numpy.ndarray or CUDA array
    ``[B, K]`` float32, C-contiguous. A CUDA array (``__cuda_array_interface__``) selects the CUDA
    kernel; then every other array must be on the same device too.
indptr : array
    ``[N + 1]`` int32 or int64; ``indptr[0] == 0``, non-decreasing, ``indptr[N] == nnz``.
indices : array
    ``[nnz]`` int32 or int64 column indices in ``[0, K)``, strictly increasing within each row.
values : array
    ``[nnz]`` float32.
bias : array or None
    ``[N]`` float32.
out : CUDA array or None
    ``[B, N]`` float32 output, required for a CUDA ``x`` and refused for a CPU one.
force_portable : bool
    Run the portable C++ path even where AVX2+FMA is available (for tests).
stream : int
    CUDA only: the cudaStream_t (``torch.cuda.Stream.cuda_stream``) to run on, 0 for the legacy
    default stream. It is synchronised before the call returns (the kernel validates the CSR
    structure and one 8-byte word comes back). Ignored for CPU arrays.

Returns
-------
numpy.ndarray or the ``out`` object
    ``[B, N]`` float32.

Raises
------
ValueError
    On a wrong rank, dtype, shape, contiguity or CSR structure, naming the argument.
RuntimeError
    For a CUDA ``x`` when the CUDA kernels were not compiled, or on a CUDA error.
)doc");

  py::class_<pyserve::CsrPackedWeight>(m, "CsrPackedWeight",
                                       R"doc(A CSR weight prepared once for csr_linear (see pyserve.ops.pack_csr_weight).

An immutable, validated copy in SELL-8-sigma layout (csrc/sparse/csr_packed_kernel.h): rows in
slices of 8, entries column-major within a slice, uint16 column indices when K <= 65536 (else
int32). Created by ``pack_csr_weight``; not constructible from Python.
)doc")
      .def_property_readonly("shape", &pyserve::CsrPackedWeight::shape, "``(N, K)`` of the weight.")
      .def_property_readonly("nnz", &pyserve::CsrPackedWeight::nnz, "Number of stored nonzeros.")
      .def_property_readonly("nbytes", &pyserve::CsrPackedWeight::nbytes, "Bytes held by the packed copy.")
      .def_property_readonly("index_bits", &pyserve::CsrPackedWeight::index_bits,
                             "16 (K <= 65536) or 32: bits per stored column index.")
      .def_property_readonly("sorted_rows", &pyserve::CsrPackedWeight::sorted_rows,
                             "Whether rows were sorted by length within windows of 64 rows.")
      .def_property_readonly("padding_ratio", &pyserve::CsrPackedWeight::padding_ratio,
                             "Stored entries (nonzeros plus slice padding) / nonzeros.");

  m.def("pack_csr_weight", &pyserve::csr_pack_weight, py::arg("indptr"), py::arg("indices"), py::arg("values"),
        py::arg("K"), py::arg("sort_rows") = -1,
        R"doc(Validate and pack a CSR weight once (see pyserve.ops.pack_csr_weight).

Parameters
----------
indptr : numpy.ndarray
    ``[N + 1]`` int32 or int64, C-contiguous; ``indptr[0] == 0``, non-decreasing, ``indptr[N] == nnz``.
indices : numpy.ndarray
    ``[nnz]`` int32 or int64 column indices in ``[0, K)``, strictly increasing within each row.
values : numpy.ndarray
    ``[nnz]`` float32.
K : int
    Columns of W, ``0 <= K < 2**31``.
sort_rows : int
    -1: automatic (sort when natural slices of 8 rows would pad the entries by more than 5%);
    0: natural row order; 1: rows sorted by length within windows of 64 rows.

Returns
-------
CsrPackedWeight

Raises
------
ValueError
    Naming the argument, on a wrong rank, dtype, contiguity, size or CSR structure, or K out of range.
)doc");

  m.def("csr_linear_packed", &pyserve::csr_linear_packed, py::arg("x"), py::arg("w"), py::arg("bias") = py::none(),
        py::arg("force_portable") = false,
        R"doc(csr_linear with a weight from pack_csr_weight: ``[B, N]`` float32 = x @ W.T + bias.

Parameters
----------
x : numpy.ndarray
    ``[B, K]`` float32, C-contiguous (CPU).
w : CsrPackedWeight
bias : numpy.ndarray or None
    ``[N]`` float32.
force_portable : bool
    Run the portable C++ path even where AVX2+FMA is available (for tests).

Raises
------
ValueError
    Wrong rank, dtype or contiguity, ``x.shape[1] != K``, ``len(bias) != N``, or a CUDA ``x``.
)doc");

  m.def("csr_linear_has_avx2", &pyserve::csr_linear_has_avx2,
        R"doc(True when csr_linear's AVX2+FMA path is compiled in and this CPU supports it.)doc");

  m.def("quantize_per_channel", &pyserve::quantize_per_channel, py::arg("w"),
        R"doc(Symmetric per-output-channel int8 quantization (see pyserve.ops.quantize_per_channel).

Parameters
----------
w : numpy.ndarray
    ``[N, K]`` float32, C-contiguous, finite.

Returns
-------
tuple[numpy.ndarray, numpy.ndarray]
    ``w_int8`` ``[N, K]`` int8 in -127..127 and ``w_scale`` ``[N]`` float32 with
    ``w ~= w_int8 * w_scale[:, None]``; ``scale = max|w[n]| / 127`` (1.0 for an all-zero row),
    ``q = clamp(rint(w / scale), -127, 127)``, round half to even.

Raises
------
ValueError
    Wrong dtype, rank or layout of ``w``, or a non-finite value.
)doc");

  m.def("int8_linear", &pyserve::int8_linear, py::arg("x"), py::arg("w_int8"), py::arg("w_scale"),
        py::arg("bias") = py::none(),
        R"doc(int8 linear layer ``y = x @ dequant(w_int8).T + bias`` (see pyserve.ops.int8_linear).

Parameters
----------
x : numpy.ndarray
    ``[B, K]`` float32, C-contiguous, finite; quantized per row like the weights.
w_int8 : numpy.ndarray
    ``[N, K]`` int8, C-contiguous (any value in -128..127).
w_scale : numpy.ndarray
    ``[N]`` float32.
bias : numpy.ndarray or None
    ``[N]`` float32.

Returns
-------
numpy.ndarray
    ``[B, N]`` float32: ``float(acc) * (x_scale[b] * w_scale[n]) + bias[n]`` with exact int32 ``acc``.

Raises
------
ValueError
    Wrong dtype, rank or layout; K mismatch; ``w_scale``/``bias`` not of length N; K > 131072;
    non-finite ``x``.
)doc");

  py::class_<pyserve::Int8PackedWeight>(m, "Int8PackedWeight",
                                        R"doc(int8 weights packed once for int8_linear (see pyserve.ops.pack_int8_weight).

An immutable copy in the layout of the register-blocked micro-kernels (AVX2 and AVX-512 VNNI;
csrc/quant/int8_kernel.h): ``w + 128`` as uint8 in blocks of 16 channels x 4 k, padded to whole
blocks: ``16 ceil(N / 16) * 4 ceil(K / 4)`` bytes (about N x K). Created by ``pack_int8_weight``;
not constructible from Python.
)doc")
      .def_property_readonly("shape", &pyserve::Int8PackedWeight::shape, "``(N, K)`` of the packed weights.")
      .def_property_readonly("nbytes", &pyserve::Int8PackedWeight::nbytes, "Bytes held by the packed copy.");

  m.def("pack_int8_weight", &pyserve::int8_pack_weight, py::arg("w_int8"),
        R"doc(Pack int8 weights once for int8_linear_packed (see pyserve.ops.pack_int8_weight).

Parameters
----------
w_int8 : numpy.ndarray
    ``[N, K]`` int8, C-contiguous, any value in -128..127, K <= 131072.

Returns
-------
Int8PackedWeight
    A packed copy; int8_linear_packed with it returns exactly what int8_linear returns with w_int8.

Raises
------
ValueError
    Wrong dtype, rank or layout, or K > 131072.
)doc");

  m.def("int8_linear_packed", &pyserve::int8_linear_packed, py::arg("x"), py::arg("w"), py::arg("w_scale"),
        py::arg("bias") = py::none(), py::arg("activation") = "none", py::arg("residual") = py::none(),
        py::arg("norm_weight") = py::none(), py::arg("norm_bias") = py::none(), py::arg("eps") = 1e-5,
        R"doc(int8_linear with weights from pack_int8_weight: the same ``[B, N]`` float32, bit for bit.

Parameters
----------
x : numpy.ndarray
    ``[B, K]`` float32, C-contiguous, finite.
w : Int8PackedWeight
    ``[N, K]`` packed weights.
w_scale : numpy.ndarray
    ``[N]`` float32.
bias : numpy.ndarray or None
    ``[N]`` float32.
activation : str
    ``"none"`` (default) or ``"gelu"``: ``y`` then goes through GELU, ``0.5 y (1 + erf(y / sqrt(2)))``
    (Hendrycks & Gimpel 2016), erf by a rational approximation (AVX2; else std::erf): within 2e-6
    of the exact GELU (absolute; relative above ``|y| = 1``), not bit-identical to
    ``torch.nn.functional.gelu(y)``.
residual : numpy.ndarray or None
    ``[B, N]`` float32, C-contiguous: added to ``y`` before the LayerNorm (needs ``norm_weight``).
norm_weight, norm_bias : numpy.ndarray or None
    ``[N]`` float32, together: ``y = LayerNorm(y + residual) * norm_weight + norm_bias`` (BERT's
    add & norm; Ba et al. 2016), row mean and biased variance accumulated in double; within float
    rounding of ``torch.nn.functional.layer_norm``, not bit-identical.
eps : float
    Added to the variance (finite, >= 0).

Raises
------
ValueError
    As int8_linear (the K mismatch names ``w_int8``); ``activation`` not ``"none"`` or ``"gelu"``;
    a wrong dtype, layout or shape of ``residual``, ``norm_weight``, ``norm_bias``; one of the two
    norm arguments without the other; a residual without them; a bad ``eps``.
)doc");

  m.def("mean_pool_normalize", &pyserve::mean_pool_normalize, py::arg("h"), py::arg("mask"), py::arg("eps_count"),
        py::arg("eps_norm"),
        R"doc(Mean pooling over the tokens a mask keeps, then L2 normalisation (sentence-transformers).

Parameters
----------
h : numpy.ndarray
    ``[B, S, E]`` float32, C-contiguous: token embeddings.
mask : numpy.ndarray
    ``[B, S]`` int64 or float32, C-contiguous: per-token weights, as ``mask.float()`` in the
    sentence-transformers code (a key mask's 1 keeps a token, 0 drops it).
eps_count, eps_norm : float
    Floors of the kept-token count and of the norm (finite, >= 0).

Returns
-------
numpy.ndarray
    ``[B, E]`` float32: ``d = sum_s m h / max(sum_s m, eps_count)``, then ``d / max(||d||, eps_norm)``;
    fp32 sums, tokens in order; a token whose mask is 0 is skipped (its values may be anything).
    No ``pyserve.ops`` face: the native node of ``native_module``'s pooling rewrite.

Raises
------
ValueError
    A wrong dtype, layout or shape of ``h`` or ``mask``, a bad ``eps_count`` / ``eps_norm``.
)doc");

  m.def("layer_norm", &pyserve::layer_norm, py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("eps"),
        py::arg("residual") = py::none(),
        R"doc(LayerNorm over the last dim (Ba et al. 2016), optionally after adding a residual.

Parameters
----------
x : numpy.ndarray
    ``[..., N]`` float32, C-contiguous.
weight, bias : numpy.ndarray
    ``[N]`` float32.
eps : float
    Added to the variance (finite, >= 0).
residual : numpy.ndarray or None
    x's shape, float32, C-contiguous: ``LayerNorm(x + residual)``.

Returns
-------
numpy.ndarray
    ``(x - mean) / sqrt(var + eps) * weight + bias`` per row of N (mean and biased variance
    accumulated in double), float32, x's shape: the int8 layers' add & LayerNorm epilogue on its
    own; within float rounding of ``torch.nn.functional.layer_norm``, not bit-identical. A row with
    an inf or NaN gives NaN, as torch. No ``pyserve.ops`` face: the native node
    ``native_module`` puts a LayerNorm with stored parameters on.

Raises
------
ValueError
    A wrong dtype, layout or shape of any argument (named), a bad ``eps``.
)doc");

  m.def("attention_qkv", &pyserve::attention_qkv, py::arg("qkv"), py::arg("heads"), py::arg("mask").none(true),
        py::arg("scale"), py::arg("precision") = "fp32",
        R"doc(Multi-head attention from a fused Q|K|V projection (see pyserve.ops.attention_qkv).

Parameters
----------
qkv : numpy.ndarray
    ``[B, S, 3 E]`` float32, C-contiguous: per row the queries, keys and values side by side, each
    ``E = heads * head_size`` wide.
heads : int
    Number of heads, >= 1, dividing ``E``.
mask : numpy.ndarray or None
    Additive ``[B or 1, S or 1, S]`` float32, C-contiguous (a size-1 dim broadcasts); required
    (pass None for no mask).
scale : float
    Factor on ``q . k`` before the mask is added (finite in float32).
precision : str
    ``"fp32"`` (default) or ``"bf16"``: bfloat16 products summed in fp32 where
    ``attention_qkv_bf16(head_size)``, else fp32 (see pyserve.ops.attention_qkv).

Returns
-------
numpy.ndarray
    ``[B, S, E]`` float32: softmax(scale q k^T + mask) v per head, heads side by side.

Raises
------
ValueError
    Wrong dtype, rank, layout or shape of ``qkv`` or ``mask``; ``heads`` < 1 or not dividing; a
    non-finite ``scale``; ``precision`` not ``"fp32"`` or ``"bf16"``.
)doc");

  m.def("attention_qkv_fast", &pyserve::attention_qkv_fast, py::arg("head_size"),
        "Whether attention_qkv runs its AVX2 kernel for this head size on this CPU (head_size % 16 == 0, 16-256).");

  m.def("attention_qkv_bf16", &pyserve::attention_qkv_bf16, py::arg("head_size"),
        "Whether attention_qkv(precision='bf16') runs its AVX-512 BF16 kernel for this head size on this CPU.");

  m.def("int8_linear_cuda", &pyserve::int8_linear_cuda, py::arg("x"), py::arg("w"), py::arg("w_scale"),
        py::arg("bias"), py::arg("y"), py::arg("xq"), py::arg("x_scale"), py::arg("B"), py::arg("K"), py::arg("N"),
        py::arg("stream") = 0,
        R"doc(CUDA int8 linear on device pointers (int); used by pyserve.ops.int8_linear for CUDA tensors.

``x`` [B, K] fp32, ``w`` [N, K] int8, ``w_scale`` [N] fp32, ``bias`` [N] fp32 or 0, ``y`` [B, N] fp32,
workspace ``xq`` [B, K] int8 and ``x_scale`` [B] fp32, all contiguous on the current device.
``stream``: the cudaStream_t (``torch.cuda.Stream.cuda_stream``) to queue the kernels on, 0 for the
legacy default stream; the call returns without waiting for them (y is ready in stream order).

Raises
------
ValueError
    Negative sizes or K > 131072.
RuntimeError
    Built without CUDA, or a CUDA error.
)doc");

  m.def("pack_indices", &pyserve::pack_indices, py::arg("idx"), py::arg("bits"),
        R"doc(Pack 2..8-bit codes, little-endian bit order (see pyserve.ops.pack_indices).

Parameters
----------
idx : numpy.ndarray
    ``[N, K]`` uint8, C-contiguous, values below ``2**bits``.
bits : int
    Code width, 2..8.

Returns
-------
numpy.ndarray
    ``[N, ceil(K * bits / 8)]`` uint8; code k of a row is at bits ``[k*bits, (k+1)*bits)``, LSB first.

Raises
------
ValueError
    ``bits`` outside 2..8, wrong dtype/rank/layout of ``idx``, or a value >= ``2**bits``.
)doc");

  m.def("unpack_indices", &pyserve::unpack_indices, py::arg("packed"), py::arg("bits"), py::arg("K"),
        R"doc(Inverse of pack_indices (see pyserve.ops.unpack_indices).

Parameters
----------
packed : numpy.ndarray
    ``[N, ceil(K * bits / 8)]`` uint8, C-contiguous.
bits : int
    Code width, 2..8.
K : int
    Codes per row, >= 0.

Returns
-------
numpy.ndarray
    ``[N, K]`` uint8.

Raises
------
ValueError
    ``bits`` outside 2..8, negative K, wrong dtype/rank/layout, rows not ``ceil(K*bits/8)`` bytes.
)doc");

  m.def("codebook_linear", &pyserve::codebook_linear, py::arg("x"), py::arg("packed"), py::arg("codebook"),
        py::arg("bits"), py::arg("bias") = py::none(),
        R"doc(Codebook (weight-shared) linear layer ``y = x @ W.T + bias`` (see pyserve.ops.codebook_linear).

Parameters
----------
x : numpy.ndarray
    ``[B, K]`` float32, C-contiguous.
packed : numpy.ndarray
    ``[N, ceil(K * bits / 8)]`` uint8 from pack_indices.
codebook : numpy.ndarray
    ``[2**bits]`` (per layer) or ``[N, 2**bits]`` (per output channel) float32.
bits : int
    Code width, 2..8.
bias : numpy.ndarray or None
    ``[N]`` float32.

Returns
-------
numpy.ndarray
    ``[B, N]`` float32 with ``W[n, k] = codebook[idx[n, k]]`` (or ``codebook[n, idx[n, k]]``).

Raises
------
ValueError
    ``bits`` outside 2..8, wrong dtype/rank/layout, short or long packed rows, codebook or bias
    of the wrong length.
)doc");

  m.def("codebook_linear_cuda", &pyserve::codebook_linear_cuda, py::arg("x"), py::arg("packed"), py::arg("codebook"),
        py::arg("bias"), py::arg("y"), py::arg("B"), py::arg("K"), py::arg("N"), py::arg("bits"),
        py::arg("per_channel"), py::arg("stream") = 0,
        R"doc(CUDA codebook linear on device pointers (int); used by pyserve.ops.codebook_linear for CUDA tensors.

Shapes as codebook_linear; ``bias`` may be 0; all arrays contiguous on the current device.
``stream``: the cudaStream_t (``torch.cuda.Stream.cuda_stream``) to queue the kernel on, 0 for the
legacy default stream; the call returns without waiting for it (y is ready in stream order).

Raises
------
ValueError
    ``bits`` outside 2..8 or negative sizes.
RuntimeError
    Built without CUDA, or a CUDA error.
)doc");
}
