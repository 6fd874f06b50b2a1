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
  the environment variable ``PYSERVE_HUFFMAN_NO_BMI2`` forces the portable build. Version 1 streams
  decode on one thread (as zstd decompresses); version 2 streams with more than 16 chunks decode
  in blocks of 16 chunks over :func:`pyserve.ops.get_num_threads` OpenMP threads.

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

Format version 2 (chunked)
--------------------------
Written by ``huffman_encode(symbols, chunk_symbols=C)``: independently decodable chunks of ``C``
symbols, so that a GPU decodes each chunk on its own thread (``huffman_decode(stream,
device="cuda")``). Identical to version 1 except: byte 6 is 0; after the code-length table come
``C`` (uint32, 1..2**24) and the bit length of each of the ``S = ceil(N / C)`` chunks (uint32);
then the chunks, each zero-padded to a whole byte. Chunk ``s`` holds symbols
``[s*C, min(N, (s+1)*C))``; its offset is the prefix sum of the chunks before it. The index costs
4 bytes plus under one byte of padding per chunk (about 0.05% at ``C = 16384`` and 5 bits per
symbol). ``.pyserve`` artifacts still store version 1 streams (they are decoded on the host).
"""

from __future__ import annotations

import numbers
from typing import Any, Optional, Union

import numpy as np

from pyserve import _C

__all__ = [
    "HUFFMAN_FORMAT_VERSION",
    "HUFFMAN_MAX_CODE_LENGTH",
    "HUFFMAN_TABLE_BITS",
    "HUFFMAN_FORMAT_VERSION_CHUNKED",
    "HUFFMAN_MAX_CHUNK_SYMBOLS",
    "huffman_decode",
    "huffman_encode",
    "huffman_stream_info",
]

#: Longest code the encoder emits and the decoder accepts, in bits.
HUFFMAN_MAX_CODE_LENGTH = 20
#: Index width of the decoder's primary lookup table, in bits.
HUFFMAN_TABLE_BITS = 11
#: Version byte of streams written without ``chunk_symbols`` (offset 4).
HUFFMAN_FORMAT_VERSION = 1
#: Version byte of chunked streams (``chunk_symbols`` given).
HUFFMAN_FORMAT_VERSION_CHUNKED = 2
#: Largest ``chunk_symbols`` (a chunk's bit length must fit in 32 bits).
HUFFMAN_MAX_CHUNK_SYMBOLS = 2**24

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


def huffman_encode(symbols: Any, chunk_symbols: Optional[int] = None) -> bytes:
    """Huffman-code a 1-D stream of small unsigned integers.

    Parameters
    ----------
    symbols : numpy.ndarray or torch.Tensor
        ``[n]`` uint8 or uint16 (any strides and byte order; a torch tensor must be on the CPU).
        ``n`` may be 0.
    chunk_symbols : int, optional
        None (default): format version 1, one bitstream (four from 32768 symbols on). An int in
        ``1..2**24``: format version 2, independently decodable chunks of that many symbols (what
        the CUDA decoder parallelises over; 16384 is a good size).

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
        If ``symbols`` is not a numpy array or CPU tensor, not 1-D, or not uint8/uint16, or
        ``chunk_symbols`` is not None or an int in ``1..2**24``.

    Notes
    -----
    Canonical Huffman codes (Huffman 1952; RFC 1951 section 3.2.2) with lengths from
    package-merge (Larmore & Hirschberg 1990). Runs on one thread; the GIL is released.
    """
    if isinstance(chunk_symbols, numbers.Integral) and not isinstance(chunk_symbols, bool):
        chunk_symbols = int(chunk_symbols)  # numpy integers too; _C checks the range
    return _C.huffman_encode(_symbols_to_numpy(symbols), chunk_symbols)


def huffman_stream_info(stream: BytesLike) -> dict:
    """Describe a stream after validating its structure (header, code lengths, bitstream sizes).

    Returns
    -------
    dict
        ``dtype`` ("uint8" or "uint16"), ``count`` (symbols), ``format_version`` (1 or 2),
        ``num_chunks`` (bitstreams of version 1, chunks of version 2) and ``chunk_symbols``.

    Raises
    ------
    ValueError
        If ``stream`` is not bytes-like or structurally malformed (the bitstreams' contents are
        only checked by decoding).
    """
    return _C.huffman_stream_info(stream)


def _cuda_device(device: Any) -> Optional[Any]:
    """None for the host, else a ``torch.device`` of type cuda; ValueError naming ``device``."""
    if device is None:
        return None
    text = str(device) if type(device).__name__ == "device" else device
    if not isinstance(text, str):
        raise ValueError(f"huffman_decode: argument 'device': expected None, 'cpu', 'cuda', 'cuda:N' or a "
                         f"torch.device, got {type(device).__name__}")
    def index_ok(tail: str) -> bool:  # ASCII digits only (str.isdigit also takes '²' and full-width digits)
        return tail.isascii() and tail.isdigit() and len(tail) <= 9

    if text == "cpu" or (text.startswith("cpu:") and index_ok(text[4:])):
        return None
    if not (text == "cuda" or (text.startswith("cuda:") and index_ok(text[5:]))):
        raise ValueError(f"huffman_decode: argument 'device': expected None, 'cpu', 'cuda', 'cuda:N' or a "
                         f"torch.device, got {device!r}")
    if not _C.build_info()["cuda"]:
        raise RuntimeError("huffman_decode: device='cuda' needs pyserve._C built with CUDA (build_info()['cuda'] is "
                           "False); rebuild with nvcc and PYSERVE_CUDA=ON, or decode on the CPU")
    import torch

    dev = torch.device(text)
    if not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"huffman_decode: argument 'device': {text!r} is not a visible CUDA device "
                         f"(torch sees {torch.cuda.device_count() if torch.cuda.is_available() else 0})")
    return dev


def huffman_decode(stream: BytesLike, device: Any = None) -> Any:
    """Decode a stream written by :func:`huffman_encode`.

    Parameters
    ----------
    stream : bytes, bytearray or memoryview
        Exactly one encoded stream (any C-contiguous buffer works, e.g. a uint8 numpy array).
    device : None, "cpu", "cpu:N", "cuda", "cuda:N" or torch.device, optional
        Where to decode. None or a CPU device: on the host, into a numpy array. A CUDA device: the stream
        is copied to the GPU and decoded there, one thread per chunk (format version 2 spreads the
        work over ``ceil(n / chunk_symbols)`` threads; version 1 over its 1-4 bitstreams only, so
        write streams meant for GPU decoding with ``chunk_symbols``).

    Returns
    -------
    numpy.ndarray or torch.Tensor
        ``[n]`` of the dtype recorded in the stream (uint8 or uint16), a new array; a CUDA tensor
        (``torch.uint8`` or ``torch.uint16``) on that device when ``device`` is CUDA.

    Raises
    ------
    ValueError
        If ``stream`` is not bytes-like, or is malformed: wrong magic, unknown format version or
        dtype code, code lengths outside 1..20 or violating the Kraft equality, a table or
        bitstream running past the end, a symbol count the bitstreams cannot hold, bit patterns
        that are no code, nonzero padding bits, or trailing bytes. The decoder never reads or
        writes out of bounds and allocates at most 16 bytes of output per input byte.

        On the GPU the same checks apply and give the same messages (a corrupt chunk is named
        by decoding the stream on the host).
    RuntimeError
        ``device`` is CUDA but pyserve was built without CUDA, or a CUDA call failed.

    Notes
    -----
    Host: table-driven decoding (a 2**11-entry primary table of multi-symbol entries plus a
    branch-free canonical-limit lookup for longer codes), bitstreams or chunks four at a time in
    lock step, GIL released; one thread for version 1, up to ``get_num_threads()`` for version 2
    (blocks of 16 chunks; an error names the first failing block's problem whatever the count). GPU (csrc/huffman/huffman_kernel.cu): one thread per
    chunk, the 2**11-entry single-symbol table in shared memory, codes longer than 11 bits by the
    canonical first-code test per length (Moffat & Turpin, IEEE Trans. Commun. 1997); the call
    returns when the decode has finished.
    """
    dev = _cuda_device(device)
    if dev is None:
        return _C.huffman_decode(stream)
    import torch

    info = _C.huffman_stream_info(stream)
    dtype = torch.uint8 if info["dtype"] == "uint8" else torch.uint16
    out = torch.empty(info["count"], dtype=dtype, device=dev)
    _C.huffman_decode_cuda(stream, out.data_ptr(), out.numel() * out.element_size())
    return out
