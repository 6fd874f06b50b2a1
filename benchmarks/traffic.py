"""The traffic controller's three goals (issue 6), measured over gRPC with tritonclient.

1. Canary split: a route at 95/5 (fp32 LeNet-300-100 / pruned + 4-bit codebook LeNet-300-100) gets
   --requests requests (10,000 by default), one routing key each; the share on the canary must lie in
   the 99% binomial interval of 5%. Stickiness: every key sent again (routing_key parameter, and
   x-routing-key metadata for a sample) and to a second server (a replica) gets the same variant.
2. Shadowing 100% of traffic (shadows in the worker process at SCHED_IDLE by default; --isolation
   compares others: nice 19, normal priority, in the server process): primary latency (p50, p99) on a
   route with no shadow, with a shadow
   10x as expensive (the fp32 model run 10 times per request: real CPU work on the same machine), a
   shadow 10x as slow without using the CPU (it waits 9x its compute time, like a remote or I/O-bound
   model), and a shadow that always fails (it loads, then fails every request); primary errors must
   be 0 and p99 must not rise by more than 5%. The server runs torch with one intra-op thread
   (OMP_NUM_THREADS=1), so the primary and one shadow execution can each have a core of the two.
   The routes take turns in --rounds blocks (the shadow backlog is waited for between blocks, 120 s at
   most), so a change in machine load hits them alike; the table gives p50/p90/p99 over all blocks
   and the median over rounds of each block's p99 change against that round's no-shadow block, and
   the server process's CPU time per request over each route's blocks and shadow backlogs (the
   worker process not counted; the backlog polls' cost and the server's idle CPU rate over the waits
   subtracted), which the machine's load moves much less than latency.
3. Rollback: a guarded canary (steps 5 -> 25 -> 50 -> 100%, window --window-s) starts failing at a
   known time; the guard must roll it back within one window.

The server runs in a subprocess (``pyserve serve`` with a fault-injection backend registered), the
client here, one request at a time (batch 1). Prints one table per goal.

    python benchmarks/traffic.py [--requests 10000] [--rounds 5] [--block 400] [--window-s 2]
                                 [--goals 1,2,3] [--isolation process,inline]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

SERVER_MAIN = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("v", sys.argv[1])
v = importlib.util.module_from_spec(spec); spec.loader.exec_module(v)
v.register_faulty_backend()
from pyserve.cli.main import main
sys.exit(main(sys.argv[2:]))
"""


def _variants():
    spec = importlib.util.spec_from_file_location("lenet_variants", ROOT / "examples/lenet300/variants.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class Served:
    """``pyserve serve`` in a subprocess on a free port, with the faulty backend registered."""

    def __init__(self, repo: Path, config: Path, poll_s: float = 0.2, extra: tuple[str, ...] = ()) -> None:
        cmd = [sys.executable, "-c", SERVER_MAIN, str(ROOT / "examples/lenet300/variants.py"), "serve",
               "--model-repository", str(repo), "--grpc-port", "0", "--host", "127.0.0.1",
               "--traffic-config", str(config), "--traffic-poll-s", str(poll_s), "--log-level", "WARNING", *extra]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
        line = self.proc.stdout.readline()
        if "serving" not in line:
            self.proc.kill()
            raise RuntimeError(f"server did not start: {line!r}")
        self.url = line.strip().rsplit(" on ", 1)[1]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def _input(x):
    import tritonclient.grpc as tc

    t = tc.InferInput("images", list(x.shape), "FP32")
    t.set_data_from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    return t


def _variant(result) -> str:
    return result.get_response().parameters["pyserve_variant"].string_param


def _status(url: str) -> dict:
    import grpc

    from pyserve.protocol import traffic_codec as codec

    with grpc.insecure_channel(url) as ch:
        return json.loads(codec.traffic_stub(ch).Status(codec.pb.StatusRequest()).json)


def _report(url: str, route: str) -> dict:
    import grpc

    from pyserve.protocol import traffic_codec as codec

    with grpc.insecure_channel(url) as ch:
        return json.loads(codec.traffic_stub(ch).Report(codec.pb.ReportRequest(route=route)).json)[route]


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (its threads, not its children: the shadow
    worker is not counted), from /proc (Linux)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _table(headers, rows) -> str:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    fmt = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *(fmt(r) for r in rows)])


