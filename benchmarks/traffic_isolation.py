"""Where should shadow work run? In-process threads vs a worker process, at normal vs lowest priority.

A stand-alone measurement behind the server's choice (docs/traffic.md, "Where shadows run"), with
no gRPC in the way: the main thread plays the primary -- LeNet-300-100 (torch, one intra-op thread)
on one image plus about 0.2 ms of pure-Python request handling, then a short pause like a client's
round trip -- and a shadow runs the same model ten times per job, back to back, as a 100% shadow
that never catches up would. The shadow runs:

- ``none``: no shadow (the baseline);
- ``thread``: a thread of the same process;
- ``thread-idle``: such a thread in the SCHED_IDLE class (Linux lets a thread set its own policy);
- ``process``: a separate process at normal priority;
- ``process-idle``: a separate process in SCHED_IDLE (what ``pyserve serve`` does by default).

``--shadow-python N`` adds N units of pure-Python work (about 0.2 ms each) to every shadow job: the
share of a job that holds the GIL, which decides how much an in-process shadow can block the primary.

The conditions take turns in --rounds blocks of --block primary requests, so a change in machine load
hits them alike; the table gives the primary's p50 and p99 over all blocks and the median over rounds
of each block's p99 against the same round's baseline block, plus the shadow jobs done.

    python benchmarks/traffic_isolation.py [--rounds 5] [--block 3000] [--shadow-python N]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import threading
import time

import numpy as np

CONDITIONS = ("none", "thread", "thread-idle", "process", "process-idle")


def _model():
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(784, 300), torch.nn.ReLU(), torch.nn.Linear(300, 100), torch.nn.ReLU(),
                            torch.nn.Linear(100, 10)).eval()
    return m, torch.rand(1, 784)


def _idle() -> None:
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # 0 = the calling thread on Linux


def _shadow_loop(stop, done, ready, idle: bool, python_reps: int = 0) -> None:
    import torch

    if idle:
        _idle()
    m, x = _model()
    ready.set()
    with torch.no_grad():
        while not stop.is_set():
            for _ in range(10):
                m(x)
            for _ in range(python_reps):  # the shadow path's own Python (checks, asyncio, divergence)
                _python_work()
            with done.get_lock():
                done.value += 1


def _python_work() -> int:
    d = {}
    for i in range(400):  # ~0.2 ms: decoding, checks, encoding in the server
        d[str(i)] = i * 2
    return len(d)


def measure(cond: str, n: int, python_reps: int = 0) -> tuple[list[float], int]:
    import torch

    m, x = _model()
    ctx = mp.get_context("spawn")
    stop = threading.Event() if cond.startswith("thread") else ctx.Event()
    ready = threading.Event() if cond.startswith("thread") else ctx.Event()
    done = ctx.Value("q", 0)
    worker = None
    if cond.startswith("thread"):
        worker = threading.Thread(target=_shadow_loop, args=(stop, done, ready, cond == "thread-idle", python_reps),
                                  daemon=True)
    elif cond.startswith("process"):
        worker = ctx.Process(target=_shadow_loop, args=(stop, done, ready, cond == "process-idle", python_reps),
                                                 daemon=True)
    if worker is not None:
        worker.start()
        if not ready.wait(120):  # a spawned process imports torch first
            raise RuntimeError(f"{cond}: the shadow did not start within 120 s")
        time.sleep(0.1)
    lat = []
    with torch.no_grad():
        for _ in range(n):
            t0 = time.perf_counter()
            _python_work()
            m(x)
            _python_work()
            lat.append(time.perf_counter() - t0)
            time.sleep(0.0005)
    stop.set()
    if worker is not None:
        worker.join(10)
    return lat, done.value


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--block", type=int, default=3000)
    ap.add_argument("--shadow-python", type=int, default=0, metavar="N",
                    help="pure-Python work per shadow job, in units of the primary's (~0.2 ms each; default 0)")
    args = ap.parse_args(argv)
    if not hasattr(os, "SCHED_IDLE"):
        print("SCHED_IDLE is Linux only", file=sys.stderr)
        return 2
    lat = {c: [] for c in CONDITIONS}
    per_round = {c: [] for c in CONDITIONS}
    jobs = {c: 0 for c in CONDITIONS}
    load = []
    for _ in range(args.rounds):
        load.append(os.getloadavg()[0])
        for c in CONDITIONS:
            blk, n = measure(c, args.block, args.shadow_python)
            lat[c].extend(blk)
            per_round[c].append(np.percentile(blk, 99))
            jobs[c] += n
    base = np.percentile(lat["none"], 99)
    print(f"primary: LeNet-300-100 batch 1 + ~0.4 ms Python, {args.rounds} rounds x {args.block} per condition; "
          f"shadow: 10x the model + {args.shadow_python} x ~0.2 ms Python per job, back to back; "
          f"load average {min(load):.1f}-{max(load):.1f}\n")
    print("| shadow runs in | p50 ms | p99 ms | p99 vs none | median of rounds' p99 change | shadow jobs done |")
    print("|---|---|---|---|---|---|")
    for c in CONDITIONS:
        p50, p99 = np.percentile(lat[c], 50) * 1e3, np.percentile(lat[c], 99) * 1e3
        med = np.median([a / b - 1 for a, b in zip(per_round[c], per_round["none"])])
        print(f"| {c} | {p50:.3f} | {p99:.3f} | {'-' if c == 'none' else f'{100 * (p99 / (base * 1e3) - 1):+.1f}%'} "
              f"| {'-' if c == 'none' else f'{100 * med:+.1f}%'} | {jobs[c]:,} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
