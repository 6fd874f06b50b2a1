"""The int8 and codebook kernels under AddressSanitizer/UBSan, AVX2 and portable builds (slow tier)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.parametrize("avx2", [1, 0], ids=["avx2", "portable"])
def test_quant_kernels_under_asan(tmp_path, avx2):
    cxx = shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    exe = tmp_path / "quant_asan"
    build = [
        cxx, "-std=c++17", "-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
        "-Wno-unknown-pragmas", f"-DPYSERVE_AVX2={avx2}", f"-I{ROOT / 'csrc'}",
        str(ROOT / "tests/ops/native/quant_asan.cpp"), str(ROOT / "csrc/quant/int8_kernel.cpp"),
        str(ROOT / "csrc/quant/codebook_kernel.cpp"), "-o", str(exe),
    ]  # fmt: skip
    compiled = subprocess.run(build, capture_output=True, text=True)
    if compiled.returncode != 0 and "sanitize" in compiled.stderr:
        pytest.skip(f"sanitizers unavailable: {compiled.stderr[-300:]}")
    assert compiled.returncode == 0, compiled.stderr
    run = subprocess.run([str(exe), "400", "3"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    assert "no memory errors" in run.stdout
