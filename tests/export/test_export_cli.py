"""`pyserve export` on the command line: the happy path writes the file and reports it; every bad
input is one line on stderr, exit 2, before any work, and leaves no file behind."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

from export_helpers import ort_run  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "pyserve", "export", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def _files(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


def test_cli_writes_onnx_and_reports(lenet, tmp_path):
    out = tmp_path / "m.onnx"
    proc = _cli(lenet.fp32, "--to", "onnx", "-o", out, "--dynamic-batch")
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out} (onnx, fp32" in proc.stdout
    (got,) = ort_run(out, {"images": lenet.test_images[:5]})
    with torch.no_grad():
        ref = lenet.module(torch.from_numpy(lenet.test_images[:5])).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-5)
    assert _files(tmp_path) == ["m.onnx"]  # no temporary left


@pytest.mark.parametrize("case", [
    "unsupported-source", "missing-source", "int8-no-scales", "int8-opset-too-old", "opset-too-new",
    "torch-fp16", "unwritable-output", "output-under-a-file", "tensorrt-missing", "both-outputs",
    "no-output", "bad-model-name", "bad-version", "trt-batch-order", "opset-for-torch", "repository-has-config-yaml",
])
def test_bad_input_exits_2_before_any_work_and_writes_nothing(lenet, tmp_path, case):
    out = tmp_path / "out" / "m.onnx"
    (tmp_path / "out").mkdir()
    a_file = tmp_path / "afile"
    a_file.write_text("x")
    (tmp_path / "model.txt").write_text("not a model")
    args, expect = {
        "unsupported-source": ([tmp_path / "model.txt", "--to", "onnx", "-o", out], "unsupported source"),
        "missing-source": ([tmp_path / "nope.pyserve", "--to", "onnx", "-o", out], "does not exist"),
        "int8-no-scales": ([lenet.fp32, "--to", "onnx", "--precision", "int8", "-o", out], "run the `int8`"),
        "int8-opset-too-old": ([lenet.int8, "--to", "onnx", "--precision", "int8", "--opset", "12", "-o", out],
                               "needs opset >= 13"),
        "opset-too-new": ([lenet.fp32, "--to", "onnx", "--opset", "999", "-o", out], "--opset must be"),
        "torch-fp16": ([lenet.fp32, "--to", "torch", "--precision", "fp16", "-o", tmp_path / "out" / "m.pt2"],
                       "--to torch writes fp32 only"),
        "unwritable-output": ([lenet.fp32, "--to", "onnx", "-o", "/sys/pyserve-export-test/m.onnx"], "not writable"),
        "output-under-a-file": ([lenet.fp32, "--to", "onnx", "-o", a_file / "m.onnx"], "is not a directory"),
        "tensorrt-missing": ([lenet.fp32, "--to", "tensorrt", "-o", tmp_path / "out" / "m.plan"],
                             "needs the full TensorRT library"),
        "both-outputs": ([lenet.fp32, "--to", "onnx", "-o", out, "--repository", tmp_path / "out", "--model", "m"],
                         "exactly one of"),
        "no-output": ([lenet.fp32, "--to", "onnx"], "exactly one of"),
        "bad-model-name": ([lenet.fp32, "--to", "onnx", "--repository", tmp_path / "out", "--model", "../x"],
                           "--model must be"),
        "bad-version": ([lenet.fp32, "--to", "onnx", "--repository", tmp_path / "out", "--model", "m",
                         "--version", "0"], "--version must be"),
        "trt-batch-order": ([lenet.fp32, "--to", "tensorrt", "--min-batch", "9", "--opt-batch", "4", "-o",
                             tmp_path / "out" / "m.plan"], "min_batch <= opt_batch <= max_batch"),
        "opset-for-torch": ([lenet.fp32, "--to", "torch", "--opset", "17", "-o", tmp_path / "out" / "m.pt2"],
                            "--opset applies to"),
        "repository-has-config-yaml": ([lenet.fp32, "--to", "onnx", "--repository", tmp_path / "out", "--model",
                                        "m"], "config.yaml exists"),
    }[case]
    if case == "repository-has-config-yaml":
        (tmp_path / "out" / "m").mkdir()
        (tmp_path / "out" / "m" / "config.yaml").write_text("max_batch_size: 0\n")
    if case == "unwritable-output":
        try:
            with tempfile.TemporaryFile(dir="/sys"):
                pytest.skip("/sys is writable here")
        except OSError:
            pass
    if case == "tensorrt-missing":
        try:
            import tensorrt  # noqa: F401
            pytest.skip("TensorRT is installed here")
        except ImportError:
            pass
    before = _files(tmp_path)
    proc = _cli(*args, timeout=60)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyserve export: error:"), proc.stderr
    assert expect in lines[0]
    assert proc.stdout == ""
    assert _files(tmp_path) == before


def test_int8_error_says_how_to_get_scales(lenet, tmp_path):
    proc = _cli(lenet.fp32, "--to", "onnx", "--precision", "int8", "-o", tmp_path / "m.onnx")
    assert proc.returncode == 2
    assert "calibration" in proc.stderr and "encode_int8" in proc.stderr


def test_recipe_source_exports_its_trained_model(lenet, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(textwrap.dedent(f"""
        format_version: 1
        name: lenet-from-recipe
        model:
          factory: {ROOT / 'examples/lenet300/model.py'}:LeNet300
          checkpoint: {lenet.checkpoint}
          inputs: [{{name: images, datatype: FP32, shape: [-1, 784]}}]
          outputs: [{{name: logits, datatype: FP32, shape: [-1, 10]}}]
        stages: [{{method: huffman}}]
    """))
    out = tmp_path / "r.onnx"
    proc = _cli(recipe, "--to", "onnx", "-o", out, "--dynamic-batch")
    assert proc.returncode == 0, proc.stderr
    (got,) = ort_run(out, {"images": lenet.test_images[:7]})
    with torch.no_grad():
        ref = lenet.module(torch.from_numpy(lenet.test_images[:7])).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_recipe_without_checkpoint_file_is_refused(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(textwrap.dedent(f"""
        format_version: 1
        name: untrained
        model:
          factory: {ROOT / 'examples/lenet300/model.py'}:LeNet300
          checkpoint: missing.pt
          inputs: [{{name: images, datatype: FP32, shape: [-1, 784]}}]
          outputs: [{{name: logits, datatype: FP32, shape: [-1, 10]}}]
        stages: [{{method: huffman}}]
    """))
    proc = _cli(recipe, "--to", "onnx", "-o", tmp_path / "r.onnx")
    assert proc.returncode == 2 and "train the model first" in proc.stderr
    assert not (tmp_path / "r.onnx").exists()
