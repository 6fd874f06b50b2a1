"""grpc++ server designs for the native engine's transport, measured without Python or a model.

    .venv/bin/python benchmarks/server/transport_designs.py [--seconds 4] [--concurrency 1,4,16] [--rounds 2]

Builds benchmarks/server/transport_designs.cpp and grpc_load_cpp.cpp (g++ and pkg-config's grpc++,
into build/), then for each design (``callback_inline``: grpc++'s callback API answering in the
reaction; ``callback_handoff``: the same handing each RPC to a worker thread, the native engine's
transport until 2026-12-01; ``cq``: the completion-queue API, the thread that read an RPC answering
it, the native engine's transport now) and concurrency, loads it with grpc_load_cpp for
``--seconds`` and reads the server's threads from /proc before and after: infer/s, p50 µs, server
CPU µs per request (user + system) and context switches per request (voluntary + involuntary, all
threads). Rounds interleave the designs. Client and server share the machine: CPU and switches per
request are the figures to compare, infer/s only indicative. Prints a markdown table of medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_server import build_cpp, free_port  # noqa: E402

DESIGNS = (("callback_inline", 4), ("callback_handoff", 8), ("cq", 5))
TICK = os.sysconf("SC_CLK_TCK")


def snapshot(pid: int) -> tuple[float, int]:
    """(CPU seconds, context switches) summed over the threads of process ``pid``."""
    cpu, switches = 0.0, 0
    for t in Path(f"/proc/{pid}/task").iterdir():
        try:
            f = (t / "stat").read_text().rsplit(")", 1)[1].split()
            status = (t / "status").read_text()
        except OSError:
            continue
        cpu += (int(f[11]) + int(f[12])) / TICK
        switches += sum(int(line.split()[1]) for line in status.splitlines() if "ctxt_switches" in line)
    return cpu, switches


def measure(server: Path, client: Path, request: Path, design: str, threads: int, concurrency: int,
            seconds: float) -> dict:
    port = free_port()
    proc = subprocess.Popen([str(server), design, str(port), str(threads)], stdout=subprocess.PIPE, text=True)
    try:
        if not proc.stdout.readline().startswith("ready"):
            raise RuntimeError(f"{design} did not start")
        args = [str(client), "--url", f"127.0.0.1:{port}", "--request", str(request), "--concurrency", str(concurrency)]
        subprocess.run(args + ["--seconds", "1"], capture_output=True, check=True)  # warm-up
        cpu0, sw0 = snapshot(proc.pid)
        r = subprocess.run(args + ["--seconds", str(seconds)], capture_output=True, text=True, check=True)
        cpu1, sw1 = snapshot(proc.pid)
    finally:
        proc.kill()
        proc.wait()
    d = json.loads(r.stdout)
    n = max(1, d["requests"])
    return {"infer_per_s": d["infer_per_s"], "p50_us": d["p50_us"], "cpu_us": (cpu1 - cpu0) / n * 1e6,
            "switches": (sw1 - sw0) / n}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    try:
        server, client = build_cpp("transport_designs"), build_cpp("grpc_load_cpp")
    except RuntimeError as exc:
        sys.exit(f"transport_designs.py: {exc}")
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    runs: dict = {}
    with tempfile.NamedTemporaryFile(suffix=".bin") as req:
        req.write(b"\x0a\x08lenet300" + b"\x00" * 3136)  # any bytes: the servers do not parse requests
        req.flush()
        for r in range(args.rounds):
            for c in concurrencies:
                for design, threads in DESIGNS:
                    m = measure(server, client, Path(req.name), design, threads, c, args.seconds)
                    runs.setdefault((design, threads, c), []).append(m)
                    print(f"  round {r + 1} {design} ({threads} threads) c={c}: {m['infer_per_s']:.0f} infer/s, "
                          f"{m['cpu_us']:.0f} CPU us/req, {m['switches']:.2f} switches/req", file=sys.stderr)
    print("| design | threads | concurrency | infer/s | p50 µs | server CPU µs/request | context switches/request |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for (design, threads, c), ms in runs.items():
        med = {k: statistics.median(m[k] for m in ms) for k in ms[0]}
        print(f"| {design} | {threads} | {c} | {med['infer_per_s']:.0f} | {med['p50_us']:.0f} | {med['cpu_us']:.0f} | "
              f"{med['switches']:.2f} |")
    print(f"\n(medians of {args.rounds} rounds, {args.seconds:g} s windows; load average after "
          f"{os.getloadavg()[0]:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
