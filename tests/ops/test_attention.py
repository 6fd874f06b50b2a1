"""pyserve.ops.attention_qkv: multi-head attention from a fused Q|K|V projection, against a float64
NumPy reference and torch's scaled_dot_product_attention."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from pyserve import ops
from pyserve.ops import attention_qkv, attention_qkv_bf16, attention_qkv_fast

FMIN = np.finfo(np.float32).min


def reference(qkv, heads, mask=None, scale=None):
    """float64 softmax(scale q k^T + mask) v per head, heads side by side: [B, S, E]."""
    x = np.asarray(qkv, np.float64)
    B, S, C = x.shape
    E = C // 3
    D = E // heads
    scale = 1 / np.sqrt(D) if scale is None else scale
    q, k, v = (x[..., i * E:(i + 1) * E].reshape(B, S, heads, D).transpose(0, 2, 1, 3) for i in range(3))
    s = scale * q @ k.transpose(0, 1, 3, 2)
    if mask is not None:
        m = np.asarray(mask, np.float64)
        s = s + (m if m.ndim == 4 else m.reshape(m.shape[0], 1, -1, S) if m.ndim == 3 else m[:, None, None, :])
    with np.errstate(invalid="ignore"):  # a row of -inf: NaN, as in torch
        s = s - s.max(-1, keepdims=True)
        p = np.exp(s)
        p /= p.sum(-1, keepdims=True)
    return (p @ v).transpose(0, 2, 1, 3).reshape(B, S, E)


def key_mask(B, S, rng):
    lengths = rng.integers(1, S + 1, B)
    return np.where(np.arange(S)[None] < lengths[:, None], 0.0, FMIN).astype(np.float32)


@pytest.mark.parametrize("B,S,H,D", [(1, 128, 12, 32), (2, 17, 4, 16), (3, 5, 2, 64), (1, 1, 1, 32), (2, 9, 3, 8),
                                     (1, 33, 2, 24)])
@pytest.mark.parametrize("mask_kind", ["none", "key", "full"])
def test_matches_float64_reference(B, S, H, D, mask_kind):
    rng = np.random.default_rng(B * 1000 + S * 10 + D)
    qkv = rng.standard_normal((B, S, 3 * H * D)).astype(np.float32) * 2
    mask = None
    if mask_kind == "key":
        mask = key_mask(B, S, rng)  # [B, S]
    elif mask_kind == "full":
        mask = rng.standard_normal((B, S, S)).astype(np.float32)
    got = attention_qkv(qkv, H, mask)
    assert got.dtype == np.float32 and got.shape == (B, S, H * D)
    # fp32 rounding of scores up to ~30 in size moves the softmax by a few 1e-6
    np.testing.assert_allclose(got, reference(qkv, H, mask), rtol=1e-4, atol=2e-5)


def test_fast_path_covers_minilm_and_bert_base():
    if not ops.build_info()["avx2"]:
        pytest.skip("no AVX2 build")
    assert attention_qkv_fast(32) and attention_qkv_fast(64) and attention_qkv_fast(16)
    assert not attention_qkv_fast(8) and not attention_qkv_fast(24)


def test_matches_torch_sdpa_at_minilm_shape_with_hf_mask():
    torch = pytest.importorskip("torch")
    B, S, H, D = 2, 128, 12, 32
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(B, S, 3 * H * D, generator=g)
    lengths = torch.tensor([[33], [128]])
    # HF transformers' extended mask: [B, 1, S, S] floats, 0 where a key is kept, the most negative float elsewhere
    mask = torch.where((torch.arange(S)[None] < lengths)[:, None, None, :].expand(B, 1, S, S), 0.0, float(FMIN))
    q, k, v = (qkv[..., i * H * D:(i + 1) * H * D].view(B, S, H, D).transpose(1, 2) for i in range(3))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=D ** -0.5)
    expected = expected.transpose(1, 2).reshape(B, S, H * D)
    got = attention_qkv(qkv, H, mask, D ** -0.5)
    assert isinstance(got, torch.Tensor)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=2e-6)
    # the same through the key mask broadcast over queries ([B, 1, 1, S] expanded: one row passed)
    km = torch.where(torch.arange(S)[None] < lengths, 0.0, float(FMIN))[:, None, None, :].expand(B, 1, S, S)
    torch.testing.assert_close(attention_qkv(qkv, H, km, D ** -0.5), got, rtol=0, atol=0)


def test_threads_do_not_change_the_result():
    rng = np.random.default_rng(3)
    qkv = rng.standard_normal((2, 64, 3 * 8 * 32)).astype(np.float32)
    mask = key_mask(2, 64, rng)
    before = ops.get_num_threads()
    try:
        ops.set_num_threads(1)
        one = attention_qkv(qkv, 8, mask)
        ops.set_num_threads(2)
        two = attention_qkv(qkv, 8, mask)
    finally:
        ops.set_num_threads(before)
    np.testing.assert_array_equal(one, two)  # each (batch, head) is computed alone, the same way


def test_fully_masked_query_rows_follow_torch():
    rng = np.random.default_rng(4)
    B, S, H, D = 1, 6, 2, 16
    qkv = rng.standard_normal((B, S, 3 * H * D)).astype(np.float32)
    v = qkv[..., 2 * H * D:]
    mask = np.zeros((1, S, S), np.float32)
    mask[0, 2, :] = FMIN  # every key excluded the HF way: the softmax is uniform, the mean of V
    mask[0, 4, :] = -np.inf  # with -inf: NaN, as torch's softmax gives
    got = attention_qkv(qkv, H, mask)
    np.testing.assert_allclose(got[0, 2], v[0].mean(0), rtol=1e-5, atol=1e-6)
    assert np.isnan(got[0, 4]).all()
    keep = [0, 1, 3, 5]
    np.testing.assert_allclose(got[0, keep], reference(qkv, H, mask)[0, keep], rtol=2e-5, atol=2e-6)


def test_nan_input_gives_nan_rows_not_garbage():
    qkv = np.ones((1, 4, 3 * 32), np.float32)
    qkv[0, 1, 0] = np.nan  # query 1, head 0
    got = attention_qkv(qkv, 1)
    assert np.isnan(got[0, 1]).all() and np.isfinite(got[0, [0, 2, 3]]).all()


def test_scale_default_is_inverse_sqrt_head_size():
    rng = np.random.default_rng(5)
    qkv = rng.standard_normal((1, 10, 3 * 2 * 16)).astype(np.float32)
    np.testing.assert_array_equal(attention_qkv(qkv, 2), attention_qkv(qkv, 2, None, 0.25))
    np.testing.assert_allclose(attention_qkv(qkv, 2, None, 1.3), reference(qkv, 2, None, 1.3), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("call,arg", [
    (lambda x: attention_qkv(x, 5), "heads"),
    (lambda x: attention_qkv(x, 0), "heads"),
    (lambda x: attention_qkv(x, True), "heads"),
    (lambda x: attention_qkv(x.astype(np.float64), 2), "qkv"),
    (lambda x: attention_qkv(x[0], 2), "qkv"),
    (lambda x: attention_qkv(x, 2, np.zeros((1, 3, 7), np.float32)), "mask"),
    (lambda x: attention_qkv(x, 2, np.zeros((2, 1, 7), np.float32)), "mask"),
    (lambda x: attention_qkv(x, 2, np.zeros((1, 2, 7, 7), np.float32)), "mask"),
    (lambda x: attention_qkv(x, 2, np.zeros((1, 7), np.int64)), "mask"),
    (lambda x: attention_qkv(x, 2, None, float("nan")), "scale"),
    (lambda x: attention_qkv(x, 2, None, "1"), "scale"),
    (lambda x: attention_qkv(x, 2, None, 1e39), "scale"),  # finite as a double, inf in float32
    (lambda x: attention_qkv(x[..., :-1], 1), "qkv"),  # a last dim that is not 3 * heads * head_size
    (lambda x: attention_qkv(x, 2, None, None, "fp16"), "precision"),
    (lambda x: attention_qkv(x, 2, None, None, None), "precision"),
])
def test_bad_arguments_name_the_argument(call, arg):
    x = np.zeros((1, 7, 3 * 2 * 16), np.float32)
    with pytest.raises(ValueError, match=f"attention_qkv: argument '{arg}'"):
        call(x)


# --- precision="bf16" -----------------------------------------------------------------------------


def to_bf16(x):
    """float32 -> the nearest bfloat16 (round half to even), as float64: what vcvtne2ps2bf16 gives
    for finite values."""
    u = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000).astype(np.uint32)
    return r.view(np.float32).astype(np.float64)


def reference_bf16(qkv, heads, mask=None, scale=None):
    """The bfloat16 kernel's arithmetic in float64: Q, K, V rounded to bfloat16; the exponentials
    rounded to bfloat16 for the weighted sum, their sum unrounded."""
    x = np.asarray(qkv, np.float32)
    B, S, C = x.shape
    E = C // 3
    D = E // heads
    scale = 1 / np.sqrt(D) if scale is None else scale
    q, k, v = (to_bf16(x[..., i * E:(i + 1) * E]).reshape(B, S, heads, D).transpose(0, 2, 1, 3) for i in range(3))
    s = scale * q @ k.transpose(0, 1, 3, 2)
    if mask is not None:
        m = np.asarray(mask, np.float64)
        s = s + (m.reshape(m.shape[0], 1, -1, S) if m.ndim == 3 else m[:, None, None, :])
    s = s - s.max(-1, keepdims=True)
    p = np.exp(s)
    return ((to_bf16(p.astype(np.float32)) @ v) / p.sum(-1, keepdims=True)).transpose(0, 2, 1, 3).reshape(B, S, E)


def _bf16_runs(D: int) -> bool:
    return attention_qkv_bf16(D)


@pytest.mark.parametrize("B,S,H,D", [(1, 128, 12, 32), (2, 17, 4, 16), (3, 5, 2, 64), (1, 1, 1, 32), (1, 33, 2, 48),
                                     (1, 40, 1, 256)])
@pytest.mark.parametrize("mask_kind", ["none", "key", "full"])
def test_bf16_matches_the_bfloat16_reference(B, S, H, D, mask_kind):
    """Where the bfloat16 kernel runs, it computes what reference_bf16 does (up to an exponential's
    rounding to bfloat16 landing the other side of a tie, one bfloat16 step on a few weights: the
    kernel's exponentials are within about 3e-6 of exp's), and
    stays within bfloat16's precision of the float64 result; elsewhere "bf16" is the fp32 result."""
    rng = np.random.default_rng(B * 1000 + S * 10 + D + 7)
    qkv = rng.standard_normal((B, S, 3 * H * D)).astype(np.float32)
    mask = None
    if mask_kind == "key":
        mask = key_mask(B, S, rng)
    elif mask_kind == "full":
        mask = rng.standard_normal((B, S, S)).astype(np.float32)
    got = attention_qkv(qkv, H, mask, precision="bf16")
    assert got.dtype == np.float32 and got.shape == (B, S, H * D)
    if not _bf16_runs(D):
        np.testing.assert_array_equal(got, attention_qkv(qkv, H, mask))
        return
    v_max = float(np.abs(qkv[..., 2 * H * D:]).max())
    bf = reference_bf16(qkv, H, mask)
    np.testing.assert_allclose(got, bf, rtol=0, atol=2e-3 * v_max)
    exact = reference(qkv, H, mask)
    np.testing.assert_allclose(got, exact, rtol=0, atol=1e-2 * v_max)
    # it is the bfloat16 arithmetic: much nearer the emulation than the exact result on average (an
    # exponential rounded to the other bfloat16 neighbour moves a few outputs by a step; S = 1: exact)
    if S > 1:
        assert np.abs(got - bf).mean() < 0.1 * np.abs(got - exact).mean()


