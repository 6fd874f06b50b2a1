"""The .pyserve container: round trip through torch.export, atomic writes, corrupt files refused."""

import os

import numpy as np
import pytest
import torch
from torch import nn

import pyserve
from pyserve.artifact import ArtifactError, encode_sparse, load_artifact, read_manifest, save


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    m = Net().eval()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-1, 1)
        m.fc.weight[m.fc.weight.abs() < 0.05] = 0
    return m


@pytest.fixture(scope="module")
def saved(net, tmp_path_factory):
    path = tmp_path_factory.mktemp("art") / "net.pyserve"
    w = net.fc.weight.detach().numpy()
    save(path, net, (torch.randn(2, 1, 8, 8),), model_name="net", input_names=["x"], output_names=["y"],
         encodings={"fc.weight": encode_sparse(w, index_bits=4, entropy="huffman")}, stats={"note": "t"})
    return path


def test_manifest_signature(saved):
    m = read_manifest(saved)
    assert m.model_name == "net" and m.format_version == 2
    assert [(s.name, s.datatype, s.shape) for s in m.inputs] == [("x", "FP32", (-1, 1, 8, 8))]
    assert [(s.name, s.datatype, s.shape) for s in m.outputs] == [("y", "FP32", (-1, 5))]
    assert m.tensors["fc.weight"]["encoding"] == "sparse" and m.tensors["conv.weight"]["encoding"] == "raw"
    assert m.tensors["bn.running_mean"]["role"] == "buffer"
    assert m.stats == {"note": "t"} and m.size_bytes == os.path.getsize(saved)


@pytest.mark.parametrize("batch", [1, 3, 17])
def test_loaded_module_matches_original(net, saved, batch):
    x = torch.randn(batch, 1, 8, 8)
    with torch.inference_mode():
        np.testing.assert_array_equal(pyserve.load(saved)(x).numpy(), net(x).numpy())


def test_truncated_file_refused(saved, tmp_path):
    data = saved.read_bytes()
    for cut in (0, 10, 63, 64, 200, len(data) // 2, len(data) - 1):
        bad = tmp_path / f"cut{cut}.pyserve"
        bad.write_bytes(data[:cut])
        with pytest.raises(ArtifactError, match="truncated|shorter"):
            load_artifact(bad)


def test_every_flipped_byte_is_caught(saved, tmp_path):
    data = saved.read_bytes()
    rng = np.random.default_rng(1)
    positions = list(range(0, 64)) + rng.integers(64, len(data), size=150).tolist()
    for pos in positions:
        bad = bytearray(data)
        bad[pos] ^= 1 << int(rng.integers(0, 8))
        path = tmp_path / "flip.pyserve"
        path.write_bytes(bytes(bad))
        with pytest.raises(ArtifactError):
            load_artifact(path)


def test_unknown_version_and_missing_file(saved, tmp_path):
    data = bytearray(saved.read_bytes())
    data[8] = 3
    (tmp_path / "v3.pyserve").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="version 3; this pyserve reads versions 1, 2"):
        read_manifest(tmp_path / "v3.pyserve")
    with pytest.raises(ArtifactError, match="no such artifact"):
        read_manifest(tmp_path / "missing.pyserve")


def test_failed_write_leaves_old_file_intact(net, saved, tmp_path):
    target = tmp_path / "keep.pyserve"
    target.write_bytes(saved.read_bytes())
    with pytest.raises(ValueError, match="does not reproduce"):
        bad = encode_sparse(np.zeros((5, 144), dtype=np.float32))
        save(target, net, (torch.randn(2, 1, 8, 8),), model_name="net", encodings={"fc.weight": bad})
    assert target.read_bytes() == saved.read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == ["keep.pyserve"]


def test_encoding_for_unknown_tensor_refused(net, tmp_path):
    with pytest.raises(ValueError, match="does not have"):
        save(tmp_path / "x.pyserve", net, (torch.randn(2, 1, 8, 8),), model_name="n",
             encodings={"nope.weight": encode_sparse(np.zeros(3, dtype=np.float32))})


