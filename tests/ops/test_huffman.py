"""pyserve.ops Huffman coding: round trips, optimality and byte-exactness against the reference."""

from __future__ import annotations

import numpy as np
import pytest

from pyserve import _C
from pyserve.ops import (
    HUFFMAN_FORMAT_VERSION,
    HUFFMAN_MAX_CODE_LENGTH,
    huffman_decode,
    huffman_encode,
)
from pyserve.ops import reference as ref

DTYPES = [np.uint8, np.uint16]
DISTRIBUTIONS = ["laplace32", "uniform", "geometric", "two_values", "sparse_wide", "shifted"]
SIZES = [1, 2, 17, 1000, 40_000, 200_003]


def alphabet(dtype) -> int:
    return 1 << (8 * np.dtype(dtype).itemsize)


def kraft_ok(lengths: np.ndarray) -> bool:
    present = lengths[lengths > 0]
    if present.size == 1:
        return int(present[0]) == 1
    return sum(2 ** (HUFFMAN_MAX_CODE_LENGTH - int(n)) for n in present) == 2**HUFFMAN_MAX_CODE_LENGTH


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_round_trip(make_symbols, dtype, distribution, size):
    x = make_symbols(dtype, distribution, size, seed=size)
    stream = huffman_encode(x)
    y = huffman_decode(stream)
    assert y.dtype == np.dtype(dtype)
    assert y.shape == (size,)
    np.testing.assert_array_equal(y, x)


@pytest.mark.parametrize("size", [1, 17, 1000, 40_000])
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_matches_reference(make_symbols, dtype, distribution, size):
    x = make_symbols(dtype, distribution, size, seed=7 + size)
    stream = huffman_encode(x)
    parsed = ref.parse_huffman_stream(stream)
    lengths = parsed.lengths
    counts = np.bincount(x, minlength=alphabet(dtype))

    # only present symbols have codes; lengths are in range and form a complete code
    np.testing.assert_array_equal(lengths > 0, counts > 0)
    assert lengths.max() <= HUFFMAN_MAX_CODE_LENGTH
    assert kraft_ok(lengths)

    # optimal: the same total bits as a heap-built Huffman code when its lengths fit the limit
    huff = ref.huffman_code_lengths(counts)
    if huff.max() <= HUFFMAN_MAX_CODE_LENGTH:
        assert ref.total_bits(counts, lengths) == ref.total_bits(counts, huff)
    else:
        assert ref.total_bits(counts, lengths) >= ref.total_bits(counts, huff)
    assert sum(parsed.stream_bits) == ref.total_bits(counts, lengths)

    # the layout is exactly as documented: an independent encoder with the same lengths agrees
    assert ref.huffman_encode_reference(x, lengths=lengths) == stream
    # and an independent bit-at-a-time decoder reads the native stream (kept small: it is slow)
    if sum(parsed.stream_bits) <= 200_000:
        np.testing.assert_array_equal(ref.huffman_decode_reference(stream), x)


def test_reference_streams_decode_natively(make_symbols):
    # the other direction: streams built only by the reference, including stream counts the native
    # encoder never writes, decode natively
    x = make_symbols(np.uint8, "laplace32", 5000, seed=3)
    for num_streams in (1, 2, 3, 4, 5, 8, 16):
        stream = ref.huffman_encode_reference(x, num_streams=num_streams)
        np.testing.assert_array_equal(huffman_decode(stream), x)
    x16 = make_symbols(np.uint16, "sparse_wide", 3000, seed=4)
    np.testing.assert_array_equal(huffman_decode(ref.huffman_encode_reference(x16, num_streams=7)), x16)


def fibonacci_counts(m: int) -> np.ndarray:
    f = [1, 1]
    while len(f) < m:
        f.append(f[-1] + f[-2])
    return np.array(f[:m], dtype=np.int64)


@pytest.mark.parametrize("m", [22, 26, 30])
def test_length_limit_is_optimal(m):
    # Fibonacci counts give an unconstrained Huffman code of depth m-1 > 20: the limit binds
    counts = fibonacci_counts(m)
    x = np.random.default_rng(m).permutation(np.repeat(np.arange(m, dtype=np.uint8), counts))
    stream = huffman_encode(x)
    lengths = ref.parse_huffman_stream(stream).lengths
    full = np.bincount(x, minlength=256)
    assert ref.huffman_code_lengths(full).max() == m - 1
    assert lengths.max() == HUFFMAN_MAX_CODE_LENGTH
    assert kraft_ok(lengths)
    assert ref.total_bits(full, lengths) == ref.total_bits(full, ref.package_merge_code_lengths(full, 20))
    np.testing.assert_array_equal(huffman_decode(stream), x)


def test_long_codes_take_the_slow_path_correctly():
    # many symbols with codes longer than the 11-bit primary table, interleaved with short ones
    rng = np.random.default_rng(11)
    counts = np.concatenate([[200_000, 100_000], np.full(3000, 3)])
    x = rng.permutation(np.repeat(np.arange(counts.size, dtype=np.uint16), counts))
    stream = huffman_encode(x)
    lengths = ref.parse_huffman_stream(stream).lengths
    assert lengths.max() > 11
    np.testing.assert_array_equal(huffman_decode(stream), x)


