"""Server CPU per request by thread, for each gRPC engine and handler-thread count.

    .venv/bin/python benchmarks/server/engine_cpu.py [--configs sync:4,sync:8,sync:16,aio:16]
        [--concurrency 16] [--rounds 3] [--seconds 4] [--batching]

Serves LeNet-300-100 (784-300-100-10, random fp32 weights: the arithmetic is the benchmark's model's)
from an in-process :class:`pyserve.server.ServerThread` with each ``engine:threads`` config in turn
(``--rounds`` interleaved rounds), loads it with benchmarks/server/grpc_load.py (its own process,
closed loops, pre-serialized requests) and reads every thread's CPU time (user + system, /proc) before
and after the window. Prints infer/s and CPU µs per request in all and by thread group: the gRPC
handler threads (``pyserve-grpc``), grpc's own Python threads (sync: ``_serve``, the completion-queue
poller; aio: ``_poll_wrapper``), native threads by their kernel name (``native:pyserve-nworker``: the
native engine's threads that poll grpc++'s completion queue and run Python handlers;
``native:default-executo`` etc.: grpc++'s own), and the event loop (``pyserve-server``). The
medians over the rounds come last. Client and server share the machine: CPU per request is the
figure to compare, throughput is only indicative.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
TICK = os.sysconf("SC_CLK_TCK")


def native_available() -> bool:
    from pyserve.server._native_engine import native_available as available

    return available()


def thread_comm(tid: int) -> str:
    """The kernel's name of thread ``tid`` of this process (grpc++ and pyserve._grpc_native name theirs)."""
    try:
        return "native:" + (Path("/proc/self/task") / str(tid) / "comm").read_text().strip()
    except OSError:
        return "native"


def thread_cpu_s() -> dict[int, float]:
    """CPU seconds of every thread of this process, by native thread id."""
    out = {}
    for t in Path("/proc/self/task").iterdir():
        try:
            f = (t / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(t.name)] = (int(f[11]) + int(f[12])) / TICK
    return out


def load(url: str, concurrency: int, seconds: float) -> dict:
    r = subprocess.run([sys.executable, str(Path(__file__).with_name("grpc_load.py")), "--url", url, "--model",
                        "lenet300", "--concurrency", str(concurrency), "--seconds", str(seconds)],
                       capture_output=True, text=True, check=True)
    return json.loads(r.stdout)


def group(name: str) -> str:
    if name.startswith("pyserve-grpc"):
        return "pyserve-grpc"
    if "(" in name:  # "Thread-3 (_serve)" -> "_serve"
        return name[name.index("(") + 1:name.rindex(")")]
    return name


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="sync:8,aio:16,native:4" if native_available() else "sync:4,sync:8,sync:16,aio:16",
                   help="engine:threads,... (engines sync, aio, native)")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--batching", action="store_true",
                   help="serve with dynamic batching (max_queue_delay_microseconds 1000, preferred_batch_size [16]), "
                        "as bench_server.py's batched runs")
    args = p.parse_args()
    import torch

    from pyserve.artifact import save
    from pyserve.server import ServerThread

    configs = [tuple(c.split(":")) for c in args.configs.split(",")]
    tmp = Path(tempfile.mkdtemp())
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(784, 300), torch.nn.ReLU(), torch.nn.Linear(300, 100), torch.nn.ReLU(),
                              torch.nn.Linear(100, 10)).eval()
    d = tmp / "repo" / "lenet300"
    (d / "1").mkdir(parents=True)
    save(d / "1" / "model.pyserve", net, (torch.randn(2, 784),), model_name="lenet300", input_names=["images"],
         output_names=["logits"])
    config = "max_batch_size: 64\n"
    if args.batching:
        config += "dynamic_batching:\n  max_queue_delay_microseconds: 1000\n  preferred_batch_size: [16]\n"
    (d / "config.yaml").write_text(config)
    totals: dict = collections.defaultdict(list)
    rates: dict = collections.defaultdict(list)
    print(f"load average {os.getloadavg()[0]:.1f}", flush=True)
    for _ in range(args.rounds):
        for engine, threads in configs:
            with ServerThread(tmp / "repo", host="127.0.0.1", grpc_port=0, grpc_engine=engine,
                              grpc_threads=int(threads)) as srv:
                load(srv.url, args.concurrency, 0.5)  # warm-up
                before = thread_cpu_s()
                r = load(srv.url, args.concurrency, args.seconds)
                after = thread_cpu_s()
                names = {t.native_id: t.name for t in threading.enumerate()}
                groups: collections.Counter = collections.Counter()
                for tid, cpu in after.items():
                    groups[group(names.get(tid) or thread_comm(tid))] += cpu - before.get(tid, 0.0)
                n = r["requests"]
                total = sum(groups.values()) / n * 1e6
                totals[(engine, threads)].append(total)
                rates[(engine, threads)].append(r["infer_per_s"])
                parts = ", ".join(f"{k} {v / n * 1e6:.0f}" for k, v in groups.most_common() if v > 0)
                print(f"{engine}:{threads} c={args.concurrency}: {r['infer_per_s']:.0f} infer/s; CPU µs/request "
                      f"{total:.0f} ({parts}); load {os.getloadavg()[0]:.1f}", flush=True)
    print("medians:")
    for key in configs:
        print(f"  {key[0]}:{key[1]}: {np.median(totals[key]):.0f} CPU µs/request, {np.median(rates[key]):.0f} infer/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