def goal_canary(repo: Path, images: np.ndarray, n: int, tmp: Path) -> tuple[str, bool]:
    import tritonclient.grpc as tc
    from scipy import stats

    cfg = tmp / "canary.yaml"
    cfg.write_text(textwrap.dedent("""
        version: 1
        routes:
          mnist:
            policy: canary
            variants:
              stable: {model: lenet300, weight_percent: 95}
              candidate: {model: lenet300c, weight_percent: 5}
    """))
    a, b = Served(repo, cfg), Served(repo, cfg)
    try:
        ca, cb = tc.InferenceServerClient(a.url), tc.InferenceServerClient(b.url)
        x = [_input(images[i % len(images): i % len(images) + 1]) for i in range(64)]
        first = {}
        t0 = time.perf_counter()
        for i in range(n):
            first[i] = _variant(ca.infer("mnist", [x[i % 64]], parameters={"routing_key": f"user-{i}"}))
        elapsed = time.perf_counter() - t0
        k = sum(v == "candidate" for v in first.values())
        lo, hi = stats.binom.interval(0.99, n, 0.05)
        same = sum(_variant(ca.infer("mnist", [x[i % 64]], parameters={"routing_key": f"user-{i}"})) == first[i]
                   for i in range(n))
        m = min(n, 2000)
        same_md = sum(_variant(ca.infer("mnist", [x[i % 64]], headers={"x-routing-key": f"user-{i}"})) == first[i]
                      for i in range(m))
        same_replica = sum(_variant(cb.infer("mnist", [x[i % 64]], parameters={"routing_key": f"user-{i}"})) == first[i]
                           for i in range(m))
        ca.close()
        cb.close()
    finally:
        a.stop()
        b.stop()
    ok = lo <= k <= hi and same == n and same_md == m and same_replica == m
    rows = [
        ["requests (one key each)", f"{n:,}", f"{n / elapsed:,.0f} req/s, batch 1"],
        ["on the canary (weight 5%)", f"{k:,} ({100 * k / n:.2f}%)", f"99% binomial interval [{lo:.0f}, {hi:.0f}]: "
         + ("inside" if lo <= k <= hi else "OUTSIDE")],
        ["same variant, same key again (parameter)", f"{same:,} / {n:,}", f"{100 * same / n:.1f}% sticky"],
        ["same variant, key as x-routing-key metadata", f"{same_md:,} / {m:,}", f"{100 * same_md / m:.1f}%"],
        ["same variant on a second server (replica)", f"{same_replica:,} / {m:,}", f"{100 * same_replica / m:.1f}%"],
    ]
    return "Goal 1: canary split and stickiness\n\n" + _table(["measure", "value", "note"], rows), ok


#: --isolation values: label -> serve flags
ISOLATIONS = {
    "process": ("--traffic-shadow-isolation", "process", "--traffic-shadow-priority", "idle"),
    "process-nice": ("--traffic-shadow-isolation", "process", "--traffic-shadow-priority", "nice"),
    "process-normal": ("--traffic-shadow-isolation", "process", "--traffic-shadow-priority", "normal"),
    "inline": ("--traffic-shadow-isolation", "inline"),
}
ISOLATION_TEXT = {"process": "worker process, SCHED_IDLE", "process-nice": "worker process, nice 19",
                  "process-normal": "worker process, normal priority", "inline": "in the server process"}


