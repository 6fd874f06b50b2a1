"""cProfile of the server's event-loop thread under load, and the server-side time per request.

    .venv/bin/python benchmarks/server/profile_server.py [--concurrency 16] [--seconds 5] [--batching]
        [--inline-max-us 100] [--top 30] [--profile]

Serves a LeNet-300-100-shaped model (784-300-100-10, random fp32 weights, a dense ``.pyserve``
artifact; the arithmetic is what matters here, not the accuracy) in this process
(:class:`pyserve.server.ServerThread`, ``OMP_NUM_THREADS=1``), loads it with
benchmarks/server/grpc_load.py in a subprocess, and prints:

- the server process's CPU time per request (all its threads; robust to other load on the machine,
  unlike throughput);
- from ModelStatistics, per request: server time (``success``: from the servicer receiving the
  message until the response is ready), queue, compute (input + infer + output), and the server
  overhead = server time - queue - compute (means over the run);
- with ``--profile``: the cProfile of the event-loop thread (the thread that runs gRPC's Python
  layer, pyserve's decode/validate/encode, and inline executions), top functions by own time.

``--p50`` instead measures the p50 (and p90/p99) server overhead per request at concurrency 1: after
each request the statistics are read again, and the request's overhead is the difference of the
success time minus the differences of queue and compute time.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def write_repo(root: Path, batching: bool) -> Path:
    import torch

    from pyserve.artifact import save

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(784, 300), torch.nn.ReLU(), torch.nn.Linear(300, 100), torch.nn.ReLU(),
                              torch.nn.Linear(100, 10)).eval()
    d = root / "lenet300"
    save(d / "1" / "model.pyserve", net, (torch.randn(2, 784),), model_name="lenet300", input_names=["images"],
         output_names=["logits"])
    config = "max_batch_size: 64\n"
    if batching:
        config += "dynamic_batching:\n  max_queue_delay_microseconds: 1000\n  preferred_batch_size: [16]\n"
    (d / "config.yaml").write_text(config)
    return root


def stats(url: str) -> dict:
    import tritonclient.grpc as tc

    c = tc.InferenceServerClient(url)
    (s,) = c.get_inference_statistics("lenet300").model_stats
    c.close()
    st = s.inference_stats
    return {"n": st.success.count, "success": st.success.ns, "queue": st.queue.ns,
            "compute": st.compute_input.ns + st.compute_infer.ns + st.compute_output.ns,
            "infer": st.compute_infer.ns, "executions": s.execution_count}


def p50_overhead(url: str, n: int) -> dict:
    """Per request at concurrency 1: server time - queue - compute, from ModelStatistics deltas."""
    import tritonclient.grpc as tc

    c = tc.InferenceServerClient(url)
    x = np.random.default_rng(0).random((1, 784), dtype=np.float32)
    inp = tc.InferInput("images", [1, 784], "FP32")
    inp.set_data_from_numpy(x)
    for _ in range(50):
        c.infer("lenet300", [inp])
    over, server, compute = [], [], []
    prev = stats(url)
    for _ in range(n):
        c.infer("lenet300", [inp])
        cur = stats(url)
        assert cur["n"] == prev["n"] + 1
        s = cur["success"] - prev["success"]
        q = cur["queue"] - prev["queue"]
        k = cur["compute"] - prev["compute"]
        over.append(s - q - k)
        server.append(s)
        compute.append(k)
        prev = cur
    c.close()
    us = lambda a, p: float(np.percentile(np.array(a) / 1e3, p))  # noqa: E731
    return {"requests": n, "overhead_p50_us": us(over, 50), "overhead_p90_us": us(over, 90),
            "overhead_p99_us": us(over, 99), "server_p50_us": us(server, 50), "compute_p50_us": us(compute, 50)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--batching", action="store_true", help="dynamic batching (1 ms, preferred 16)")
    p.add_argument("--inline-max-us", type=float, default=100.0)
    p.add_argument("--profile", action="store_true", help="cProfile the event-loop thread")
    p.add_argument("--grpc-engine", choices=("sync", "aio"), default="aio",
                   help="server engine (default aio: the event loop --profile looks at does all of aio's work; "
                   "with sync it sees only batches and routes; benchmarks/server/engine_cpu.py splits sync's "
                   "CPU by thread)")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--p50", type=int, default=0, metavar="N", help="p50 server overhead over N requests at c=1")
    args = p.parse_args()
    from pyserve.server import ServerThread

    with tempfile.TemporaryDirectory() as tmp:
        repo = write_repo(Path(tmp), args.batching)
        with ServerThread(repo, host="127.0.0.1", grpc_port=0, inline_max_us=args.inline_max_us,
                          grpc_engine=args.grpc_engine) as srv:
            if args.p50:
                print(json.dumps(p50_overhead(srv.url, args.p50)))
                return 0
            prof = cProfile.Profile()
            loop = srv._loop
            if args.profile:
                done = threading.Event()
                loop.call_soon_threadsafe(lambda: (prof.enable(), done.set()))
                done.wait(10)
            before = stats(srv.url)
            cpu0 = time.process_time()
            out = subprocess.run([sys.executable, str(Path(__file__).with_name("grpc_load.py")), "--url", srv.url,
                                  "--model", "lenet300", "--concurrency", str(args.concurrency),
                                  "--seconds", str(args.seconds)], capture_output=True, text=True, check=True)
            if args.profile:
                done = threading.Event()
                loop.call_soon_threadsafe(lambda: (prof.disable(), done.set()))
                done.wait(10)
            cpu_s = time.process_time() - cpu0
            after = stats(srv.url)
            load = json.loads(out.stdout)
            n = after["n"] - before["n"]
            per = {k: (after[k] - before[k]) / n / 1e3 for k in ("success", "queue", "compute", "infer")}
            runner = next(iter(srv.server.repository._models.values())).current.scheduler.runner
            print(json.dumps({"load": load, "requests": n, "server_cpu_us_per_request": cpu_s / n * 1e6, "executions": after["executions"] - before["executions"],
                              "mean_server_us": per["success"], "mean_queue_us": per["queue"],
                              "mean_compute_us": per["compute"], "mean_infer_us": per["infer"],
                              "mean_overhead_us": per["success"] - per["queue"] - per["compute"],
                              "inline_executions": runner.inline_count, "pool_executions": runner.pool_count,
                              "ema_cpu_us": {1 << (k - 1): round(v / 1e3, 1) for k, v in runner.ema_ns.items()},
                              "load_average": os.getloadavg()}, indent=1))
    if args.profile:
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(args.top)
        print(s.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
