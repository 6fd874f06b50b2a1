"""Canonical Huffman coding of uint8/uint16 symbol streams.

This is the last stage of Deep Compression (Han, Mao & Dally 2016, section 4): the k-means codebook
indices of a layer and the gaps between its sparse indices are Huffman coded. The kernels live in
``csrc/huffman/`` (``pyserve._C``); this module only normalises arguments.

Algorithms
----------
* Code lengths: optimal length-limited prefix codes by package-merge (Larmore & Hirschberg 1990),
  limited to ``HUFFMAN_MAX_CODE_LENGTH`` = 20 bits. When the limit does not bind, the total bit
  count equals that of a Huffman code (Huffman 1952); it binds only for extremely skewed counts.
* Codes: canonical (Schwartz & Kallick 1964), assigned as in RFC 1951 section 3.2.2: shorter codes
  first, within one length in increasing symbol order, so the stream stores lengths only.
* Decoding: a primary table of 2**11 entries that yields up to 6 (uint8) or 3 (uint16) symbols per
  lookup (huff0's multi-symbol "X2" idea), a branch-free canonical-limit lookup for longer codes,
  and up to four bitstreams decoded in lock step, five lookups per 64-bit reload (like the
  4-stream literals of zstd). On x86-64 CPUs with BMI2 a BMI2 build of the loop is used; setting
  the environment variable ``PYSERVE_HUFFMAN_NO_BMI2`` forces the portable build. Decoding is
  single-threaded (as is zstd's decompression).

Stream layout (format version 1)
--------------------------------
All integers little-endian; bits within a bitstream are MSB-first.

======  =====  ============================================================================
offset  bytes  field
======  =====  ============================================================================
0       4      magic ``b"PSHF"``
4       1      format version, 1
5       1      symbol dtype: 1 = uint8, 2 = uint16
6       1      S, number of bitstreams: 0 if N == 0, else 1..16 (the encoder writes 1 for
               N < 32768, else 4)
7       1      T, code-length table mode: 0 = dense range, 1 = sparse list
8       8      N, number of symbols (uint64)
16      4      A, number of code-length table entries (uint32); 0 iff N == 0
20      2      F, first symbol of the dense range (uint16); 0 for T == 1
22      ...    code-length table. T == 0: A bytes, the length of symbol F + i (0 = absent).
               T == 1: A entries of 3 bytes, symbol (uint16, strictly increasing) and length
               (uint8, 1..20)
...     8*S    bit length of each bitstream (uint64)
...     ...    the S bitstreams, each zero-padded to a whole byte, back to back, ending the buffer
======  =====  ============================================================================

Bitstream ``s`` holds symbols ``[s*C, min(N, (s+1)*C))`` with ``C = ceil(N / S)``. With two or more
symbols present the lengths satisfy the Kraft equality exactly (a complete code); a lone symbol has
the 1-bit code ``0``.
"""

from __future__ import annotations

from typing import Any, Union

import numpy as np

from pyserve import _C

__all__ = [
    "HUFFMAN_FORMAT_VERSION",
    "HUFFMAN_MAX_CODE_LENGTH",
    "HUFFMAN_TABLE_BITS",
    "huffman_decode",
    "huffman_encode",
]

#: Longest code the encoder emits and the decoder accepts, in bits.
HUFFMAN_MAX_CODE_LENGTH = 20
#: Index width of the decoder's primary lookup table, in bits.
HUFFMAN_TABLE_BITS = 11
#: Version byte written at offset 4 of every stream.
HUFFMAN_FORMAT_VERSION = 1

_SYMBOL_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16))

BytesLike = Union[bytes, bytearray, memoryview]


def _is_torch_tensor(obj: Any) -> bool:
    # Checked by name so that importing pyserve.ops never imports torch.
    return type(obj).__module__.split(".")[0] == "torch" and hasattr(obj, "device") and hasattr(obj, "numpy")


def _symbols_to_numpy(symbols: Any) -> np.ndarray:
    op = "huffman_encode: argument 'symbols'"
    if _is_torch_tensor(symbols):
        if symbols.device.type != "cpu":
            raise ValueError(f"{op}: expected a CPU tensor, got a tensor on device '{symbols.device}'")
        symbols = symbols.detach().numpy()
    if not isinstance(symbols, np.ndarray):
        raise ValueError(
            f"{op}: expected a numpy.ndarray or CPU torch.Tensor of dtype uint8 or uint16, "
            f"got {type(symbols).__name__}"
        )
    if symbols.ndim != 1:
        raise ValueError(f"{op}: expected a 1-D array, got ndim={symbols.ndim} with shape {symbols.shape}")
    if symbols.dtype.kind != "u" or symbols.dtype.itemsize not in (1, 2):
        raise ValueError(f"{op}: expected dtype uint8 or uint16, got {symbols.dtype}")
    if not symbols.dtype.isnative:
        symbols = symbols.astype(symbols.dtype.newbyteorder("="))
    return np.ascontiguousarray(symbols)


def huffman_encode(symbols: Any) -> bytes:
    """Huffman-code a 1-D stream of small unsigned integers.

    Parameters
    ----------
    symbols : numpy.ndarray or torch.Tensor
        ``[n]`` uint8 or uint16 (any strides and byte order; a torch tensor must be on the CPU).
        ``n`` may be 0.

    Returns
    -------
    bytes
        A self-describing stream (layout in the module docstring): about ``22 + table + 8*S``
        header bytes plus ``sum(len(code(x)) for x in symbols) / 8`` bytes, where the code lengths
        are optimal for the stream's own symbol counts under the 20-bit limit. A stream with one
        distinct symbol costs 1 bit per symbol.

    Raises
    ------
    ValueError
        If ``symbols`` is not a numpy array or CPU tensor, not 1-D, or not uint8/uint16.

    Notes
    -----
    Canonical Huffman codes (Huffman 1952; RFC 1951 section 3.2.2) with lengths from
    package-merge (Larmore & Hirschberg 1990). Runs on one thread; the GIL is released.
    """
    return _C.huffman_encode(_symbols_to_numpy(symbols))


def huffman_decode(stream: BytesLike) -> np.ndarray:
    """Decode a stream written by :func:`huffman_encode`.

    Parameters
    ----------
    stream : bytes, bytearray or memoryview
        Exactly one encoded stream (any C-contiguous buffer works, e.g. a uint8 numpy array).

    Returns
    -------
    numpy.ndarray
        ``[n]`` of the dtype recorded in the stream (uint8 or uint16), a new array.

    Raises
    ------
    ValueError
        If ``stream`` is not bytes-like, or is malformed: wrong magic, unknown format version or
        dtype code, code lengths outside 1..20 or violating the Kraft equality, a table or
        bitstream running past the end, a symbol count the bitstreams cannot hold, bit patterns
        that are no code, nonzero padding bits, or trailing bytes. The decoder never reads or
        writes out of bounds and allocates at most 16 bytes of output per input byte.

    Notes
    -----
    Table-driven decoding (a 2**11-entry primary table of multi-symbol entries plus a branch-free
    canonical-limit lookup for longer codes), up to four bitstreams in lock step, one thread, GIL
    released.
    """
    return _C.huffman_decode(stream)
