"""pyserve.ops.csr_linear against the float64 densify-and-matmul reference, and its argument checks."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pyserve import _C
from pyserve.ops import build_info, csr_linear, get_num_threads, set_num_threads
from pyserve.ops.reference import csr_linear_reference

PATHS = ["avx2", "portable"] if _C.csr_linear_has_avx2() else ["portable"]


def make_csr(n, k, sparsity, seed=0, index_dtype=np.int32, empty_rows=()):
    """Random W [n, k] with about `sparsity` zeros as (indptr, indices, values), canonical CSR."""
    rng = np.random.default_rng(seed)
    mask = rng.random((n, k)) >= sparsity
    for r in empty_rows:
        if r < n:
            mask[r] = False
    rows, cols = np.nonzero(mask)
    indptr = np.zeros(n + 1, dtype=index_dtype)
    np.cumsum(np.bincount(rows, minlength=n), out=indptr[1:])
    return indptr, cols.astype(index_dtype), rng.standard_normal(len(cols)).astype(np.float32)


def run(x, indptr, indices, values, bias=None, path="avx2"):
    """The public op for the default path, the raw binding with force_portable for the fallback."""
    if path == "portable":
        return _C.csr_linear(x, indptr, indices, values, bias, None, True)
    return csr_linear(x, indptr, indices, values, bias)


@pytest.fixture
def threads():
    saved = get_num_threads()
    yield set_num_threads
    set_num_threads(saved)


def check(y, x, indptr, indices, values, bias=None):
    ref = csr_linear_reference(x, indptr, indices, values, bias)
    assert y.dtype == np.float32 and y.shape == ref.shape
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=2e-5 * np.sqrt(max(1, x.shape[1])))


# B, N, K: B = 1 (SpMV), odd sizes, K and B not multiples of 8, B across the 64-column passes,
# and the empty cases N = 0, B = 0, K = 0.
SHAPES = [(1, 1, 1), (1, 37, 29), (1, 50, 300), (3, 17, 8), (8, 64, 33), (9, 31, 77), (64, 40, 100),
          (65, 19, 45), (130, 7, 21), (5, 0, 7), (0, 5, 7), (4, 6, 0)]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("nthreads", [1, 2])
@pytest.mark.parametrize("sparsity", [0.0, 0.9, 1.0])
@pytest.mark.parametrize("B,N,K", SHAPES)
def test_matches_reference(B, N, K, sparsity, nthreads, path, threads):
    threads(nthreads)
    indptr, indices, values = make_csr(N, K, sparsity, seed=B * 1000 + N, empty_rows=(0, 3))
    rng = np.random.default_rng(1)
    x = rng.standard_normal((B, K)).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    check(run(x, indptr, indices, values, None, path), x, indptr, indices, values)
    check(run(x, indptr, indices, values, bias, path), x, indptr, indices, values, bias)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("indptr_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("B", [1, 5, 8, 70])
def test_index_dtypes(B, index_dtype, indptr_dtype, path):
    indptr, indices, values = make_csr(45, 200, 0.8, seed=B, index_dtype=index_dtype)
    indptr = indptr.astype(indptr_dtype)
    x = np.random.default_rng(B).standard_normal((B, 200)).astype(np.float32)
    check(run(x, indptr, indices, values, None, path), x, indptr, indices, values)


def test_long_rows_exercise_every_vector_tail():
    # Row lengths 0..40 cover the 16-wide, 8-wide and scalar tails of the SpMV loop.
    k = 64
    rows = [np.sort(np.random.default_rng(r).choice(k, r, replace=False)) for r in range(41)]
    indptr = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
    indices = np.concatenate(rows).astype(np.int32)
    values = np.random.default_rng(0).standard_normal(len(indices)).astype(np.float32)
    for B in (1, 2, 8, 16, 24, 40, 56, 64):
        x = np.random.default_rng(B).standard_normal((B, k)).astype(np.float32)
        for path in PATHS:
            check(run(x, indptr, indices, values, None, path), x, indptr, indices, values)


@pytest.mark.parametrize("path", PATHS)
def test_thread_count_does_not_change_the_result(threads, path):
    # Big enough (>= 2**18 multiply-adds) for the kernel to use the threads at all.
    indptr, indices, values = make_csr(1500, 500, 0.6, seed=3, empty_rows=range(0, 1500, 13))
    for B in (1, 3, 16, 70):
        x = np.random.default_rng(B).standard_normal((B, 500)).astype(np.float32)
        threads(1)
        y1 = run(x, indptr, indices, values, None, path)
        threads(2)
        y2 = run(x, indptr, indices, values, None, path)
        np.testing.assert_array_equal(y1, y2)  # each row is summed in the same order on any thread
        if B in (1, 16):
            check(y2, x, indptr, indices, values)
        bad = indices.copy()
        first = len(bad) // 2
        bad[first] = 500
        bad[-3] = -1
        with pytest.raises(ValueError, match=rf"indices\[{first}\] = 500"):
            run(x, indptr, bad, values, None, path)


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_torch_in_torch_out():
    indptr, indices, values = make_csr(33, 40, 0.8, seed=4)
    x = torch.randn(6, 40)
    bias = torch.randn(33)
    y = csr_linear(x, torch.from_numpy(indptr), torch.from_numpy(indices), torch.from_numpy(values), bias)
    assert isinstance(y, torch.Tensor) and y.dtype == torch.float32 and y.shape == (6, 33)
    check(y.numpy(), x.numpy(), indptr, indices, values, bias.numpy())
    # A weight made by torch itself, and a tensor that requires grad.
    w = torch.randn(33, 40) * (torch.rand(33, 40) > 0.7)
    csr = w.to_sparse_csr()
    xg = torch.randn(3, 40, requires_grad=True)
    y = csr_linear(xg, csr.crow_indices(), csr.col_indices(), csr.values())
    torch.testing.assert_close(y, xg.detach() @ w.T, rtol=1e-5, atol=1e-5)


def test_numpy_in_numpy_out_and_non_contiguous_inputs():
    indptr, indices, values = make_csr(21, 30, 0.5, seed=5)
    base = np.random.default_rng(5).standard_normal((30, 16)).astype(np.float32)
    for x in (base.T, np.asfortranarray(base.T), np.repeat(base.T, 2, axis=0)[::2],
              base.T.astype(">f4")):
        y = csr_linear(x, indptr, indices, values)
        assert isinstance(y, np.ndarray)
        check(y, np.ascontiguousarray(x, dtype=np.float32), indptr, indices, values)
    wide_indices = np.repeat(indices, 2)[::2]  # a strided view of the indices
    y = csr_linear(base.T, indptr, wide_indices, values[::1])
    check(y, base.T, indptr, indices, values)
    xt = torch.from_numpy(base).T  # transposed torch view
    check(csr_linear(xt, indptr, indices, values).numpy(), base.T, indptr, indices, values)


def test_matches_dense_torch_linear_at_bert_shape():
    indptr, indices, values = make_csr(768, 3072, 0.9, seed=6)
    w = np.zeros((768, 3072), np.float32)
    w[np.repeat(np.arange(768), np.diff(indptr)), indices] = values
    x = torch.randn(8, 3072)
    b = torch.randn(768)
    y = csr_linear(x, indptr, indices, values, b)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, torch.from_numpy(w), b), rtol=1e-4, atol=1e-4)


def test_gil_released_concurrent_calls(threads):
    threads(1)
    indptr, indices, values = make_csr(500, 400, 0.9, seed=7)
    xs = [np.random.default_rng(i).standard_normal((4, 400)).astype(np.float32) for i in range(4)]
    expect = [csr_linear(x, indptr, indices, values) for x in xs]
    got = [None] * 4

    def work(i):
        for _ in range(20):
            got[i] = csr_linear(xs[i], indptr, indices, values)

    ts = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for e, g in zip(expect, got):
        np.testing.assert_array_equal(e, g)


@settings(max_examples=40, deadline=None)
@given(
    B=st.integers(0, 20), N=st.integers(0, 20), K=st.integers(1, 40),
    density=st.floats(0.0, 1.0), seed=st.integers(0, 2**32 - 1),
    index_dtype=st.sampled_from([np.int32, np.int64]), with_bias=st.booleans(),
)
def test_property_matches_reference(B, N, K, density, seed, index_dtype, with_bias):
    indptr, indices, values = make_csr(N, K, 1.0 - density, seed=seed, index_dtype=index_dtype)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, K)).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32) if with_bias else None
    for path in PATHS:
        check(run(x, indptr, indices, values, bias, path), x, indptr, indices, values, bias)


# ---- bad input ---------------------------------------------------------------------------------

def good():
    indptr, indices, values = make_csr(4, 6, 0.5, seed=8)
    return dict(x=np.ones((2, 6), np.float32), indptr=indptr, indices=indices, values=values,
                bias=np.zeros(4, np.float32))


def _replace(**changes):
    args = good()
    args.update(changes)
    return args


def _bad_cases():
    g = good()
    ip, ix = g["indptr"], g["indices"]
    nnz = len(ix)
    non_monotone = ip.copy()
    non_monotone[2] = ip[3] + 1 if ip[3] + 1 <= nnz else nnz
    non_monotone[3] = non_monotone[2] - 1
    unsorted = ix.copy()
    row = int(np.argmax(np.diff(ip) >= 2))  # a row with two nonzeros
    unsorted[ip[row]], unsorted[ip[row] + 1] = ix[ip[row] + 1], ix[ip[row]]
    dup = ix.copy()
    dup[ip[row] + 1] = dup[ip[row]]
    too_big = ix.copy()
    too_big[-1] = 6
    negative = ix.copy()
    negative[0] = -1
    shifted = ip.copy()
    shifted[0] = 1
    return [
        ("x dtype float64", dict(x=np.ones((2, 6))), "x", "float32"),
        ("x int32", dict(x=np.ones((2, 6), np.int32)), "x", "float32"),
        ("x rank 1", dict(x=np.ones(6, np.float32)), "x", "2-D"),
        ("x rank 3", dict(x=np.ones((1, 2, 6), np.float32)), "x", "2-D"),
        ("x a list", dict(x=[[1.0] * 6]), "x", "numpy.ndarray"),
        ("x mismatched K", dict(x=np.ones((2, 5), np.float32)), "indices", "[0, 5)"),
        ("indptr float", dict(indptr=ip.astype(np.float32)), "indptr", "int32 or int64"),
        ("indptr uint64", dict(indptr=ip.astype(np.uint64)), "indptr", "int32 or int64"),
        ("indptr rank 2", dict(indptr=ip.reshape(1, -1)), "indptr", "1-D"),
        ("indptr empty", dict(indptr=np.zeros(0, np.int32)), "indptr", "at least 1"),
        ("indptr[0] != 0", dict(indptr=shifted), "indptr", "indptr[0] == 0"),
        ("indptr non-monotone", dict(indptr=non_monotone), "indptr", "non-decreasing"),
        ("indptr[-1] != nnz", dict(indptr=np.append(ip[:-1], nnz - 1).astype(np.int32)), "indptr", "nnz"),
        ("indptr too long for nnz", dict(indptr=np.append(ip, nnz + 5).astype(np.int32), bias=None), "indptr", "nnz"),
        ("indices float", dict(indices=ix.astype(np.float32)), "indices", "int32 or int64"),
        ("indices int16", dict(indices=ix.astype(np.int16)), "indices", "int32 or int64"),
        ("indices rank 2", dict(indices=ix.reshape(1, -1)), "indices", "1-D"),
        ("index out of range", dict(indices=too_big), "indices", "[0, 6)"),
        ("index negative", dict(indices=negative), "indices", "[0, 6)"),
        ("indices unsorted", dict(indices=unsorted), "indices", "strictly increasing"),
        ("indices duplicated", dict(indices=dup), "indices", "strictly increasing"),
        ("values float64", dict(values=g["values"].astype(np.float64)), "values", "float32"),
        ("values short", dict(values=g["values"][:-1]), "values", f"({nnz},)"),
        ("values rank 2", dict(values=g["values"].reshape(1, -1)), "values", "1-D"),
        ("bias wrong length", dict(bias=np.zeros(5, np.float32)), "bias", "(4,)"),
        ("bias float64", dict(bias=np.zeros(4)), "bias", "float32"),
        ("bias rank 2", dict(bias=np.zeros((1, 4), np.float32)), "bias", "1-D"),
    ]


BAD = _bad_cases()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("changes,arg,expected", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_input_raises_value_error_naming_the_argument(changes, arg, expected, path):
    args = _replace(**changes)
    with pytest.raises(ValueError) as info:
        if path == "portable" and isinstance(args["x"], np.ndarray):
            _C.csr_linear(args["x"], args["indptr"], args["indices"], args["values"], args["bias"], None, True)
        else:
            csr_linear(**args)
    msg = str(info.value)
    assert msg.startswith("csr_linear: argument "), msg
    assert f"'{arg}'" in msg and "expected" in msg and "got" in msg, msg
    assert expected in msg, msg


@pytest.mark.parametrize("B", [0, 1, 3, 9, 70])
def test_bad_index_is_reported_for_every_batch_path(B):
    # The kernel validates rows as it goes; every batch path (empty, SpMV, SpMM) must refuse.
    args = good()
    args["indices"] = args["indices"].copy()
    args["indices"][-1] = 1000
    args["x"] = np.ones((B, 6), np.float32)
    with pytest.raises(ValueError, match=r"indices\[\d+\] = 1000"):
        csr_linear(**args)


def test_raw_binding_refuses_non_contiguous_and_out_on_cpu():
    g = good()
    x = np.ones((6, 2), np.float32).T
    with pytest.raises(ValueError, match="argument 'x': expected a C-contiguous"):
        _C.csr_linear(x, g["indptr"], g["indices"], g["values"])
    with pytest.raises(ValueError, match="argument 'out': expected None"):
        _C.csr_linear(g["x"], g["indptr"], g["indices"], g["values"], None, np.zeros((2, 4), np.float32))


def test_torch_tensor_on_other_device_or_dtype():
    g = good()
    with pytest.raises(ValueError, match="argument 'x': expected dtype float32, got torch.float64"):
        csr_linear(torch.ones(2, 6, dtype=torch.float64), g["indptr"], g["indices"], g["values"])
    with pytest.raises(ValueError, match="argument 'x': expected dtype float32"):
        csr_linear(torch.ones(2, 6, dtype=torch.bfloat16), g["indptr"], g["indices"], g["values"])
    with pytest.raises(ValueError, match="argument 'indptr': expected a CPU tensor"):
        csr_linear(torch.ones(2, 6), torch.from_numpy(g["indptr"]).to("meta"), g["indices"], g["values"])


@pytest.mark.skipif(build_info()["cuda"], reason="the CUDA path is compiled in")
def test_cuda_input_without_cuda_build_names_the_op():
    class FakeCuda:
        __cuda_array_interface__ = {"shape": (1, 1), "typestr": "<f4", "data": (0, False), "version": 3}

    g = good()
    with pytest.raises(RuntimeError, match="csr_linear: .*CUDA"):
        _C.csr_linear(FakeCuda(), g["indptr"], g["indices"], g["values"])


@pytest.mark.parametrize("n", [0, -1])
def test_set_num_threads_refuses_less_than_one(n, threads):
    with pytest.raises(ValueError, match=rf"set_num_threads: argument 'n': expected an integer >= 1, got {n}"):
        set_num_threads(n)
    with pytest.raises(ValueError, match="set_num_threads: argument 'n'"):
        _C.set_num_threads(n)


def test_set_num_threads_round_trip(threads):
    for n in (1, 2, 3):
        set_num_threads(n)
        assert get_num_threads() == n
    with pytest.raises(ValueError, match="expected an integer >= 1, got float"):
        set_num_threads(2.0)
    with pytest.raises(ValueError, match="expected an integer >= 1, got bool"):
        set_num_threads(True)


def test_num_threads_applies_to_calls_from_other_python_threads(threads):
    threads(1)
    seen = []
    t = threading.Thread(target=lambda: seen.append(get_num_threads()))
    t.start()
    t.join()
    assert seen == [1]


# ---- CUDA ----------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("B,N,K,sparsity", [(1, 3072, 768, 0.9), (8, 768, 3072, 0.95), (64, 300, 301, 0.7),
                                             (5, 40, 33, 1.0), (0, 7, 9, 0.5), (3, 0, 9, 0.5)])
def test_cuda_matches_cpu(B, N, K, sparsity, index_dtype):
    indptr, indices, values = make_csr(N, K, sparsity, seed=B + N, index_dtype=index_dtype, empty_rows=(0,))
    x = np.random.default_rng(0).standard_normal((B, K)).astype(np.float32)
    bias = np.random.default_rng(1).standard_normal(N).astype(np.float32)
    cpu = csr_linear(x, indptr, indices, values, bias)
    dev = "cuda"
    y = csr_linear(torch.from_numpy(x).to(dev), *(torch.from_numpy(a).to(dev) for a in (indptr, indices, values, bias)))
    assert y.device.type == "cuda" and y.dtype == torch.float32 and tuple(y.shape) == (B, N)
    np.testing.assert_allclose(y.cpu().numpy(), cpu, rtol=1e-5, atol=1e-4)


@pytest.mark.gpu
def test_cuda_bad_input():
    g = good()
    dev = "cuda"
    bad = g["indices"].copy()
    bad[-1] = 99
    t = {k: torch.from_numpy(v).to(dev) for k, v in g.items()}
    with pytest.raises(ValueError, match="argument 'indices': expected column indices in"):
        csr_linear(t["x"], t["indptr"], torch.from_numpy(bad).to(dev), t["values"])
    with pytest.raises(ValueError, match="argument 'values': expected a tensor on x's device"):
        csr_linear(t["x"], t["indptr"], t["indices"], g["values"])


def _cuda_args(*arrays):
    return [torch.from_numpy(a).to("cuda") for a in arrays]


@pytest.mark.gpu
@pytest.mark.parametrize("ptr_dtype,index_dtype", [(np.int32, np.int32), (np.int32, np.int64), (np.int64, np.int32),
                                                   (np.int64, np.int64)])
@pytest.mark.parametrize("B,N,K,sparsity", [(1, 1, 1, 0.0), (7, 9, 5, 0.3), (8, 8, 64, 0.5), (9, 33, 70, 0.1),
                                             (17, 5, 3, 0.0), (31, 10, 40, 0.5), (32, 3, 1, 0.0), (33, 9, 7, 0.3),
                                             (64, 17, 33, 0.2), (65, 20, 40, 0.5), (130, 5, 70, 0.9),
                                             (2, 300, 500, 0.99), (40, 300, 500, 0.99), (3, 1, 4097, 0.2),
                                             (0, 5, 3, 0.5)])
def test_cuda_tile_edges_match_float64_reference(B, N, K, sparsity, ptr_dtype, index_dtype):
    # Warps of 32 lanes over a row's nonzeros, 8 rows per block, batch chunks of 8 (B < 32), or the
    # transposed path with 64 batch rows per warp (B >= 32): sizes around and between those, rows
    # of 0 and > 32 nonzeros, every indptr x indices dtype pair.
    indptr, indices, values = make_csr(N, K, sparsity, seed=B * 7 + N, index_dtype=index_dtype,
                                       empty_rows=(0, N // 2))
    indptr = indptr.astype(ptr_dtype)
    rng = np.random.default_rng(K)
    x = rng.standard_normal((B, K)).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    dense = np.zeros((N, K))
    rows = np.repeat(np.arange(N), np.diff(indptr.astype(np.int64)))
    dense[rows, indices.astype(np.int64)] = values
    ref = x.astype(np.float64) @ dense.T + bias
    y = csr_linear(*_cuda_args(x, indptr, indices, values, bias))
    assert tuple(y.shape) == (B, N) and y.dtype == torch.float32
    np.testing.assert_allclose(y.cpu().numpy(), ref, rtol=1e-5, atol=1e-4)
    y0 = csr_linear(*_cuda_args(x, indptr, indices, values))  # no bias
    np.testing.assert_allclose(y0.cpu().numpy(), ref - bias, rtol=1e-5, atol=1e-4)


@pytest.mark.gpu
def test_cuda_empty_matrix_and_batch():
    for N, B in [(0, 3), (0, 0), (4, 0)]:
        indptr, indices, values = make_csr(N, 6, 0.5, seed=1)
        y = csr_linear(*_cuda_args(np.ones((B, 6), np.float32), indptr, indices, values))
        assert tuple(y.shape) == (B, N)
    with pytest.raises(ValueError, match=r"indptr\[-1\] == nnz"):
        csr_linear(*_cuda_args(np.ones((2, 6), np.float32), np.array([0], np.int64), np.zeros(1, np.int64),
                               np.ones(1, np.float32)))


@pytest.mark.gpu
@pytest.mark.parametrize("B", [9, 40])
def test_cuda_runs_on_the_current_stream_and_recovers_after_an_error(B):
    # On a busy side stream the kernel must wait for x (made on that stream); after a malformed
    # call the device-side flag is reset, so the next valid call succeeds.
    indptr, indices, values = make_csr(300, 200, 0.9, seed=4)
    x = np.random.default_rng(5).standard_normal((B, 200)).astype(np.float32)
    ip, ix, v = _cuda_args(indptr, indices, values)
    bad = ix.clone()
    bad[3] = 500
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        x_dev = torch.from_numpy(x).to("cuda")
        with pytest.raises(ValueError, match=r"indices\[3\] = 500"):
            csr_linear(x_dev, ip, bad, v)
        torch.cuda._sleep(10_000_000)
        y = csr_linear(x_dev * 1.0, ip, ix, v)
    np.testing.assert_allclose(y.cpu().numpy(), csr_linear(x, indptr, indices, values), rtol=1e-5, atol=1e-4)


def test_cuda_view_describes_the_tensor_like_torch():
    # The CUDA face hands _C a prebuilt __cuda_array_interface__ for float32/int32/int64 tensors
    # (torch builds its own in Python on every access); other dtypes and None pass through.
    from pyserve.ops.sparse import _cuda_view

    for dtype, typestr in [(torch.float32, "<f4"), (torch.int32, "<i4"), (torch.int64, "<i8")]:
        t = torch.zeros((3, 5), dtype=dtype)
        assert _cuda_view(t).__cuda_array_interface__ == {
            "typestr": typestr, "shape": (3, 5), "strides": None, "data": (t.data_ptr(), False), "version": 2}
    t = torch.zeros(4, dtype=torch.float64)
    assert _cuda_view(t) is t and _cuda_view(None) is None


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.int32, torch.int64])
@pytest.mark.parametrize("shape", [(0,), (7,), (2, 3), (0, 4)])
def test_cuda_view_equals_torch_interface_on_cuda(dtype, shape):
    from pyserve.ops.sparse import _cuda_view

    t = torch.zeros(shape, dtype=dtype, device="cuda")
    assert _cuda_view(t).__cuda_array_interface__ == t.__cuda_array_interface__


def _cpu_message(x, indptr, indices, values):
    with pytest.raises(ValueError) as info:
        csr_linear(x, indptr, indices, values)
    return str(info.value)


@pytest.mark.gpu
@pytest.mark.parametrize("ptr_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("B", [0, 1, 12, 40])
@pytest.mark.parametrize("where", ["first", "middle", "last"])
@pytest.mark.parametrize("kind", ["negative", "too_large", "repeat", "descending"])
def test_cuda_bad_indices_give_the_cpu_message(kind, where, B, ptr_dtype):
    indptr, indices, values = make_csr(200, 50, 0.8, seed=9, empty_rows=range(0, 200, 7))
    indptr = indptr.astype(ptr_dtype)
    pos = {"first": 1, "middle": len(indices) // 2, "last": len(indices) - 1}[where]
    bad = indices.copy()
    bad[pos] = {"negative": -3, "too_large": 50, "repeat": bad[pos - 1], "descending": bad[pos - 1] - 1}[kind]
    x = np.ones((B, 50), np.float32)
    expected = _cpu_message(x, indptr, bad, values)
    with pytest.raises(ValueError) as info:
        csr_linear(*_cuda_args(x, indptr, bad, values))
    assert str(info.value) == expected


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["first", "descending", "last_short", "last_long", "huge", "negative"])
def test_cuda_bad_indptr_gives_the_cpu_message(kind):
    indptr, indices, values = make_csr(40, 30, 0.7, seed=3, index_dtype=np.int64, empty_rows=(5,))
    bad = indptr.copy()
    if kind == "first":
        bad[0] = 1
    elif kind == "descending":
        bad[20] = bad[21] + 1
    elif kind == "last_short":
        bad[-1] -= 1
    elif kind == "last_long":
        bad[-1] += 1
    elif kind == "huge":
        bad[10] = 10**12
    else:
        bad[10] = -4
    x = np.ones((3, 30), np.float32)
    expected = _cpu_message(x, bad, indices, values)
    with pytest.raises(ValueError) as info:
        csr_linear(*_cuda_args(x, bad, indices, values))
    assert str(info.value) == expected and "argument 'indptr'" in expected


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("B", [0, 1, 12])
def test_first_bad_index_is_reported_exactly(B, path, threads):
    # Corrupt one or two random positions of a matrix with empty rows; the message must name the
    # first offending nonzero whatever the chunking and thread count.
    threads(2)
    rng = np.random.default_rng(B + 11)
    indptr, indices, values = make_csr(200, 50, 0.8, seed=9, empty_rows=range(0, 200, 7))
    x = np.ones((B, 50), np.float32)
    for trial in range(12):
        bad = indices.copy()
        positions = np.sort(rng.choice(len(bad), rng.integers(1, 3), replace=False))
        for p in positions:
            bad[p] = rng.choice([-3, 50, 77, bad[p - 1] if p > 0 else -1])
        rows = np.repeat(np.arange(200), np.diff(indptr))
        first = next(j for j in range(len(bad))
                     if bad[j] < 0 or bad[j] >= 50 or (j > 0 and rows[j] == rows[j - 1] and bad[j] <= bad[j - 1]))
        with pytest.raises(ValueError) as info:
            if path == "portable":
                _C.csr_linear(x, indptr, bad, values, None, None, True)
            else:
                csr_linear(x, indptr, bad, values)
        assert f"indices[{first}] = {bad[first]}" in str(info.value), (trial, str(info.value))


@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("path", PATHS)
def test_spmv_whole_matrix_index_check_agrees_with_row_by_row_oracle(index_dtype, path):
    # B = 1 validates all column indices in one pass (descents allowed only across row boundaries,
    # empty rows in between included) before the kernel; it must accept and refuse exactly what a
    # row-by-row check does, and name the same first offending nonzero.
    rng = np.random.default_rng(5)
    for trial in range(300):
        n, k = int(rng.integers(1, 12)), int(rng.integers(1, 40))
        counts = np.minimum(rng.integers(0, 9, n), k)
        counts[rng.random(n) < 0.3] = 0
        rows = [np.sort(rng.choice(k, c, replace=False)) for c in counts]
        indices = np.concatenate(rows + [np.zeros(0, np.int64)]).astype(index_dtype)
        if len(indices) and rng.random() < 0.6:
            indices[rng.integers(len(indices))] = rng.integers(-2, k + 2)
        indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        values = rng.standard_normal(len(indices)).astype(np.float32)
        x = rng.standard_normal((1, k)).astype(np.float32)
        owner = np.repeat(np.arange(n), counts)
        bad = [j for j in range(len(indices)) if indices[j] < 0 or indices[j] >= k
               or (j > 0 and owner[j] == owner[j - 1] and indices[j] <= indices[j - 1])]
        if bad:
            with pytest.raises(ValueError) as info:
                run(x, indptr, indices, values, path=path)
            assert f"indices[{bad[0]}] = {indices[bad[0]]}" in str(info.value), (trial, str(info.value))
        else:
            check(run(x, indptr, indices, values, path=path), x, indptr, indices, values)
