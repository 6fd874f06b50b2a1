"""The Huffman kernel under AddressSanitizer/UBSan: round trips and mutated streams (slow tier)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_kernel_fuzz_under_asan(tmp_path):
    cxx = shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    exe = tmp_path / "huffman_fuzz"
    build = [
        cxx, "-std=c++17", "-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
        f"-I{ROOT / 'csrc'}", str(ROOT / "tests/ops/native/huffman_fuzz.cpp"),
        str(ROOT / "csrc/huffman/huffman_kernel.cpp"), "-o", str(exe),
    ]  # fmt: skip
    compiled = subprocess.run(build, capture_output=True, text=True)
    if compiled.returncode != 0 and "sanitize" in compiled.stderr:
        pytest.skip(f"sanitizers unavailable: {compiled.stderr[-300:]}")
    assert compiled.returncode == 0, compiled.stderr
    run = subprocess.run([str(exe), "300", "7"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "no memory errors" in run.stdout
