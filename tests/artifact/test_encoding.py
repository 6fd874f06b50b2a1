"""Sparse relative-index + codebook encodings against a plain-Python reference."""

import numpy as np
import pytest

from pyserve.artifact import ArtifactError
from pyserve.artifact.encoding import decode_tensor, encode_raw, encode_sparse, relative_indices


def reference_relative_indices(positions, index_bits, numel):
    """Walk the positions one by one, emitting fillers when a gap is too long (paper, section 2),
    then fillers until fewer than 2**index_bits positions remain."""
    max_gap, prev, gaps, src = 1 << index_bits, -1, [], []
    for i, p in enumerate(positions):
        gap = p - prev
        while gap > max_gap:
            gaps.append(max_gap - 1)
            src.append(-1)
            gap -= max_gap
        gaps.append(gap - 1)
        src.append(i)
        prev = p
    while numel - 1 - prev >= max_gap:
        gaps.append(max_gap - 1)
        src.append(-1)
        prev += max_gap
    return np.array(gaps, dtype=np.uint8), np.array(src, dtype=np.int64)


@pytest.mark.parametrize("index_bits", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("density", [0.0, 0.01, 0.1, 0.5, 1.0])
def test_relative_indices_match_reference(index_bits, density):
    rng = np.random.default_rng(index_bits * 100 + int(density * 100))
    numel = 3000
    positions = np.flatnonzero(rng.random(numel) < density)
    gaps, src = relative_indices(positions, index_bits, numel)
    ref_gaps, ref_src = reference_relative_indices(positions.tolist(), index_bits, numel)
    np.testing.assert_array_equal(gaps, ref_gaps)
    np.testing.assert_array_equal(src, ref_src)


def _pruned_shared(rng, shape, density, k):
    codebook = np.concatenate([[0.0], np.sort(rng.normal(size=k - 1))]).astype(np.float32)
    codes = rng.integers(1, k, size=shape)
    keep = rng.random(shape) < density
    return np.where(keep, codebook[codes], 0).astype(np.float32), codebook


@pytest.mark.parametrize("entropy", ["none", "huffman"])
@pytest.mark.parametrize("index_bits", [2, 5, 8])
@pytest.mark.parametrize("with_codebook", [True, False])
@pytest.mark.parametrize("shape,density", [((300, 784), 0.08), ((10, 100), 0.26), ((7,), 0.0), ((4, 3, 5, 5), 1.0)])
def test_sparse_round_trip_exact(entropy, index_bits, with_codebook, shape, density):
    rng = np.random.default_rng(7)
    w, codebook = _pruned_shared(rng, shape, density, 64)
    if not with_codebook:
        w = np.where(w != 0, rng.normal(size=shape), 0).astype(np.float32)
        codebook = None
    enc = encode_sparse(w, index_bits=index_bits, codebook=codebook, entropy=entropy)
    out = decode_tensor(enc.meta, enc.blobs, "w")
    assert out.dtype == np.float32 and out.shape == w.shape
    np.testing.assert_array_equal(out, w)
    assert enc.meta["nnz"] == int((w != 0).sum())


def test_huffman_makes_sparse_layer_smaller():
    rng = np.random.default_rng(0)
    # A Laplacian-like weight distribution, pruned to 8% and shared on 63 centroids: the
    # codebook-index and gap streams are skewed, so Huffman coding must beat one byte per symbol.
    w = rng.laplace(size=(300, 784)).astype(np.float32)
    w[np.abs(w) < np.quantile(np.abs(w), 0.92)] = 0
    codebook = np.concatenate([[0], np.linspace(w.min(), w.max(), 63)]).astype(np.float32)
    nz = w != 0
    w[nz] = codebook[1:][np.abs(w[nz][:, None] - codebook[1:][None, :]).argmin(1)]
    plain = encode_sparse(w, index_bits=5, codebook=codebook, entropy="none")
    coded = encode_sparse(w, index_bits=5, codebook=codebook, entropy="huffman")
    assert coded.size_bytes < 0.8 * plain.size_bytes
    np.testing.assert_array_equal(decode_tensor(coded.meta, coded.blobs, "w"), w)


def test_value_not_in_codebook_is_refused():
    w = np.array([0, 1.5, 0, 2.0], dtype=np.float32)
    with pytest.raises(ValueError, match="not in the codebook"):
        encode_sparse(w, codebook=np.array([0, 1.5], dtype=np.float32))


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int64, np.uint8, np.bool_])
def test_raw_round_trip(dtype):
    a = (np.arange(24).reshape(2, 3, 4) % 5).astype(dtype)
    enc = encode_raw(a)
    out = decode_tensor(enc.meta, enc.blobs, "a")
    assert out.dtype == a.dtype
    np.testing.assert_array_equal(out, a)