def test_bf16_is_twice_as_wide_only_where_the_cpu_has_it():
    """attention_qkv_bf16 follows cpu_kernels()["avx512_bf16"] and the fp32 kernel's head sizes."""
    has = ops.cpu_kernels()["avx512_bf16"]
    for D in (16, 32, 64, 256):
        assert attention_qkv_bf16(D) is (has and attention_qkv_fast(D))
    for D in (8, 24, 272):
        assert attention_qkv_bf16(D) is False
    if not ops.build_info()["avx512_bf16"]:
        assert not has


def test_bf16_special_rows_threads_and_torch_inputs():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(9)
    B, S, H, D = 2, 40, 3, 32
    qkv = rng.standard_normal((B, S, 3 * H * D)).astype(np.float32)
    v = qkv[..., 2 * H * D:]
    mask = np.zeros((B, S, S), np.float32)
    mask[0, 2, :] = FMIN  # every key excluded the HF way: the mean of the (bfloat16) values
    mask[1, 4, :] = -np.inf  # NaN, as in fp32
    qkv_nan = qkv.copy()
    qkv_nan[1, 7, 5] = np.nan  # query 7 of batch 1, head 0
    got = attention_qkv(qkv_nan, H, mask, precision="bf16")
    assert np.isnan(got[1, 4]).all()
    assert np.isnan(got[1, 7, :D]).all() and np.isfinite(got[1, 7, D:]).all()
    tol = 2e-3 * float(np.abs(v).max())
    mean_v = to_bf16(v[0]).mean(0) if _bf16_runs(D) else v[0].mean(0)
    np.testing.assert_allclose(got[0, 2], mean_v, rtol=0, atol=tol)
    before = ops.get_num_threads()
    try:
        ops.set_num_threads(1)
        one = attention_qkv(qkv, H, mask, precision="bf16")
        ops.set_num_threads(2)
        two = attention_qkv(qkv, H, mask, precision="bf16")
    finally:
        ops.set_num_threads(before)
    np.testing.assert_array_equal(one, two)
    t = attention_qkv(torch.from_numpy(qkv), H, torch.from_numpy(mask), precision="bf16")
    assert isinstance(t, torch.Tensor)
    np.testing.assert_array_equal(t.numpy(), two)


