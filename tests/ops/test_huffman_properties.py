"""Hypothesis property tests for pyserve.ops Huffman coding (issue 3).

Properties, for arbitrary 1-D uint8 / uint16 arrays (one-symbol and all-65536-symbol alphabets
included):
  * ``huffman_decode(huffman_encode(x))`` is ``x`` (values, dtype, length);
  * the bit-at-a-time reference decoder (``pyserve.ops.reference``) reads the native stream to ``x``
    too, so the stream follows the documented layout and not merely the native decoder;
  * any mutation of a valid stream (bit flips, byte overwrites, truncation, insertion, deletion,
    header-field changes, random tails) either raises ValueError naming the argument or returns a
    1-D uint8/uint16 array; never another exception, a crash or a hang.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pyserve.ops import huffman_decode, huffman_encode
from pyserve.ops import reference as ref

PROPERTY_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = [np.uint8, np.uint16]


def _symbols(dtype, max_size: int = 3000):
    """Arrays of ``dtype`` whose values come either from the whole range or from a few symbols
    (the skewed, small-alphabet case that quantized indices produce)."""
    info = np.iinfo(dtype)
    wide = st.integers(int(info.min), int(info.max))
    narrow = st.sampled_from([0, 1, 2, 3, int(info.max)])
    elements = st.one_of(wide, narrow)
    return hnp.arrays(dtype, st.integers(0, max_size), elements=elements)


def _assert_same(y: np.ndarray, x: np.ndarray) -> None:
    assert isinstance(y, np.ndarray)
    assert y.dtype == x.dtype
    assert y.shape == x.shape
    np.testing.assert_array_equal(y, x)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@PROPERTY_SETTINGS
@given(data=st.data())
def test_round_trip_arbitrary(dtype, data):
    x = data.draw(_symbols(dtype), label="symbols")
    stream = huffman_encode(x)
    _assert_same(huffman_decode(stream), x)
    if x.size <= 1500:  # the reference decoder is pure Python, bit by bit
        _assert_same(ref.huffman_decode_reference(stream), x)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@PROPERTY_SETTINGS
@given(data=st.data())
def test_round_trip_chunked(dtype, data):
    x = data.draw(_symbols(dtype), label="symbols")
    chunk = data.draw(st.integers(1, max(1, 2 * x.size)), label="chunk_symbols")
    stream = huffman_encode(x, chunk_symbols=chunk)
    _assert_same(huffman_decode(stream), x)
    if x.size <= 1500:
        _assert_same(ref.huffman_decode_reference(stream), x)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_chunked_stream_is_value_error_or_array(dtype, data):
    x = data.draw(_symbols(dtype, max_size=5000), label="symbols")
    stream = huffman_encode(x, chunk_symbols=data.draw(st.integers(1, 700), label="chunk_symbols"))
    mutated = data.draw(_mutation(stream), label="mutated")
    _decode_or_value_error(mutated)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@PROPERTY_SETTINGS
@given(size=st.integers(1, 100_000), data=st.data())
def test_round_trip_one_symbol_alphabet(dtype, size, data):
    value = data.draw(st.integers(0, int(np.iinfo(dtype).max)), label="value")
    x = np.full(size, value, dtype=dtype)
    stream = huffman_encode(x)
    _assert_same(huffman_decode(stream), x)
    # One distinct symbol takes a 1-bit code: ~size/8 bytes of payload plus a bounded header.
    assert len(stream) <= size // 8 + 256


@settings(max_examples=25, deadline=None)
@given(extra=hnp.arrays(np.uint16, st.integers(0, 20_000), elements=st.integers(0, 65535)),
       seed=st.integers(0, 2**32 - 1), skew=st.booleans())
def test_round_trip_all_65536_symbols(extra, seed, skew):
    """Every uint16 value present at least once, in a shuffled order, plus arbitrary extra symbols
    (optionally a heavy repetition of a few, which stretches the longest codes to the limit)."""
    rng = np.random.default_rng(seed)
    parts = [np.arange(65536, dtype=np.uint16), extra]
    if skew:
        parts.append(np.repeat(np.array([7, 40_000], dtype=np.uint16), 200_000))
    x = np.concatenate(parts)
    rng.shuffle(x)
    assert np.unique(x).size == 65536
    _assert_same(huffman_decode(huffman_encode(x)), x)


def _decode_or_value_error(stream: bytes) -> None:
    try:
        y = huffman_decode(stream)
    except ValueError as exc:
        assert str(exc).startswith("huffman_decode: argument 'stream': "), str(exc)
        return
    assert isinstance(y, np.ndarray) and y.ndim == 1
    assert y.dtype in (np.dtype(np.uint8), np.dtype(np.uint16))


_HEADER = struct.Struct("<4sBBBBQIH")  # magic, version, dtype, S, T, N, A, F (docs: pyserve/ops/huffman.py)


@st.composite
def _mutation(draw, stream: bytes) -> bytes:
    b = bytearray(stream)
    n = len(b)
    kind = draw(st.sampled_from(["flip", "overwrite", "truncate", "insert", "delete", "header", "tail", "multi"]))
    if kind in ("flip", "multi") and n:
        for _ in range(draw(st.integers(1, 1 if kind == "flip" else 16))):
            bit = draw(st.integers(0, 8 * n - 1))
            b[bit // 8] ^= 1 << (bit % 8)
    elif kind == "overwrite" and n:
        at = draw(st.integers(0, n - 1))
        new = draw(st.binary(min_size=1, max_size=8))
        b[at:at + len(new)] = new[: n - at]
    elif kind == "truncate":
        del b[draw(st.integers(0, max(n - 1, 0))):]
    elif kind == "insert":
        at = draw(st.integers(0, n))
        b[at:at] = draw(st.binary(min_size=1, max_size=32))
    elif kind == "delete" and n:
        at = draw(st.integers(0, n - 1))
        del b[at:at + draw(st.integers(1, 32))]
    elif kind == "header" and n >= _HEADER.size:
        # Overwrite one header field (dtype, stream count, mode, symbol count, entries, first) with
        # an arbitrary value of its width: the lengths and counts the decoder must not trust.
        fields = list(_HEADER.unpack_from(b))
        i = draw(st.integers(1, len(fields) - 1))
        width = {1: 8, 2: 8, 3: 8, 4: 8, 5: 64, 6: 32, 7: 16}[i]
        fields[i] = draw(st.integers(0, 2**width - 1))
        _HEADER.pack_into(b, 0, *fields)
    else:  # "tail", or a mutation that does not apply to an empty stream
        b += draw(st.binary(min_size=1, max_size=64))
    return bytes(b)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_stream_is_value_error_or_array(dtype, data):
    x = data.draw(_symbols(dtype, max_size=5000), label="symbols")
    stream = huffman_encode(x)
    mutated = data.draw(_mutation(stream), label="mutated")
    _decode_or_value_error(mutated)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_are_value_error_or_array(blob):
    _decode_or_value_error(blob)