def test_inconsistent_sparse_meta_is_refused():
    w = np.zeros((10, 10), dtype=np.float32)
    w[9, 9] = 1.0
    enc = encode_sparse(w, index_bits=8, codebook=np.array([0, 1], dtype=np.float32), entropy="none")
    for key, value, msg in [("entries", 5, "expected 5"), ("shape", [5, 5], "past the end"),
                            ("codebook_size", 1, "codebook"), ("index_bits", 9, "bad sparse header"),
                            ("encoding", "zip", "unknown encoding"), ("values", "int4", "unknown sparse values")]:
        with pytest.raises(ArtifactError, match=msg):
            decode_tensor(dict(enc.meta, **{key: value}), enc.blobs, "w")
    with pytest.raises(ArtifactError, match="missing"):
        decode_tensor(enc.meta, {"gaps": enc.blobs["gaps"]}, "w")


def test_shape_larger_than_entries_cover_is_refused_before_allocating():
    w = np.zeros((100, 100), dtype=np.float32)
    w[3, 7] = 1.0
    enc = encode_sparse(w, index_bits=5, entropy="huffman")
    assert enc.meta["entries"] == 10000 // 32  # fillers cover the tail
    np.testing.assert_array_equal(decode_tensor(enc.meta, enc.blobs, "w"), w)
    for shape in ([10**9, 10], [2**40, 2**40], [100, 101]):
        with pytest.raises(ArtifactError, match="cover|past the end|bad sparse header"):
            decode_tensor(dict(enc.meta, shape=shape), enc.blobs, "w")


# --- int8 -----------------------------------------------------------------------------------------

def test_int8_encoding_round_trip_matches_per_channel_dequantization():
    from pyserve.artifact.encoding import encode_int8, int8_parts

    rng = np.random.default_rng(7)
    w = rng.standard_normal((6, 5)).astype(np.float32)
    scale = (np.abs(w).max(axis=1) / 127).astype(np.float32)
    q = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
    enc = encode_int8(q, scale, input_scale=0.05)
    out = decode_tensor(enc.meta, enc.blobs, "w")
    # Reference computed element by element, not by broadcasting.
    ref = np.array([[float(q[i, j]) * float(scale[i]) for j in range(5)] for i in range(6)], dtype=np.float32)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=0)
    parts = int8_parts(enc.meta, enc.blobs, "w")
    np.testing.assert_array_equal(parts.values, q)
    np.testing.assert_array_equal(parts.scale, scale)
    assert parts.input_scale == 0.05
    assert enc.size_bytes == 30 + 24


@pytest.mark.parametrize("values, scale, input_scale, match", [
    (np.zeros((2, 3), np.float32), np.ones(2, np.float32), None, "int8 array"),
    (np.zeros((2, 3), np.int8), np.ones(3, np.float32), None, "scale must be float32"),
    (np.zeros((2, 3), np.int8), np.array([1.0, 0.0], np.float32), None, "finite and > 0"),
    (np.zeros((2, 3), np.int8), np.ones(2, np.float32), -1.0, "input_scale"),
])
def test_int8_encoding_refuses_bad_arguments(values, scale, input_scale, match):
    from pyserve.artifact.encoding import encode_int8

    with pytest.raises(ValueError, match=match):
        encode_int8(values, scale, input_scale=input_scale)


@pytest.mark.parametrize("mutate", [
    lambda m, b: b.update(values=b["values"][:-1]),
    lambda m, b: b.update(scale=np.array([1.0, -1.0], "<f4").tobytes()),
    lambda m, b: b.pop("scale"),
    lambda m, b: m.update(input_scale=float("nan")),
    lambda m, b: m.update(datatype="FP16"),
    lambda m, b: m.update(shape=[3, 3]),
])
def test_int8_decoder_refuses_inconsistent_entries(mutate):
    from pyserve.artifact.encoding import encode_int8

    enc = encode_int8(np.ones((2, 3), np.int8), np.ones(2, np.float32))
    meta, blobs = dict(enc.meta), dict(enc.blobs)
    mutate(meta, blobs)
    with pytest.raises(ArtifactError):
        decode_tensor(meta, blobs, "w")


def test_int8_tensor_survives_save_and_load(tmp_path):
    torch = pytest.importorskip("torch")
    from pyserve.artifact import encode_int8, load_artifact, save

    lin = torch.nn.Linear(4, 3)
    w = lin.weight.detach().numpy()
    scale = (np.abs(w).max(axis=1) / 127).astype(np.float32)
    q = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(q.astype(np.float32) * scale[:, None]))
    path = tmp_path / "m.pyserve"
    save(path, lin, (torch.randn(2, 4),), model_name="lin", encodings={"weight": encode_int8(q, scale)})
    loaded = load_artifact(path)
    np.testing.assert_array_equal(loaded.int8["weight"].values, q)
    x = torch.randn(5, 4)
    torch.testing.assert_close(loaded.module(x), lin(x))
