"""Where mirroring costs the primary: per-request CPU of the server process and a cProfile of its
event-loop thread, route without a shadow vs routes shadowed at 100% (issue 6, goal 2).

The server is ``pyserve serve`` in a subprocess (as in benchmarks/traffic.py, one torch thread); the
client sends one request at a time (batch 1). The routes take turns in blocks of --block requests,
--rounds rounds; for each block the server process's own CPU time (user + system, from
/proc/PID/stat, so not the shadow worker's, which is a child) is read before and after, and the
profiler of the server's main thread (its event loop) is switched on for the block with SIGUSR1 and
off (stats dumped) with SIGUSR2. CPU time per request is robust to the machine's load (it counts
the server's work, not the waits), so the difference against the no-shadow route is the mirroring
cost the primary's process pays, whatever else runs on the machine.

    python benchmarks/traffic_profile.py [--rounds 5] [--block 400] [--routes none,waiting,failing,slow]
                                         [--isolation process] [--top 25] [--no-profile]

Prints per route: requests, p50/p99 client latency, server CPU µs per request and its difference
from the no-shadow route; then, unless --no-profile, each shadowed route's top functions by own
time (per request) next to the no-shadow route's.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import pstats
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

_spec = importlib.util.spec_from_file_location("traffic_bench", ROOT / "benchmarks/traffic.py")
tb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tb)

#: the server's main program with a profiler of its main (event-loop) thread toggled by signals
PROFILED_MAIN = """
import cProfile, importlib.util, os, signal, sys
spec = importlib.util.spec_from_file_location("v", sys.argv[1])
v = importlib.util.module_from_spec(spec); spec.loader.exec_module(v)
v.register_faulty_backend()
out = os.environ["PYSERVE_PROFILE_OUT"]
state = {"prof": None, "n": 0}
def on(*_):
    state["prof"] = cProfile.Profile(); state["prof"].enable()
def off(*_):
    p = state["prof"]
    if p is not None:
        p.disable(); p.dump_stats(out); state["prof"] = None