def goal_shadow(repo: Path, images: np.ndarray, rounds: int, block: int, tmp: Path,
                isolation: str = "process") -> tuple[str, bool]:
    import tritonclient.grpc as tc

    v = _variants()
    v.write_faulty_model(repo, "slow10", repo / "lenet300/1/model.pyserve", "slow", 10)
    v.write_faulty_model(repo, "sleep10", repo / "lenet300/1/model.pyserve", "sleep", 10)
    # loads and warms up, then fails every request once the flag exists (so failures reach the shadow runner)
    fails_now = tmp / "shadow-fails-now"
    fails_now.unlink(missing_ok=True)
    v.write_faulty_model(repo, "broken", repo / "lenet300/1/model.pyserve", "ok", fail_if_exists=fails_now)
    cfg = tmp / "shadow.yaml"
    cfg.write_text(textwrap.dedent("""
        version: 1
        routes:
          none:
            policy: canary
            variants: {primary: {model: lenet300}}
          slow:
            policy: shadow
            variants: {primary: {model: lenet300}}
            shadows: {slow10: {model: slow10, fraction: 1.0}}
          waiting:
            policy: shadow
            variants: {primary: {model: lenet300}}
            shadows: {sleep10: {model: sleep10, fraction: 1.0}}
          failing:
            policy: shadow
            variants: {primary: {model: lenet300}}
            shadows: {broken: {model: broken, fraction: 1.0}}
    """))
    srv = Served(repo, cfg, extra=ISOLATIONS[isolation])
    fails_now.touch()
    lat = {"none": [], "slow": [], "waiting": [], "failing": []}
    per_round = {k: [] for k in lat}  # p99 of each block
    errors = {k: 0 for k in lat}
    load = []
    polls = {k: 0 for k in lat}  # backlog polls (Report RPCs) per route
    cpu = {k: 0.0 for k in lat}  # server process CPU seconds over each route's blocks and backlogs
    waits = {k: 0.0 for k in lat}  # seconds waited for the backlog after each route's blocks
    try:
        c = tc.InferenceServerClient(srv.url)
        x = [_input(images[i: i + 1]) for i in range(64)]
        def settled(route: str, expected: int, timeout_s: float) -> float:
            """Wait until the route's shadow ran or dropped ``expected`` copies; seconds waited."""
            t0 = time.monotonic()
            while route != "none" and time.monotonic() - t0 < timeout_s:
                polls[route] += 1
                sh = next(iter(_report(srv.url, route)["shadows"].values()))
                if sh["requests_count"] + sh["dropped"] >= expected:
                    break
                time.sleep(0.2)
            return time.monotonic() - t0

        for i in range(200):  # warm-up
            c.infer("none", [x[i % 64]])
        warm = 20  # every route, so the shadow worker process has started and loaded its models
        for route in lat:
            for i in range(warm):
                c.infer(route, [x[i % 64]], parameters={"routing_key": f"w-{i}"})
            settled(route, warm, 120)
        waited = []
        polls = {k: 0 for k in lat}  # count the measured rounds' polls only
        for r in range(rounds):
            load.append(os.getloadavg()[0])
            for route in lat:
                blk = []
                c0 = _cpu_s(srv.proc.pid)
                for i in range(block):
                    t0 = time.perf_counter()
                    try:
                        c.infer(route, [x[i % 64]], parameters={"routing_key": f"r{r}-{i}"})
                    except tc.InferenceServerException:
                        errors[route] += 1
                    blk.append(time.perf_counter() - t0)
                lat[route].extend(blk)
                per_round[route].append(np.percentile(blk, 99))
                time.sleep(0.5)  # let queued shadow work finish (or be dropped) before the next block
                waited.append(settled(route, warm + (r + 1) * block, 120))
                cpu[route] += _cpu_s(srv.proc.pid) - c0
                waits[route] += waited[-1] + 0.5
        # what one settle poll (a Report RPC) costs the server, to subtract from the routes' CPU
        c0 = _cpu_s(srv.proc.pid)
        for _ in range(20):
            _report(srv.url, "slow")
        per_poll = (_cpu_s(srv.proc.pid) - c0) / 20
        # and what the server burns per second doing nothing (timers, the guard tick), charged for the waits
        c0, t0 = _cpu_s(srv.proc.pid), time.monotonic()
        time.sleep(3.0)
        idle_rate = (_cpu_s(srv.proc.pid) - c0) / (time.monotonic() - t0)
        reps = {r: _report(srv.url, r) for r in ("slow", "waiting", "failing")}
        c.close()
    finally:
        srv.stop()
    p = {k: (np.percentile(v, 50) * 1e3, np.percentile(v, 99) * 1e3, np.percentile(v, 90) * 1e3)
         for k, v in lat.items()}
    base99 = p["none"][1]
    # per round: this route's block p99 against the no-shadow block of the same round; median over rounds
    med = {k: float(np.median([a / b - 1 for a, b in zip(per_round[k], per_round["none"])])) for k in lat}
    cpu_us = {k: 1e6 * (cpu[k] - polls[k] * per_poll - idle_rate * waits[k]) / len(lat[k]) for k in lat}
    rows = []
    for route, label in (("none", "no shadow"), ("slow", "shadow 10x as expensive (CPU), 100%"),
                         ("waiting", "shadow 10x as slow (waiting), 100%"),
                         ("failing", "shadow always failing, 100%")):
        sh = next(iter(reps[route]["shadows"].values())) if route in reps else None
        rows.append([label, len(lat[route]), errors[route], f"{p[route][0]:.3f}", f"{p[route][2]:.3f}",
                     f"{p[route][1]:.3f}",
                     f"{100 * (p[route][1] / base99 - 1):+.1f}%" if route != "none" else "-",
                     f"{100 * med[route]:+.1f}%" if route != "none" else "-",
                     f"{cpu_us[route]:.0f}" + (f" ({cpu_us[route] - cpu_us['none']:+.0f})" if route != "none" else ""),
                     f"{sh['requests_count']:,} ok {sh['requests_count'] - sh['requests_errors']:,}" if sh else "-",
                     f"{sh['dropped']:,}" if sh else "-"])
    ok = all(e == 0 for e in errors.values()) and all(p[r][1] <= 1.05 * base99 for r in ("slow", "waiting", "failing"))
    text = (f"Goal 2: shadowing 100% of traffic, shadows {ISOLATION_TEXT[isolation]} (primary latency as the "
            f"client sees it, batch 1; {rounds} rounds of {block} requests per route, load average "
            f"{min(load):.1f}-{max(load):.1f}; waiting for the shadow backlog after blocks took up to "
            f"{max(waited):.0f} s, 120 s at most)\n\n"
            + _table(["route", "requests", "primary errors", "p50 ms", "p90 ms", "p99 ms", "p99 vs no shadow",
                      f"median of {rounds} rounds' p99 change", "server CPU µs/req (vs none)", "shadow runs",
                      "shadow dropped"], rows))
    return text, ok


