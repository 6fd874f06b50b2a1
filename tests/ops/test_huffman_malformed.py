"""huffman_decode on malformed, truncated and corrupted streams: ValueError or a valid array, never a crash.

The decoder's memory safety is checked more strictly under AddressSanitizer by
tests/ops/test_huffman_native_fuzz.py (marked slow).
"""

from __future__ import annotations

import struct

import numpy as np
import pytest

from pyserve.ops import huffman_decode, huffman_encode
from pyserve.ops import reference as ref

HEADER = struct.Struct("<4sBBBBQIH")  # magic, version, dtype, S, T, N, A, F


def decode_or_value_error(stream) -> None:
    """Decoding must either raise ValueError or return a plausible array."""
    try:
        y = huffman_decode(stream)
    except ValueError as exc:
        assert str(exc).startswith("huffman_decode: argument 'stream': ")
        return
    assert isinstance(y, np.ndarray) and y.ndim == 1
    assert y.dtype in (np.dtype(np.uint8), np.dtype(np.uint16))
    assert y.size <= 8 * len(stream)


def patch_header(stream: bytes, **fields) -> bytes:
    names = ["magic", "version", "dtype", "streams", "mode", "count", "entries", "first"]
    values = dict(zip(names, HEADER.unpack_from(stream)))
    values.update(fields)
    return HEADER.pack(*(values[n] for n in names)) + stream[HEADER.size :]


@pytest.fixture(scope="module")
def small_u8(make_symbols):
    return huffman_encode(make_symbols(np.uint8, "laplace32", 300, seed=1))


@pytest.fixture(scope="module")
def small_u16_sparse(make_symbols):
    return huffman_encode(make_symbols(np.uint16, "sparse_wide", 120, seed=2))


@pytest.fixture(scope="module")
def multi_u8(make_symbols):
    stream = huffman_encode(make_symbols(np.uint8, "laplace32", 40_000, seed=3))
    assert ref.parse_huffman_stream(stream).num_streams == 4
    return stream


def expect_error(stream: bytes, fragment: str) -> None:
    with pytest.raises(ValueError, match="huffman_decode: argument 'stream'") as info:
        huffman_decode(stream)
    assert fragment in str(info.value), str(info.value)


# ---- each inconsistency, with its message -------------------------------------------------------


def test_header_errors(small_u8):
    s = small_u8
    n = HEADER.unpack_from(s)[5]
    expect_error(b"", "truncated stream")
    expect_error(s[:21], "truncated stream")
    expect_error(b"XXXX" + s[4:], "bad magic")
    expect_error(patch_header(s, version=3), "unsupported format version 3")
    expect_error(patch_header(s, dtype=3), "bad symbol dtype code 3")
    expect_error(patch_header(s, streams=0), "bad bitstream count 0")
    expect_error(patch_header(s, streams=17), "bad bitstream count 17")
    expect_error(patch_header(s, mode=2), "bad code-length table mode 2")
    expect_error(patch_header(s, entries=0), "bad code-length table size 0")
    expect_error(patch_header(s, count=2**63), "cannot fit")
    expect_error(patch_header(s, count=2**64 - 1), "cannot fit")
    expect_error(patch_header(s, count=n + 1), "bitstream 0")
    expect_error(patch_header(s, count=n - 1), "bitstream 0")
    expect_error(s + b"\x00", "trailing data")


def test_empty_stream_errors():
    empty = huffman_encode(np.zeros(0, np.uint8))
    expect_error(patch_header(empty, streams=1), "inconsistent header")
    expect_error(patch_header(empty, entries=1), "inconsistent header")
    expect_error(empty + b"\x00", "trailing data")


