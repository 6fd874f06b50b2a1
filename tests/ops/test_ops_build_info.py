"""pyserve._C.build_info(), the CPU paths in use and the CUDA device query."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import pyserve
from pyserve import _C
from pyserve.ops import build_info, cpu_kernels, cuda_device_count


def test_build_info_keys_and_types():
    info = build_info()
    assert info == _C.build_info()
    assert set(info) == {"version", "compiler", "avx2", "avx512_vnni", "avx512_bf16", "openmp", "cuda",
                         "cuda_archs"}
    assert info["version"] == pyserve.__version__
    assert isinstance(info["compiler"], str) and info["compiler"]
    for key in ("avx2", "avx512_vnni", "avx512_bf16", "openmp", "cuda"):
        assert isinstance(info[key], bool)
    archs = info["cuda_archs"]
    assert isinstance(archs, list) and all(isinstance(a, int) for a in archs)
    if info["cuda"]:
        assert archs and all(a >= 50 for a in archs)
    else:
        assert archs == []


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        pytest.skip("no /proc/cpuinfo here")
    line = next((l for l in text.splitlines() if l.startswith("flags")), None)
    if line is None:
        pytest.skip("no CPU flags in /proc/cpuinfo")
    return set(line.split(":", 1)[1].split())


def test_cpu_kernels_follow_the_cpu_flags_and_the_build():
    """The paths reported are the CPU's (its /proc/cpuinfo flags) that the build compiled in."""
    flags = _cpu_flags()
    info, paths = build_info(), cpu_kernels()
    assert set(paths) == {"avx2", "avx512", "avx512_vnni", "avx512_bf16"} and paths == _C.cpu_kernels()
    env = os.environ
    avx2 = info["avx2"] and {"avx2", "fma"} <= flags and "PYSERVE_DISABLE_AVX2" not in env
    assert paths["avx2"] is avx2
    wide = (avx2 and info["avx512_vnni"] and {"avx512f", "avx512bw", "avx512vl"} <= flags
            and "PYSERVE_DISABLE_AVX512" not in env)
    assert paths["avx512"] is wide
    vnni = (avx2 and info["avx512_vnni"] and {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= flags
            and "PYSERVE_DISABLE_AVX512" not in env)
    assert paths["avx512_vnni"] is vnni
    bf16 = (avx2 and info["avx512_bf16"] and {"avx512f", "avx512bw", "avx512vl", "avx512_bf16"} <= flags
            and "PYSERVE_DISABLE_AVX512" not in env)
    assert paths["avx512_bf16"] is bf16


@pytest.mark.parametrize("var, expected", [
    ("PYSERVE_DISABLE_AVX512", {"avx512": False, "avx512_vnni": False, "avx512_bf16": False}),
    ("PYSERVE_DISABLE_AVX2", {"avx2": False, "avx512": False, "avx512_vnni": False, "avx512_bf16": False})])
def test_cpu_kernels_turned_off_by_the_environment(var, expected):
    env = {**os.environ, var: "1"}
    out = subprocess.run([sys.executable, "-c", "import json; from pyserve.ops import cpu_kernels; "
                          "print(json.dumps(cpu_kernels()))"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert {k: got[k] for k in expected} == expected
    if var == "PYSERVE_DISABLE_AVX512":
        assert got["avx2"] == (build_info()["avx2"] and {"avx2", "fma"} <= _cpu_flags()
                               and "PYSERVE_DISABLE_AVX2" not in os.environ)


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
    code = "import sys, pyserve.ops; print(sorted(m for m in ('torch', 'grpc') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_public_names():
    import pyserve.ops as ops

    for name in ops.__all__:
        assert getattr(ops, name) is not None


def test_stub_file_parses():
    """pyserve/_C.pyi is Python: a default before a required argument in a binding made it a SyntaxError."""
    import ast

    ast.parse((Path(pyserve.__file__).resolve().parent / "_C.pyi").read_text())


def test_stub_file_is_current(tmp_path):
    """pyserve/_C.pyi is generated (CONTRIBUTING.md); fail when it no longer matches the module."""
    pytest.importorskip("pybind11_stubgen")

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
