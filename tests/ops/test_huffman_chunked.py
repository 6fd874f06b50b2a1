"""Huffman format version 2 (independently decodable chunks) and decoding on a CUDA device.

Host tests run everywhere; the CUDA tests (marked ``gpu``) compare ``huffman_decode(stream,
device="cuda")`` with the host decoder and the bit-by-bit reference on the same streams.
"""

from __future__ import annotations

import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from pyserve.ops import (
    HUFFMAN_FORMAT_VERSION_CHUNKED,
    HUFFMAN_MAX_CHUNK_SYMBOLS,
    huffman_decode,
    get_num_threads,
    huffman_encode,
    huffman_stream_info,
    set_num_threads,
)
from pyserve.ops import reference as ref

DTYPES = [np.uint8, np.uint16]
CHUNKS = [1, 3, 7, 64, 4096, 16384]


def skewed(dtype, size: int, seed: int = 0) -> np.ndarray:
    """Symbols whose counts grow like Fibonacci numbers: code lengths up to the 20-bit limit."""
    fib = [1, 1]
    while len(fib) < 26:
        fib.append(fib[-1] + fib[-2])
    counts = np.array(fib[:26], dtype=np.int64)
    rng = np.random.default_rng(seed)
    x = rng.choice(26, size=size, p=counts / counts.sum()).astype(dtype)
    return x * (3 if np.dtype(dtype).itemsize == 2 else 1)


def chunk_bits_offset(stream: bytes) -> tuple[int, int]:
    """(offset of the chunk-size field, number of chunks) of a version 2 stream."""
    parsed = ref.parse_huffman_stream(stream)
    payload = sum(len(b) for b in parsed.bitstreams)
    return len(stream) - payload - 4 * parsed.num_streams - 4, parsed.num_streams


