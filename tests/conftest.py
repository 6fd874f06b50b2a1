"""Shared test configuration: the one hook that skips `gpu` and `tensorrt` tests where there is none."""

from __future__ import annotations

import functools
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest


@functools.lru_cache(maxsize=None)
def cuda_device_count() -> int:
    """Number of CUDA devices, asked in a subprocess so a broken driver cannot crash the test run."""
    code = "import pyserve._C as c; print(c.cuda_device_count())"
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        return int(out.stdout.strip()) if out.returncode == 0 else 0
    except (subprocess.SubprocessError, ValueError):
        return 0


@functools.lru_cache(maxsize=None)
def tensorrt_available() -> bool:
    code = "import tensorrt; assert hasattr(tensorrt, 'Builder')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    return out.returncode == 0


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none found")
    skip_trt = pytest.mark.skip(reason="needs the full TensorRT library and a GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None and cuda_device_count() == 0:
            item.add_marker(skip_gpu)
        if item.get_closest_marker("tensorrt") is not None and (cuda_device_count() == 0 or not tensorrt_available()):
            item.add_marker(skip_trt)


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def compressed(tmp_path_factory):
    """LeNet-300-100 trained 1 epoch, pruned to 90/90/70% with 1 retraining epoch, 4-bit codebooks.

    The run also writes its report (``--report``) into ``<artifact dir>/report``."""
    d = tmp_path_factory.mktemp("compress")
    recipe = d / "recipe.yaml"
    recipe.write_text(textwrap.dedent(f"""
        format_version: 1
        name: tinylenet
        model:
          factory: {ROOT / 'examples/lenet300/model.py'}:LeNet300
          checkpoint: ckpt/model.pt
          inputs: [{{name: images, datatype: FP32, shape: [-1, 784]}}]
          outputs: [{{name: logits, datatype: FP32, shape: [-1, 10]}}]
        train: {{epochs: 1, batch_size: 256}}
        stages:
          - {{method: prune, sparsity: {{fc1: 0.9, fc2: 0.9, fc3: 0.7}}, retrain_epochs: 1}}
          - {{method: quantize, bits: 4, finetune_epochs: 1}}
          - {{method: huffman}}
        report: {{sensitivity: [0.5, 0.9, 0.99]}}
    """))
    out = d / "tiny.pyserve"
    proc = subprocess.run([sys.executable, "-m", "pyserve", "compress", str(recipe), "-o", str(out), "-q",
                           "--report", str(d / "report")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return recipe, out, proc.stdout


