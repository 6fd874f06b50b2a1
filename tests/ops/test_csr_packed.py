"""pyserve.ops.pack_csr_weight + csr_linear(x, packed): against the float64 densify-and-matmul
reference (pyserve.ops.reference), against the raw-CSR path, and its argument checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pyserve import _C
from pyserve.ops import csr_linear, get_num_threads, pack_csr_weight, set_num_threads
from pyserve.ops import sparse as sparse_module
from pyserve.ops.reference import csr_linear_reference

from test_csr_linear import BAD, PATHS, make_csr  # noqa: E402  (tests/ops is on sys.path)

# sort_rows: -1 automatic (the default of pack_csr_weight), 0 natural row order, 1 rows sorted by
# length within windows of 64 rows.
WINDOWS = [-1, 0, 1]


def pack(indptr, indices, values, K, window=-1):
    return _C.pack_csr_weight(indptr, indices, values, K, window)


def run(x, w, bias=None, path="avx2"):
    if path == "portable":
        return _C.csr_linear_packed(x, w, bias, True)
    return csr_linear(x, w, bias=bias)


def check(y, x, indptr, indices, values, bias=None):
    ref = csr_linear_reference(x, indptr, indices, values, bias)
    assert y.dtype == np.float32 and y.shape == ref.shape
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=2e-5 * np.sqrt(max(1, x.shape[1])))


@pytest.fixture
def threads():
    saved = get_num_threads()
    yield set_num_threads
    set_num_threads(saved)


SHAPES = [(1, 1, 1), (1, 37, 29), (1, 50, 300), (3, 17, 8), (8, 64, 33), (9, 31, 77), (64, 40, 100),
          (65, 19, 45), (130, 7, 21), (5, 0, 7), (0, 5, 7), (4, 6, 0), (1, 8, 16), (2, 9, 16)]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("sparsity", [0.0, 0.9, 1.0])
@pytest.mark.parametrize("B,N,K", SHAPES)
def test_matches_reference(B, N, K, sparsity, window, path, threads):
    threads(1)
    indptr, indices, values = make_csr(N, K, sparsity, seed=B * 1000 + N, empty_rows=(0, 3))
    w = pack(indptr, indices, values, K, window)
    assert w.shape == (N, K) and w.nnz == len(indices) and w.index_bits == 16
    rng = np.random.default_rng(1)
    x = rng.standard_normal((B, K)).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    check(run(x, w, None, path), x, indptr, indices, values)
    check(run(x, w, bias, path), x, indptr, indices, values, bias)


@pytest.mark.parametrize("path", PATHS)
def test_rows_of_every_length_and_every_batch_tail(path, threads):
    # Row lengths 0..40 in shuffled order: ragged slices (the masked part of the SpMV loop), empty
    # rows, a last slice of 1 row (41 = 5 * 8 + 1), and B across the 8-column transposes and the
    # 64-column passes.
    threads(1)
    k = 64
    lengths = np.random.default_rng(0).permutation(41)
    rows = [np.sort(np.random.default_rng(int(r)).choice(k, r, replace=False)) for r in lengths]
    indptr = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
    indices = np.concatenate(rows).astype(np.int32)
    values = np.random.default_rng(0).standard_normal(len(indices)).astype(np.float32)
    for window in WINDOWS:
        w = pack(indptr, indices, values, k, window)
        for B in (1, 2, 7, 8, 9, 16, 24, 40, 56, 63, 64, 65, 130):
            x = np.random.default_rng(B).standard_normal((B, k)).astype(np.float32)
            bias = np.random.default_rng(B + 1).standard_normal(41).astype(np.float32)
            check(run(x, w, bias, path), x, indptr, indices, values, bias)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("K,bits", [(65535, 16), (65536, 16), (65537, 32), (100_003, 32)])
def test_index_width_at_the_16_bit_boundary(K, bits, path):
    # Columns 0, K - 1 and K - 2 in every row: the largest index (65535 for K = 65536) must survive
    # the 16-bit store, and K = 65537 (index 65536) must fall back to 32-bit indices.
    rng = np.random.default_rng(K)
    N = 11
    rows = [np.unique(np.concatenate([[0, K - 2, K - 1], rng.choice(K, 5 + n, replace=False)])) for n in range(N)]
    indptr = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
    indices = np.concatenate(rows).astype(np.int64)
    values = rng.standard_normal(len(indices)).astype(np.float32)
    w = pack_csr_weight(indptr, indices, values, K)
    assert w.index_bits == bits
    for B in (1, 3):
        x = rng.standard_normal((B, K)).astype(np.float32)
        bias = rng.standard_normal(N).astype(np.float32)
        check(run(x, w, bias, path), x, indptr, indices, values, bias)


@pytest.mark.parametrize("path", PATHS)
def test_thread_count_does_not_change_the_result(threads, path):
    # Big enough (>= 2**18 multiply-adds) for the kernels to use the threads at all.
    indptr, indices, values = make_csr(1500, 500, 0.6, seed=3, empty_rows=range(0, 1500, 13))
    for window in WINDOWS:
        w = pack(indptr, indices, values, 500, window)
        for B in (1, 3, 16, 70):
            x = np.random.default_rng(B).standard_normal((B, 500)).astype(np.float32)
            threads(1)
            y1 = run(x, w, None, path)
            threads(2)
            y2 = run(x, w, None, path)
            np.testing.assert_array_equal(y1, y2)  # each row is summed in the same order on any thread
            if B in (1, 16):
                check(y2, x, indptr, indices, values)


def test_agrees_with_the_raw_path_on_non_finite_x():
    # CSR semantics: only stored nonzeros multiply x. A row without column 0 stays finite when
    # x[:, 0] is inf or NaN, although its slice's padding holds column index 0 (the padded lanes
    # must add nothing, not 0 * inf = NaN).
    K = 40
    lengths = [0, 1, 2, 9, 17, 3, 30, 4, 5, 12, 1]
    rng = np.random.default_rng(2)
    rows = [np.sort(rng.choice(np.arange(1, K), n, replace=False)) for n in lengths]
    rows[3] = np.concatenate([[0], rows[3][1:]])  # one row does read column 0
    indptr = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int32)
    indices = np.concatenate(rows).astype(np.int32)
    values = rng.standard_normal(len(indices)).astype(np.float32)
    for bad in (np.inf, -np.inf, np.nan):
        for B in (1, 4):
            x = rng.standard_normal((B, K)).astype(np.float32)
            x[:, 0] = bad
            raw = csr_linear(x, indptr, indices, values)
            for window in WINDOWS:
                w = pack(indptr, indices, values, K, window)
                for path in PATHS:
                    y = run(x, w, None, path)
                    np.testing.assert_array_equal(np.isfinite(y), np.isfinite(raw))
                    fin = np.isfinite(raw)
                    np.testing.assert_allclose(y[fin], raw[fin], rtol=1e-5, atol=1e-5)
                    assert np.isfinite(y[:, [n for n in range(len(rows)) if n != 3]]).all()


def test_torch_and_numpy_in_and_out_and_non_contiguous_x():
    indptr, indices, values = make_csr(33, 40, 0.8, seed=4)
    w = pack_csr_weight(torch.from_numpy(indptr), torch.from_numpy(indices), torch.from_numpy(values), 40)
    x = torch.randn(6, 40)
    bias = torch.randn(33)
    y = csr_linear(x, w, bias=bias)
    assert isinstance(y, torch.Tensor) and y.dtype == torch.float32 and y.shape == (6, 33)
    check(y.numpy(), x.numpy(), indptr, indices, values, bias.numpy())
    base = np.random.default_rng(5).standard_normal((40, 16)).astype(np.float32)
    for xx in (base.T, np.asfortranarray(base.T), base.T.astype(">f4")):
        y = csr_linear(xx, w)
        assert isinstance(y, np.ndarray)
        check(y, np.ascontiguousarray(xx, dtype=np.float32), indptr, indices, values)
    check(csr_linear(torch.from_numpy(base).T, w).numpy(), base.T, indptr, indices, values)


def test_packed_copy_does_not_see_later_writes_to_the_source():
    indptr, indices, values = make_csr(20, 30, 0.5, seed=6)
    w = pack_csr_weight(indptr, indices, values, 30)
    x = np.random.default_rng(6).standard_normal((2, 30)).astype(np.float32)
    before = csr_linear(x, w)
    values *= 2
    indices[:] = 0
    np.testing.assert_array_equal(csr_linear(x, w), before)
    assert w.nbytes > 0 and w.padding_ratio >= 1.0


def test_bert_shapes_store_6_bytes_per_nonzero_and_little_padding():
    for n, k, s in [(3072, 768, 0.9), (3072, 768, 0.99), (768, 3072, 0.95)]:
        indptr, indices, values = make_csr(n, k, s, seed=7)
        w = pack_csr_weight(indptr, indices, values, k)
        assert w.index_bits == 16 and 1.0 <= w.padding_ratio < 1.2, (n, k, s, w.padding_ratio, w.sorted_rows)
        per_nnz = (w.nbytes - 16 * n) / w.nnz  # entries; the per-row tables are 16 bytes a row at most
        assert per_nnz < 6 * 1.2


@settings(max_examples=40, deadline=None)
@given(
    B=st.integers(0, 20), N=st.integers(0, 30), K=st.integers(1, 40),
    density=st.floats(0.0, 1.0), seed=st.integers(0, 2**32 - 1), window=st.sampled_from(WINDOWS),
    with_bias=st.booleans(),
)
def test_property_matches_reference(B, N, K, density, seed, window, with_bias):
    indptr, indices, values = make_csr(N, K, 1.0 - density, seed=seed)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, K)).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32) if with_bias else None
    w = pack(indptr, indices, values, K, window)
    for path in PATHS:
        check(run(x, w, bias, path), x, indptr, indices, values, bias)


# ---- pinned artifact weights -------------------------------------------------------------------

def test_pinned_tensors_take_the_packed_kernel_and_follow_in_place_changes(monkeypatch):
    indptr, indices, values = make_csr(40, 50, 0.7, seed=8)
    t = [torch.from_numpy(a.astype(np.int64) if a.dtype != np.float32 else a.copy()) for a in (indptr, indices, values)]
    assert sparse_module._pin_csr(*t, 50)
    calls = []
    real = _C.csr_linear_packed
    monkeypatch.setattr(_C, "csr_linear_packed", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(3, 50)
    check(csr_linear(x, *t).numpy(), x.numpy(), indptr, indices, values)
    assert calls == [1]
    t[2].mul_(2)  # an in-place torch op bumps the version counter: re-packed
    check(csr_linear(x, *t).numpy(), x.numpy(), indptr, indices, 2 * values)
    assert calls == [1, 1]
    # Other tensors with the same contents, numpy arrays, a different x width: the raw path.
    csr_linear(x, t[0].clone(), t[1], t[2])
    csr_linear(x.numpy(), indptr, indices, values)
    assert calls == [1, 1]
    with pytest.raises(ValueError, match=r"argument 'indices': expected column indices in \[0, K\) = \[0, 49\)"):
        csr_linear(torch.randn(3, 49), *t)
    # An in-place change that breaks the structure: no packed copy, and the raw path reports it.
    t[1][0] = 99
    assert sparse_module._cached_csr(*t) is None
    with pytest.raises(ValueError, match="argument 'indices'"):
        csr_linear(x, *t)


def test_pin_refuses_what_it_cannot_track():
    indptr, indices, values = make_csr(5, 6, 0.5, seed=9)
    assert not sparse_module._pin_csr(indptr, indices, values, 6)  # numpy arrays
    with torch.inference_mode():
        t = [torch.from_numpy(a) for a in (indptr, indices, values)]
        inf = [a.clone() for a in t]
    assert not sparse_module._pin_csr(*inf, 6)
    assert not sparse_module._pin_csr(*t, 3)  # invalid for K = 3


# ---- bad input ---------------------------------------------------------------------------------

# The structural cases of test_csr_linear's table, raised by pack_csr_weight instead of each call.
PACK_BAD = [c for c in BAD if c[2] in ("indptr", "indices", "values") and c[0] != "x mismatched K"]


@pytest.mark.parametrize("changes,arg,expected", [c[1:] for c in PACK_BAD], ids=[c[0] for c in PACK_BAD])
def test_bad_structure_is_refused_at_pack_time(changes, arg, expected):
    indptr, indices, values = make_csr(4, 6, 0.5, seed=8)
    args = dict(indptr=indptr, indices=indices, values=values)
    args.update({k: v for k, v in changes.items() if k in args})
    for fn in (lambda: pack_csr_weight(**args, K=6), lambda: _C.pack_csr_weight(**args, K=6)):
        with pytest.raises(ValueError) as info:
            fn()
        msg = str(info.value)
        assert msg.startswith(f"pack_csr_weight: argument '{arg}': expected"), msg
        assert "got" in msg and expected in msg, msg


def test_bad_index_message_names_the_position():
    indptr, indices, values = make_csr(30, 20, 0.5, seed=10)
    bad = indices.copy()
    bad[17] = 20
    with pytest.raises(ValueError, match=r"pack_csr_weight: argument 'indices': expected column indices in "
                                         r"\[0, K\) = \[0, 20\) with K the number of columns, got indices\[17\] = 20 \(row 1\)"):
        pack_csr_weight(indptr, bad, values, 20)


@pytest.mark.parametrize("K,expected", [(-1, "expected 0 <= K < 2\\*\\*31"), (2**31, "expected 0 <= K < 2\\*\\*31"),
                                        (6.0, "expected an int"), (True, "expected an int"), ("6", "expected an int")])
def test_bad_k(K, expected):
    indptr, indices, values = make_csr(4, 6, 0.5, seed=8)
    with pytest.raises(ValueError, match=rf"pack_csr_weight: argument 'K': {expected}"):
        pack_csr_weight(indptr, indices, values, K)
    if isinstance(K, int) and not isinstance(K, bool):
        with pytest.raises(ValueError, match=rf"pack_csr_weight: argument 'K': {expected}"):
            _C.pack_csr_weight(indptr, indices, values, K)


def test_bad_call_arguments_with_a_packed_weight():
    indptr, indices, values = make_csr(4, 6, 0.5, seed=8)
    w = pack_csr_weight(indptr, indices, values, 6)
    x = np.ones((2, 6), np.float32)
    cases = [
        (dict(x=np.ones((2, 5), np.float32)), "x", r"K = 6 \(the packed weight's columns\), got shape \(2, 5\)"),
        (dict(x=np.ones((2, 6))), "x", "float32"),
        (dict(x=np.ones(6, np.float32)), "x", "2-D"),
        (dict(bias=np.zeros(5, np.float32)), "bias", r"\(4,\)"),
        (dict(bias=np.zeros(4)), "bias", "float32"),
        (dict(indices=indices), "indices", "expected None with a CsrPackedWeight"),
        (dict(values=values), "values", "expected None with a CsrPackedWeight"),
    ]
    for changes, arg, expected in cases:
        args = dict(x=x, indices=None, values=None, bias=None)
        args.update(changes)
        with pytest.raises(ValueError, match=rf"csr_linear: argument '{arg}': .*{expected}"):
            csr_linear(args["x"], w, args["indices"], args["values"], bias=args["bias"])
    with pytest.raises(ValueError, match="csr_linear: argument 'indices': expected a \\[nnz\\] array with a raw indptr"):
        csr_linear(x, indptr)
    with pytest.raises(ValueError, match="argument 'x': expected a C-contiguous"):
        _C.csr_linear_packed(np.ones((6, 2), np.float32).T, w)
    with pytest.raises(TypeError):
        _C.CsrPackedWeight()
