"""What mirroring costs the server's event-loop thread, without gRPC: CPU time per routed request.

A server (:class:`pyserve.server.ServerThread`, shadows in the worker process at SCHED_IDLE) serves
three routes on the fp32 LeNet-300-100 (examples/lenet300/variants.py): ``none`` (no shadow),
``waiting`` (a shadow 10x as slow, waiting) and ``failing`` (loads, then fails every request), each
shadowed at 100%. A coroutine on the server's own event loop sends --block requests, one at a time,
through the traffic router (``TrafficRouter.infer``, the path the gRPC servicer takes), sleeping
--gap-ms between them (a client's turnaround: the quiet moments a real server has), then waits for
the shadow backlog. ``time.thread_time()`` of the loop thread over the block and its backlog (less
the loop's idle CPU rate, measured each round, times the backlog wait), per request, minus the
no-shadow route's, is what mirroring costs the primary's process (the worker's CPU is its own
process's). Routes take turns, --rounds rounds; medians over rounds. CPU time is
much less sensitive to the machine's load than latency; p50/p99 of the in-process call are given
too.

    python benchmarks/traffic_mirror_cost.py [--rounds 5] [--block 1000] [--gap-ms 1] [--routes waiting,failing]

The same script runs against another checkout's pyserve (PYTHONPATH=that/checkout, run from there)
for a before/after comparison in one time frame.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _variants():
    spec = importlib.util.spec_from_file_location("lenet_variants", ROOT / "examples/lenet300/variants.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


async def _block(router, route: str, images: np.ndarray, n: int, gap_s: float, tag: str):
    from pyserve.protocol.types import InferRequest, Tensor

    lat = []
    c0 = time.thread_time()
    for i in range(n):
        x = images[i % len(images): i % len(images) + 1]
        req = InferRequest(route, (Tensor("images", "FP32", np.ascontiguousarray(x, dtype=np.float32)),),
                           parameters={"routing_key": f"{tag}-{i}"})
        t0 = time.perf_counter()
        await router.infer(req)
        lat.append(time.perf_counter() - t0)
        await asyncio.sleep(gap_s)
    t_drain = time.perf_counter()
    await router.drain_shadows()
    return time.thread_time() - c0, lat, time.perf_counter() - t_drain


async def _idle_cpu_rate(seconds: float) -> float:
    """CPU seconds per second the loop thread spends with nothing routed (timers, the guard tick)."""
    c0, t0 = time.thread_time(), time.perf_counter()
    await asyncio.sleep(seconds)
    return (time.thread_time() - c0) / (time.perf_counter() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--block", type=int, default=1000)
    ap.add_argument("--gap-ms", type=float, default=1.0)
    ap.add_argument("--routes", default="none,waiting,failing", help="routes to run (none is always run)")
    args = ap.parse_args(argv)
    import pyserve
    from pyserve.server import ServerThread

    routes = ("none", *(r for r in args.routes.split(",") if r in ("waiting", "failing")))
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        repo = tmp / "repo"
        v = _variants()
        info = v.build_variants(repo, n_train=2000, epochs=1)
        images = info["test"][0]
        v.register_faulty_backend()
        fails_now = tmp / "fails-now"
        v.write_faulty_model(repo, "sleep10", repo / "lenet300/1/model.pyserve", "sleep", 10)
        v.write_faulty_model(repo, "broken", repo / "lenet300/1/model.pyserve", "ok", fail_if_exists=fails_now)
        cfg = tmp / "traffic.yaml"
        cfg.write_text(textwrap.dedent("""
            version: 1
            routes:
              none: {policy: canary, variants: {primary: {model: lenet300}}}
              waiting:
                policy: shadow
                variants: {primary: {model: lenet300}}
                shadows: {s: {model: sleep10, fraction: 1.0}}
              failing:
                policy: shadow
                variants: {primary: {model: lenet300}}
                shadows: {s: {model: broken, fraction: 1.0}}
        """))
        os.environ["OMP_NUM_THREADS"] = "1"
        srv = ServerThread(repo, host="127.0.0.1", grpc_port=0, traffic_config=cfg, shadow_isolation="process",
                           shadow_priority="idle")
        cpu = {r: [] for r in routes}
        lat = {r: [] for r in routes}
        waits = {r: [] for r in routes}
        load = []
        with srv:
            fails_now.touch()
            router = srv.server.traffic

            def run(route, n, tag):
                fut = asyncio.run_coroutine_threadsafe(_block(router, route, images, n, args.gap_ms / 1e3, tag),
                                                       srv._loop)
                return fut.result(600)

            for r in routes:  # warm-up: the worker starts and loads its models
                run(r, 50, f"w-{r}")
            idle = []
            for k in range(args.rounds):
                load.append(os.getloadavg()[0])
                idle.append(asyncio.run_coroutine_threadsafe(_idle_cpu_rate(1.0), srv._loop).result(60))
                for r in routes:
                    c, l, drain_s = run(r, args.block, f"{k}")
                    # the wait for the backlog is charged the loop's idle rate (timers), not mirroring
                    cpu[r].append(1e6 * (c - idle[-1] * drain_s) / args.block)
                    waits[r].append(drain_s)
                    lat[r].extend(l)
    med = {r: float(np.median(cpu[r])) for r in routes}
    print(f"pyserve from {Path(pyserve.__file__).parent}; {args.rounds} rounds of {args.block} requests per route, "
          f"gap {args.gap_ms:g} ms, load average {min(load):.1f}-{max(load):.1f}; idle loop "
          f"{1e6 * float(np.median(idle)):.0f} µs CPU/s, charged for the backlog waits "
          f"({', '.join(f'{r} {float(np.median(waits[r])):.1f} s' for r in routes)} median per block)\n")
    print("| route | event-loop thread CPU µs/request (median of rounds) | vs none | rounds | p50 ms | p99 ms |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in routes:
        diff = "-" if r == "none" else f"{med[r] - med['none']:+.0f}"
        print(f"| {r} | {med[r]:.0f} | {diff} | "
              f"{' '.join(f'{x:.0f}' for x in cpu[r])} | {1e3 * np.percentile(lat[r], 50):.3f} | "
              f"{1e3 * np.percentile(lat[r], 99):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
