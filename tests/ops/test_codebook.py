"""Index packing and codebook_linear against the bit-by-bit / float64 references."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pyserve.ops import codebook_linear, pack_indices, unpack_indices
from pyserve.ops.reference import (
    codebook_linear_reference,
    pack_indices_reference,
    unpack_indices_reference,
)

EPS32 = float(np.finfo(np.float32).eps)
ALL_BITS = list(range(2, 9))


def _codes(N, K, bits, seed):
    return np.random.default_rng(seed).integers(0, 2**bits, (N, K)).astype(np.uint8)


def _assert_close(y, x, idx, codebook, bias=None):
    """fp32 summation in another order than float64: bound by K * eps * sum |x * w| (+ |bias|)."""
    ref = codebook_linear_reference(x, idx, codebook, bias)
    absdot = codebook_linear_reference(np.abs(x), idx, np.abs(codebook))
    K = max(np.asarray(x).shape[1], 1)
    bound = (K + 2) * EPS32 * absdot + (0 if bias is None else 2 * EPS32 * np.abs(np.asarray(bias))[None, :])
    y = np.asarray(y, np.float64)
    assert y.shape == ref.shape
    assert np.all(np.abs(y - ref) <= bound + 1e-30)
    # and in practice far tighter than the worst case:
    scale = max(1.0, float(np.abs(ref).max(initial=0)))
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5 * scale)


# --- pack / unpack --------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("N,K", [(1, 1), (3, 7), (2, 31), (5, 32), (4, 33), (2, 100), (0, 9), (3, 0)])
def test_pack_matches_bitwise_reference(bits, N, K):
    idx = _codes(N, K, bits, bits * 100 + K)
    packed = pack_indices(idx, bits)
    assert packed.dtype == np.uint8 and packed.shape == (N, (K * bits + 7) // 8)
    np.testing.assert_array_equal(packed, pack_indices_reference(idx, bits))
    np.testing.assert_array_equal(unpack_indices(packed, bits, K), idx)
    np.testing.assert_array_equal(unpack_indices_reference(packed, bits, K), idx)


def test_pack_layout_by_hand():
    # 3-bit codes 1, 2, 7: bits LSB first 100 010 111 -> byte0 = 0b11010001, byte1 = 0b1
    np.testing.assert_array_equal(pack_indices(np.array([[1, 2, 7]], np.uint8), 3), [[0b11010001, 0b1]])
    np.testing.assert_array_equal(pack_indices(np.array([[1, 15, 3]], np.uint8), 4), [[0xF1, 0x03]])
    np.testing.assert_array_equal(pack_indices(np.array([[3, 0, 1, 2, 1]], np.uint8), 2), [[0b10010011, 0b01]])


@pytest.mark.parametrize("bits", [4, 5, 8])
def test_unpack_ignores_padding_bits(bits):
    idx = _codes(2, 3, bits, 1)
    packed = pack_indices(idx, bits)
    if (3 * bits) % 8:
        packed[:, -1] |= np.uint8(0xFF << ((3 * bits) % 8) & 0xFF)
    np.testing.assert_array_equal(unpack_indices(packed, bits, 3), idx)


def test_pack_torch_and_noncontiguous():
    idx = torch.from_numpy(_codes(20, 11, 5, 2)).t()  # [11, 20] non-contiguous
    packed = pack_indices(idx, 5)
    assert isinstance(packed, torch.Tensor) and packed.dtype == torch.uint8
    np.testing.assert_array_equal(packed.numpy(), pack_indices_reference(idx.numpy(), 5))
    back = unpack_indices(packed, 5, 20)
    assert isinstance(back, torch.Tensor)
    assert torch.equal(back, idx.contiguous())


@settings(max_examples=150, deadline=None)
@given(data=st.data(), bits=st.integers(2, 8))
def test_pack_roundtrip_property(data, bits):
    shape = data.draw(hnp.array_shapes(min_dims=2, max_dims=2, min_side=0, max_side=70))
    idx = data.draw(hnp.arrays(np.uint8, shape, elements=st.integers(0, 2**bits - 1)))
    packed = pack_indices(idx, bits)
    assert packed.shape == (shape[0], (shape[1] * bits + 7) // 8)
    np.testing.assert_array_equal(unpack_indices(packed, bits, shape[1]), idx)
    if idx.size <= 300:
        np.testing.assert_array_equal(packed, pack_indices_reference(idx, bits))


@settings(max_examples=100, deadline=None)
@given(data=st.data(), bits=st.integers(2, 8))
def test_unpack_pack_roundtrip_property(data, bits):
    """Any bytes unpack; repacking reproduces them except the (zeroed) padding bits."""
    N = data.draw(st.integers(0, 5))
    K = data.draw(st.integers(0, 60))
    rb = (K * bits + 7) // 8
    packed = data.draw(hnp.arrays(np.uint8, (N, rb)))
    idx = unpack_indices(packed, bits, K)
    assert idx.max(initial=0) < 2**bits
    repacked = pack_indices(idx, bits)
    pad = (8 - (K * bits) % 8) % 8
    mask = np.full(rb, 0xFF, np.uint8)
    if rb and pad:
        mask[-1] = 0xFF >> pad
    np.testing.assert_array_equal(repacked, packed & mask)


# --- codebook_linear ------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("B", [0, 1, 2, 3, 8])
@pytest.mark.parametrize("K,N", [(1, 1), (7, 3), (33, 5), (100, 17), (300, 4)])
@pytest.mark.parametrize("per_channel", [False, True], ids=["per-layer", "per-channel"])
def test_codebook_linear_matches_reference(bits, B, K, N, per_channel):
    rng = np.random.default_rng(bits * 1000 + B * 10 + K)
    x = rng.standard_normal((B, K)).astype(np.float32)
    idx = _codes(N, K, bits, K + N)
    shape = (N, 2**bits) if per_channel else (2**bits,)
    codebook = rng.standard_normal(shape).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32) if (B + K) % 2 else None
    y = codebook_linear(x, pack_indices(idx, bits), codebook, bits, bias)
    assert isinstance(y, np.ndarray) and y.dtype == np.float32 and y.shape == (B, N)
    _assert_close(y, x, idx, codebook, bias)


@pytest.mark.parametrize("bits", [4, 5])
@pytest.mark.parametrize("B", [1, 8])
def test_codebook_linear_bert_shape(bits, B):
    rng = np.random.default_rng(bits + B)
    x = rng.standard_normal((B, 768)).astype(np.float32)
    idx = _codes(3072, 768, bits, 3)
    codebook = np.sort(rng.standard_normal(2**bits)).astype(np.float32) * np.float32(0.05)
    bias = rng.standard_normal(3072).astype(np.float32)
    y = codebook_linear(x, pack_indices(idx, bits), codebook, bits, bias)
    _assert_close(y, x, idx, codebook, bias)
    dense = torch.nn.functional.linear(torch.from_numpy(x), torch.from_numpy(codebook[idx]), torch.from_numpy(bias))
    np.testing.assert_allclose(y, dense.numpy(), rtol=1e-4, atol=1e-4)


# K around the block sizes of the AVX2 paths (4 bits: 64 codes; 5 bits: 32 codes in 20 bytes, the
# last blocks of a row read through a padded copy; 2, 3 bits: 32) and their tails.
_BLOCK_KS = [31, 32, 33, 63, 64, 65, 95, 96, 97, 127, 128, 129, 160, 191, 200]


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("K", _BLOCK_KS)
@pytest.mark.parametrize("per_channel", [False, True], ids=["per-layer", "per-channel"])
def test_codebook_linear_decodes_every_weight_exactly(bits, K, per_channel):
    """x = identity [K, K] (the B > 1 path): y = W.T bit for bit, because each output is one
    product by 1.0 plus zeros, in any summation order. Full-mantissa codebook values, so every
    byte of every weight is checked (the 4-/5-bit paths assemble weights from byte planes), and a
    weight paired with the wrong activation shows up as a swapped entry."""
    rng = np.random.default_rng(K * 16 + bits)
    N = 5
    idx = _codes(N, K, bits, K + bits)
    idx[0] = np.arange(K) % 2**bits  # every code at every position modulo the block size
    shape = (N, 2**bits) if per_channel else (2**bits,)
    codebook = rng.standard_normal(shape).astype(np.float32)
    W = codebook[np.arange(N)[:, None], idx] if per_channel else codebook[idx]
    y = codebook_linear(np.eye(K, dtype=np.float32), pack_indices(idx, bits), codebook, bits)
    np.testing.assert_array_equal(y, W.T)


@pytest.mark.parametrize("bits", [2, 3, 4, 5])
@pytest.mark.parametrize("K", _BLOCK_KS)
@pytest.mark.parametrize("per_channel", [False, True], ids=["per-layer", "per-channel"])
def test_codebook_linear_b1_decodes_every_weight_exactly(bits, K, per_channel):
    """B = 1 (the fused lookup-and-FMA path): x = e_k gives column k of W bit for bit, for every k."""
    rng = np.random.default_rng(K * 16 + bits + 1)
    N = 4
    idx = _codes(N, K, bits, K + bits + 1)
    idx[0] = np.arange(K) % 2**bits
    shape = (N, 2**bits) if per_channel else (2**bits,)
    codebook = rng.standard_normal(shape).astype(np.float32)
    W = codebook[np.arange(N)[:, None], idx] if per_channel else codebook[idx]
    packed = pack_indices(idx, bits)
    x = np.zeros((1, K), np.float32)
    for k in range(K):
        x[0, :] = 0
        x[0, k] = 1
        np.testing.assert_array_equal(codebook_linear(x, packed, codebook, bits)[0], W[:, k], err_msg=f"k={k}")


def test_codebook_linear_empty_k():
    y = codebook_linear(np.zeros((2, 0), np.float32), np.zeros((3, 0), np.uint8), np.ones(4, np.float32), 2,
                        np.arange(3, dtype=np.float32))
    np.testing.assert_array_equal(y, np.tile(np.arange(3, dtype=np.float32), (2, 1)))


def test_codebook_linear_torch_and_noncontiguous():
    rng = np.random.default_rng(9)
    xb = rng.standard_normal((40, 6)).astype(np.float32)
    x = torch.from_numpy(xb).t()  # [6, 40] non-contiguous
    idx = _codes(9, 40, 3, 4)
    packed = torch.from_numpy(pack_indices(idx, 3))
    codebook = torch.from_numpy(rng.standard_normal((9, 16)).astype(np.float32))[:, ::2]  # [9, 8] strided
    bias = torch.from_numpy(rng.standard_normal(18).astype(np.float32))[::2]
    y = codebook_linear(x, packed, codebook, 3, bias)
    assert isinstance(y, torch.Tensor) and y.dtype == torch.float32 and y.shape == (6, 9)
    _assert_close(y.numpy(), xb.T, idx, codebook.numpy(), bias.numpy())
    y2 = codebook_linear(np.ascontiguousarray(xb.T), packed, codebook, 3, bias)
    assert isinstance(y2, np.ndarray)
    np.testing.assert_array_equal(y2, y.numpy())


_SUBPROCESS_CHECK = textwrap.dedent(
    """
    import numpy as np
    from pyserve.ops import codebook_linear, pack_indices, unpack_indices
    from pyserve.ops.reference import codebook_linear_reference
    rng = np.random.default_rng(12)
    for bits in range(2, 9):
        shapes = [(1, 777, 300, False), (9, 261, 129, True), (2, 5, 3, False)]
        if bits in (2, 4, 5, 8):  # one of each kernel path, above the 2**22-MAC threshold for going parallel
            shapes += [(1, 2050, 2100, bits % 4 == 0), (8, 1030, 600, bits % 4 != 0)]
        for B, K, N, pc in shapes:
            x = rng.standard_normal((B, K)).astype(np.float32)
            idx = rng.integers(0, 2**bits, (N, K)).astype(np.uint8)
            cb = rng.standard_normal((N, 2**bits) if pc else 2**bits).astype(np.float32)
            packed = pack_indices(idx, bits)
            assert (unpack_indices(packed, bits, K) == idx).all()
            y = codebook_linear(x, packed, cb, bits)
            np.testing.assert_allclose(y, codebook_linear_reference(x, idx, cb), rtol=1e-4, atol=1e-4)
    print("ok")
    """
)


@pytest.mark.parametrize(
    "env",
    [{"OMP_NUM_THREADS": "1"}, {"OMP_NUM_THREADS": "2"}, {"OMP_NUM_THREADS": "2", "PYSERVE_DISABLE_AVX2": "1"}],
    ids=["1-thread", "2-threads", "portable"],
)
def test_codebook_threads_and_portable_path(env):
    out = subprocess.run(
        [sys.executable, "-c", _SUBPROCESS_CHECK], env={**os.environ, **env}, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


# --- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [0, 1, 9, 16, -3])
def test_bits_out_of_range(bits):
    idx = np.zeros((2, 4), np.uint8)
    for call in (
        lambda: pack_indices(idx, bits),
        lambda: unpack_indices(np.zeros((2, 4), np.uint8), bits, 4),
        lambda: codebook_linear(np.zeros((1, 4), np.float32), np.zeros((2, 4), np.uint8), np.zeros(4, np.float32), bits),
    ):
        with pytest.raises(ValueError, match=rf"argument 'bits': expected an integer in 2\.\.8, got {bits}"):
            call()


def test_bits_not_int():
    with pytest.raises(ValueError, match="argument 'bits': expected an int, got float"):
        pack_indices(np.zeros((1, 1), np.uint8), 4.0)


@pytest.mark.parametrize(
    "idx,bits,words",
    [
        (np.array([[0, 4, 1]], np.uint8), 2, ["0..3", "got 4 at [0, 1]"]),
        (np.array([[0, 1], [2, 200]], np.uint8), 7, ["0..127", "got 200 at [1, 1]"]),
        (np.zeros((2, 3), np.int64), 4, ["uint8", "int64"]),
        (np.zeros(5, np.uint8), 4, ["2-D", "ndim=1"]),
    ],
)
def test_pack_bad_input(idx, bits, words):
    with pytest.raises(ValueError) as info:
        pack_indices(idx, bits)
    message = str(info.value)
    assert "pack_indices: argument 'idx'" in message
    for word in words:
        assert word in message, message


def test_unpack_short_and_long_rows():
    with pytest.raises(ValueError, match=r"argument 'packed'.*ceil\(K \* bits / 8\) = 4 .*K = 7, bits = 4.*\(2, 3\).*too short"):
        unpack_indices(np.zeros((2, 3), np.uint8), 4, 7)
    with pytest.raises(ValueError, match=r"argument 'packed'.*= 4 .*\(2, 5\).*too long"):
        unpack_indices(np.zeros((2, 5), np.uint8), 4, 7)
    with pytest.raises(ValueError, match=r"argument 'K': expected K >= 0, got -1"):
        unpack_indices(np.zeros((2, 0), np.uint8), 4, -1)


def _linear_args():
    x = np.zeros((2, 10), np.float32)
    packed = pack_indices(np.zeros((3, 10), np.uint8), 4)  # [3, 5]
    return x, packed, np.zeros(16, np.float32), np.zeros(3, np.float32)


@pytest.mark.parametrize(
    "case,arg,words",
    [
        ("x_f64", "x", ["float32", "float64"]),
        ("x_3d", "x", ["2-D", "ndim=3"]),
        ("k_mismatch", "packed", ["= 6 bytes", "K = 11", "(3, 5)", "too short"]),
        ("short_rows", "packed", ["= 5 bytes", "(3, 4)", "too short"]),
        ("packed_int8", "packed", ["uint8", "int8"]),
        ("cb_short", "codebook", ["(16,)", "(3, 16)", "got shape (8,)"]),
        ("cb_rows", "codebook", ["(3, 16)", "got shape (4, 16)"]),
        ("cb_3d", "codebook", ["1-D", "ndim=3"]),
        ("cb_f64", "codebook", ["float32", "float64"]),
        ("bias_len", "bias", ["(3,)", "(4,)"]),
        ("bias_i32", "bias", ["float32", "int32"]),
    ],
)
def test_codebook_linear_bad_input(case, arg, words):
    x, packed, cb, bias = _linear_args()
    if case == "x_f64":
        x = x.astype(np.float64)
    elif case == "x_3d":
        x = x[None]
    elif case == "k_mismatch":
        x = np.zeros((2, 11), np.float32)
    elif case == "short_rows":
        packed = packed[:, :4]
    elif case == "packed_int8":
        packed = packed.astype(np.int8)
    elif case == "cb_short":
        cb = cb[:8]
    elif case == "cb_rows":
        cb = np.zeros((4, 16), np.float32)
    elif case == "cb_3d":
        cb = np.zeros((3, 16, 1), np.float32)
    elif case == "cb_f64":
        cb = cb.astype(np.float64)
    elif case == "bias_len":
        bias = np.zeros(4, np.float32)
    elif case == "bias_i32":
        bias = bias.astype(np.int32)
    with pytest.raises(ValueError) as info:
        codebook_linear(x, packed, cb, 4, bias)
    message = str(info.value)
    assert "codebook_linear" in message and f"argument '{arg}'" in message, message
    for word in words:
        assert word in message, message


# --- CUDA -----------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [2, 4, 5, 8])
@pytest.mark.parametrize("B,K,N", [(1, 768, 3072), (8, 33, 7), (20, 3072, 768), (0, 4, 2)])
@pytest.mark.parametrize("per_channel", [False, True])
def test_codebook_linear_cuda_matches_cpu(bits, B, K, N, per_channel):
    rng = np.random.default_rng(bits + B + K)
    x = rng.standard_normal((B, K)).astype(np.float32)
    packed = pack_indices(_codes(N, K, bits, 5), bits)
    cb = rng.standard_normal((N, 2**bits) if per_channel else 2**bits).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    cpu = codebook_linear(x, packed, cb, bits, bias)
    dev = torch.device("cuda")
    y = codebook_linear(torch.from_numpy(x).to(dev), torch.from_numpy(packed).to(dev), torch.from_numpy(cb).to(dev),
                        bits, torch.from_numpy(bias).to(dev))
    assert y.device.type == "cuda"
    np.testing.assert_allclose(y.cpu().numpy(), cpu, rtol=1e-4, atol=1e-4)


def _reference_f64(x, packed, cb, bits, K, bias=None):
    idx = unpack_indices(packed, bits, K).astype(np.int64)
    w = np.take_along_axis(cb.astype(np.float64), idx, axis=1) if cb.ndim == 2 else cb.astype(np.float64)[idx]
    y = x.astype(np.float64) @ w.T
    return y if bias is None else y + bias


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("B,K,N", [(1, 1, 1), (1, 7, 9), (8, 8, 8), (9, 9, 17), (17, 63, 3), (3, 65, 33),
                                    (2, 257, 1), (40, 300, 10)])
@pytest.mark.parametrize("per_channel", [False, True])
def test_codebook_linear_cuda_tile_edges_match_float64_reference(bits, B, K, N, per_channel):
    # Warp per output row (8 per block), groups of 8 codes = `bits` bytes per lane, batch chunks
    # of 8: K not a multiple of 8 leaves a partial last group (the row's last byte partly used).
    rng = np.random.default_rng(bits * 100 + K)
    x = rng.standard_normal((B, K)).astype(np.float32)
    packed = pack_indices(_codes(N, K, bits, 5), bits)
    cb = rng.standard_normal((N, 2**bits) if per_channel else 2**bits).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    dev = torch.device("cuda")
    y = codebook_linear(torch.from_numpy(x).to(dev), torch.from_numpy(packed).to(dev), torch.from_numpy(cb).to(dev),
                        bits, torch.from_numpy(bias).to(dev))
    np.testing.assert_allclose(y.cpu().numpy(), _reference_f64(x, packed, cb, bits, K, bias), rtol=1e-5, atol=1e-4)


@pytest.mark.gpu
def test_codebook_linear_cuda_unaligned_rows_and_current_stream():
    # packed one byte into its storage (rows of 3 bytes: none aligned), run on a side stream that
    # is kept busy: the kernel must neither need alignment nor run outside torch's current stream.
    B, K, N, bits = 33, 6, 50, 4
    rng = np.random.default_rng(3)
    x = rng.standard_normal((B, K)).astype(np.float32)
    packed = pack_indices(_codes(N, K, bits, 7), bits)
    cb = rng.standard_normal(2**bits).astype(np.float32)
    dev = torch.device("cuda")
    storage = torch.zeros(packed.size + 1, dtype=torch.uint8, device=dev)
    p_dev = storage[1:].view(packed.shape)
    p_dev.copy_(torch.from_numpy(packed))
    cb_dev = torch.from_numpy(cb).to(dev)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        x_dev = torch.from_numpy(x).to(dev)
        torch.cuda._sleep(10_000_000)
        y = codebook_linear(x_dev * 1.0, p_dev, cb_dev, bits) * 1.0
    side.synchronize()
    np.testing.assert_allclose(y.cpu().numpy(), _reference_f64(x, packed, cb, bits, K), rtol=1e-5, atol=1e-4)


@pytest.mark.gpu
def test_codebook_linear_cuda_empty():
    dev = torch.device("cuda")
    packed = torch.from_numpy(pack_indices(np.zeros((3, 5), np.uint8), 4)).to(dev)
    cb = torch.zeros(16, device=dev)
    assert tuple(codebook_linear(torch.zeros(0, 5, device=dev), packed, cb, 4).shape) == (0, 3)
    empty = torch.zeros(0, 3, dtype=torch.uint8, device=dev)
    assert tuple(codebook_linear(torch.zeros(2, 5, device=dev), empty, cb, 4).shape) == (2, 0)


def test_codebook_linear_cuda_entry_without_cuda_build():
    from pyserve import _C

    if _C.build_info()["cuda"]:
        pytest.skip("built with CUDA; the GPU tests cover this entry")
    with pytest.raises(RuntimeError, match="codebook_linear_cuda: .*without CUDA"):
        _C.codebook_linear_cuda(0, 0, 0, 0, 0, 1, 1, 1, 4, False)