def test_code_length_table_errors(small_u8, small_u16_sparse):
    s = small_u8
    parsed = ref.parse_huffman_stream(s)
    assert parsed.table_mode == 0
    first = HEADER.unpack_from(s)[7]
    lengths = bytearray(s[22 : 22 + HEADER.unpack_from(s)[6]])
    # the most frequent symbol: shortening it oversubscribes, lengthening it leaves a hole
    top = int(np.argmin(np.where(parsed.lengths > 0, parsed.lengths, 99))) - first

    def with_lengths(new: bytearray) -> bytes:
        return s[:22] + bytes(new) + s[22 + len(new) :]

    shorter = bytearray(lengths)
    shorter[top] -= 1
    expect_error(with_lengths(shorter), "oversubscribed")
    longer = bytearray(lengths)
    longer[top] += 1
    expect_error(with_lengths(longer), "incomplete")
    too_long = bytearray(lengths)
    too_long[top] = 21
    expect_error(with_lengths(too_long), "exceeds the maximum 20")
    expect_error(with_lengths(bytearray(len(lengths))), "no symbol with a code")
    # a dense range past the dtype, and a table running past the buffer
    expect_error(patch_header(s, first=250), "beyond the dtype")
    expect_error(patch_header(s, entries=256, first=0)[: 22 + 100], "truncated code-length table")

    u = small_u16_sparse
    assert ref.parse_huffman_stream(u).table_mode == 1
    entries = HEADER.unpack_from(u)[6]
    table = bytearray(u[22 : 22 + 3 * entries])
    swapped = bytearray(table)
    swapped[0:3], swapped[3:6] = table[3:6], table[0:3]
    expect_error(u[:22] + bytes(swapped) + u[22 + len(table) :], "strictly increasing")
    zero_len = bytearray(table)
    zero_len[2] = 0
    expect_error(u[:22] + bytes(zero_len) + u[22 + len(table) :], "outside 1..20")
    expect_error(patch_header(u, first=5), "first symbol 0")
    expect_error(patch_header(u, entries=entries + 100), "truncated")


def test_single_symbol_stream_errors():
    s = huffman_encode(np.zeros(16, np.uint8))
    assert len(s) == 22 + 1 + 8 + 2
    expect_error(s[:-2] + b"\x80\x00", "no code")  # a '1' bit: the lone symbol's code is '0'
    expect_error(s[:22] + b"\x02" + s[23:], "single-symbol code must have length 1")
    bits_pos = 23
    expect_error(s[:bits_pos] + struct.pack("<Q", 17) + s[bits_pos + 8 :], "truncated")
    expect_error(s[:bits_pos] + struct.pack("<Q", 15) + s[bits_pos + 8 :], "bitstream 0")


def test_bitstream_size_errors(small_u8, make_symbols):
    s = small_u8
    parsed = ref.parse_huffman_stream(s)
    pos = len(s) - len(parsed.bitstreams[0]) - 8
    bits = parsed.stream_bits[0]
    expect_error(s[:pos] + struct.pack("<Q", bits + 64) + s[pos + 8 :], "truncated stream")
    expect_error(s[:pos] + struct.pack("<Q", 2**64 - 1) + s[pos + 8 :], "truncated stream")
    expect_error(s[:pos] + struct.pack("<Q", 0) + s[pos + 8 :], "cannot hold")
    # nonzero padding bits
    for seed in range(20):
        x = make_symbols(np.uint8, "laplace32", 301 + seed, seed=seed)
        t = huffman_encode(x)
        p = ref.parse_huffman_stream(t)
        if p.stream_bits[0] % 8:
            expect_error(t[:-1] + bytes([t[-1] | 1]), "nonzero padding")
            break
    else:
        pytest.fail("no stream with padding bits found")


# ---- fuzz-ish: truncation, bit flips, random bytes ----------------------------------------------


@pytest.mark.parametrize("which", ["small_u8", "small_u16_sparse", "multi_u8"])
def test_every_truncation_is_rejected(which, request):
    s = request.getfixturevalue(which)
    for cut in range(len(s)):
        with pytest.raises(ValueError):
            huffman_decode(s[:cut])


