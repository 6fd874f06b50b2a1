"""pyserve._C.int8_linear_packed's add & LayerNorm epilogue (residual, norm_weight, norm_bias, eps)
against the plain packed call followed by a float64 LayerNorm, and its argument errors."""

import numpy as np
import pytest

from pyserve import _C, ops


def _layer(N, K, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.integers(-127, 128, (N, K), dtype=np.int8)
    return _C.pack_int8_weight(w), (rng.random(N, dtype=np.float32) * 0.01).astype(np.float32), \
        rng.standard_normal(N).astype(np.float32)


@pytest.mark.parametrize("B,N,K", [(1, 384, 384), (128, 384, 1536), (5, 37, 20), (3, 8, 16)])
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("activation", ["none", "gelu"])
def test_epilogue_is_layer_norm_of_output_plus_residual(B, N, K, with_residual, activation):
    rng = np.random.default_rng(B + N + K)
    w, sw, bias = _layer(N, K)
    x = rng.standard_normal((B, K)).astype(np.float32)
    res = (rng.standard_normal((B, N)) * 3).astype(np.float32) if with_residual else None
    g = rng.uniform(0.5, 1.5, N).astype(np.float32)
    beta = rng.standard_normal(N).astype(np.float32)
    plain = _C.int8_linear_packed(x, w, sw, bias, activation).astype(np.float64)
    pre = plain + (res if with_residual else 0.0)
    mean, var = pre.mean(1, keepdims=True), pre.var(1, keepdims=True)
    expected = (pre - mean) / np.sqrt(var + 1e-12) * g + beta
    got = _C.int8_linear_packed(x, w, sw, bias, activation, res, g, beta, 1e-12)
    assert got.dtype == np.float32 and got.shape == (B, N)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=2e-5)


def test_epilogue_threads_do_not_change_the_result():
    rng = np.random.default_rng(1)
    w, sw, bias = _layer(384, 384)
    x = rng.standard_normal((700, 384)).astype(np.float32)
    res = rng.standard_normal((700, 384)).astype(np.float32)
    g, beta = np.ones(384, np.float32), np.zeros(384, np.float32)
    before = ops.get_num_threads()
    try:
        ops.set_num_threads(1)
        one = _C.int8_linear_packed(x, w, sw, bias, "none", res, g, beta)
        ops.set_num_threads(2)
        two = _C.int8_linear_packed(x, w, sw, bias, "none", res, g, beta)
    finally:
        ops.set_num_threads(before)
    np.testing.assert_array_equal(one, two)


@pytest.mark.parametrize("kwargs,arg", [
    ({"norm_weight": np.ones(8, np.float32)}, "norm_bias"),
    ({"norm_bias": np.ones(8, np.float32)}, "norm_weight"),
    ({"residual": np.ones((2, 8), np.float32)}, "residual"),
    ({"residual": np.ones((2, 9), np.float32), "norm_weight": np.ones(8, np.float32),
      "norm_bias": np.ones(8, np.float32)}, "residual"),
    ({"residual": np.ones((2, 8), np.float64), "norm_weight": np.ones(8, np.float32),
      "norm_bias": np.ones(8, np.float32)}, "residual"),
    ({"norm_weight": np.ones(7, np.float32), "norm_bias": np.ones(8, np.float32)}, "norm_weight"),
    ({"norm_weight": np.ones(8, np.float32), "norm_bias": np.ones(8, np.int32)}, "norm_bias"),
    ({"norm_weight": np.ones(8, np.float32), "norm_bias": np.ones(8, np.float32), "eps": float("nan")}, "eps"),
    ({"norm_weight": np.ones(8, np.float32), "norm_bias": np.ones(8, np.float32), "eps": -1.0}, "eps"),
    ({"norm_weight": np.ones(8, np.float32), "norm_bias": np.ones(8, np.float32), "eps": 1e39}, "eps"),  # inf in float32
])
def test_bad_epilogue_arguments_name_the_argument(kwargs, arg):
    w, sw, bias = _layer(8, 16)
    with pytest.raises(ValueError, match=f"argument '{arg}'"):
        _C.int8_linear_packed(np.zeros((2, 16), np.float32), w, sw, bias, **kwargs)


