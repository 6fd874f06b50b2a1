"""pyserve._C.build_info() and the CUDA device query."""

from __future__ import annotations

import pytest

import pyserve
from pyserve import _C
from pyserve.ops import build_info, cuda_device_count


def test_build_info_keys_and_types():
    info = build_info()
    assert info == _C.build_info()
    assert set(info) == {"version", "compiler", "avx2", "openmp", "cuda", "cuda_archs"}
    assert info["version"] == pyserve.__version__
    assert isinstance(info["compiler"], str) and info["compiler"]
    for key in ("avx2", "openmp", "cuda"):
        assert isinstance(info[key], bool)
    archs = info["cuda_archs"]
    assert isinstance(archs, list) and all(isinstance(a, int) for a in archs)
    if info["cuda"]:
        assert archs and all(a >= 50 for a in archs)
    else:
        assert archs == []


def test_cuda_device_count_never_raises():
    count = cuda_device_count()
    assert isinstance(count, int) and count >= 0
    if not build_info()["cuda"]:
        assert count == 0


@pytest.mark.gpu
def test_cuda_build_sees_the_gpu():
    assert build_info()["cuda"]
    assert cuda_device_count() >= 1


def test_ops_import_is_light():
    import subprocess
    import sys

    code = "import sys, pyserve.ops; print(sorted(m for m in ('torch', 'grpc') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_public_names():
    import pyserve.ops as ops

    for name in ops.__all__:
        assert getattr(ops, name) is not None


def test_stub_file_is_current(tmp_path):
    """pyserve/_C.pyi is generated (CONTRIBUTING.md); fail when it no longer matches the module."""
    pytest.importorskip("pybind11_stubgen")
    import subprocess
    import sys
    from pathlib import Path

    subprocess.run(
        [sys.executable, "-m", "pybind11_stubgen", "pyserve._C", "-o", str(tmp_path), "--exit-code"],
        check=True,
        capture_output=True,
    )
    committed = Path(_C.__file__).resolve().parent / "_C.pyi"
    if not committed.exists():  # editable installs keep the .so apart from the sources
        committed = Path(pyserve.__file__).resolve().parent / "_C.pyi"
    assert (tmp_path / "pyserve" / "_C.pyi").read_text() == committed.read_text(), (
        "pyserve/_C.pyi is stale: regenerate it with pybind11-stubgen (see CONTRIBUTING.md)"
    )
