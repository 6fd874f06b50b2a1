"""int8_linear on packed weights (pack_int8_weight, and the pinned packed copies of weights pyserve owns).

The packed kernel must return exactly what the row kernel returns (the same int32 sums, the same
two fp32 roundings) and agree with the NumPy reference; both split activation paths (pairs cut to
|x0| + |x1| <= 128 plus residuals, and the vpsignb path of rows with too many residuals) are
driven on purpose, alone and mixed within one 4-row tile.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from pyserve import _C
from pyserve.ops import (cpu_kernels, get_num_threads, int8_linear, pack_int8_weight, quantize_per_channel,
                         set_num_threads)
from pyserve.ops import quant as quant_module
from pyserve.ops.reference import int8_linear_reference, quantize_rows_reference

EPS32 = float(np.finfo(np.float32).eps)


def _x(kind: str, B: int, K: int, seed: int) -> np.ndarray:
    """Activations whose quantized rows exercise one path of the packed kernel.

    gauss:   ~1-3% of aligned pairs exceed |x0 + x1| = 128 (a few residuals per row)
    uniform: about a quarter of the pairs exceed it (more than K / 16 residuals: the vpsignb path)
    sign:    every value quantizes to +-127 (every pair of one sign exceeds it)
    edge:    pairs right at the bound: (127, 1), (-127, -1), (64, 64), (127, -2), (-1, 128 - 1)
    mixed:   rows alternate gauss / sign, so 4-row tiles mix the two paths
    zeros:   all-zero rows (scale 1, every xq 0)
    atcap:   each row holds exactly K_pad / 16 violating pairs (one sign; opposite-sign pairs
             with |x0| + |x1| > 128, which never saturate, are mixed in and must not split) (the most a row may have and still
             split; K_pad = 4 ceil(K / 4)), at random positions, so every byte k % 4 of a 4-k group
             and, for K > 4096, both sides of the K chunk boundaries carry residuals
    overcap: one violating pair more than that: those rows take the vpsignb path
    """
    rng = np.random.default_rng(seed)
    if kind == "gauss":
        return rng.standard_normal((B, K)).astype(np.float32)
    if kind == "uniform":
        return rng.uniform(-1, 1, (B, K)).astype(np.float32)
    if kind == "sign":
        return np.where(rng.random((B, K)) < 0.5, -1.0, 1.0).astype(np.float32)
    if kind == "edge":
        pattern = np.array([127, 1, -127, -1, 64, 64, 127, -2, -1, 127, 2, 127, 0, -127, -64, -65], np.float32)
        return np.resize(pattern, (B, K)) * np.float32(1.0 + rng.random((B, 1)).astype(np.float32) * 0)
    if kind == "mixed":
        x = rng.standard_normal((B, K)).astype(np.float32)
        x[1::2] = np.where(rng.random((x[1::2].shape)) < 0.5, -1.0, 1.0)
        return x
    if kind == "zeros":
        return np.zeros((B, K), np.float32)
    if kind in ("atcap", "overcap"):
        # values in quantized units: each row's largest |x| is 127 (the first violating pair's
        # larger value), so x_scale = 1 and xq = x; other values |x| <= 30 never violate
        x = rng.integers(-30, 31, (B, K)).astype(np.float32)
        n = max(1, (4 * ((K + 3) // 4)) // 16) + (kind == "overcap")
        for b in range(B):
            if K // 2 == 0:
                x[b, 0] = 127
            for i, p in enumerate(rng.choice(K // 2, size=min(2 * n, K // 2), replace=False)):
                big = 127 if i == 0 else rng.integers(65, 128)
                small = rng.integers(129 - big, 128)  # |big| + |small| >= 129
                sign = rng.choice([-1, 1])  # the first n pairs one sign (a residual), the rest opposite
                pair = [sign * big, (sign if i < n else -sign) * small]
                if rng.random() < 0.5:
                    pair.reverse()
                x[b, 2 * p: 2 * p + 2] = pair
        return x
    raise ValueError(kind)


def _assert_close_to_reference(y, x, w_int8, w_scale, bias=None):
    ref = int8_linear_reference(x, w_int8, w_scale, bias)
    no_bias = int8_linear_reference(x, w_int8, w_scale, None)
    bound = 4 * EPS32 * (np.abs(no_bias) + (0 if bias is None else np.abs(np.asarray(bias, np.float64))[None, :]))
    assert y.shape == ref.shape
    assert np.all(np.abs(np.asarray(y, np.float64) - ref) <= bound + 1e-30)


def _weights(N, K, seed, full_range=False):
    rng = np.random.default_rng(seed)
    if full_range:
        q = rng.integers(-128, 128, (N, K)).astype(np.int8)
        if N:
            q[0] = -128
        if N > 1:
            q[-1] = 127
        return q, rng.uniform(0.001, 0.1, N).astype(np.float32)
    return quantize_per_channel(rng.standard_normal((N, K)).astype(np.float32))


@pytest.mark.parametrize("kind", ["gauss", "uniform", "sign", "edge", "mixed", "zeros", "atcap", "overcap"])
@pytest.mark.parametrize(
    "B,K,N",
    [(1, 1, 1), (3, 5, 17), (4, 16, 16), (5, 33, 31), (8, 768, 48), (13, 130, 33), (64, 257, 20),
     (9, 1030, 20), (6, 2049, 17),
     (10, 64, 96), (18, 100, 65),  # the VNNI kernel's 8-row tiles with 2 rows left; 5 blocks, 1 channel over
     (7, 4097, 18), (5, 9000, 33)],  # K > 4096: several K chunks of 4096, the last short
)
def test_packed_equals_row_kernel_and_reference(kind, B, K, N):
    x = _x(kind, B, K, seed=B * 1000 + K)
    for full_range in (False, True):
        q, s = _weights(N, K, seed=N + K, full_range=full_range)
        bias = np.random.default_rng(1).standard_normal(N).astype(np.float32)
        packed = pack_int8_weight(q)
        assert packed.shape == (N, K) and packed.nbytes >= N * K
        for b in (None, bias):
            y_rows = int8_linear(x, q, s, b)
            y_packed = int8_linear(x, packed, s, b)
            assert y_packed.dtype == np.float32 and y_packed.shape == (B, N)
            np.testing.assert_array_equal(y_packed, y_rows)
            _assert_close_to_reference(y_packed, x, q, s, b)


@pytest.mark.parametrize("B,K,N", [(0, 8, 4), (3, 8, 0), (2, 0, 5)])
def test_packed_empty_shapes(B, K, N):
    x = _x("gauss", B, K, 2)
    q, s = _weights(N, K, 3)
    y = int8_linear(x, pack_int8_weight(q), s, np.ones(N, np.float32))
    assert y.shape == (B, N)
    np.testing.assert_array_equal(y, int8_linear(x, q, s, np.ones(N, np.float32)))


def test_packed_split_arithmetic_by_hand():
    """Pairs over the bound are cut and their residuals added back through the packed block: an int sum
    checked against integer arithmetic done here (x_scale = 1: amax 127; w_scale = 1)."""
    x = np.array([[127, 127, -127, -100, 3, 125, 0, 0, -1, 127, 64, 64]], np.float32)
    w = np.array([[127, -128, 5, -7, 100, -100, 9, 9, 127, 127, -128, -128],
                  [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]], np.int8)
    y = int8_linear(x, pack_int8_weight(w), np.ones(2, np.float32))
    expected = x.astype(np.int64) @ w.astype(np.int64).T
    np.testing.assert_array_equal(y, expected.astype(np.float32))


def test_packed_largest_k_is_exact():
    """K = 131072: the largest K int8_linear accepts; sums near the int32 limit stay exact (every
    row has amax 127, so x_scale = 1 and y is the integer sum itself)."""
    K = 131072
    x = np.full((5, K), 127.0, np.float32)
    x[1, 1::2] = 1.0  # (127, 1) pairs: the split path with sums up to 2.1e9
    x[2] = -127.0
    x[3, ::2] = -127.0  # (-127, -1) pairs: the split path, negative
    x[3, 1::2] = -1.0
    q = np.full((3, K), 127, np.int8)
    q[1] = -128
    q[2, ::3] = -128
    s = np.ones(3, np.float32)
    y = int8_linear(x, pack_int8_weight(q), s)
    np.testing.assert_array_equal(y, int8_linear(x, q, s))
    ref = quantize_rows_reference(x)[0].astype(np.int64) @ q.astype(np.int64).T
    assert np.abs(ref).max() > 2**30
    np.testing.assert_array_equal(y, ref.astype(np.float32))


@pytest.mark.parametrize("threads", [1, 2])
def test_packed_threads(threads):
    before = get_num_threads()
    set_num_threads(threads)
    try:
        # above the 2**22-MAC threshold for going parallel; tiles of both paths
        x = _x("mixed", 70, 520, 5)
        q, s = _weights(300, 520, 6)
        np.testing.assert_array_equal(int8_linear(x, pack_int8_weight(q), s), int8_linear(x, q, s))
    finally:
        set_num_threads(before)


def test_packed_scratch_reused_across_calls_and_threads():
    """The fused quantize + split keeps its per-call buffers per thread between calls: calls that grow
    and shrink B and K, switch rows between the split and vpsignb paths, and run on several Python
    threads at once must each equal the row kernel (nothing of an earlier call may leak into a later
    one: padding, residual lists, row scales)."""
    from concurrent.futures import ThreadPoolExecutor

    cases = [("sign", 9, 1030, 20), ("gauss", 3, 5, 17), ("overcap", 64, 257, 20), ("gauss", 128, 384, 40),
             ("atcap", 13, 130, 33), ("zeros", 2, 1030, 3), ("mixed", 70, 520, 48), ("edge", 1, 1, 1)]
    prepared = []
    for i, (kind, B, K, N) in enumerate(cases):
        x = _x(kind, B, K, seed=100 + i)
        q, s = _weights(N, K, seed=200 + i)
        prepared.append((x, pack_int8_weight(q), s, int8_linear(x, q, s)))
    for x, packed, s, expected in prepared + prepared[::-1]:
        np.testing.assert_array_equal(int8_linear(x, packed, s), expected)

    def run(order):
        for j in order:
            x, packed, s, expected = prepared[j]
            np.testing.assert_array_equal(int8_linear(x, packed, s), expected)

    rng = np.random.default_rng(3)
    with ThreadPoolExecutor(4) as pool:
        for f in [pool.submit(run, rng.permutation(len(prepared)).tolist() * 3) for _ in range(4)]:
            f.result()


@pytest.mark.parametrize("threads", [1, 2])
def test_packed_non_finite_row_named_in_parallel_call(threads):
    """A non-finite value found while the rows are quantized in parallel names the first bad row and
    writes no output; the next call on the same thread is unaffected."""
    before = get_num_threads()
    set_num_threads(threads)
    try:
        q, s = _weights(300, 520, 6)
        packed = pack_int8_weight(q)
        x = _x("gauss", 70, 520, 5)  # above the 2**22-MAC threshold for going parallel
        bad = x.copy()
        bad[41, 7] = np.nan
        bad[60, 0] = -np.inf
        with pytest.raises(ValueError, match=r"int8_linear: argument 'x'.*finite.*row 41"):
            int8_linear(bad, packed, s)
        np.testing.assert_array_equal(int8_linear(x, packed, s), int8_linear(x, q, s))
    finally:
        set_num_threads(before)


@pytest.mark.parametrize("B,N", [(1, 1), (3, 7), (128, 1536), (5, 33)])
def test_packed_gelu_epilogue_matches_torch_gelu(B, N):
    """activation="gelu": GELU of the layer's output in the native call, within 2e-6 (absolute, and
    relative for |y| > 1) of float64 GELU of the same y; the tail of a length not divisible by 8 goes
    through the same function; y without activation unchanged bit for bit."""
    K = 40
    rng = np.random.default_rng(B * N)
    q, s = _weights(N, K, seed=N)
    bias = (rng.standard_normal(N) * 3).astype(np.float32)
    x = (rng.standard_normal((B, K)) * 2).astype(np.float32)
    packed = pack_int8_weight(q)
    y = _C.int8_linear_packed(x, packed, s, bias)
    np.testing.assert_array_equal(y, _C.int8_linear_packed(x, packed, s, bias, "none"))
    np.testing.assert_array_equal(y, int8_linear(x, q, s, bias))
    g = _C.int8_linear_packed(x, packed, s, bias, activation="gelu")
    ref = torch.nn.functional.gelu(torch.from_numpy(y).double()).numpy()
    assert g.dtype == np.float32 and g.shape == (B, N)
    assert np.all(np.abs(g - ref) <= 2e-6 * np.maximum(1.0, np.abs(ref))), np.abs(g - ref).max()


def test_packed_gelu_bad_activation():
    q, s = _weights(3, 8, 13)
    with pytest.raises(ValueError, match=r"int8_linear: argument 'activation'.*'none' or 'gelu'.*'relu'"):
        _C.int8_linear_packed(_x("gauss", 2, 8, 14), pack_int8_weight(q), s, None, "relu")


_PORTABLE_CHECK = textwrap.dedent(
    """
    import math
    import numpy as np
    from pyserve import _C
    from pyserve.ops import int8_linear, pack_int8_weight, quantize_per_channel
    from pyserve.ops.reference import int8_linear_reference
    rng = np.random.default_rng(11)
    for B, K, N in [(64, 520, 260), (9, 33, 17), (1, 7, 3)]:
        x = rng.standard_normal((B, K)).astype(np.float32)
        x[1::3] = np.sign(x[1::3])
        q, s = quantize_per_channel(rng.standard_normal((N, K)).astype(np.float32))
        y = int8_linear(x, pack_int8_weight(q), s)
        assert np.array_equal(y, int8_linear(x, q, s)), (B, K, N)
        ref = int8_linear_reference(x, q, s)
        assert np.all(np.abs(y - ref) <= 4 * np.finfo(np.float32).eps * np.abs(ref) + 1e-30), (B, K, N)
        g = _C.int8_linear_packed(x, pack_int8_weight(q), s, None, "gelu")  # std::erf here
        exact = 0.5 * y.astype(np.float64) * (1 + np.vectorize(math.erf)(y.astype(np.float64) / math.sqrt(2)))
        assert np.all(np.abs(g - exact) <= 2e-6 * np.maximum(1.0, np.abs(exact))), (B, K, N)
    print("ok")
    """
)


def test_packed_portable_path():
    env = {**os.environ, "PYSERVE_DISABLE_AVX2": "1", "OMP_NUM_THREADS": "2"}
    out = subprocess.run([sys.executable, "-c", _PORTABLE_CHECK], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_packed_avx2_path_on_a_vnni_cpu():
    """On a CPU with AVX-512 VNNI the tests above drive the vpdpbusd kernel; this runs them again with
    PYSERVE_DISABLE_AVX512 set, so the AVX2 kernel (split activations, vpsignb rows) stays covered
    there too. Both must return what the row kernel returns, bit for bit."""
    if not cpu_kernels()["avx512_vnni"]:
        pytest.skip("this CPU runs the AVX2 kernel already (no AVX-512 VNNI path in use)")
    env = {**os.environ, "PYSERVE_DISABLE_AVX512": "1", "OMP_NUM_THREADS": "2"}
    code = ("import sys, pytest; from pyserve.ops import cpu_kernels; assert not cpu_kernels()['avx512_vnni']; "
            f"sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', {__file__!r}, '-k', "
            "'not avx2_path and not portable_path and not cuda']))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and " failed" not in out.stdout


def test_packed_torch_inputs():
    q, s = _weights(40, 70, 7)
    packed = pack_int8_weight(torch.from_numpy(q))
    x = torch.from_numpy(_x("gauss", 9, 70, 8))
    y = int8_linear(x, packed, torch.from_numpy(s))
    assert isinstance(y, torch.Tensor) and y.shape == (9, 40)
    np.testing.assert_array_equal(y.numpy(), int8_linear(x.numpy(), q, s))


# --- the cache for torch weight tensors -------------------------------------------------------------


def test_pinned_weights_use_the_packed_copy_and_are_repacked_after_inplace_ops():
    q, s = _weights(24, 40, 9)
    w = torch.from_numpy(q.copy())
    x = _x("gauss", 6, 40, 10)
    expected = int8_linear(x, q, s)
    assert quant_module._pin_packed(w)
    assert isinstance(quant_module._PACK_CACHE[id(w)].packed, _C.Int8PackedWeight)
    assert quant_module._cached_pack(w) is quant_module._PACK_CACHE[id(w)].packed
    np.testing.assert_array_equal(int8_linear(x, w, s), expected)

    w.mul_(-1)  # an in-place op bumps the version: the packed copy is stale
    flipped = int8_linear(x, (-q.astype(np.int16)).clip(-128, 127).astype(np.int8), s)
    np.testing.assert_array_equal(int8_linear(x, w, s), flipped)  # re-packed from the new values

    key = id(w)
    del w
    gc.collect()
    assert key not in quant_module._PACK_CACHE


def test_a_callers_torch_weights_are_never_packed_behind_its_back():
    """A write torch does not version (``w.data``) must be seen at once: nothing cached."""
    q, s = _weights(24, 40, 17)
    w = torch.from_numpy(q.copy())
    x = _x("gauss", 6, 40, 18)
    before = len(quant_module._PACK_CACHE)
    for _ in range(3):
        np.testing.assert_array_equal(int8_linear(x, w, s), int8_linear(x, q, s))
    new = np.random.default_rng(19).integers(-128, 128, q.shape).astype(np.int8)
    w.data.copy_(torch.from_numpy(new))
    np.testing.assert_array_equal(int8_linear(x, w, s), int8_linear(x, new, s))
    assert len(quant_module._PACK_CACHE) == before


@pytest.mark.parametrize("make", ["numpy", "noncontiguous", "inference", "grad"])
def test_weights_the_packed_kernel_cannot_track_are_not_pinned(make):
    q, _ = _weights(8, 16, 11)
    if make == "numpy":
        w = q
    elif make == "noncontiguous":
        w = torch.from_numpy(np.ascontiguousarray(q.T)).t()
    elif make == "inference":
        with torch.inference_mode():
            w = torch.from_numpy(q).clone()  # an inference tensor: no version counter
    else:
        w = torch.from_numpy(q).float().requires_grad_()
    before = len(quant_module._PACK_CACHE)
    assert quant_module._pin_packed(w) is False
    assert len(quant_module._PACK_CACHE) == before


def test_pinned_weights_used_under_inference_mode_calls():
    """The server calls under inference_mode with weights pinned outside it (registered buffers)."""
    q, s = _weights(8, 16, 15)
    w = torch.from_numpy(q.copy())
    assert quant_module._pin_packed(w)
    x = torch.from_numpy(_x("gauss", 3, 16, 16))
    with torch.inference_mode():
        for _ in range(3):
            np.testing.assert_array_equal(int8_linear(x, w, s).numpy(), int8_linear(x.numpy(), q, s))


# --- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "w,words",
    [
        (np.zeros((3, 4), np.int16), ["int8", "int16"]),
        (np.zeros((3,), np.int8), ["2-D", "ndim=1"]),
        (np.zeros((1, 131073), np.int8), ["131072", "131073"]),
        ([[1, 2]], ["numpy.ndarray", "list"]),
    ],
    ids=["dtype", "rank", "k_limit", "list"],
)
def test_pack_bad_input(w, words):
    with pytest.raises(ValueError) as info:
        pack_int8_weight(w)
    message = str(info.value)
    assert "pack_int8_weight" in message and "argument 'w_int8'" in message
    assert all(word in message for word in words), message


def test_packed_linear_bad_input():
    q, s = _weights(3, 8, 13)
    packed = pack_int8_weight(q)
    x = _x("gauss", 2, 8, 14)
    with pytest.raises(ValueError, match=r"int8_linear: argument 'w_int8'.*K = 9.*\(3, 8\)"):
        int8_linear(_x("gauss", 2, 9, 1), packed, s)
    with pytest.raises(ValueError, match=r"argument 'w_scale'.*\(3,\).*\(4,\)"):
        int8_linear(x, packed, np.ones(4, np.float32))
    with pytest.raises(ValueError, match=r"argument 'bias'.*\(3,\).*\(2,\)"):
        int8_linear(x, packed, s, np.ones(2, np.float32))
    with pytest.raises(ValueError, match=r"argument 'x'.*finite.*row 1"):
        int8_linear(np.array([[0.0] * 8, [np.inf] + [0.0] * 7], np.float32), packed, s)
    with pytest.raises(TypeError):
        _C.Int8PackedWeight()


@pytest.mark.gpu
def test_packed_weight_with_cuda_x_is_refused():
    q, s = _weights(3, 8, 17)
    with pytest.raises(ValueError, match=r"int8_linear: argument 'w_int8'.*CUDA.*Int8PackedWeight"):
        int8_linear(torch.zeros(2, 8, device="cuda"), pack_int8_weight(q), torch.from_numpy(s).cuda())
