"""
pyserve native kernels (C++/CUDA). Use the Python faces in pyserve.ops.
"""
from __future__ import annotations
import numpy
import typing
__all__: list[str] = ['CsrPackedWeight', 'Int8PackedWeight', 'attention_qkv', 'attention_qkv_bf16', 'attention_qkv_fast', 'build_info', 'codebook_linear', 'codebook_linear_cuda', 'cpu_kernels', 'csr_linear', 'csr_linear_has_avx2', 'csr_linear_packed', 'cuda_device_count', 'get_num_threads', 'huffman_decode', 'huffman_decode_cuda', 'huffman_encode', 'huffman_stream_info', 'int8_linear', 'int8_linear_cuda', 'int8_linear_packed', 'layer_norm', 'mean_pool_normalize', 'pack_csr_weight', 'pack_indices', 'pack_int8_weight', 'quantize_per_channel', 'set_num_threads', 'unpack_indices']
class CsrPackedWeight:
    """
    A CSR weight prepared once for csr_linear (see pyserve.ops.pack_csr_weight).
    
    An immutable, validated copy in SELL-8-sigma layout (csrc/sparse/csr_packed_kernel.h): rows in
    slices of 8, entries column-major within a slice, uint16 column indices when K <= 65536 (else
    int32). Created by ``pack_csr_weight``; not constructible from Python.
    """
    @property
    def index_bits(self) -> int:
        """
        16 (K <= 65536) or 32: bits per stored column index.
        """
    @property
    def nbytes(self) -> int:
        """
        Bytes held by the packed copy.
        """
    @property
    def nnz(self) -> int:
        """
        Number of stored nonzeros.
        """
    @property
    def padding_ratio(self) -> float:
        """
        Stored entries (nonzeros plus slice padding) / nonzeros.
        """
    @property
    def shape(self) -> tuple:
        """
        ``(N, K)`` of the weight.
        """
    @property
    def sorted_rows(self) -> bool:
        """
        Whether rows were sorted by length within windows of 64 rows.
        """
class Int8PackedWeight:
    """
    int8 weights packed once for int8_linear (see pyserve.ops.pack_int8_weight).
    
    An immutable copy in the layout of the register-blocked micro-kernels (AVX2 and AVX-512 VNNI;
    csrc/quant/int8_kernel.h): ``w + 128`` as uint8 in blocks of 16 channels x 4 k, padded to whole
    blocks: ``16 ceil(N / 16) * 4 ceil(K / 4)`` bytes (about N x K). Created by ``pack_int8_weight``;
    not constructible from Python.
    """
    @property
    def nbytes(self) -> int:
        """
        Bytes held by the packed copy.
        """
    @property
    def shape(self) -> tuple:
        """
        ``(N, K)`` of the packed weights.
        """
def attention_qkv(qkv: numpy.ndarray, heads: typing.SupportsInt | typing.SupportsIndex, mask: numpy.ndarray | None, scale: typing.SupportsFloat | typing.SupportsIndex, precision: str = 'fp32') -> numpy.ndarray:
    """
    Multi-head attention from a fused Q|K|V projection (see pyserve.ops.attention_qkv).
    
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
    """
def attention_qkv_bf16(head_size: typing.SupportsInt | typing.SupportsIndex) -> bool:
    """
    Whether attention_qkv(precision='bf16') runs its AVX-512 BF16 kernel for this head size on this CPU.
    """
def attention_qkv_fast(head_size: typing.SupportsInt | typing.SupportsIndex) -> bool:
    """
    Whether attention_qkv runs its AVX2 kernel for this head size on this CPU (head_size % 16 == 0, 16-256).
    """
def build_info() -> dict[str, typing.Any]:
    """
    What this build compiled in.
    
    Returns
    -------
    dict
        ``{"version": str, "compiler": str, "avx2": bool, "avx512_vnni": bool, "avx512_bf16": bool,
        "openmp": bool, "cuda": bool, "cuda_archs": list[int]}``; ``cuda_archs`` is empty when CUDA was not compiled.
    """
def codebook_linear(x: numpy.ndarray, packed: numpy.ndarray, codebook: numpy.ndarray, bits: typing.SupportsInt | typing.SupportsIndex, bias: numpy.ndarray | None = None) -> numpy.ndarray:
    """
    Codebook (weight-shared) linear layer ``y = x @ W.T + bias`` (see pyserve.ops.codebook_linear).
    
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
    """