# ---- host ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("size", [0, 1, 5, 1000, 40_001])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_chunked_round_trip_matches_reference(make_symbols, dtype, size, chunk):
    x = make_symbols(dtype, "laplace32", size, seed=size + chunk)
    stream = huffman_encode(x, chunk_symbols=chunk)
    assert stream[4] == HUFFMAN_FORMAT_VERSION_CHUNKED
    # byte-identical to the reference encoder with the native encoder's code lengths
    parsed = ref.parse_huffman_stream(stream)
    assert parsed.version == 2 and parsed.num_streams == -(-size // chunk)
    if size:
        assert stream == ref.huffman_encode_reference(x, lengths=parsed.lengths, chunk_symbols=chunk)
    y = huffman_decode(stream)
    assert y.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(y, x)
    if size <= 1000:
        np.testing.assert_array_equal(ref.huffman_decode_reference(stream), x)
    info = huffman_stream_info(stream)
    assert info == {"dtype": np.dtype(dtype).name, "count": size, "format_version": 2,
                    "num_chunks": -(-size // chunk), "chunk_symbols": chunk if size else 0}


def test_reference_chunked_streams_decode_natively(make_symbols):
    x = make_symbols(np.uint16, "geometric", 5000, seed=4)
    for chunk in (1, 2, 999, 5000, 70000):
        np.testing.assert_array_equal(huffman_decode(ref.huffman_encode_reference(x, chunk_symbols=chunk)), x)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_chunk_index_overhead_is_small(make_symbols, dtype):
    # 4 bytes of size plus < 1 byte of padding per chunk, against version 1's single bitstream
    x = make_symbols(dtype, "laplace32", 200_000, seed=9)
    v1 = huffman_encode(x)
    v1_one_stream = ref.huffman_encode_reference(x, lengths=ref.parse_huffman_stream(v1).lengths, num_streams=1)
    v2 = huffman_encode(x, chunk_symbols=16384)
    chunks = -(-x.size // 16384)
    extra = len(v2) - len(v1_one_stream)
    assert 4 * chunks - 8 <= extra <= 5 * chunks - 4
    assert extra / len(v1_one_stream) < 0.001


def test_long_codes_round_trip():
    for dtype in DTYPES:
        x = skewed(dtype, 60_000, seed=1)
        stream = huffman_encode(x, chunk_symbols=777)
        assert int(ref.parse_huffman_stream(stream).lengths.max()) > 11  # past the primary table
        np.testing.assert_array_equal(huffman_decode(stream), x)


def test_numpy_integer_chunk_symbols():
    x = np.arange(100, dtype=np.uint8)
    assert huffman_encode(x, chunk_symbols=np.int64(7)) == huffman_encode(x, chunk_symbols=7)
    with pytest.raises(ValueError, match="argument 'chunk_symbols'"):
        huffman_encode(x, chunk_symbols=np.int32(0))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_rejected_stream_allocates_little():
    # A v2 header announcing ~2 million 1-symbol chunks whose sizes do not fit: refused before the
    # per-chunk tables are allocated (they would take ~80 MB, ~10x the input). In a fresh process
    # whose address space is capped 48 MB above what it has mapped once the input is built.
    code = textwrap.dedent("""
        import resource, struct
        from pyserve.ops import huffman_decode
        size = 8 * 2**20
        chunks = (size - 31) // 4
        b = (b"PSHF" + bytes([2, 1, 0, 0]) + struct.pack("<QIH", chunks, 1, 0) + b"\\x01"
             + struct.pack("<I", 1) + struct.pack("<I", 1) * chunks)
        b += bytes(size - len(b))
        vm_kb = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmSize:"))
        cap = (vm_kb + 48 * 1024) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        try:
            huffman_decode(b)
        except ValueError as exc:
            assert "truncated stream: bitstream" in str(exc), exc
            print("refused")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "refused", out.stdout + out.stderr[-500:]


@pytest.mark.parametrize("bad", [0, -1, HUFFMAN_MAX_CHUNK_SYMBOLS + 1, 2**64, 1.5, "16", True])
def test_bad_chunk_symbols_names_the_argument(bad):
    with pytest.raises(ValueError, match="huffman_encode: argument 'chunk_symbols': expected None or an int in 1..16777216"):
        huffman_encode(np.zeros(10, np.uint8), chunk_symbols=bad)


def test_chunked_header_errors(make_symbols):
    x = make_symbols(np.uint8, "laplace32", 5000, seed=5)
    s = huffman_encode(x, chunk_symbols=1000)
    pos, chunks = chunk_bits_offset(s)
    assert chunks == 5 and struct.unpack_from("<I", s, pos)[0] == 1000

    def expect(stream, fragment):
        with pytest.raises(ValueError, match="huffman_decode: argument 'stream'") as info:
            huffman_decode(stream)
        assert fragment in str(info.value), str(info.value)

    expect(s[:6] + b"\x04" + s[7:], "bad bitstream count field 4")
    expect(s[:pos] + struct.pack("<I", 0) + s[pos + 4:], "bad chunk size 0")
    expect(s[:pos] + struct.pack("<I", 2**24 + 1) + s[pos + 4:], "bad chunk size 16777217")
    # a smaller chunk size needs more sizes than the buffer holds / a larger one leaves bytes over
    expect(s[:pos] + struct.pack("<I", 1) + s[pos + 4:], "truncated stream")
    expect(s[:pos] + struct.pack("<I", 5000) + s[pos + 4:], "")
    s10 = huffman_encode(x[:10], chunk_symbols=4)
    p10, _ = chunk_bits_offset(s10)
    expect(s10[:p10 + 2], "truncated stream: the chunk size needs 4 bytes")
    # moving one bit between two chunk sizes keeps the total: each chunk must still decode exactly
    b0, b1 = struct.unpack_from("<2I", s, pos + 4)
    moved = s[:pos + 4] + struct.pack("<2I", b0 + 1, b1 - 1) + s[pos + 12:]
    expect(moved, "bitstream ")
    expect(s + b"\x00", "trailing data")


def test_every_chunk_size_byte_value_is_safe(make_symbols):
    # every byte of the chunk-size field and sizes set to a few values: ValueError or the right data
    x = make_symbols(np.uint8, "laplace32", 3000, seed=6)
    s = huffman_encode(x, chunk_symbols=500)
    pos, chunks = chunk_bits_offset(s)
    for i in range(pos, pos + 4 + 4 * chunks):
        for v in (0, 1, 0x7F, 0xFF):
            bad = bytearray(s)
            bad[i] = v
            try:
                y = huffman_decode(bytes(bad))
            except ValueError as exc:
                assert str(exc).startswith("huffman_decode: argument 'stream': ")
            else:
                assert y.size <= 8 * len(bad)


@pytest.fixture
def threads():
    """threads(n) sets pyserve's thread count for one test and restores it afterwards."""
    before = get_num_threads()
    yield set_num_threads
    set_num_threads(before)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_threads_give_the_same_symbols_and_messages(make_symbols, dtype, threads):
    # 63 chunks = 4 blocks of 16 chunks decoded on different threads
    x = make_symbols(dtype, "geometric", 63 * 1000 - 5, seed=8)
    s = huffman_encode(x, chunk_symbols=1000)
    bits_pos, chunks = chunk_bits_offset(s)
    assert chunks == 63
    corrupt = []
    for chunk in (0, 17, 40, 62):  # move one bit between chunk `chunk` and its neighbour
        a = chunk if chunk < 62 else 61
        b0, b1 = struct.unpack_from("<2I", s, bits_pos + 4 + 4 * a)
        corrupt.append(s[:bits_pos + 4 + 4 * a] + struct.pack("<2I", b0 + 1, b1 - 1) + s[bits_pos + 12 + 4 * a:])
    payload0 = len(s) - sum(len(b) for b in ref.parse_huffman_stream(s).bitstreams)
    rng = np.random.default_rng(1)
    for _ in range(10):
        bad = bytearray(s)
        for i in rng.integers(payload0, len(s), 3):
            bad[int(i)] ^= 0xFF
        corrupt.append(bytes(bad))
    results = {}
    for n in (1, 2, 3):
        threads(n)
        np.testing.assert_array_equal(huffman_decode(s), x)
        outcome = []
        for stream in corrupt:
            try:
                outcome.append(huffman_decode(stream).tobytes())
            except ValueError as exc:
                outcome.append(str(exc))
        results[n] = outcome
    assert results[1] == results[2] == results[3]
    assert sum(isinstance(o, str) for o in results[1]) >= 4


def test_device_argument_errors():
    s = huffman_encode(np.arange(10, dtype=np.uint8), chunk_symbols=4)
    np.testing.assert_array_equal(huffman_decode(s, device="cpu"), np.arange(10))
    np.testing.assert_array_equal(huffman_decode(s, device=None), np.arange(10))
    np.testing.assert_array_equal(huffman_decode(s, device="cpu:0"), np.arange(10))
    np.testing.assert_array_equal(huffman_decode(s, device=torch.device("cpu", 0)), np.arange(10))
    for bad in ("gpu", "cuda:x", 3, "cuda:\u00b2", "cuda:\uff11", "cuda:99999999999999999999", "cpu:x"):
        with pytest.raises(ValueError, match="huffman_decode: argument 'device': expected None, 'cpu', 'cuda'"):
            huffman_decode(s, device=bad)


def test_cuda_device_without_a_gpu_is_a_clear_error():
    from tests.conftest import cuda_device_count

    if cuda_device_count() > 0:
        pytest.skip("a GPU is present (the gpu tests cover it)")
    with pytest.raises((ValueError, RuntimeError), match="huffman_decode: (argument 'device': 'cuda' is not a visible|device='cuda' needs)"):
        huffman_decode(huffman_encode(np.zeros(3, np.uint8)), device="cuda")


# ---- CUDA ------------------------------------------------------------------------------------------

torch = pytest.importorskip("torch")


def _gpu_decode(stream: bytes) -> np.ndarray:
    y = huffman_decode(stream, device="cuda")
    assert y.device.type == "cuda" and y.dim() == 1
    return y.cpu().numpy()


@pytest.mark.gpu
@pytest.mark.parametrize("chunk", [None, 1, 5, 1024, 16384])
@pytest.mark.parametrize("distribution", ["laplace32", "geometric", "uniform", "two_values"])
@pytest.mark.parametrize("size", [0, 1, 31, 50_001])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_cuda_decode_matches_host(make_symbols, dtype, size, distribution, chunk):
    x = make_symbols(dtype, distribution, size, seed=size + 1)
    stream = huffman_encode(x) if chunk is None else huffman_encode(x, chunk_symbols=chunk)
    y = _gpu_decode(stream)
    assert y.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(y, x)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_cuda_long_codes_and_one_symbol(dtype):
    x = skewed(dtype, 200_000, seed=2)
    for chunk in (None, 333, 16384):
        s = huffman_encode(x) if chunk is None else huffman_encode(x, chunk_symbols=chunk)
        np.testing.assert_array_equal(_gpu_decode(s), x)
    one = np.full(70_000, 7, dtype=dtype)
    np.testing.assert_array_equal(_gpu_decode(huffman_encode(one, chunk_symbols=4096)), one)


@pytest.mark.gpu
def test_cuda_large_stream():
    rng = np.random.default_rng(3)
    x = np.clip(np.round(rng.laplace(0, 3, 16_000_000)), -15, 16).astype(np.int64) + 15
    x = x.astype(np.uint8)
    s = huffman_encode(x, chunk_symbols=16384)
    np.testing.assert_array_equal(_gpu_decode(s), x)


@pytest.mark.gpu
def test_cuda_corrupt_stream_gives_the_host_message(make_symbols):
    x = make_symbols(np.uint8, "laplace32", 20_000, seed=7)
    s = huffman_encode(x, chunk_symbols=2000)
    pos, chunks = chunk_bits_offset(s)
    b0, b1 = struct.unpack_from("<2I", s, pos + 4)
    corrupt = [s[:pos + 4] + struct.pack("<2I", b0 + 1, b1 - 1) + s[pos + 12:]]
    rng = np.random.default_rng(0)
    payload0 = len(s) - sum(len(b) for b in ref.parse_huffman_stream(s).bitstreams)
    for _ in range(20):
        bad = bytearray(s)
        i = int(rng.integers(payload0, len(s)))
        bad[i] ^= 1 << int(rng.integers(0, 8))
        corrupt.append(bytes(bad))
    for stream in corrupt:
        try:
            host = huffman_decode(stream)
        except ValueError as exc:
            with pytest.raises(ValueError) as info:
                huffman_decode(stream, device="cuda")
            assert str(info.value) == str(exc)
        else:  # a flip that still decodes (one code for another of the same length)
            np.testing.assert_array_equal(_gpu_decode(stream), host)


@pytest.mark.gpu
def test_cuda_decode_on_a_torch_device_object():
    x = np.arange(1000, dtype=np.uint16) % 300
    y = huffman_decode(huffman_encode(x, chunk_symbols=100), device=torch.device("cuda", 0))
    assert y.dtype == torch.uint16 and y.device == torch.device("cuda", 0)
    np.testing.assert_array_equal(y.cpu().numpy(), x)