def test_gelu_epilogue_is_the_same_function_in_full_and_partial_channel_blocks():
    """The GELU fused into the tile store (full blocks of 16 channels) and the padded tail path give
    each channel the same bits: a 37-channel layer equals the first 37 channels of a 48-channel one
    with the same first rows, and both are within 2e-6 of torch's exact GELU of the plain output."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7)
    w48 = rng.integers(-127, 128, (48, 64), dtype=np.int8)
    s48 = (rng.random(48, dtype=np.float32) * 0.02).astype(np.float32)
    b48 = rng.standard_normal(48).astype(np.float32)
    x = rng.standard_normal((9, 64)).astype(np.float32)
    full = _C.int8_linear_packed(x, _C.pack_int8_weight(w48), s48, b48, "gelu")
    part = _C.int8_linear_packed(x, _C.pack_int8_weight(np.ascontiguousarray(w48[:37])), s48[:37].copy(),
                                 b48[:37].copy(), "gelu")
    np.testing.assert_array_equal(part, full[:, :37])
    plain = _C.int8_linear_packed(x, _C.pack_int8_weight(w48), s48, b48)
    np.testing.assert_allclose(full, torch.nn.functional.gelu(torch.from_numpy(plain)).numpy(), rtol=0, atol=2e-6)


_CONST_ROWS = """
import sys, numpy as np
from pyserve import _C
rng = np.random.default_rng(3)
w = np.zeros((40, 16), np.int8)  # y = 0 (and bias 0): the normalized row is the residual's
packed, sw = _C.pack_int8_weight(w), np.full(40, 0.01, np.float32)
res = np.full((4, 40), 0.3, np.float32)
res[1] = 1000.0
res[2, :] = rng.standard_normal(40).astype(np.float32)
res[3] = -7.25
g, b = rng.uniform(0.5, 1.5, 40).astype(np.float32), rng.standard_normal(40).astype(np.float32)
y = _C.int8_linear_packed(rng.standard_normal((4, 16)).astype(np.float32), packed, sw, None, "none", res, g, b, 1e-12)
np.save(sys.argv[1], y)
"""


@pytest.mark.parametrize("env", [{}, {"PYSERVE_DISABLE_AVX2": "1"}], ids=["simd", "portable"])
def test_constant_rows_normalize_to_the_bias(tmp_path, env):
    """A constant row (zero variance; rstd = 1 / sqrt(eps) = 1e6 at BERT's eps) gives exactly norm_bias,
    as torch's layer_norm does, on the SIMD and the portable path: computing y * rstd - mean * rstd
    left 0.0119 per element of a row of 0.3 on the AVX2 path. The other rows agree with torch."""
    import os
    import subprocess
    import sys

    torch = pytest.importorskip("torch")
    out = tmp_path / "y.npy"
    proc = subprocess.run([sys.executable, "-c", _CONST_ROWS, str(out)], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    y = np.load(out)
    rng = np.random.default_rng(3)
    _ = rng.standard_normal(40)  # the same draws as the script: row 2, then g and b
    g, b = rng.uniform(0.5, 1.5, 40).astype(np.float32), rng.standard_normal(40).astype(np.float32)
    for r in (0, 1, 3):
        np.testing.assert_array_equal(y[r], b)
    res2 = np.random.default_rng(3).standard_normal(40).astype(np.float32)
    expected = torch.nn.functional.layer_norm(torch.from_numpy(res2), [40], torch.from_numpy(g), torch.from_numpy(b),
                                              1e-12).numpy()
    np.testing.assert_allclose(y[2], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(384,), (1, 128, 384), (3, 5, 37), (2, 1, 1, 8), (0, 16)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_layer_norm_alone_against_float64(shape, with_residual):
    """_C.layer_norm (the epilogue on its own, what native_module runs for a BERT's embeddings
    LayerNorm): within float rounding of a float64 LayerNorm of x (+ residual), any leading dims; a
    constant row gives the bias exactly; x is not modified."""
    rng = np.random.default_rng(len(shape) * 10 + shape[-1])
    N = shape[-1]
    x = (rng.standard_normal(shape) * 3 + 1).astype(np.float32)
    if x.size:
        x.reshape(-1, N)[0] = 0.3  # a constant row
    res = rng.standard_normal(shape).astype(np.float32) if with_residual else None
    g, b = rng.uniform(0.5, 1.5, N).astype(np.float32), rng.standard_normal(N).astype(np.float32)
    x0 = x.copy()
    y = _C.layer_norm(x, g, b, 1e-12, res)
    assert y.shape == x.shape and y.dtype == np.float32
    np.testing.assert_array_equal(x, x0)
    s = x.astype(np.float64) + (0 if res is None else res)
    mean = s.mean(-1, keepdims=True)
    ref = (s - mean) / np.sqrt(((s - mean) ** 2).mean(-1, keepdims=True) + 1e-12) * g + b
    if x.size and not with_residual:
        np.testing.assert_array_equal(y.reshape(-1, N)[0], b)
        ref.reshape(-1, N)[0] = b
    np.testing.assert_allclose(y, ref, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("call, arg", [
    (lambda x, g, b: _C.layer_norm(x.astype(np.float64), g, b, 1e-5), "'x'"),
    (lambda x, g, b: _C.layer_norm(np.asfortranarray(x), g, b, 1e-5), "'x'"),
    (lambda x, g, b: _C.layer_norm(np.ones((), np.float32), g[:1], b[:1], 1e-5), "'x'"),
    (lambda x, g, b: _C.layer_norm(x, g[:5], b, 1e-5), "'weight'"),
    (lambda x, g, b: _C.layer_norm(x, g, b.astype(np.float64), 1e-5), "'bias'"),
    (lambda x, g, b: _C.layer_norm(x, g, b, float("nan")), "'eps'"),
    (lambda x, g, b: _C.layer_norm(x, g, b, -1.0), "'eps'"),
    (lambda x, g, b: _C.layer_norm(x, g, b, 1e-5, x[:, :3].copy()), "'residual'"),
])
def test_layer_norm_bad_arguments_are_named(call, arg):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 6)).astype(np.float32)
    with pytest.raises(ValueError, match=f"layer_norm: argument {arg}"):
        call(x, np.ones(6, np.float32), np.zeros(6, np.float32))
