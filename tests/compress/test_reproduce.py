"""`make reproduce` (examples/reproduce.py): the paper's LeNet goals, recorded on the real recipes.

Slow: trains the fp32 baseline (when not cached) and runs the whole recipe."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_reproduce_lenet300_meets_the_paper(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "examples/reproduce.py"), "--models", "lenet300", "-q",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr
    table = (tmp_path / "table.md").read_text()
    ours = [line for line in table.splitlines() if "| pyserve |" in line]
    assert len(ours) == 1 and ours[0].rstrip().endswith("| met |"), table
    ratio = float(ours[0].split("|")[7].strip().rstrip("x"))
    assert ratio >= 40.0
