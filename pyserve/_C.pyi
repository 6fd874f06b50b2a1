"""
pyserve native kernels (C++/CUDA). Use the Python faces in pyserve.ops.
"""
from __future__ import annotations
import numpy
import typing
__all__: list[str] = ['build_info', 'csr_linear', 'csr_linear_has_avx2', 'cuda_device_count', 'get_num_threads', 'huffman_decode', 'huffman_encode', 'set_num_threads']
def build_info() -> dict[str, typing.Any]:
    """
    What this build compiled in.
    
    Returns
    -------
    dict
        ``{"version": str, "compiler": str, "avx2": bool, "openmp": bool, "cuda": bool,
        "cuda_archs": list[int]}``; ``cuda_archs`` is empty when CUDA was not compiled.
    """
def csr_linear(x: typing.Any, indptr: typing.Any, indices: typing.Any, values: typing.Any, bias: typing.Any = None, out: typing.Any = None, force_portable: bool = False) -> typing.Any:
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
def huffman_encode(symbols: numpy.ndarray) -> bytes:
    """
    Canonical Huffman encode of a 1-D uint8 or uint16 array (see pyserve.ops.huffman_encode).
    
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
    """
def set_num_threads(n: typing.SupportsInt | typing.SupportsIndex) -> None:
    """
    Set the number of OpenMP threads every pyserve kernel uses (see pyserve.ops.set_num_threads).
    
    Process-wide (not per calling thread). Raises ValueError if ``n < 1``.
    """