signal.signal(signal.SIGUSR1, on)
signal.signal(signal.SIGUSR2, off)
from pyserve.cli.main import main
sys.exit(main(sys.argv[2:]))
"""

ROUTES = {
    "none": None,
    "waiting": ("sleep10", "sleep", 10),
    "failing": ("broken", "ok", 1),
    "slow": ("slow10", "slow", 10),
}


def _stat_cpu_s(path: str) -> float:
    with open(path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> tuple[float, float]:
    """User + system CPU seconds of process ``pid`` (its own threads, not its children) and of its
    main thread alone (the event loop)."""
    return _stat_cpu_s(f"/proc/{pid}/stat"), _stat_cpu_s(f"/proc/{pid}/task/{pid}/stat")


def report_cpu_s(url: str, pid: int, route: str, n: int = 20) -> tuple[float, float]:
    """Server CPU seconds one Report RPC costs, process and main thread (the settle polls call it;
    subtracted below)."""
    c0 = cpu_s(pid)
    for _ in range(n):
        tb._report(url, route)
    c1 = cpu_s(pid)
    return (c1[0] - c0[0]) / n, (c1[1] - c0[1]) / n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--block", type=int, default=400)
    ap.add_argument("--routes", default="none,waiting,failing")
    ap.add_argument("--isolation", default="process", choices=list(tb.ISOLATIONS))
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--no-profile", action="store_true", help="CPU time and latency only (no profiler)")
    ap.add_argument("--save", default=None, help="directory to write each route's pstats file to (ROUTE.pstats)")
    args = ap.parse_args(argv)
    routes = args.routes.split(",")
    if "none" not in routes:
        routes.insert(0, "none")
    for r in routes:
        if r not in ROUTES:
            ap.error(f"--routes: unknown {r!r}; one of {', '.join(ROUTES)}")
    import tritonclient.grpc as tc

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        repo = tmp / "repo"
        v = tb._variants()
        info = v.build_variants(repo)
        images = info["test"][0]
        fails_now = tmp / "shadow-fails-now"
        lines = ["version: 1", "routes:"]
        for r in routes:
            spec = ROUTES[r]
            if spec is None:
                lines += [f"  {r}:", "    policy: canary", "    variants: {primary: {model: lenet300}}"]
                continue
            model, mode, factor = spec
            v.write_faulty_model(repo, model, repo / "lenet300/1/model.pyserve", mode, factor,
                                 fail_if_exists=fails_now if r == "failing" else None)
            lines += [f"  {r}:", "    policy: shadow", "    variants: {primary: {model: lenet300}}",
                      f"    shadows: {{s: {{model: {model}, fraction: 1.0}}}}"]
        cfg = tmp / "shadow.yaml"
        cfg.write_text("\n".join(lines) + "\n")
        prof_out = tmp / "prof.out"
        os.environ["PYSERVE_PROFILE_OUT"] = str(prof_out)
        main_src = tb.SERVER_MAIN
        tb.SERVER_MAIN = PROFILED_MAIN
        try:
            srv = tb.Served(repo, cfg, extra=tb.ISOLATIONS[args.isolation])
        finally:
            tb.SERVER_MAIN = main_src
        fails_now.touch()
        pid = srv.proc.pid
        lat = {r: [] for r in routes}
        block_p99 = {r: [] for r in routes}
        cpu = {r: [] for r in routes}
        main_cpu = {r: [] for r in routes}
        polls = {r: 0 for r in routes}
        stats: dict[str, pstats.Stats | None] = {r: None for r in routes}
        load = []
        try:
            c = tc.InferenceServerClient(srv.url)
            x = [tb._input(images[i: i + 1]) for i in range(64)]

            def settled(route: str, expected: int, timeout_s: float = 120) -> None:
                t0 = time.monotonic()
                while route != "none" and time.monotonic() - t0 < timeout_s:
                    polls[route] += 1
                    sh = next(iter(tb._report(srv.url, route)["shadows"].values()))
                    if sh["requests_count"] + sh["dropped"] >= expected:
                        return
                    time.sleep(0.2)

            for i in range(200):
                c.infer("none", [x[i % 64]])
            warm = 20
            for r in routes:
                polls[r] = 0
                for i in range(warm):
                    c.infer(r, [x[i % 64]], parameters={"routing_key": f"w-{i}"})
                settled(r, warm)
            for rnd in range(args.rounds):
                load.append(os.getloadavg()[0])
                for r in routes:
                    if not args.no_profile:
                        os.kill(pid, signal.SIGUSR1)
                        time.sleep(0.05)
                    c0 = cpu_s(pid)
                    blk = []
                    for i in range(args.block):
                        t0 = time.perf_counter()
                        c.infer(r, [x[i % 64]], parameters={"routing_key": f"r{rnd}-{i}"})
                        blk.append(time.perf_counter() - t0)
                    time.sleep(0.5)  # the shadow work of the block's last requests lands in this block
                    settled(r, warm + (rnd + 1) * args.block)
                    c1 = cpu_s(pid)
                    cpu[r].append(c1[0] - c0[0])
                    main_cpu[r].append(c1[1] - c0[1])
                    lat[r].extend(blk)
                    block_p99[r].append(np.percentile(blk, 99))
                    if not args.no_profile:
                        os.kill(pid, signal.SIGUSR2)
                        for _ in range(100):
                            if prof_out.exists() and prof_out.stat().st_size:
                                break
                            time.sleep(0.05)
                        time.sleep(0.1)
                        s = pstats.Stats(str(prof_out))
                        if stats[r] is None:
                            stats[r] = s
                        else:
                            stats[r].add(s)
                        prof_out.unlink()
            per_poll = {r: report_cpu_s(srv.url, pid, r) if r != "none" else (0.0, 0.0) for r in routes}
            c.close()
        finally:
            srv.stop()
    n = {r: len(lat[r]) for r in routes}
    # the settle polls' Report RPCs are the benchmark's, not mirroring's: subtracted
    cpu_us = {r: 1e6 * (sum(cpu[r]) - polls[r] * per_poll[r][0]) / n[r] for r in routes}
    main_us = {r: 1e6 * (sum(main_cpu[r]) - polls[r] * per_poll[r][1]) / n[r] for r in routes}
    print(f"Server process CPU per request and client latency ({args.rounds} rounds of {args.block} per route, "
          f"shadows: {tb.ISOLATION_TEXT[args.isolation]}, load average {min(load):.1f}-{max(load):.1f}; "
          f"profiler {'off' if args.no_profile else 'on (slows the server)'}; the settle polls' Report RPCs "
          "subtracted: " + ", ".join(f"{r} {polls[r]} x {1e3 * per_poll[r][0]:.1f} ms" for r in routes if r != "none")
          + ")\n")
    import pyserve

    print(f"pyserve from {Path(pyserve.__file__).parent}")
    base99 = np.percentile(lat["none"], 99)
    rows = []
    for r in routes:
        p99 = np.percentile(lat[r], 99)
        med = float(np.median([a / b - 1 for a, b in zip(block_p99[r], block_p99["none"])]))
        rows.append([r, n[r], f"{1e3 * np.percentile(lat[r], 50):.3f}", f"{1e3 * p99:.3f}",
                     "-" if r == "none" else f"{100 * (p99 / base99 - 1):+.1f}% ({100 * med:+.1f}%)",
                     f"{cpu_us[r]:.0f}", "-" if r == "none" else f"{cpu_us[r] - cpu_us['none']:+.0f}",
                     f"{main_us[r]:.0f}", "-" if r == "none" else f"{main_us[r] - main_us['none']:+.0f}"])
    print(tb._table(["route", "requests", "p50 ms", "p99 ms", "p99 vs none (median of rounds)",
                     "server CPU µs/req", "vs none",
                     "event-loop thread CPU µs/req", "vs none"], rows))
    if args.no_profile:
        return 0
    for r in routes:
        s = stats[r]
        if s is None:
            continue
        if args.save:
            Path(args.save).mkdir(parents=True, exist_ok=True)
            s.dump_stats(str(Path(args.save) / f"{r}.pstats"))
        total = sum(t[2] for t in s.stats.values())
        print(f"\n{r}: profiled event-loop thread, own time {1e6 * total / n[r]:.0f} µs/req; "
              f"top {args.top} by own time (µs per request, calls per request)\n")
        items = sorted(s.stats.items(), key=lambda kv: -kv[1][2])[: args.top]
        rows = [[f"{1e6 * st[2] / n[r]:.1f}", f"{1e6 * st[3] / n[r]:.1f}", f"{st[1] / n[r]:.2f}",
                 f"{Path(fn).name}:{ln}({name})"[:90]] for (fn, ln, name), st in items]
        print(tb._table(["own µs/req", "cum µs/req", "calls/req", "function"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
