"""A/B of two pyserve checkouts through gRPC: server CPU µs per request, interleaved rounds.

    .venv/bin/python benchmarks/server/ab_grpc.py OTHER [--rounds 5] [--seconds 3] [--concurrency 16]
        [--batching] [--inline-max-us 1000]

``OTHER`` is a directory holding another checkout's ``pyserve`` package and its
``benchmarks/server`` (for example an older commit: ``git archive COMMIT pyserve benchmarks/server |
tar -x -C OTHER`` and copy the built ``pyserve/_C*.so`` into ``OTHER/pyserve``). Each round runs
``benchmarks/server/profile_server.py`` (aio engine, the server in its own process, loaded by
grpc_load.py for ``--seconds`` at ``--concurrency``) once from this checkout and once from ``OTHER``
(its package imported instead of the editable install), alternating which goes first. Prints, per
side, the per-round server process CPU µs per request and infer/s, their medians, and the ratio
other/this (> 1: this checkout spends less CPU per request). ``--inline-max-us`` defaults to the
server's own default (1000), not profile_server's 100.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# runs a script with the package of SRC instead of the editable install's import hook
_BOOT = ("import runpy, sys; src, script = sys.argv[1], sys.argv[2]; "
         "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in type(f).__module__]; "
         "sys.path.insert(0, src); sys.argv = sys.argv[2:]; runpy.run_path(script, run_name='__main__')")


def run(src: Path, args) -> dict:
    script = src / "benchmarks" / "server" / "profile_server.py"
    flags = ["--seconds", str(args.seconds), "--concurrency", str(args.concurrency),
             "--inline-max-us", str(args.inline_max_us), "--grpc-engine", "aio"]
    if args.batching:
        flags.append("--batching")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if src == ROOT:
        cmd = [sys.executable, str(script), *flags]
    else:
        cmd = [sys.executable, "-c", _BOOT, str(src), str(script), *flags]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])}... failed:\n{r.stderr[-3000:]}")
    out = json.loads(r.stdout[r.stdout.index("{"):])
    return {"cpu_us": out["server_cpu_us_per_request"], "infer_per_s": out["load"]["infer_per_s"],
            "overhead_us": out["mean_overhead_us"], "executions": out["executions"], "requests": out["requests"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("other", type=Path)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--batching", action="store_true")
    p.add_argument("--inline-max-us", type=float, default=1000.0)
    args = p.parse_args()
    other = args.other.resolve()
    if not (other / "pyserve" / "__init__.py").is_file() or not (other / "benchmarks/server/profile_server.py").is_file():
        print(f"ab_grpc.py: {other}: needs pyserve/ and benchmarks/server/ (see --help)", file=sys.stderr)
        return 2
    result = {"load_average_before": os.getloadavg(), "rounds": []}
    sides = {"this": ROOT, "other": other}
    for i in range(args.rounds):
        order = ("this", "other") if i % 2 == 0 else ("other", "this")
        result["rounds"].append({side: run(sides[side], args) for side in order})
    result["load_average_after"] = os.getloadavg()
    for key in ("cpu_us", "infer_per_s", "overhead_us"):
        a = statistics.median(r["this"][key] for r in result["rounds"])
        b = statistics.median(r["other"][key] for r in result["rounds"])
        result[key] = {"this": round(a, 1), "other": round(b, 1), "other/this": round(b / a, 3)}
    result["rows_per_execution"] = {
        side: round(statistics.median(r[side]["requests"] / max(1, r[side]["executions"]) for r in result["rounds"]), 2)
        for side in sides}
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
