"""int8 quantization and int8_linear against the NumPy reference (pyserve.ops.reference)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from pyserve.ops import int8_linear, quantize_per_channel
from pyserve.ops.reference import int8_linear_reference, quantize_rows_reference

EPS32 = float(np.finfo(np.float32).eps)


def _gauss(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _assert_close_to_reference(y, x, w_int8, w_scale, bias=None):
    """y agrees with the float64 reference up to the fp32 rounding of the documented dequantization.

    The kernel's int32 sum is exact; what remains is float32(acc) * float32(sx * sw) (+ bias): at
    most a few fp32 roundings of |acc * sx * sw| + |bias|.
    """
    ref = int8_linear_reference(x, w_int8, w_scale, bias)
    no_bias = int8_linear_reference(x, w_int8, w_scale, None)
    bound = 4 * EPS32 * (np.abs(no_bias) + (0 if bias is None else np.abs(np.asarray(bias, np.float64))[None, :]))
    y = np.asarray(y, dtype=np.float64)
    assert y.shape == ref.shape
    assert np.all(np.abs(y - ref) <= bound + 1e-30), float(np.max(np.abs(y - ref) - bound))


# --- quantize_per_channel ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (17, 33), (64, 333), (5, 1024), (0, 5), (4, 0)])
def test_quantize_per_channel_matches_reference(shape):
    w = _gauss(shape, 1) * np.float32(3.0)
    q, s = quantize_per_channel(w)
    qr, sr = quantize_rows_reference(w)
    assert q.dtype == np.int8 and s.dtype == np.float32
    assert q.shape == shape and s.shape == (shape[0],)
    np.testing.assert_array_equal(q, qr)
    np.testing.assert_array_equal(s, sr)
    if w.size:
        # Per-element error at most half a step (plus fp32 rounding of the division).
        err = np.abs(q.astype(np.float64) * s[:, None] - w)
        assert np.all(err <= s[:, None] * (0.5 + 1e-6))
        assert np.all(np.abs(q).max(axis=1) == 127)


def test_quantize_rounds_half_to_even():
    # amax = 127 gives scale exactly 1.0, so w / scale = w and the ties are exact.
    w = np.array([[127.0, 0.5, 1.5, 2.5, -0.5, -2.5, -3.5, 126.5]], dtype=np.float32)
    q, s = quantize_per_channel(w)
    assert s[0] == 1.0
    np.testing.assert_array_equal(q[0], [127, 0, 2, 2, 0, -2, -4, 126])


def test_quantize_zero_row_gets_scale_one():
    w = np.zeros((3, 9), dtype=np.float32)
    w[1] = np.linspace(-1, 1, 9)
    w[2, 4] = np.float32(1e-45)  # a denormal: max|w| / 127 underflows to 0, treated as a zero row
    q, s = quantize_per_channel(w)
    assert s[0] == 1.0 and s[2] == 1.0
    assert not q[0].any() and not q[2].any()
    assert s[1] == np.float32(1.0) / np.float32(127.0)


def test_quantize_torch_in_torch_out_and_noncontiguous():
    base = _gauss((40, 30), 2)
    w = torch.from_numpy(base).t()  # [30, 40], non-contiguous
    q, s = quantize_per_channel(w)
    assert isinstance(q, torch.Tensor) and q.dtype == torch.int8 and isinstance(s, torch.Tensor)
    qr, sr = quantize_rows_reference(np.ascontiguousarray(base.T))
    np.testing.assert_array_equal(q.numpy(), qr)
    np.testing.assert_array_equal(s.numpy(), sr)


# --- int8_linear ----------------------------------------------------------------------------------


@pytest.mark.parametrize("B", [0, 1, 2, 3, 17])
@pytest.mark.parametrize("K", [0, 1, 7, 31, 32, 33, 100, 773])
@pytest.mark.parametrize("N", [1, 5, 19])
def test_int8_linear_matches_reference(B, K, N):
    x = _gauss((B, K), 3)
    w_int8, w_scale = quantize_per_channel(_gauss((N, K), 4))
    y = int8_linear(x, w_int8, w_scale)
    assert isinstance(y, np.ndarray) and y.dtype == np.float32 and y.shape == (B, N)
    _assert_close_to_reference(y, x, w_int8, w_scale)


@pytest.mark.parametrize("B,K,N", [(1, 768, 64), (8, 96, 33), (64, 129, 70)])
def test_int8_linear_full_int8_range_and_bias(B, K, N):
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((B, K)) * 10).astype(np.float32)
    w_int8 = rng.integers(-128, 128, (N, K)).astype(np.int8)  # includes -128
    w_int8[0, :] = -128
    w_scale = rng.uniform(0.001, 0.1, N).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    y = int8_linear(x, w_int8, w_scale, bias)
    _assert_close_to_reference(y, x, w_int8, w_scale, bias)


def test_int8_linear_zero_rows_give_bias():
    x = np.zeros((2, 50), dtype=np.float32)
    x[1] = 1.0
    w = _gauss((6, 50), 6)
    w[3] = 0
    w_int8, w_scale = quantize_per_channel(w)
    bias = np.arange(6, dtype=np.float32)
    y = int8_linear(x, w_int8, w_scale, bias)
    np.testing.assert_array_equal(y[0], bias)
    assert y[1, 3] == bias[3]
    _assert_close_to_reference(y, x, w_int8, w_scale, bias)


@pytest.mark.parametrize("B,K,N", [(1, 768, 768), (16, 3072, 96), (128, 768, 64)])
def test_int8_linear_close_to_fp32(B, K, N):
    """The stated accuracy: relative Frobenius error below 2% of the fp32 product (Gaussian data)."""
    x, w = _gauss((B, K), 7), _gauss((N, K), 8) * np.float32(0.05)
    w_int8, w_scale = quantize_per_channel(w)
    y = int8_linear(x, w_int8, w_scale)
    exact = x.astype(np.float64) @ w.astype(np.float64).T
    assert np.linalg.norm(y - exact) / np.linalg.norm(exact) < 0.02


def test_int8_linear_torch_and_noncontiguous():
    xb = _gauss((70, 9), 9)
    x = torch.from_numpy(xb).t()  # [9, 70], non-contiguous
    w = torch.from_numpy(_gauss((70, 13), 10)).t()  # [13, 70]
    w_int8, w_scale = quantize_per_channel(w)
    bias = torch.arange(26, dtype=torch.float32)[::2]  # strided
    y = int8_linear(x, w_int8, w_scale, bias)
    assert isinstance(y, torch.Tensor) and y.dtype == torch.float32 and y.shape == (9, 13)
    _assert_close_to_reference(y.numpy(), xb.T, w_int8.numpy(), w_scale.numpy(), bias.numpy())
    # numpy x with torch weights gives numpy
    y2 = int8_linear(np.ascontiguousarray(xb.T), w_int8, w_scale.numpy(), bias)
    assert isinstance(y2, np.ndarray)
    np.testing.assert_array_equal(y2, y.numpy())


_SUBPROCESS_CHECK = textwrap.dedent(
    """
    import numpy as np
    from pyserve.ops import int8_linear, quantize_per_channel
    from pyserve.ops.reference import int8_linear_reference
    rng = np.random.default_rng(11)
    # the first two exceed the kernels' 2**22-MAC threshold for going parallel (and 2**20 for quantizing)
    for B, K, N in [(300, 3500, 8), (64, 520, 260), (1, 4100, 1030), (1, 777, 300), (33, 260, 129), (3, 5, 2)]:
        x = rng.standard_normal((B, K)).astype(np.float32)
        w = rng.standard_normal((N, K)).astype(np.float32)
        q, s = quantize_per_channel(w)
        y = int8_linear(x, q, s)
        ref = int8_linear_reference(x, q, s)
        assert np.all(np.abs(y - ref) <= 4 * np.finfo(np.float32).eps * np.abs(ref) + 1e-30), (B, K, N)
    print("ok")
    """
)


@pytest.mark.parametrize(
    "env",
    [{"OMP_NUM_THREADS": "1"}, {"OMP_NUM_THREADS": "2"}, {"OMP_NUM_THREADS": "2", "PYSERVE_DISABLE_AVX2": "1"},
     {"OMP_NUM_THREADS": "2", "PYSERVE_DISABLE_AVX512": "1"}],
    ids=["1-thread", "2-threads", "portable", "avx2"],  # avx2: the AVX2 packed kernel on a CPU with AVX-512 VNNI
)
def test_int8_threads_and_portable_path(env):
    out = subprocess.run(
        [sys.executable, "-c", _SUBPROCESS_CHECK], env={**os.environ, **env}, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


# --- bad input ------------------------------------------------------------------------------------


def _args():
    x = _gauss((2, 8), 12)
    q, s = quantize_per_channel(_gauss((3, 8), 13))
    return x, q, s, np.zeros(3, np.float32)


@pytest.mark.parametrize(
    "case,arg,words",
    [
        ("x_float64", "x", ["float32", "float64"]),
        ("x_1d", "x", ["2-D", "ndim=1"]),
        ("x_list", "x", ["numpy.ndarray", "list"]),
        ("x_nan", "x", ["finite", "row 1"]),
        ("w_int16", "w_int8", ["int8", "int16"]),
        ("w_3d", "w_int8", ["2-D", "ndim=3"]),
        ("k_mismatch", "w_int8", ["K = 8", "(3, 9)"]),
        ("scale_len", "w_scale", ["(3,)", "(4,)"]),
        ("scale_f64", "w_scale", ["float32", "float64"]),
        ("bias_len", "bias", ["(3,)", "(2,)"]),
        ("bias_2d", "bias", ["1-D", "ndim=2"]),
    ],
)
def test_int8_linear_bad_input(case, arg, words):
    x, q, s, b = _args()
    if case == "x_float64":
        x = x.astype(np.float64)
    elif case == "x_1d":
        x = x[0]
    elif case == "x_list":
        x = x.tolist()
    elif case == "x_nan":
        x[1, 3] = np.nan
    elif case == "w_int16":
        q = q.astype(np.int16)
    elif case == "w_3d":
        q = q[None]
    elif case == "k_mismatch":
        q = np.zeros((3, 9), np.int8)
    elif case == "scale_len":
        s = np.ones(4, np.float32)
    elif case == "scale_f64":
        s = s.astype(np.float64)
    elif case == "bias_len":
        b = np.zeros(2, np.float32)
    elif case == "bias_2d":
        b = b[None]
    with pytest.raises(ValueError) as info:
        int8_linear(x, q, s, b)
    message = str(info.value)
    assert f"argument '{arg}'" in message and "int8_linear" in message
    for word in words:
        assert word in message, message


@pytest.mark.parametrize(
    "w,words",
    [
        (np.zeros((2, 3), np.float64), ["float32", "float64"]),
        (np.zeros(3, np.float32), ["2-D", "ndim=1"]),
        (np.array([[1.0, np.inf]], np.float32), ["finite", "row 0"]),
        (np.array([[1.0, 2.0], [np.nan, 0.0]], np.float32), ["finite", "row 1"]),
    ],
)
def test_quantize_bad_input(w, words):
    with pytest.raises(ValueError) as info:
        quantize_per_channel(w)
    message = str(info.value)
    assert "quantize_per_channel: argument 'w'" in message
    for word in words:
        assert word in message, message


@pytest.mark.parametrize("K", [1, 7, 8, 9, 15, 16, 17, 24, 31, 40, 385])
def test_quantize_finds_a_non_finite_value_at_every_position(K):
    """The AVX2 quantizer checks 16 values per step, then 8, then one at a time: an inf or NaN is
    found wherever it sits, in whichever row, and a row of finite values (largest magnitude first or
    last, signed zeros) quantizes as the reference does."""
    rng = np.random.default_rng(K)
    for bad in (np.inf, -np.inf, np.nan):
        for k in sorted({0, K // 2, K - 1, min(K - 1, 15), min(K - 1, 16)}):
            w = rng.standard_normal((3, K)).astype(np.float32)
            w[2, k] = bad
            with pytest.raises(ValueError, match=r"finite.*row 2"):
                quantize_per_channel(w)
    w = rng.standard_normal((4, K)).astype(np.float32)
    w[0, 0], w[1, -1], w[2] = 1e30, -1e30, -0.0
    q, s = quantize_per_channel(w)
    qr, sr = quantize_rows_reference(w)
    np.testing.assert_array_equal(q, qr)
    np.testing.assert_array_equal(s, sr)


def test_int8_linear_k_limit():
    x = np.zeros((1, 131073), np.float32)
    with pytest.raises(ValueError, match=r"argument 'x'.*K <= 131072.*131073"):
        int8_linear(x, np.zeros((1, 131073), np.int8), np.ones(1, np.float32))


# --- CUDA -----------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("B,K,N", [(1, 768, 768), (7, 33, 5), (64, 3072, 768), (0, 8, 3)])
def test_int8_linear_cuda_matches_cpu(B, K, N):
    x = _gauss((B, K), 14)
    w_int8, w_scale = quantize_per_channel(_gauss((N, K), 15))
    bias = _gauss((N,), 16)
    cpu = int8_linear(x, w_int8, w_scale, bias)
    dev = torch.device("cuda")
    y = int8_linear(
        torch.from_numpy(x).to(dev), torch.from_numpy(w_int8).to(dev), torch.from_numpy(w_scale).to(dev),
        torch.from_numpy(bias).to(dev),
    )
    assert y.device.type == "cuda"
    np.testing.assert_allclose(y.cpu().numpy(), cpu, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(cpu).max(initial=0))))


def _int8_cuda(x, w_int8, w_scale, bias):
    dev = torch.device("cuda")
    return int8_linear(*(None if a is None else torch.from_numpy(a).to(dev) for a in (x, w_int8, w_scale, bias)))


@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 7, 8, 9, 16, 17, 32, 33, 65, 130])
@pytest.mark.parametrize("K,N", [(1, 1), (3, 5), (4, 33), (7, 31), (63, 2), (64, 64), (65, 9), (130, 40), (260, 33), (0, 3)])
def test_int8_linear_cuda_tile_edges_are_bit_identical_to_cpu(B, K, N):
    # B <= 16: warp-per-channel kernel (batch chunks of 8); B > 16: 32 x 32 tiles over K steps of
    # 128 bytes. K % 4 != 0 takes the byte-load path. The int32 sums are exact and the epilogue has
    # the CPU's two roundings, so the result is equal bit for bit.
    x = _gauss((B, K), B + K)
    w_int8, w_scale = quantize_per_channel(_gauss((N, K), N + 1))
    bias = _gauss((N,), 3)
    for b in (bias, None):
        cpu = int8_linear(x, w_int8, w_scale, b)
        np.testing.assert_array_equal(_int8_cuda(x, w_int8, w_scale, b).cpu().numpy(), cpu)


@pytest.mark.gpu
@pytest.mark.parametrize("B", [3, 40])
def test_int8_linear_cuda_unaligned_weight_rows(B):
    # K % 4 == 0 but w starts one byte into its storage: the launcher must take the byte path.
    K, N = 64, 33
    x = _gauss((B, K), 5)
    w_int8, w_scale = quantize_per_channel(_gauss((N, K), 6))
    dev = torch.device("cuda")
    storage = torch.zeros(N * K + 1, dtype=torch.int8, device=dev)
    w_dev = storage[1:].view(N, K)
    w_dev.copy_(torch.from_numpy(w_int8))
    assert w_dev.data_ptr() % 4 == 1
    y = int8_linear(torch.from_numpy(x).to(dev), w_dev, torch.from_numpy(w_scale).to(dev))
    np.testing.assert_array_equal(y.cpu().numpy(), int8_linear(x, w_int8, w_scale))


@pytest.mark.gpu
def test_int8_linear_cuda_empty_and_saturating_inputs():
    w_int8, w_scale = quantize_per_channel(_gauss((5, 12), 7))
    assert tuple(_int8_cuda(np.zeros((0, 12), np.float32), w_int8, w_scale, None).shape) == (0, 5)
    x = np.zeros((3, 12), np.float32)  # all-zero rows: scale 1, y = bias
    x[1] = 1e30
    x[2, ::2] = -2.5  # ties at +-127 after scaling, round half to even elsewhere
    x[2, 1::2] = np.linspace(-1, 1, 6)
    bias = _gauss((5,), 8)
    np.testing.assert_array_equal(_int8_cuda(x, w_int8, w_scale, bias).cpu().numpy(),
                                  int8_linear(x, w_int8, w_scale, bias))
    no_rows = np.zeros((0, 12), np.int8)
    assert tuple(_int8_cuda(x, no_rows, np.zeros(0, np.float32), None).shape) == (3, 0)


@pytest.mark.gpu
def test_int8_linear_cuda_runs_on_the_current_stream():
    # No host synchronisation: the result must be ordered on torch's current stream.
    B, K, N = 40, 768, 768
    x = _gauss((B, K), 9)
    w_int8, w_scale = quantize_per_channel(_gauss((N, K), 10))
    dev = torch.device("cuda")
    w_dev, s_dev = torch.from_numpy(w_int8).to(dev), torch.from_numpy(w_scale).to(dev)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        x_dev = torch.from_numpy(x).to(dev, non_blocking=False)
        torch.cuda._sleep(10_000_000)  # keep the stream busy so a kernel on another stream would race
        y = int8_linear(x_dev * 1.0, w_dev, s_dev)
        y2 = y * 1.0
    side.synchronize()
    np.testing.assert_array_equal(y2.cpu().numpy(), int8_linear(x, w_int8, w_scale))


def test_int8_linear_cuda_entry_without_cuda_build():
    from pyserve import _C

    if _C.build_info()["cuda"]:
        pytest.skip("built with CUDA; the GPU tests cover this entry")
    with pytest.raises(RuntimeError, match="int8_linear_cuda: .*without CUDA"):
        _C.int8_linear_cuda(0, 0, 0, 0, 0, 0, 0, 1, 1, 1)


@pytest.mark.gpu
def test_int8_linear_cuda_rejects_mixed_devices():
    w_int8, w_scale = quantize_per_channel(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="argument 'w_int8'"):
        int8_linear(torch.zeros(2, 4, device="cuda"), w_int8, w_scale)