def test_bf16_turned_off_by_the_environment_computes_fp32():
    """PYSERVE_DISABLE_AVX512: "bf16" runs the fp32 kernel, bit for bit what "fp32" gives."""
    code = ("import json, numpy as np; from pyserve.ops import attention_qkv, attention_qkv_bf16; "
            "x = np.random.default_rng(1).standard_normal((1, 20, 3 * 64)).astype(np.float32); "
            "print(json.dumps([attention_qkv_bf16(32), "
            "bool(np.array_equal(attention_qkv(x, 2, precision='bf16'), attention_qkv(x, 2)))]))")
    env = {**os.environ, "PYSERVE_DISABLE_AVX512": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [False, True]


def test_avx512_kernel_equals_the_avx2_kernel_bit_for_bit(tmp_path):
    """The fp32 attention's AVX-512 kernel (cpu_kernels()["avx512"]) gives what the AVX2 kernel gives
    (PYSERVE_DISABLE_AVX512), bit for bit (NaN where NaN), over head sizes with and without a 16-column remainder,
    sequences not a multiple of the tile, key / full / NaN / -inf masks, large scores, 2 threads."""
    if not ops.cpu_kernels()["avx512"]:
        pytest.skip("no AVX-512 F/BW/VL on this CPU (or not compiled in)")
    code = """
import sys, numpy as np
from pyserve import ops
from pyserve.ops import attention_qkv
ops.set_num_threads(2)
rng = np.random.default_rng(5)
outs = []
for B, S, H, D in [(1, 128, 12, 32), (2, 17, 3, 16), (1, 1, 2, 64), (3, 33, 2, 48), (1, 200, 4, 32),
                   (2, 16, 1, 256), (1, 31, 2, 80), (1, 9, 2, 112)]:
    for kind in ("none", "key", "full", "special", "large"):
        qkv = rng.standard_normal((B, S, 3 * H * D)).astype(np.float32) * (30 if kind == "large" else 1)
        mask = None
        if kind == "key":
            mask = np.where(rng.random((B, S)) < 0.3, np.finfo(np.float32).min, 0).astype(np.float32)
        elif kind != "none":
            mask = rng.standard_normal((B, S, S)).astype(np.float32)
            if kind == "special":
                mask[0, 0, 0] = np.nan
                mask[0, -1, :] = -np.inf
        outs.append(attention_qkv(qkv, H, mask))
np.savez(sys.argv[1], *outs)
"""
    results = []
    for name, extra in (("wide", {}), ("avx2", {"PYSERVE_DISABLE_AVX512": "1"})):
        path = tmp_path / f"{name}.npz"
        out = subprocess.run([sys.executable, "-c", code, str(path)], env={**os.environ, **extra},
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        results.append(np.load(path))
    wide, avx2 = results
    assert len(wide.files) == 40
    for k in wide.files:  # the same bits, NaN for NaN (a NaN's sign and payload are not kept alike)
        a, b = wide[k], avx2[k]
        nan = np.isnan(a)
        assert np.array_equal(nan, np.isnan(b)), k
        assert np.array_equal(a[~nan].view(np.uint32), b[~nan].view(np.uint32)), k
    assert np.isnan(wide["arr_3"][0, 0]).all() and np.isnan(wide["arr_3"][0, -1]).all()


def test_a_2d_mask_is_a_key_mask_and_a_wrong_one_is_named_with_its_own_shape():
    """[B, S] is one row of key offsets per batch row (documented; unlike SDPA's 2-D [L, S]); a 2-D
    or 1-D mask of another shape is refused showing the shape given, not an internal reshape."""
    rng = np.random.default_rng(8)
    qkv = rng.standard_normal((2, 6, 3 * 2 * 16)).astype(np.float32)
    km = key_mask(2, 6, rng)
    np.testing.assert_array_equal(attention_qkv(qkv, 2, km), attention_qkv(qkv, 2, km[:, None, :]))
    for bad in (np.zeros((6, 6), np.float32), np.zeros((2, 5), np.float32), np.zeros(7, np.float32)):
        with pytest.raises(ValueError, match=rf"argument 'mask'.*got shape \({bad.shape[0]},"):
            attention_qkv(qkv, 2, bad)


def test_bf16_single_key_gives_the_rounded_values():
    """S = 1: the softmax weight is exp(0) = 1 exactly, so each output is its value rounded to
    bfloat16 (where the bfloat16 kernel runs), or the value itself."""
    rng = np.random.default_rng(10)
    qkv = rng.standard_normal((3, 1, 3 * 4 * 32)).astype(np.float32)
    v = qkv[..., 2 * 4 * 32:]
    got = attention_qkv(qkv, 4, precision="bf16")
    np.testing.assert_array_equal(got, to_bf16(v).astype(np.float32) if _bf16_runs(32) else v)


@pytest.mark.parametrize("B,S,E", [(1, 128, 384), (3, 7, 5), (2, 1, 16), (4, 33, 64)])
@pytest.mark.parametrize("kind", ["int64", "float32"])
def test_mean_pool_normalize_matches_the_torch_ops(B, S, E, kind):
    """_C.mean_pool_normalize against sentence-transformers' pooling written in torch (float64): masked
    mean then L2 normalisation, int64 key masks and float32 weights; a row with no kept token gives
    zeros (count floored by eps_count, then the norm by eps_norm), as the torch ops do."""
    torch = pytest.importorskip("torch")
    from pyserve import _C

    rng = np.random.default_rng(B * 100 + S + E)
    h = rng.standard_normal((B, S, E)).astype(np.float32)
    lengths = rng.integers(1, S + 1, B)
    lengths[-1] = 0 if B > 1 else lengths[-1]
    m = (np.arange(S)[None] < lengths[:, None]).astype(np.int64)
    if kind == "float32":
        m = (m * rng.uniform(0.5, 2.0, (B, S))).astype(np.float32)
    got = _C.mean_pool_normalize(h, m, 1e-9, 1e-12)
    th, f = torch.from_numpy(h).double(), torch.from_numpy(m).double().unsqueeze(-1)
    d = (th * f).sum(1) / f.sum(1).clamp_min(1e-9)
    ref = (d / torch.linalg.vector_norm(d, 2.0, [1], True).clamp_min(1e-12)).numpy()
    assert got.shape == (B, E) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    if B > 1:
        assert not got[-1].any()


def test_mean_pool_skips_masked_tokens_and_names_bad_arguments():
    from pyserve import _C

    h = np.ones((1, 4, 3), np.float32)
    h[0, 3] = np.nan  # a padding position's value never reaches the embedding
    got = _C.mean_pool_normalize(h, np.array([[1, 1, 1, 0]]), 1e-9, 1e-12)
    np.testing.assert_allclose(got, np.full((1, 3), 1 / np.sqrt(3), np.float32), rtol=1e-6)
    for call, arg in ((lambda: _C.mean_pool_normalize(h.astype(np.float64), np.ones((1, 4), np.int64), 0, 0), "'h'"),
                      (lambda: _C.mean_pool_normalize(h, np.ones((1, 5), np.int64), 0, 0), "'mask'"),
                      (lambda: _C.mean_pool_normalize(h, np.ones((1, 4), np.int32), 0, 0), "'mask'"),
                      (lambda: _C.mean_pool_normalize(h, np.ones((1, 4), np.int64), -1.0, 0), "'eps_count'"),
                      (lambda: _C.mean_pool_normalize(h, np.ones((1, 4), np.int64), 0, float("inf")), "'eps_norm'")):
        with pytest.raises(ValueError, match=f"mean_pool_normalize: argument {arg}"):
            call()