def codebook_linear_cuda(x: typing.SupportsInt | typing.SupportsIndex, packed: typing.SupportsInt | typing.SupportsIndex, codebook: typing.SupportsInt | typing.SupportsIndex, bias: typing.SupportsInt | typing.SupportsIndex, y: typing.SupportsInt | typing.SupportsIndex, B: typing.SupportsInt | typing.SupportsIndex, K: typing.SupportsInt | typing.SupportsIndex, N: typing.SupportsInt | typing.SupportsIndex, bits: typing.SupportsInt | typing.SupportsIndex, per_channel: bool, stream: typing.SupportsInt | typing.SupportsIndex = 0) -> None:
    """
    CUDA codebook linear on device pointers (int); used by pyserve.ops.codebook_linear for CUDA tensors.
    
    Shapes as codebook_linear; ``bias`` may be 0; all arrays contiguous on the current device.
    ``stream``: the cudaStream_t (``torch.cuda.Stream.cuda_stream``) to queue the kernel on, 0 for the
    legacy default stream; the call returns without waiting for it (y is ready in stream order).
    
    Raises
    ------
    ValueError
        ``bits`` outside 2..8 or negative sizes.
    RuntimeError
        Built without CUDA, or a CUDA error.
    """
def cpu_kernels() -> dict[str, bool]:
    """
    The CPU code paths this process runs.
    
    Returns
    -------
    dict
        ``{"avx2": bool, "avx512": bool, "avx512_vnni": bool, "avx512_bf16": bool}``: compiled in,
        supported by this CPU and not turned off by the environment variables ``PYSERVE_DISABLE_AVX2``
        (all off) or ``PYSERVE_DISABLE_AVX512`` (the AVX-512 paths off), each read once per path and process: set
        them before the process starts.
    """
def csr_linear(x: typing.Any, indptr: typing.Any, indices: typing.Any, values: typing.Any, bias: typing.Any = None, out: typing.Any = None, force_portable: bool = False, stream: typing.SupportsInt | typing.SupportsIndex = 0) -> typing.Any:
    """
    y = x @ W.T + bias with W [N, K] in CSR form (see pyserve.ops.csr_linear).
    
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
    """
def csr_linear_has_avx2() -> bool:
    """
    True when csr_linear's AVX2+FMA path is compiled in and this CPU supports it.
    """
def csr_linear_packed(x: typing.Any, w: CsrPackedWeight, bias: typing.Any = None, force_portable: bool = False) -> typing.Any:
    """
    csr_linear with a weight from pack_csr_weight: ``[B, N]`` float32 = x @ W.T + bias.
    
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
    """
def cuda_device_count() -> int:
    """
    Number of CUDA devices visible to the CUDA runtime.
    
    Returns 0 when pyserve was built without CUDA and on any runtime error (no driver, no device).
    Never raises.
    """
def get_num_threads() -> int:
    """
    Number of OpenMP threads the pyserve kernels use (default: omp_get_max_threads()).
    """
def huffman_decode(stream: bytes | bytearray | memoryview) -> numpy.ndarray:
    """
    Decode a stream written by huffman_encode (see pyserve.ops.huffman_decode).
    
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
    """
def huffman_decode_cuda(stream: bytes | bytearray | memoryview, out: typing.SupportsInt | typing.SupportsIndex, out_nbytes: typing.SupportsInt | typing.SupportsIndex) -> None:
    """
    Decode a stream on the GPU into the device buffer at address ``out`` (see pyserve.ops.huffman_decode).
    
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
    """
def huffman_encode(symbols: numpy.ndarray, chunk_symbols: typing.Any = None) -> bytes:
    """
    Canonical Huffman encode of a 1-D uint8 or uint16 array (see pyserve.ops.huffman_encode).
    
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
    """
def huffman_stream_info(stream: bytes | bytearray | memoryview) -> dict:
    """
    Validate a stream's header, code lengths and bitstream sizes and describe it.
    
    Returns
    -------
    dict
        ``dtype`` ("uint8" or "uint16"), ``count`` (symbols), ``format_version`` (1 or 2),
        ``num_chunks`` (bitstreams or chunks), ``chunk_symbols`` (symbols per chunk; the last may hold fewer).
    
    Raises
    ------
    ValueError
        If ``stream`` is not bytes-like or its structure is malformed.
    """