def test_interrupted_write_leaves_nothing_half_written(net, saved, tmp_path, monkeypatch):
    import pyserve.artifact._container as container

    target = tmp_path / "keep.pyserve"
    target.write_bytes(saved.read_bytes())

    def crash(*_args):
        raise KeyboardInterrupt  # as if the user pressed Ctrl-C during the final rename

    monkeypatch.setattr(container.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        save(target, net, (torch.randn(2, 1, 8, 8),), model_name="net")
    assert target.read_bytes() == saved.read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == ["keep.pyserve"]


def test_graph_holds_no_source_paths(saved):
    import zlib

    from pyserve.artifact._container import read_container

    _, blobs = read_container(saved)
    graph = zlib.decompress(blobs["graph"]).decode()
    assert "stack_trace" not in graph
    assert __file__ not in graph and ".py\\\"" not in graph and ".py\"" not in graph


def _as_version_1(path, out):
    """Rewrite a version-2 file as version 1 (plain JSON manifest), byte for byte otherwise."""
    import hashlib
    import json
    import struct
    import zlib

    data = path.read_bytes()
    _, _, m_size, b_size, _, _ = struct.unpack_from("<8sIQQ32sI", data)
    manifest = json.loads(zlib.decompress(data[64:64 + m_size]))
    manifest["format_version"] = 1
    plain = json.dumps(manifest, separators=(",", ":")).encode()
    header = struct.pack("<8sIQQ32sI", b"\x89PYSRV\r\n", 1, len(plain), b_size, hashlib.sha256(plain).digest(), 0)
    out.write_bytes(header + plain + data[64 + m_size:])
    return manifest


def test_reads_version_1_files(net, saved, tmp_path):
    v1 = tmp_path / "v1.pyserve"
    manifest = _as_version_1(saved, v1)
    m = read_manifest(v1)
    assert m.format_version == 1 and m.tensors == manifest["tensors"]
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(load_artifact(v1).module(x), load_artifact(saved).module(x))


def test_version_2_manifest_is_compressed_and_checked(saved, tmp_path):
    import struct
    import zlib

    data = bytearray(saved.read_bytes())
    m_size = struct.unpack_from("<Q", data, 12)[0]
    json_bytes = zlib.decompress(bytes(data[64:64 + m_size]))
    assert json_bytes.startswith(b"{") and m_size < len(json_bytes)
    # a bad zlib stream with a matching SHA-256 is still refused, with a clear message
    import hashlib

    junk = b"\x78\x9c" + b"\x00" * (m_size - 2)
    data[64:64 + m_size] = junk
    data[28:60] = hashlib.sha256(junk).digest()
    (tmp_path / "bad.pyserve").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="manifest (is not valid zlib data|zlib stream)"):
        read_manifest(tmp_path / "bad.pyserve")


def _rewrite(src, dst, edit):
    """Copy an artifact with its manifest edited; checksums are recomputed, so only the
    semantic checks can catch the change."""
    from pyserve.artifact._container import read_container, write_container

    manifest, blobs = read_container(src)
    manifest.pop("blobs")
    edit(manifest)
    write_container(dst, manifest, blobs)
    return dst


@pytest.mark.parametrize("edit,message", [
    (lambda m: m["tensors"]["fc.bias"].update(shape=[5, 1]), "fc.bias"),
    (lambda m: m["inputs"][0].update(datatype="INT64"), "input 'x' is declared INT64"),
    (lambda m: m["inputs"][0].update(shape=[-1, 1, 8, 9]), "input 'x' is declared"),
    (lambda m: m["outputs"][0].update(shape=[-1, 6]), "output 'y' is declared"),
    (lambda m: m["outputs"].append({"name": "z", "datatype": "FP32", "shape": [-1]}), "2 outputs declared"),
    (lambda m: m["tensors"].update(extra=dict(m["tensors"]["fc.bias"])), "'extra' is not used"),
    (lambda m: m.update(model_name=["a"]), "model_name|expected a string"),
    (lambda m: m["inputs"][0].update(shape=[float("inf"), 1]), "malformed"),
    (lambda m: m.update(format_version=float("inf")), "malformed"),
])
def test_crafted_manifest_refused(saved, tmp_path, edit, message):
    bad = _rewrite(saved, tmp_path / "crafted.pyserve", edit)
    with pytest.raises(ArtifactError, match=message):
        load_artifact(bad)


def test_deeply_nested_manifest_and_special_files(saved, tmp_path):
    import hashlib
    import struct

    data = saved.read_bytes()
    nested = b"[" * 200000
    header = struct.pack("<8sIQQ32sI", data[:8], struct.unpack_from("<I", data, 8)[0], len(nested), 0,
                         hashlib.sha256(nested).digest(), 0)
    (tmp_path / "deep.pyserve").write_bytes(header + nested)
    with pytest.raises(ArtifactError):
        read_manifest(tmp_path / "deep.pyserve")
    for special in ("/dev/zero", str(tmp_path), str(saved) + "/x"):
        with pytest.raises(ArtifactError, match="not a regular file|no such artifact"):
            read_manifest(special)
