"""`pyserve evaluate ARTIFACT --data mnist`: accuracy equal to pyserve.load's; bad inputs one line + exit 2."""

import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import pyserve
from pyserve import artifact
from pyserve.datasets import mnist


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "pyserve", *args], capture_output=True, text=True, timeout=600)


def _direct_accuracy(path) -> float:
    module = pyserve.load(path)
    test = mnist().test
    with torch.inference_mode():
        pred = np.concatenate([module(torch.from_numpy(test.images[i:i + 777])).argmax(1).numpy()
                               for i in range(0, len(test), 777)])
    return float((pred == test.labels).mean())


@pytest.mark.parametrize("batch", [None, "333"])
def test_evaluate_matches_pyserve_load(compressed, batch):
    _, out, _ = compressed
    args = ["evaluate", str(out), "--data", "mnist"] + (["--batch-size", batch] if batch else [])
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    match = re.search(r"top-1 accuracy (\d\.\d{4}) \((\d+)/10000\)", proc.stdout)
    assert match, proc.stdout
    acc = _direct_accuracy(out)
    assert int(match.group(2)) == round(acc * 10000)
    assert match.group(1) == f"{acc:.4f}"
    assert acc > 0.9


@pytest.fixture(scope="module")
def small_input_artifact(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval") / "lin10.pyserve"
    torch.manual_seed(0)
    artifact.save(path, torch.nn.Linear(10, 10).eval(), (torch.randn(2, 10),), model_name="lin10",
                  input_names=["x"], output_names=["y"])
    return path


def test_evaluate_errors_one_line_exit_2(compressed, small_input_artifact, tmp_path):
    _, out, _ = compressed
    corrupt = tmp_path / "corrupt.pyserve"
    data = bytearray(out.read_bytes())
    data[-10] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    cases = [
        ((str(tmp_path / "missing.pyserve"), "--data", "mnist"), "missing.pyserve"),
        ((str(corrupt), "--data", "mnist"), "checksum mismatch"),
        ((str(out), "--data", "cifar"), "--data: unknown dataset 'cifar'; expected one of mnist"),
        ((str(out), "--data", "mnist", "--batch-size", "0"), "--batch-size: must be >= 1, got 0"),
        ((str(small_input_artifact), "--data", "mnist"), "input x has shape [-1, 10], --data mnist gives [-1, 784]"),
    ]
    for args, expect in cases:
        proc = run_cli("evaluate", *args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert "Traceback" not in proc.stderr
        line, = proc.stderr.strip().splitlines()
        assert line.startswith("pyserve evaluate: error: ") and expect in line, line