def int8_linear(x: numpy.ndarray, w_int8: numpy.ndarray, w_scale: numpy.ndarray, bias: numpy.ndarray | None = None) -> numpy.ndarray:
    """
    int8 linear layer ``y = x @ dequant(w_int8).T + bias`` (see pyserve.ops.int8_linear).
    
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
    """
def int8_linear_cuda(x: typing.SupportsInt | typing.SupportsIndex, w: typing.SupportsInt | typing.SupportsIndex, w_scale: typing.SupportsInt | typing.SupportsIndex, bias: typing.SupportsInt | typing.SupportsIndex, y: typing.SupportsInt | typing.SupportsIndex, xq: typing.SupportsInt | typing.SupportsIndex, x_scale: typing.SupportsInt | typing.SupportsIndex, B: typing.SupportsInt | typing.SupportsIndex, K: typing.SupportsInt | typing.SupportsIndex, N: typing.SupportsInt | typing.SupportsIndex, stream: typing.SupportsInt | typing.SupportsIndex = 0) -> None:
    """
    CUDA int8 linear on device pointers (int); used by pyserve.ops.int8_linear for CUDA tensors.
    
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
    """
def int8_linear_packed(x: numpy.ndarray, w: Int8PackedWeight, w_scale: numpy.ndarray, bias: numpy.ndarray | None = None, activation: str = 'none', residual: numpy.ndarray | None = None, norm_weight: numpy.ndarray | None = None, norm_bias: numpy.ndarray | None = None, eps: typing.SupportsFloat | typing.SupportsIndex = 1e-05) -> numpy.ndarray:
    """
    int8_linear with weights from pack_int8_weight: the same ``[B, N]`` float32, bit for bit.
    
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
    """
def layer_norm(x: numpy.ndarray, weight: numpy.ndarray, bias: numpy.ndarray, eps: typing.SupportsFloat | typing.SupportsIndex, residual: numpy.ndarray | None = None) -> numpy.ndarray:
    """
    LayerNorm over the last dim (Ba et al. 2016), optionally after adding a residual.
    
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
    """
def mean_pool_normalize(h: numpy.ndarray, mask: numpy.ndarray, eps_count: typing.SupportsFloat | typing.SupportsIndex, eps_norm: typing.SupportsFloat | typing.SupportsIndex) -> numpy.ndarray:
    """
    Mean pooling over the tokens a mask keeps, then L2 normalisation (sentence-transformers).
    
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
    """
def pack_csr_weight(indptr: typing.Any, indices: typing.Any, values: typing.Any, K: typing.SupportsInt | typing.SupportsIndex, sort_rows: typing.SupportsInt | typing.SupportsIndex = -1) -> CsrPackedWeight:
    """
    Validate and pack a CSR weight once (see pyserve.ops.pack_csr_weight).
    
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
    """
def pack_indices(idx: numpy.ndarray, bits: typing.SupportsInt | typing.SupportsIndex) -> numpy.ndarray:
    """
    Pack 2..8-bit codes, little-endian bit order (see pyserve.ops.pack_indices).
    
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
    """
def pack_int8_weight(w_int8: numpy.ndarray) -> Int8PackedWeight:
    """
    Pack int8 weights once for int8_linear_packed (see pyserve.ops.pack_int8_weight).
    
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
    """
def quantize_per_channel(w: numpy.ndarray) -> tuple:
    """
    Symmetric per-output-channel int8 quantization (see pyserve.ops.quantize_per_channel).
    
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
    """
def set_num_threads(n: typing.SupportsInt | typing.SupportsIndex) -> None:
    """
    Set the number of OpenMP threads every pyserve kernel uses (see pyserve.ops.set_num_threads).
    
    Process-wide (not per calling thread). Raises ValueError if ``n < 1``.
    """
def unpack_indices(packed: numpy.ndarray, bits: typing.SupportsInt | typing.SupportsIndex, K: typing.SupportsInt | typing.SupportsIndex) -> numpy.ndarray:
    """
    Inverse of pack_indices (see pyserve.ops.unpack_indices).
    
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
    """
