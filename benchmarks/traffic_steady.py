"""Shadow copies under steady load: do they reach the shadow worker, or are they dropped while it idles?

Several client threads send batch-1 requests back to back for --seconds on a route that mirrors 100%
to a shadow as cheap as the primary (the pruned + 4-bit LeNet-300-100 against the fp32 one), so
there is (almost) always a routed request running on the server's event loop. The shadow worker
runs at normal priority (so the machine's CPU is not what limits it) and the route's queue is small
(--queue). Prints, per run: requests, copies mirrored, copies that ran, copies dropped, the
dropped share, the worker process's CPU time over the run and the server's p99.

A copy dropped while the worker had CPU time to spare is the defect this measures (before the fix
the overdue slice sent at most 0.2 ms worth of copies per 20 ms, whatever was waiting).

    python benchmarks/traffic_steady.py [--clients 4] [--seconds 10] [--queue 16] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from traffic import Served, _cpu_s, _input, _report, _table, _variants  # noqa: E402


def _children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(d))
            except OSError:
                pass
    return out


def run(repo: Path, images: np.ndarray, clients: int, seconds: float, queue: int, tmp: Path) -> list:
    import tritonclient.grpc as tc

    cfg = tmp / "steady.yaml"
    cfg.write_text(textwrap.dedent(f"""
        version: 1
        routes:
          mnist:
            policy: shadow
            variants: {{primary: {{model: lenet300}}}}
            shadows: {{mirror: {{model: lenet300c, fraction: 1.0}}}}
            shadow_queue_size: {queue}
    """))
    srv = Served(repo, cfg, extra=("--traffic-shadow-priority", "normal"))
    try:
        c = tc.InferenceServerClient(srv.url)
        x = [_input(images[i: i + 1]) for i in range(64)]
        for i in range(50):  # start the worker and load the shadow (its first load takes seconds)
            c.infer("mnist", [x[i % 64]], parameters={"routing_key": f"w{i}"})
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            before = next(iter(_report(srv.url, "mnist")["shadows"].values()))
            if before["requests_count"] + before["dropped"] >= 50:
                break
            time.sleep(0.2)
        else:
            raise RuntimeError(f"the shadow worker did not run the warm-up copies: {before}")
        worker = _children(srv.proc.pid)
        w0 = _cpu_s(worker[0]) if worker else float("nan")
        lat: list[float] = []
        stop = time.monotonic() + seconds
        load0 = os.getloadavg()[0]

        def client(k: int) -> None:
            cc = tc.InferenceServerClient(srv.url)
            i = 0
            while time.monotonic() < stop:
                t0 = time.perf_counter()
                cc.infer("mnist", [x[i % 64]], parameters={"routing_key": f"c{k}-{i}"})
                lat.append(time.perf_counter() - t0)
                i += 1
            cc.close()

        threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        w1 = _cpu_s(worker[0]) if worker else float("nan")
        time.sleep(3)  # let the last copies finish
        after = next(iter(_report(srv.url, "mnist")["shadows"].values()))
        c.close()
    finally:
        srv.stop()
    n = len(lat)
    ran = after["requests_count"] - before["requests_count"]
    dropped = after["dropped"] - before["dropped"]
    return [n, ran + dropped, ran, dropped, f"{100 * dropped / max(1, ran + dropped):.1f}%",
            f"{w1 - w0:.2f} s of {seconds:g} s", f"{np.percentile(lat, 99) * 1e3:.2f}",
            f"{load0:.1f}-{os.getloadavg()[0]:.1f}"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--queue", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args(argv)
    v = _variants()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        info = v.build_variants(tmp / "repo", n_train=2000, epochs=1)
        images = info["test"][0]
        rows = [run(tmp / "repo", images, a.clients, a.seconds, a.queue, tmp) for _ in range(a.rounds)]
    print(f"Steady load: {a.clients} clients back to back for {a.seconds:g} s, shadow 100% (lenet300c, worker at "
          f"normal priority), shadow_queue_size {a.queue}\n")
    print(_table(["requests", "copies mirrored", "ran", "dropped", "dropped share", "worker CPU", "primary p99 ms",
                  "load"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
