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


def test_inspect_table_sparsity_bits_and_bytes_by_part(compressed):
    _, out, _ = compressed
    proc = run_cli("inspect", str(out))
    assert proc.returncode == 0, proc.stderr
    m = read_manifest(out)
    sd = pyserve.load(out).state_dict()
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines()[4:] if line.startswith("  fc")}
    for layer in ("fc1", "fc2", "fc3"):
        cells = rows[f"{layer}.weight"]
        w = next(v for k, v in sd.items() if k.endswith(f"{layer}.weight")).numpy()
        # sparsity and bits from the decoded weights, not from the manifest the CLI read
        assert cells[4] == f"{100 * (w == 0).mean():.1f}%"
        distinct = np.unique(w[w != 0]).size + 1
        assert int(cells[5]) >= int(np.ceil(np.log2(distinct)))
        parts = dict(p.split("=") for p in cells[7:])
        assert set(parts) == {"gaps", "codes", "codebook"}
        assert sum(map(int, parts.values())) == int(cells[6]) == m.tensors[f"{layer}.weight"]["size_bytes"]
    # the summary's parts add up to the file's size on disk
    summary = next(line for line in proc.stdout.splitlines() if "bytes by part:" in line)
    parts = [int(chunk.split()[-1]) for chunk in summary.split(":", 1)[1].split("=")[0].split(",")]
    assert sum(parts) == int(summary.rsplit("=", 1)[1]) == out.stat().st_size


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


@pytest.mark.parametrize("model_py,expect", [
    ("def Net():\n    raise RuntimeError('boom')\n", "model.factory: model.py:Net raised RuntimeError: boom"),
    ("def Net(:\n", "model.factory: cannot load"),
    ("import torch\ndef Net():\n    return torch.nn.Linear(784, 10)\n", "model.checkpoint"),
])
def test_user_code_and_checkpoint_errors_one_line(tmp_path, model_py, expect):
    (tmp_path / "model.py").write_text(model_py)
    (tmp_path / "ckpt.pt").write_bytes(b"not a checkpoint")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: x\nmodel: {factory: model.py:Net, checkpoint: ckpt.pt, inputs: [{name: x, shape: [-1, 784]}],"
                      " outputs: [{name: y, shape: [-1, 10]}]}\nstages: [{method: prune, sparsity: 0.5}]\n")
    proc = run_cli("compress", str(recipe), "-o", str(tmp_path / "o.pyserve"), "-q")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line, = proc.stderr.strip().splitlines()
    assert expect in line and line.startswith(f"pyserve compress: error: {recipe}")
    assert "weights_only" not in line and "Re-running" not in line


def test_missing_checkpoint_is_named_before_training_from_scratch(tmp_path):
    """A model.checkpoint path that does not exist (a typo, or the first run) trains from scratch and
    saves there, and the run says so, naming the path; the second run reuses it. The model is a bare
    nn.Linear (its weight is "weight", not "<layer>.weight"): compressed and loadable."""
    (tmp_path / "model.py").write_text("import torch\ndef Net():\n    return torch.nn.Linear(784, 10)\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: x\nmodel: {factory: model.py:Net, checkpoint: ckpts/nett.pt, inputs: [{name: x, "
                      "shape: [-1, 784]}], outputs: [{name: y, shape: [-1, 10]}]}\ntrain: {epochs: 0}\n"
                      "stages: [{method: prune, sparsity: 0.5}]\n")
    ckpt = tmp_path / "ckpts" / "nett.pt"
    proc = run_cli("compress", str(recipe), "-o", str(tmp_path / "o.pyserve"))
    assert proc.returncode == 0, proc.stderr
    assert f"no checkpoint at {ckpt}: training x from scratch for 0 epochs, then saving it there" in proc.stderr
    assert ckpt.is_file()
    proc = run_cli("compress", str(recipe), "-o", str(tmp_path / "o.pyserve"))
    assert proc.returncode == 0, proc.stderr
    assert f"reusing checkpoint {ckpt}" in proc.stderr and "no checkpoint" not in proc.stderr
    m = read_manifest(tmp_path / "o.pyserve")
    assert set(m.raw["tensors"]) == {"weight", "bias"}
    x = torch.from_numpy(mnist().test.images[:5])
    with torch.inference_mode():
        assert pyserve.load(tmp_path / "o.pyserve")(x).shape == (5, 10)


@pytest.mark.parametrize("checkpoint,stage,expect", [
    ("ckdir", "{method: prune, sparsity: 0.5}", "model.checkpoint: {ckdir} is a directory"),
    ("/proc/nope/x.pt", "{method: prune, sparsity: 0.5}", "model.checkpoint: cannot create /proc/nope"),
    ("ck.pt", "{method: lowrank, rank: 4}", "the model is a single nn.Linear: lowrank replaces a layer by two"),
])
def test_checkpoint_and_stage_problems_refused_before_training(tmp_path, checkpoint, stage, expect):
    """A checkpoint path that is a directory or cannot be created, and lowrank on a model that is one
    Linear layer: one recipe error line (exit 2) before the 50 epochs of training, not a write error
    blamed on -o after them, nor a traceback."""
    (tmp_path / "model.py").write_text("import torch\ndef Net():\n    return torch.nn.Linear(784, 10)\n")
    (tmp_path / "ckdir").mkdir()
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: x\nmodel: {{factory: model.py:Net, checkpoint: {checkpoint}, inputs: [{{name: x, "
                      f"shape: [-1, 784]}}], outputs: [{{name: y, shape: [-1, 10]}}]}}\ntrain: {{epochs: 50}}\n"
                      f"stages: [{stage}]\n")
    proc = run_cli("compress", str(recipe), "-o", str(tmp_path / "o.pyserve"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"pyserve compress: error: {recipe}") and expect.format(ckdir=tmp_path / "ckdir") in line
    assert "training" not in proc.stderr and not (tmp_path / "o.pyserve").exists()


def test_unwritable_output_refused_before_work(tmp_path):
    (tmp_path / "file").write_text("x")
    for out, expect in ((tmp_path / "file" / "x.pyserve", "is not a directory"), (tmp_path, "is a directory")):
        proc = run_cli("compress", "examples/lenet300/recipe.yaml", "-o", str(out))
        assert proc.returncode == 2 and expect in proc.stderr and "Traceback" not in proc.stderr