@pytest.mark.parametrize("which", ["small_u8", "small_u16_sparse"])
def test_every_single_bit_flip(which, request):
    s = request.getfixturevalue(which)
    for bit in range(8 * len(s)):
        corrupted = bytearray(s)
        corrupted[bit // 8] ^= 1 << (bit % 8)
        decode_or_value_error(bytes(corrupted))


def test_random_bit_flips_multistream(multi_u8):
    rng = np.random.default_rng(0)
    for _ in range(300):
        corrupted = bytearray(multi_u8)
        for bit in rng.integers(0, 8 * len(corrupted), rng.integers(1, 8)):
            corrupted[bit // 8] ^= 1 << (bit % 8)
        decode_or_value_error(bytes(corrupted))


def test_random_payload_behind_valid_header(multi_u8, small_u16_sparse):
    # garbage bitstreams that pass every header check exercise the decoder's fast loops
    rng = np.random.default_rng(1)
    for s in (multi_u8, small_u16_sparse):
        parsed = ref.parse_huffman_stream(s)
        payload = sum(len(b) for b in parsed.bitstreams)
        head = s[: len(s) - payload]
        for _ in range(100):
            body = rng.integers(0, 256, payload, dtype=np.uint8)
            decode_or_value_error(head + body.tobytes())


def test_random_bytes():
    rng = np.random.default_rng(2)
    for _ in range(2000):
        n = int(rng.integers(0, 200))
        decode_or_value_error(rng.integers(0, 256, n, dtype=np.uint8).tobytes())
    # random bytes behind a plausible prefix get further into the parser
    for _ in range(2000):
        n = int(rng.integers(0, 200))
        body = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        prefix = b"PSHF\x01" + bytes([int(rng.integers(1, 3)), int(rng.integers(0, 5)), int(rng.integers(0, 2))])
        decode_or_value_error(prefix + body)


def test_every_header_byte_value(small_u8):
    # every byte of header, table and sizes set to a few values
    parsed = ref.parse_huffman_stream(small_u8)
    structural = len(small_u8) - len(parsed.bitstreams[0])
    for pos in range(structural):
        for value in (0x00, 0x01, 0x7F, 0x80, 0xFF):
            corrupted = bytearray(small_u8)
            corrupted[pos] = value
            decode_or_value_error(bytes(corrupted))


# ---- wrong arguments ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.uint32, np.int64, np.float32, np.bool_])
def test_encode_rejects_dtype(dtype):
    from pyserve import _C

    x = np.zeros(10, dtype=dtype)
    for fn in (huffman_encode, _C.huffman_encode):
        with pytest.raises(ValueError, match=r"huffman_encode: argument 'symbols': expected dtype uint8 or uint16"):
            fn(x)


@pytest.mark.parametrize("shape", [(), (2, 3), (1, 1, 4)])
def test_encode_rejects_ndim(shape):
    from pyserve import _C

    x = np.zeros(shape, dtype=np.uint8)
    for fn in (huffman_encode, _C.huffman_encode):
        with pytest.raises(ValueError, match=r"huffman_encode: argument 'symbols': expected a 1-D array, got ndim="):
            fn(x)


def test_encode_rejects_other_types_and_native_checks_contiguity():
    from pyserve import _C

    for bad in ([1, 2, 3], b"abc", None, 3):
        with pytest.raises(ValueError, match="argument 'symbols'"):
            huffman_encode(bad)
    with pytest.raises(ValueError, match="argument 'symbols': expected a contiguous array"):
        _C.huffman_encode(np.zeros(10, np.uint16)[::2])
    with pytest.raises(ValueError, match="argument 'symbols': expected dtype uint8 or uint16"):
        _C.huffman_encode(np.zeros(4, ">u2"))


def test_decode_rejects_other_types():
    for bad in ("PSHF", 3, None, [1, 2], np.zeros(3, np.float64)[::2]):
        with pytest.raises(ValueError, match="huffman_decode: argument 'stream'"):
            huffman_decode(bad)
