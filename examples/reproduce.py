"""Reproduce Deep Compression's Table 1 rows for the two LeNets on MNIST (Han, Mao, Dally, ICLR 2016,
arXiv 1510.00149) and print ours beside the paper's.

    python examples/reproduce.py [--models lenet300 lenet5] [--out out/reproduce]

For each model this runs ``examples/<model>/recipe.yaml`` exactly as ``pyserve compress`` does
(training the fp32 baseline first when its checkpoint is not cached), writes the artifact to
``OUT/<model>.pyserve``, and prints one row for the paper and one for pyserve: top-1 test error of
the fp32 baseline and of the compressed model (as loaded back from the artifact), fp32 parameter
bytes, artifact bytes (the whole file: header, manifest, graph, every tensor) and their ratio. The
table also goes to ``OUT/table.md``. The goals (issue 4): ratio at least the paper's, compressed error
at most our baseline's + 0.1 point; each recipe's ``evaluate`` section states them as targets
(``max_accuracy_drop: 0.001``, ``min_compression``). Exit status 0 when every goal is met, 3 when
one is missed (the table is printed and written all the same).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODELS = ("lenet300", "lenet5")


def goal_met(name: str, result) -> bool:
    """Issue 4's goal: ratio >= the paper's, compressed error <= our baseline's + 0.1 point (and the
    recipe's own evaluate targets, which state the same)."""
    from pyserve.compress.pipeline import PAPER

    base_err, comp_err = 1 - result.accuracy_before, 1 - result.accuracy_loaded
    return (result.compression >= PAPER[name]["compression"] and comp_err <= base_err + 0.001 + 1e-12
            and result.target_met)


def rows_for(name: str, result, seconds: float) -> list[str]:
    from pyserve.compress.pipeline import PAPER

    p = PAPER[name]
    base_err, comp_err = 1 - result.accuracy_before, 1 - result.accuracy_loaded
    goal = goal_met(name, result)
    return [
        f"| {p['model']} | paper | {p['top1_error_ref']:.2%} | {p['top1_error_compressed']:.2%} | "
        f"{p['fp32_bytes'] / 1e3:,.0f} KB | {p['compressed_bytes'] / 1e3:,.0f} KB | {p['compression']:.0f}x | | |",
        f"| {p['model']} | pyserve | {base_err:.2%} | {comp_err:.2%} | {result.fp32_bytes:,} B | "
        f"{result.artifact_bytes:,} B | {result.compression:.1f}x | {seconds / 60:.1f} min | "
        f"{'met' if goal else 'NOT met'} |",
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    ap.add_argument("--out", default="out/reproduce", help="directory for the artifacts and table.md")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    args = ap.parse_args()

    from pyserve.compress import compress

    out = Path(args.out)
    lines = ["| model | source | baseline error | compressed error | fp32 size | compressed size | ratio | "
             "run time | goal (ratio >= paper, error <= baseline + 0.1 pt) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    missed = []
    for name in args.models:
        start = time.monotonic()
        result = compress(HERE / name / "recipe.yaml", out / f"{name}.pyserve", verbose=not args.quiet)
        seconds = time.monotonic() - start
        print(result.table, flush=True)
        lines += rows_for(name, result, seconds)
        if not goal_met(name, result):
            missed.append(name)
    table = "\n".join(lines)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(table + "\n")
    print("\nDeep Compression, Table 1 (Han, Mao, Dally, ICLR 2016) beside pyserve:\n" + table)
    if missed:
        print(f"reproduce: goal NOT met for {', '.join(missed)}", file=sys.stderr)
        return 3
    print(f"reproduce: goals met for {', '.join(args.models)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
