"""benchmarks/bench_gpu.py and benchmarks/gpu_check.sh on a machine without a GPU: they import,
parse their arguments, and refuse to run with a clear message and a non-zero exit status."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks" / "bench_gpu.py"
CHECK = ROOT / "benchmarks" / "gpu_check.sh"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_defaults(bench):
    args = bench.parse_args([])
    assert (args.out, args.repeats, args.device, args.quick) == ("gpu_results.json", 7, "cuda:0", False)
    assert args.ops == ["csr", "int8", "codebook", "huffman"]


def test_options(bench):
    args = bench.parse_args(["--out", "r.json", "--repeats", "9", "--quick", "--ops", "int8, csr", "--min-ms", "5"])
    assert (args.out, args.repeats, args.min_ms, args.ops) == ("r.json", 3, 5.0, ["int8", "csr"])  # --quick caps repeats


@pytest.mark.parametrize("argv", [["--ops", "gemm"], ["--ops", ","], ["--repeats", "0"], ["--repeats", "x"]])
def test_bad_arguments_exit_2(bench, argv, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--ops" in err or "--repeats" in err


def _has_gpu() -> bool:
    from pyserve.ops import build_info, cuda_device_count

    return bool(build_info()["cuda"]) and cuda_device_count() > 0


def test_main_without_gpu_exits_2(bench, tmp_path, capsys):
    if _has_gpu():
        pytest.skip("a GPU is present")
    out = tmp_path / "r.json"
    assert bench.main(["--out", str(out), "--quick"]) == 2
    assert capsys.readouterr().err.startswith("bench_gpu: no usable GPU: ")
    assert not out.exists()


@pytest.mark.slow
def test_script_without_gpu_exits_2(tmp_path):
    if _has_gpu():
        pytest.skip("a GPU is present")
    proc = subprocess.run([sys.executable, str(BENCH), "--out", str(tmp_path / "r.json")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "bench_gpu: no usable GPU: " in proc.stderr


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_syntax_and_no_gpu_exit(tmp_path):
    assert subprocess.run(["bash", "-n", str(CHECK)], capture_output=True).returncode == 0
    if shutil.which("nvidia-smi") is not None:
        pytest.skip("nvidia-smi present: this machine may have a GPU")
    results = tmp_path / "results.txt"
    proc = subprocess.run(["bash", str(CHECK), str(results)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PY": sys.executable})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("gpu_check: no GPU")
    assert not results.exists()  # nothing was built or written
