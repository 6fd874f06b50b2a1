"""`pyserve compress` through the CLI: a short real run on MNIST, and the bad-input cases."""

import subprocess
import sys

import numpy as np
import pytest
import torch

import pyserve
from pyserve.artifact import read_manifest
from pyserve.datasets import mnist


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "pyserve", *args], capture_output=True, text=True,
                          timeout=600)


def test_compress_writes_a_small_accurate_artifact(compressed):
    recipe, out, stdout = compressed
    assert (recipe.parent / "ckpt/model.pt").is_file()  # the trained checkpoint is cached
    m = read_manifest(out)
    assert m.model_name == "tinylenet" and m.stats["fp32_bytes"] == 266610 * 4
    assert m.stats["fp32_bytes"] / m.size_bytes > 15
    # the printed table reports the same sizes and accuracies as the manifest
    assert f"fp32 {m.stats['fp32_bytes']} B -> artifact {m.size_bytes} B" in stdout
    module = pyserve.load(out)
    test = mnist().test
    with torch.inference_mode():
        pred = module(torch.from_numpy(test.images)).argmax(1).numpy()
    acc = float((pred == test.labels).mean())
    assert acc > 0.9
    assert f"loaded from artifact {acc:.4f}" in stdout
    assert abs(acc - m.stats["accuracy_compressed"]) < 1e-9


def test_stored_layers_are_pruned_and_shared(compressed):
    _, out, _ = compressed
    m = read_manifest(out)
    sd = {k: v for k, v in pyserve.load(out).state_dict().items()}
    for layer, sparsity in (("fc1", 0.9), ("fc2", 0.9), ("fc3", 0.7)):
        meta = m.tensors[f"{layer}.weight"]
        assert meta["encoding"] == "sparse" and meta["entropy"] == "huffman" and meta["values"] == "codebook"
        w = next(v for k, v in sd.items() if k.endswith(f"{layer}.weight")).numpy()
        assert meta["nnz"] == int((w != 0).sum())
        assert abs((w == 0).mean() - sparsity) < 0.01
        assert np.unique(w[w != 0]).size <= 15  # 4 bits: 15 centroids + the zero
    assert m.tensors["fc1.bias"]["encoding"] == "raw"


def test_inspect_prints_signature(compressed):
    _, out, _ = compressed
    proc = run_cli("inspect", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "images" in proc.stdout and "[-1, 784]" in proc.stdout and "checksums OK" in proc.stdout


@pytest.mark.parametrize("content,expect", [
    (None, "no such recipe file"),
    ("name: [unclosed\n", "malformed YAML"),
    ("name: x\nmodel: {factory: m.py:M, inputs: [], outputs: []}\nstages: [{method: prune, sparsity: 0.5}]\nwat: 1\n",
     "wat: unknown field"),
])
def test_bad_recipe_one_line_exit_2(tmp_path, content, expect):
    path = tmp_path / "r.yaml"
    if content is not None:
        path.write_text(content)
    proc = run_cli("compress", str(path), "-o", str(tmp_path / "o.pyserve"))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and expect in lines[0]
    assert not (tmp_path / "o.pyserve").exists()


def test_inspect_corrupt_artifact_exit_2(compressed, tmp_path):
    _, out, _ = compressed
    bad = tmp_path / "bad.pyserve"
    data = bytearray(out.read_bytes())
    data[-10] ^= 0xFF
    bad.write_bytes(bytes(data))
    proc = run_cli("inspect", str(bad))
    assert proc.returncode == 2 and "checksum mismatch" in proc.stderr and "Traceback" not in proc.stderr
