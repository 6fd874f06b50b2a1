"""Slow, obviously-correct NumPy/Python references for the kernels in ``pyserve._C``; for tests.

Huffman
-------
Computed another way than the native code: code lengths from a heap-built Huffman tree
(:func:`huffman_code_lengths`, Huffman 1952) and, for the length-limited case, a package-merge that
carries explicit symbol multisets (:func:`package_merge_code_lengths`, Larmore & Hirschberg 1990);
canonical codes by the RFC 1951 section 3.2.2 procedure; a bit-at-a-time decoder and a
string-building encoder for the stream layout documented in :mod:`pyserve.ops.huffman`.
"""

from __future__ import annotations

import heapq
import struct
from dataclasses import dataclass

import numpy as np

__all__ = [
    "ParsedHuffmanStream",
    "canonical_codes",
    "huffman_code_lengths",
    "huffman_decode_reference",
    "huffman_encode_reference",
    "package_merge_code_lengths",
    "parse_huffman_stream",
    "stream_ranges",
    "total_bits",
]

MAGIC = b"PSHF"
VERSION = 1
CHUNKED_VERSION = 2
MAX_CODE_LENGTH = 20
MULTI_STREAM_THRESHOLD = 32768
ENCODER_STREAMS = 4
_DTYPES = {1: np.dtype(np.uint8), 2: np.dtype(np.uint16)}
_CODES = {np.dtype(np.uint8): 1, np.dtype(np.uint16): 2}


def huffman_code_lengths(counts: np.ndarray) -> np.ndarray:
    """Unconstrained Huffman code lengths by repeatedly merging the two lightest trees (heapq).

    Parameters
    ----------
    counts : numpy.ndarray
        ``[alphabet]`` non-negative symbol counts.

    Returns
    -------
    numpy.ndarray
        ``[alphabet]`` int64 code lengths; 0 for absent symbols, 1 for a lone present symbol.
    """
    counts = np.asarray(counts, dtype=np.int64)
    lengths = np.zeros(counts.shape[0], dtype=np.int64)
    present = np.flatnonzero(counts)
    if present.size == 0:
        return lengths
    if present.size == 1:
        lengths[present[0]] = 1
        return lengths
    # heap of (weight, tiebreak, symbols under this tree); merging deepens every symbol by one
    heap = [(int(counts[s]), i, [int(s)]) for i, s in enumerate(present)]
    heapq.heapify(heap)
    tiebreak = len(heap)
    while len(heap) > 1:
        w1, _, s1 = heapq.heappop(heap)
        w2, _, s2 = heapq.heappop(heap)
        for s in s1:
            lengths[s] += 1
        for s in s2:
            lengths[s] += 1
        heapq.heappush(heap, (w1 + w2, tiebreak, s1 + s2))
        tiebreak += 1
    return lengths


