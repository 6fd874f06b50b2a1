"""Shared test configuration: the one hook that skips `gpu` and `tensorrt` tests where there is none."""

from __future__ import annotations

import functools
import subprocess
import sys

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
        if "gpu" in item.keywords and cuda_device_count() == 0:
            item.add_marker(skip_gpu)
        if "tensorrt" in item.keywords and (cuda_device_count() == 0 or not tensorrt_available()):
            item.add_marker(skip_trt)
