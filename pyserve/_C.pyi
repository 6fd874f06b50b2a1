"""
pyserve native kernels (C++/CUDA). Use the Python faces in pyserve.ops.
"""
from __future__ import annotations
import numpy
import typing
__all__: list[str] = ['build_info', 'cuda_device_count', 'huffman_decode', 'huffman_encode']
def build_info() -> dict[str, typing.Any]:
    """
    What this build compiled in.
    
    Returns
    -------
    dict
        ``{"version": str, "compiler": str, "avx2": bool, "openmp": bool, "cuda": bool,
        "cuda_archs": list[int]}``; ``cuda_archs`` is empty when CUDA was not compiled.
    """
def cuda_device_count() -> int:
    """
    Number of CUDA devices visible to the CUDA runtime.
    
    Returns 0 when pyserve was built without CUDA and on any runtime error (no driver, no device).
    Never raises.
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