def package_merge_code_lengths(counts: np.ndarray, max_length: int) -> np.ndarray:
    """Optimal code lengths no longer than ``max_length`` (package-merge, the "coin collector").

    Every item carries the multiset of symbols it contains (a count vector), so the result is read
    straight off the 2m-2 cheapest items of the final list. Slow (O(m^2 L)); for small alphabets.

    Parameters
    ----------
    counts : numpy.ndarray
        ``[alphabet]`` non-negative symbol counts with ``2**max_length >= (counts > 0).sum()``.
    max_length : int
        Longest allowed code, in bits.

    Returns
    -------
    numpy.ndarray
        ``[alphabet]`` int64 code lengths (0 for absent symbols).
    """
    counts = np.asarray(counts, dtype=np.int64)
    lengths = np.zeros(counts.shape[0], dtype=np.int64)
    present = np.flatnonzero(counts)
    m = present.size
    if m <= 1:
        lengths[present] = 1
        return lengths
    if 2**max_length < m:
        raise ValueError(f"{m} symbols need codes longer than {max_length} bits")
    order = present[np.argsort(counts[present], kind="stable")]
    leaves = [(int(counts[s]), np.eye(m, dtype=np.int64)[i]) for i, s in enumerate(order)]
    items = list(leaves)
    for _ in range(max_length - 1):
        packages = [
            (items[2 * i][0] + items[2 * i + 1][0], items[2 * i][1] + items[2 * i + 1][1]) for i in range(len(items) // 2)
        ]
        items = sorted(leaves + packages, key=lambda item: item[0])  # stable: leaves first on ties
    chosen = items[: 2 * m - 2]
    per_symbol = np.sum([vec for _, vec in chosen], axis=0)
    lengths[order] = per_symbol
    return lengths


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical codes for ``lengths`` by the procedure of RFC 1951 section 3.2.2.

    Returns
    -------
    numpy.ndarray
        ``[alphabet]`` int64 codes, right-aligned in ``lengths[s]`` bits (0 for absent symbols).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    max_len = int(lengths.max(initial=0))
    bl_count = np.bincount(lengths, minlength=max_len + 1)
    bl_count[0] = 0
    next_code = [0] * (max_len + 2)
    code = 0
    for bits in range(1, max_len + 1):
        code = (code + int(bl_count[bits - 1])) << 1
        next_code[bits] = code
    codes = np.zeros(lengths.shape[0], dtype=np.int64)
    for s in np.flatnonzero(lengths):  # increasing symbol order
        codes[s] = next_code[lengths[s]]
        next_code[lengths[s]] += 1
    return codes


def total_bits(counts: np.ndarray, lengths: np.ndarray) -> int:
    """Payload size in bits of symbols with these ``counts`` coded with these ``lengths``."""
    return int(np.dot(np.asarray(counts, dtype=np.int64), np.asarray(lengths, dtype=np.int64)))


def chunk_ranges(n: int, chunk: int, count: int) -> list[tuple[int, int]]:
    """``[(begin, end)]`` of ``count`` bitstreams / chunks of ``chunk`` symbols each (the last ones may hold fewer)."""
    return [(min(n, s * chunk), min(n, (s + 1) * chunk)) for s in range(count)]


def stream_ranges(n: int, num_streams: int) -> list[tuple[int, int]]:
    """``[(begin, end)]`` of each bitstream's symbols: chunks of ``ceil(n / num_streams)``."""
    if num_streams == 0:
        return []
    return chunk_ranges(n, -(-n // num_streams), num_streams)


@dataclass(frozen=True)
class ParsedHuffmanStream:
    """The fields of one stream (layout: :mod:`pyserve.ops.huffman`)."""

    dtype: np.dtype
    count: int
    num_streams: int
    table_mode: int
    lengths: np.ndarray  # [alphabet] int64, 0 = absent
    stream_bits: tuple[int, ...]
    bitstreams: tuple[bytes, ...]
    version: int = 1
    chunk_symbols: int = 0  # version 2: symbols per chunk (num_streams = ceil(count / chunk_symbols))

    def ranges(self) -> list[tuple[int, int]]:
        """``[(begin, end)]`` of each bitstream's (version 1) or chunk's (version 2) symbols."""
        if self.version == CHUNKED_VERSION:
            return chunk_ranges(self.count, self.chunk_symbols, self.num_streams)
        return stream_ranges(self.count, self.num_streams)


def parse_huffman_stream(stream: bytes) -> ParsedHuffmanStream:
    """Parse a stream's header, code-length table and bitstream sizes (structural checks only).

    Raises
    ------
    ValueError
        On a structural error (magic, version, dtype, table bounds, sizes, trailing bytes).
    """
    data = bytes(stream)
    if len(data) < 22:
        raise ValueError("truncated header")
    magic, version, dtype_code, num_streams, mode, count, entries, first = struct.unpack_from("<4sBBBBQIH", data, 0)
    if magic != MAGIC or version not in (VERSION, CHUNKED_VERSION) or dtype_code not in _DTYPES:
        raise ValueError("bad magic, version or dtype")
    if version == CHUNKED_VERSION and num_streams != 0:
        raise ValueError("version 2 stores 0 in the bitstream count field")
    dtype = _DTYPES[dtype_code]
    alphabet = 1 << (8 * dtype.itemsize)
    lengths = np.zeros(alphabet, dtype=np.int64)
    pos = 22
    if count == 0:
        if (num_streams, mode, entries, first) != (0, 0, 0, 0) or len(data) != 22:
            raise ValueError("bad empty stream")
        return ParsedHuffmanStream(dtype, 0, 0, 0, lengths, (), (), version)
    if mode == 0:
        if first + entries > alphabet or pos + entries > len(data):
            raise ValueError("bad dense table")
        lengths[first : first + entries] = np.frombuffer(data, np.uint8, entries, pos)
        pos += entries
    elif mode == 1:
        if pos + 3 * entries > len(data):
            raise ValueError("bad sparse table")
        for i in range(entries):
            sym, length = struct.unpack_from("<HB", data, pos + 3 * i)
            lengths[sym] = length
        pos += 3 * entries
    else:
        raise ValueError("bad table mode")
    chunk_symbols = 0
    if version == CHUNKED_VERSION:
        if pos + 4 > len(data):
            raise ValueError("truncated chunk size")
        (chunk_symbols,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if not 1 <= chunk_symbols <= 2**24:
            raise ValueError("bad chunk size")
        num_streams = -(-count // chunk_symbols)
        if pos + 4 * num_streams > len(data):
            raise ValueError("truncated chunk sizes")
        stream_bits = struct.unpack_from(f"<{num_streams}I", data, pos)
        pos += 4 * num_streams
    else:
        if pos + 8 * num_streams > len(data):
            raise ValueError("truncated bitstream sizes")
        stream_bits = struct.unpack_from(f"<{num_streams}Q", data, pos)
        pos += 8 * num_streams
    bitstreams = []
    for bits in stream_bits:
        nbytes = -(-bits // 8)
        if pos + nbytes > len(data):
            raise ValueError("truncated bitstream")
        bitstreams.append(data[pos : pos + nbytes])
        pos += nbytes
    if pos != len(data):
        raise ValueError("trailing bytes")
    return ParsedHuffmanStream(dtype, count, num_streams, mode, lengths, tuple(stream_bits), tuple(bitstreams),
                               version, chunk_symbols)


def huffman_encode_reference(symbols: np.ndarray, lengths: np.ndarray | None = None, num_streams: int | None = None,
                             chunk_symbols: int | None = None) -> bytes:
    """Encode ``symbols`` into the documented layout, one code string at a time.

    Parameters
    ----------
    symbols : numpy.ndarray
        ``[n]`` uint8 or uint16.
    lengths : numpy.ndarray, optional
        ``[alphabet]`` code lengths to use; default :func:`huffman_code_lengths` of the counts
        (which must then not exceed 20 bits).
    num_streams : int, optional
        Bitstream count; default the native encoder's rule (1 below 32768 symbols, else 4).
    chunk_symbols : int, optional
        Write format version 2 with chunks of this many symbols (``num_streams`` is then ignored).

    Returns
    -------
    bytes
        With the native encoder's lengths and defaults, byte-identical to ``huffman_encode``.
    """
    symbols = np.asarray(symbols)
    dtype = symbols.dtype
    alphabet = 1 << (8 * dtype.itemsize)
    n = symbols.shape[0]
    counts = np.bincount(symbols, minlength=alphabet)
    if lengths is None:
        lengths = huffman_code_lengths(counts)
    lengths = np.asarray(lengths, dtype=np.int64)
    version = VERSION if chunk_symbols is None else CHUNKED_VERSION
    if n == 0:
        return struct.pack("<4sBBBBQIH", MAGIC, version, _CODES[dtype], 0, 0, 0, 0, 0)
    if chunk_symbols is not None:
        num_streams = -(-n // chunk_symbols)
        ranges = chunk_ranges(n, chunk_symbols, num_streams)
    else:
        if num_streams is None:
            num_streams = 1 if n < MULTI_STREAM_THRESHOLD else ENCODER_STREAMS
        ranges = stream_ranges(n, num_streams)
    present = np.flatnonzero(lengths)
    lo, hi = int(present[0]), int(present[-1])
    if hi - lo + 1 <= 3 * present.size:
        mode, entries, first = 0, hi - lo + 1, lo
        table = bytes(lengths[lo : hi + 1].astype(np.uint8))
    else:
        mode, entries, first = 1, present.size, 0
        table = b"".join(struct.pack("<HB", int(s), int(lengths[s])) for s in present)
    codes = canonical_codes(lengths)
    code_str = {int(s): format(int(codes[s]), f"0{int(lengths[s])}b") for s in present}
    streams, bit_counts = [], []
    for begin, end in ranges:
        bits = "".join(code_str[int(s)] for s in symbols[begin:end])
        bit_counts.append(len(bits))
        bits += "0" * (-len(bits) % 8)
        streams.append(int(bits, 2).to_bytes(len(bits) // 8, "big") if bits else b"")
    if chunk_symbols is not None:
        header = struct.pack("<4sBBBBQIH", MAGIC, version, _CODES[dtype], 0, mode, n, entries, first)
        sizes = struct.pack("<I", chunk_symbols) + struct.pack(f"<{num_streams}I", *bit_counts)
    else:
        header = struct.pack("<4sBBBBQIH", MAGIC, version, _CODES[dtype], num_streams, mode, n, entries, first)
        sizes = struct.pack(f"<{num_streams}Q", *bit_counts)
    return header + table + sizes + b"".join(streams)


def huffman_decode_reference(stream: bytes) -> np.ndarray:
    """Decode a stream bit by bit with a dictionary of (length, code) -> symbol.

    Raises
    ------
    ValueError
        On structural errors, invalid codes, or bitstreams that do not hold exactly their symbols.
    """
    parsed = parse_huffman_stream(stream)
    out = np.zeros(parsed.count, dtype=parsed.dtype)
    if parsed.count == 0:
        return out
    lengths = parsed.lengths
    codes = canonical_codes(lengths)
    table = {(int(lengths[s]), int(codes[s])): int(s) for s in np.flatnonzero(lengths)}
    max_len = int(lengths.max())
    for (begin, end), bits, payload in zip(parsed.ranges(), parsed.stream_bits, parsed.bitstreams):
        bitarray = np.unpackbits(np.frombuffer(payload, np.uint8))[:bits].tolist()
        pos = 0
        for i in range(begin, end):
            code = length = 0
            while True:
                if pos >= bits or length >= max_len:
                    raise ValueError("invalid code or bitstream too short")
                code = (code << 1) | bitarray[pos]
                pos += 1
                length += 1
                sym = table.get((length, code))
                if sym is not None:
                    out[i] = sym
                    break
        if pos != bits:
            raise ValueError("bitstream longer than its symbols")
    return out


# ---- CSR sparse linear ---------------------------------------------------------------------------


def csr_linear_reference(x, indptr, indices, values, bias=None) -> np.ndarray:
    """``y = x @ W.T + bias`` by densifying ``W`` row by row and multiplying in float64.

    Computed another way than the kernel: ``W [N, K]`` is materialised densely (duplicates summed,
    ``np.add.at``), the product is a float64 matmul, and the result is rounded to float32 once.

    Parameters
    ----------
    x : array_like
        ``[B, K]`` float.
    indptr, indices, values : array_like
        CSR of ``W``: ``[N + 1]``, ``[nnz]``, ``[nnz]``; assumed valid.
    bias : array_like, optional
        ``[N]``.

    Returns
    -------
    numpy.ndarray
        ``[B, N]`` float32.
    """
    x = np.asarray(x, dtype=np.float64)
    indptr = np.asarray(indptr, dtype=np.int64)
    n_rows = len(indptr) - 1
    dense = np.zeros((n_rows, x.shape[1]), dtype=np.float64)
    rows = np.repeat(np.arange(n_rows), np.diff(indptr))
    np.add.at(dense, (rows, np.asarray(indices, dtype=np.int64)), np.asarray(values, dtype=np.float64))
    y = x @ dense.T
    if bias is not None:
        y = y + np.asarray(bias, dtype=np.float64)
    return y.astype(np.float32)


__all__ += ["csr_linear_reference"]
# --- int8 and codebook linear (pyserve.ops.quant) -------------------------------------------------
#
# Computed another way than csrc/quant: quantization codes by numpy's IEEE fp32 division and
# np.rint (the same documented fp32 formula, so codes must agree exactly), accumulation in int64,
# dequantization and matmuls in float64; packing bit by bit through Python integers.

__all__ += [
    "codebook_linear_reference",
    "int8_linear_reference",
    "pack_indices_reference",
    "quantize_rows_reference",
    "unpack_indices_reference",
]


def quantize_rows_reference(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row int8 quantization as documented in :mod:`pyserve.ops.quant`.

    Parameters
    ----------
    a : numpy.ndarray
        ``[R, K]`` float32.

    Returns
    -------
    (numpy.ndarray, numpy.ndarray)
        ``[R, K]`` int8 codes and ``[R]`` float32 scales (1.0 where ``max|row| / 127`` is 0).
    """
    a = np.asarray(a, dtype=np.float32)
    q = np.zeros(a.shape, dtype=np.int8)
    scales = np.ones(a.shape[0], dtype=np.float32)
    for r in range(a.shape[0]):
        amax = np.float32(np.max(np.abs(a[r]))) if a.shape[1] else np.float32(0)
        scale = np.float32(amax / np.float32(127))
        if scale == 0:
            continue
        scales[r] = scale
        with np.errstate(over="ignore"):
            codes = np.rint(a[r] / scale)  # float32 / float32: IEEE division, rint: half to even
        q[r] = np.clip(codes, -127, 127).astype(np.int8)
    return q, scales


def int8_linear_reference(x, w_int8, w_scale, bias=None) -> np.ndarray:
    """``y[b, n] = acc * x_scale[b] * w_scale[n] + bias[n]`` with int64 ``acc``, float64 math.

    Returns ``[B, N]`` float64 (compare with a tolerance of a few fp32 ulps).
    """
    xq, sx = quantize_rows_reference(np.asarray(x, dtype=np.float32))
    acc = xq.astype(np.int64) @ np.asarray(w_int8).astype(np.int64).T
    y = acc.astype(np.float64) * (sx.astype(np.float64)[:, None] * np.asarray(w_scale, np.float64)[None, :])
    if bias is not None:
        y = y + np.asarray(bias, np.float64)[None, :]
    return y


def pack_indices_reference(idx: np.ndarray, bits: int) -> np.ndarray:
    """Pack ``[N, K]`` codes bit by bit (little-endian bit order) into ``[N, ceil(K*bits/8)]`` uint8."""
    idx = np.asarray(idx)
    N, K = idx.shape
    row_bytes = (K * bits + 7) // 8
    out = np.zeros((N, row_bytes), dtype=np.uint8)
    for n in range(N):
        for k in range(K):
            value = int(idx[n, k])
            for i in range(bits):
                if (value >> i) & 1:
                    j = k * bits + i
                    out[n, j // 8] |= np.uint8(1 << (j % 8))
    return out


def unpack_indices_reference(packed: np.ndarray, bits: int, K: int) -> np.ndarray:
    """Inverse of :func:`pack_indices_reference`, bit by bit."""
    packed = np.asarray(packed)
    N = packed.shape[0]
    out = np.zeros((N, K), dtype=np.uint8)
    for n in range(N):
        for k in range(K):
            value = 0
            for i in range(bits):
                j = k * bits + i
                value |= ((int(packed[n, j // 8]) >> (j % 8)) & 1) << i
            out[n, k] = value
    return out


def codebook_linear_reference(x, idx, codebook, bias=None) -> np.ndarray:
    """``x @ W.T + bias`` in float64 with ``W = codebook[idx]`` (or ``codebook[n, idx[n]]``)."""
    idx = np.asarray(idx).astype(np.int64)
    codebook = np.asarray(codebook, dtype=np.float64)
    if codebook.ndim == 1:
        w = codebook[idx]
    else:
        w = np.take_along_axis(codebook, idx, axis=1)
    y = np.asarray(x, dtype=np.float64) @ w.T
    if bias is not None:
        y = y + np.asarray(bias, np.float64)[None, :]
    return y