def goal_rollback(repo: Path, images: np.ndarray, window_s: float, tmp: Path) -> tuple[str, bool]:
    import tritonclient.grpc as tc

    v = _variants()
    flag = tmp / "canary-fails-now"
    v.write_faulty_model(repo, "flaky", repo / "lenet300c/1/model.pyserve", "ok", fail_if_exists=flag)
    # the baseline through the same wrapper, so both variants take the same execution path (a
    # wrapper has no infer_sync, so it always runs in the thread pool, while a bare pyserve model
    # runs inline on the event loop): otherwise the guard's p99 ratio compares pool hand-overs
    # with inline runs and, under load, rolls back before the canary fails
    v.write_faulty_model(repo, "steady", repo / "lenet300/1/model.pyserve", "ok")
    cfg = tmp / "guard.yaml"
    cfg.write_text(textwrap.dedent(f"""
        version: 1
        routes:
          mnist:
            policy: canary
            variants:
              stable: {{model: steady, weight_percent: 95}}
              candidate: {{model: flaky, weight_percent: 5}}
            guard:
              canary: candidate
              steps_percent: [5, 25, 50, 100]
              window_s: {window_s}
              min_requests: 20
              max_error_rate_increase: 0.05
              max_p99_latency_ratio: 3.0
    """))
    srv = Served(repo, cfg)
    try:
        c = tc.InferenceServerClient(srv.url)
        x = [_input(images[i: i + 1]) for i in range(64)]
        t_fail = t_back = None
        errors = 0
        i = 0
        start = time.monotonic()
        while time.monotonic() - start < 20 * window_s + 30:
            st = _status(srv.url)["routes"]["mnist"]["guard"] if i % 50 == 0 else None
            if t_fail is None and st is not None and st["canary_percent"] >= 25:
                flag.touch()  # the canary starts failing now, at 25%
                t_fail = time.monotonic()
            try:
                c.infer("mnist", [x[i % 64]], parameters={"routing_key": f"u{i}"})
            except tc.InferenceServerException:
                errors += 1
            i += 1
            if t_fail is not None and i % 10 == 0:
                st = _status(srv.url)["routes"]["mnist"]["guard"]
                if st["state"] == "rolled_back":
                    t_back = time.monotonic()
                    break
        decisions = _status(srv.url)["decisions"]
        c.close()
    finally:
        srv.stop()
        flag.unlink(missing_ok=True)
    rows = [[time.strftime("%H:%M:%S", time.localtime(d["time_s"])), d["action"], f"{d['from_percent']:g}%",
             f"{d['to_percent']:g}%", d["reason"][:90]] for d in decisions]
    took = (t_back - t_fail) if (t_back and t_fail) else float("nan")
    ok = t_back is not None and took <= window_s
    text = (f"Goal 3: rollback (window_s {window_s:g}, min_requests 20; the canary starts failing at 25%)\n\n"
            + _table(["time", "decision", "from", "to", "reason"], rows)
            + f"\n\ncanary failing -> rolled back: {took:.2f} s = {took / window_s:.2f} window(s); "
              f"failed requests seen by clients: {errors}")
    return text, ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--block", type=int, default=400)
    ap.add_argument("--window-s", type=float, default=2.0)
    ap.add_argument("--goals", default="1,2,3", help="which goals to measure, e.g. 2 or 1,3 (default all)")
    ap.add_argument("--isolation", default="process",
                    help="goal 2: where shadows run, one or more of " + ", ".join(ISOLATIONS)
                    + " (comma-separated; each gets its own server and table; the goal is judged on the first)")
    args = ap.parse_args(argv)
    goals = {int(g) for g in args.goals.split(",")}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        repo = tmp / "repo"
        info = _variants().build_variants(repo)
        images = info["test"][0]
        results = []
        if 1 in goals:
            results.append(goal_canary(repo, images, args.requests, tmp))
        if 2 in goals:
            for k, iso in enumerate(args.isolation.split(",")):
                if iso not in ISOLATIONS:
                    ap.error(f"--isolation: unknown {iso!r}; one of {', '.join(ISOLATIONS)}")
                text, ok = goal_shadow(repo, images, args.rounds, args.block, tmp, iso)
                results.append((text, ok) if k == 0 else (text + "\n(comparison; not judged)", True))
        if 3 in goals:
            results.append(goal_rollback(repo, images, args.window_s, tmp))
    for text, ok in results:
        print(text)
        print(f"-> goal {'met' if ok else 'NOT met'}\n")
    return 0 if all(ok for _, ok in results) else 1


if __name__ == "__main__":
    sys.exit(main())