# ---- edge cases ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_empty(dtype):
    stream = huffman_encode(np.zeros(0, dtype=dtype))
    assert len(stream) == 22
    assert stream[:5] == b"PSHF" + bytes([HUFFMAN_FORMAT_VERSION])
    y = huffman_decode(stream)
    assert y.dtype == np.dtype(dtype) and y.shape == (0,)


@pytest.mark.parametrize("size", [1, 7, 8, 9, 1000, 40_000, 100_001])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_single_distinct_symbol_gets_one_bit(dtype, size):
    value = np.iinfo(dtype).max
    x = np.full(size, value, dtype=dtype)
    stream = huffman_encode(x)
    parsed = ref.parse_huffman_stream(stream)
    assert parsed.lengths[value] == 1 and np.count_nonzero(parsed.lengths) == 1
    assert sum(parsed.stream_bits) == size
    np.testing.assert_array_equal(huffman_decode(stream), x)


def test_all_65536_symbols():
    rng = np.random.default_rng(5)
    x = np.concatenate([np.arange(65536), rng.integers(0, 256, 200_000)]).astype(np.uint16)
    x = rng.permutation(x)
    stream = huffman_encode(x)
    parsed = ref.parse_huffman_stream(stream)
    assert np.count_nonzero(parsed.lengths) == 65536
    assert parsed.table_mode == 0
    assert kraft_ok(parsed.lengths)
    np.testing.assert_array_equal(huffman_decode(stream), x)


def test_all_256_byte_values():
    x = np.arange(256, dtype=np.uint8)
    stream = huffman_encode(x)
    assert (ref.parse_huffman_stream(stream).lengths == 8).all()
    np.testing.assert_array_equal(huffman_decode(stream), x)


@pytest.mark.parametrize("size", [32_767, 32_768, 32_769])
def test_stream_count_threshold(make_symbols, size):
    x = make_symbols(np.uint8, "laplace32", size)
    stream = huffman_encode(x)
    assert ref.parse_huffman_stream(stream).num_streams == (1 if size < 32_768 else 4)
    np.testing.assert_array_equal(huffman_decode(stream), x)


def test_large_stream_round_trip(make_symbols):
    x = make_symbols(np.uint8, "laplace32", 3_000_000, seed=9)
    np.testing.assert_array_equal(huffman_decode(huffman_encode(x)), x)


def test_compresses_skewed_indices_near_entropy(make_symbols):
    x = make_symbols(np.uint8, "laplace32", 1_000_000)
    p = np.bincount(x) / x.size
    entropy_bits = -(p[p > 0] * np.log2(p[p > 0])).sum() * x.size
    payload_bits = 8 * len(huffman_encode(x))
    assert entropy_bits <= payload_bits <= 1.02 * entropy_bits + 8 * 200


# ---- input forms --------------------------------------------------------------------------------


def test_non_contiguous_and_byte_swapped_inputs(make_symbols):
    x = make_symbols(np.uint16, "laplace32", 5001)
    np.testing.assert_array_equal(huffman_decode(huffman_encode(x[::3])), x[::3])
    swapped = x.astype(">u2")
    assert huffman_encode(swapped) == huffman_encode(x)


def test_bytes_like_streams(make_symbols):
    x = make_symbols(np.uint8, "geometric", 3000)
    stream = huffman_encode(x)
    for form in (stream, bytearray(stream), memoryview(stream), np.frombuffer(stream, np.uint8)):
        np.testing.assert_array_equal(huffman_decode(form), x)
    np.testing.assert_array_equal(huffman_decode(memoryview(b"xx" + stream)[2:]), x)


@pytest.mark.parametrize("dtype_name", ["uint8", "uint16"])
def test_torch_cpu_tensors(make_symbols, dtype_name):
    torch = pytest.importorskip("torch")
    x = make_symbols(np.dtype(dtype_name), "laplace32", 4096)
    t = torch.from_numpy(x.astype(np.int32)).to(getattr(torch, dtype_name))
    assert huffman_encode(t) == huffman_encode(x)


def test_native_module_direct(make_symbols):
    x = make_symbols(np.uint8, "laplace32", 100)
    assert _C.huffman_encode(x) == huffman_encode(x)
    np.testing.assert_array_equal(_C.huffman_decode(_C.huffman_encode(x)), x)


def test_decoded_array_is_writable_and_owned():
    y = huffman_decode(huffman_encode(np.arange(10, dtype=np.uint8)))
    assert y.flags.writeable and y.flags.c_contiguous and y.flags.owndata


def test_threads_share_nothing(make_symbols):
    # the GIL is released inside the kernels: concurrent calls must not interfere
    from concurrent.futures import ThreadPoolExecutor

    inputs = [make_symbols(np.uint8 if i % 2 else np.uint16, "laplace32", 50_000 + i, seed=i) for i in range(8)]
    with ThreadPoolExecutor(4) as pool:
        streams = list(pool.map(huffman_encode, inputs))
        outputs = list(pool.map(huffman_decode, streams))
    for x, s, y in zip(inputs, streams, outputs):
        assert s == huffman_encode(x)
        np.testing.assert_array_equal(y, x)
