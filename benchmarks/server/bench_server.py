"""pyserve vs the KServe Python server on the same MNIST model and client (perf_analyzer), and
pyserve's dynamic batching vs unbatched at concurrency 16.

    benchmarks/server/setup.sh                    # once: .venv-pa (perf_analyzer), .venv-kserve
    .venv/bin/python benchmarks/server/bench_server.py [--seconds 3] [--rounds 3] [--out results.json]
        [--engines sync,aio,native] [--vs-client grpc_load|cpp|tritonclient] [--skip-batching]

Model: LeNet-300-100 (784-300-100-10, ReLU) trained two epochs on MNIST (pyserve.datasets, offline),
fp32. pyserve serves it as a dense ``.pyserve`` artifact (``pyserve serve``, the pyserve backend);
KServe serves the same weights in a ``kserve.Model`` (benchmarks/server/kserve_server.py) in
torch under inference_mode, as pyserve's backend runs it. Every server process gets
OMP_NUM_THREADS=1 so the two compare on equal terms with the client on the same 2-core machine.

Client: perf_analyzer from tritonclient[grpc]==2.51.0 (C++; gRPC; batch 1; random FP32 data;
``--concurrency-range C`` for C in 1, 4, 16; three time windows). It needs ModelMetadata and
ModelConfig; the KServe Python server has no ModelConfig RPC ("failed to get model config: Method
not found!"), so pyserve vs KServe is measured with one client for both: by default
benchmarks/server/grpc_load.py (one process, grpc.aio, C concurrent closed loops sending one
pre-serialized ModelInferRequest and not parsing the answers, so the client takes little of the
2-core machine's CPU; ``--vs-client cpp`` uses benchmarks/server/grpc_load_cpp.cpp, the same loop in
C++ on grpc++'s callback API (built on first use; its Python-free client leaves both servers more of
the two cores; ``--vs-client tritonclient`` uses a tritonclient.grpc.aio loop instead), and
perf_analyzer measures pyserve batched vs unbatched. pyserve runs with each gRPC engine: ``sync``
(``--grpc-engine sync``: the synchronous ``grpc.server``, the unbatched model served in the handler
thread; results under "pyserve") and ``aio`` (the default: grpc.aio, inline execution of the tiny
model on the event loop; "pyserve_aio") and, where pyserve was built with grpc++, ``native`` (the sync
engine's handlers on the grpc++ transport; "pyserve_native"); ``--engines`` picks a subset.
The server overhead per request (server time minus queue and compute, from ModelStatistics deltas
after each request at concurrency 1) is measured on both; batched vs unbatched on both too. Every point is measured ``--rounds`` times with the servers taking turns (all run
at once, idle but for the one measured); the tables give medians.

Prints one table per comparison (infer/s, p50 and p99 latency in microseconds, and ratios) and
writes everything to ``--out`` as JSON. Timings on a shared machine are noisy: compare ratios
measured in the same run, not absolute figures across runs.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
PA_VENV = ROOT / ".venv-pa"
KS_VENV = ROOT / ".venv-kserve"
READY = re.compile(r"^pyserve: serving (\d+) model\(s\) on (\S+):(\d+)$")
CONCURRENCY = (1, 4, 16)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_model(workdir: Path) -> tuple[Path, float]:
    """Train LeNet-300-100 for two epochs; write the artifact and an .npz of the weights."""
    import torch

    from pyserve.artifact import save
    from pyserve.datasets import mnist

    torch.manual_seed(0)
    data = mnist()
    x = torch.from_numpy(data.train.images)
    y = torch.from_numpy(data.train.labels)
    net = torch.nn.Sequential(torch.nn.Linear(784, 300), torch.nn.ReLU(), torch.nn.Linear(300, 100), torch.nn.ReLU(),
                              torch.nn.Linear(100, 10))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(2):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 256):
            idx = perm[i:i + 256]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        acc = float((net(torch.from_numpy(data.test.images)).argmax(1).numpy() == data.test.labels).mean())
    artifact = workdir / "lenet300.pyserve"
    save(artifact, net, (torch.randn(2, 784),), model_name="lenet300", input_names=["images"],
         output_names=["logits"])
    names = {"0": "fc1", "2": "fc2", "4": "fc3"}
    weights = {f"{names[k.split('.')[0]]}.{k.split('.')[1]}": v.numpy() for k, v in net.state_dict().items()}
    np.savez(workdir / "lenet300.npz", **weights)
    return artifact, acc


def write_repo(root: Path, artifact: Path, batching: bool) -> Path:
    d = root / ("repo_batched" if batching else "repo_plain") / "lenet300"
    (d / "1").mkdir(parents=True, exist_ok=True)
    shutil.copy(artifact, d / "1" / "model.pyserve")
    config = "max_batch_size: 64\n"
    if batching:
        config += "dynamic_batching:\n  max_queue_delay_microseconds: 1000\n  preferred_batch_size: [16]\n"
    (d / "config.yaml").write_text(config)
    return d.parent


def _env() -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def start_pyserve(repo: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyserve.cli.main", "serve", "--model-repository", str(repo), "--grpc-port", "0",
         "--host", "127.0.0.1", "--log-level", "WARNING", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=_env())
    line = proc.stdout.readline()
    m = READY.match(line.strip())
    if not m:
        proc.kill()
        raise RuntimeError(f"pyserve did not start: {line!r}")
    return proc, f"127.0.0.1:{m.group(3)}"


def start_kserve(weights: Path) -> tuple[subprocess.Popen, str]:
    grpc_port, http_port = free_port(), free_port()
    env = _env()
    env.pop("PYTHONPATH")
    proc = subprocess.Popen(
        [str(KS_VENV / "bin" / "python"), str(Path(__file__).with_name("kserve_server.py")), "--weights", str(weights),
         "--grpc-port", str(grpc_port), "--http-port", str(http_port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    url = f"127.0.0.1:{grpc_port}"
    import tritonclient.grpc as tc

    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"kserve server exited with {proc.returncode}")
        try:
            c = tc.InferenceServerClient(url)
            if c.is_model_ready("lenet300"):
                c.close()
                return proc, url
            c.close()
        except Exception:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("kserve server not ready within 180 s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def perf_analyzer(url: str, concurrency: int, seconds: float) -> dict:
    """One perf_analyzer run: {'infer_per_s', 'p50_us', 'p99_us'}; raises RuntimeError with its output."""
    binary = PA_VENV / "bin" / "perf_analyzer"
    libdir = next(PA_VENV.glob("lib/python*/site-packages/nvidia/cuda_runtime/lib"))
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = f"{libdir}:{env.get('LD_LIBRARY_PATH', '')}"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "pa.csv"
        cmd = [str(binary), "-m", "lenet300", "-u", url, "-i", "grpc", "-b", "1",
               "--concurrency-range", str(concurrency), "--measurement-interval", str(int(seconds * 1000)),
               "--stability-percentage", "1000", "--max-trials", "3", "--percentile", "99", "-f", str(out)]
        for _attempt in range(3):  # on a loaded machine a window can miss even a loose stability bound
            r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
            if r.returncode == 0 and out.exists():
                break
            if "stable measurement" not in r.stdout + r.stderr:
                break
        if r.returncode != 0 or not out.exists():
            raise RuntimeError(f"perf_analyzer failed ({r.returncode}): {(r.stdout + r.stderr)[-800:]}")
        row = next(csv.DictReader(out.open()))
    return {"infer_per_s": float(row["Inferences/Second"]), "p50_us": float(row["p50 latency"]),
            "p99_us": float(row["p99 latency"]), "client": "perf_analyzer"}


def grpc_load(url: str, concurrency: int, seconds: float) -> dict:
    """benchmarks/server/grpc_load.py in its own process: pre-serialized requests, raw answers."""
    r = subprocess.run([sys.executable, str(Path(__file__).with_name("grpc_load.py")), "--url", url, "--model",
                        "lenet300", "--concurrency", str(concurrency), "--seconds", str(seconds)],
                       capture_output=True, text=True, timeout=600, env=_env())
    if r.returncode != 0:
        raise RuntimeError(f"grpc_load failed ({r.returncode}): {r.stderr[-800:]}")
    return json.loads(r.stdout)


def build_cpp(name: str) -> Path:
    """benchmarks/server/NAME.cpp built into build/NAME with g++ and pkg-config's grpc++ (again only
    when the source is newer). RuntimeError when grpc++ (libgrpc++-dev) or pkg-config is missing."""
    src, out = Path(__file__).with_name(f"{name}.cpp"), ROOT / "build" / name
    if not out.exists() or out.stat().st_mtime < src.stat().st_mtime:
        flags = subprocess.run(["pkg-config", "--cflags", "--libs", "grpc++"], capture_output=True, text=True)
        if flags.returncode != 0:
            raise RuntimeError(f"building {src.name} needs grpc++ (libgrpc++-dev) and pkg-config: "
                               f"{flags.stderr.strip()}")
        out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["g++", "-O2", "-std=c++17", str(src), "-o", str(out), *flags.stdout.split()], check=True)
    return out


def grpc_load_cpp(url: str, concurrency: int, seconds: float) -> dict:
    """benchmarks/server/grpc_load_cpp.cpp (built here once, :func:`build_cpp`): the same
    pre-serialized request and closed loops as grpc_load.py, without Python in the client."""
    client = build_cpp("grpc_load_cpp")
    sys.path.insert(0, str(Path(__file__).parent))
    from grpc_load import request_bytes

    with tempfile.NamedTemporaryFile(suffix=".bin") as req:
        req.write(request_bytes("lenet300", "images", (1, 784), None))
        req.flush()
        r = subprocess.run([str(client), "--url", url, "--request", req.name, "--concurrency", str(concurrency),
                            "--seconds", str(seconds)], capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"grpc_load_cpp failed ({r.returncode}): {r.stderr[-800:]}")
    return json.loads(r.stdout)


def server_overhead(url: str, n: int) -> dict:
    """p50/p90/p99 server overhead per request at concurrency 1, from ModelStatistics deltas
    (benchmarks/server/profile_server.py: server time - queue - compute of each request)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from profile_server import p50_overhead

    return p50_overhead(url, n)


def python_client(url: str, concurrency: int, seconds: float) -> dict:
    """Fallback: closed loop of ``concurrency`` tritonclient.grpc.aio requests for ``seconds``."""
    import tritonclient.grpc as tc
    import tritonclient.grpc.aio as aio

    x = np.random.default_rng(0).random((1, 784), dtype=np.float32)

    async def run():
        client = aio.InferenceServerClient(url)
        inp = tc.InferInput("images", [1, 784], "FP32")
        inp.set_data_from_numpy(x)
        lat: list[float] = []
        stop_at = time.perf_counter() + seconds

        async def worker():
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                await client.infer("lenet300", [inp])
                lat.append(time.perf_counter() - t0)

        for _ in range(20):  # warm-up
            await client.infer("lenet300", [inp])
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
        await client.close()
        return lat, elapsed

    lat, elapsed = asyncio.run(run())
    lat_us = np.array(lat) * 1e6
    return {"infer_per_s": len(lat) / elapsed, "p50_us": float(np.percentile(lat_us, 50)),
            "p99_us": float(np.percentile(lat_us, 99)), "client": "tritonclient.grpc.aio"}


def median_of(runs: list[dict]) -> dict:
    """Per field, the median over the rounds (the client name kept)."""
    keys = ("infer_per_s", "p50_us", "p99_us") + (("cpu_us_per_request",) if "cpu_us_per_request" in runs[0] else ())
    out = {k: float(np.median([r[k] for r in runs])) for k in keys}
    out["client"] = runs[0]["client"]
    out["rounds"] = [{k: round(r[k], 1) for k in keys} for r in runs]
    return out


def proc_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) used so far by process ``pid`` and all its descendants (/proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            stats[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)  # ppid, cpu
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        total += stats.get(p, (0, 0.0))[1]
        todo.extend(child for child, (ppid, _) in stats.items() if ppid == p)
    return total


def success_count(url: str) -> int | None:
    """Requests pyserve has answered successfully so far (ModelStatistics), or None (KServe has none)."""
    import tritonclient.grpc as tc

    try:
        with tc.InferenceServerClient(url) as c:
            stats = c.get_inference_statistics("lenet300", as_json=True)
        return sum(int(m["inference_stats"]["success"].get("count", 0)) for m in stats["model_stats"])
    except Exception:  # noqa: BLE001 - a server without the statistics extension
        return None


def rounds(servers: dict[str, tuple[str, int]], concurrencies, seconds: float, client: str, n_rounds: int) -> dict:
    """Every (server, concurrency) point measured ``n_rounds`` times, the servers taking turns
    within each round so that the machine's load drifts over all of them alike; medians.
    ``servers``: name -> (url, pid). With the grpc_load client, each point also gets the server
    process tree's CPU time per request (``cpu_us_per_request``; warm-up requests counted), which
    depends far less on the other load on a shared machine than throughput does."""
    raw: dict = {name: {c: [] for c in concurrencies} for name in servers}
    for r in range(n_rounds):
        for c in concurrencies:
            for name, (url, pid) in servers.items():
                run = {"perf_analyzer": perf_analyzer, "grpc_load": grpc_load,
                       "cpp": grpc_load_cpp}.get(client, python_client)
                n0 = success_count(url) if client == "perf_analyzer" else None
                cpu0 = proc_cpu_s(pid)
                res = run(url, c, seconds)
                cpu1 = proc_cpu_s(pid)
                if "requests" in res:
                    res["cpu_us_per_request"] = (cpu1 - cpu0) / (res["requests"] + 51) * 1e6
                elif n0 is not None:  # perf_analyzer: the requests it sent, from the server's statistics
                    n1 = success_count(url)
                    if n1 is not None and n1 > n0:
                        res["cpu_us_per_request"] = (cpu1 - cpu0) / (n1 - n0) * 1e6
                raw[name][c].append(res)
                cpu = f", server CPU {res['cpu_us_per_request']:.0f} us/request" if "cpu_us_per_request" in res else ""
                print(f"  round {r + 1} {name} c={c}: {res['infer_per_s']:.0f} infer/s, p50 {res['p50_us']:.0f} us, "
                      f"p99 {res['p99_us']:.0f} us{cpu} ({res['client']})", flush=True)
    return {name: {c: median_of(runs) for c, runs in per.items()} for name, per in raw.items()}


def cpu_table(title: str, results: dict) -> str:
    names = list(results)
    lines = [f"**{title}**", "", "| concurrency | " + " | ".join(f"{n} CPU µs/request" for n in names) + " |",
             "| --- |" + " --- |" * len(names)]
    for c in results[names[0]]:
        lines.append(f"| {c} | " + " | ".join(f"{results[n][c].get('cpu_us_per_request', float('nan')):.0f}"
                                             for n in names) + " |")
    return "\n".join(lines)


def table(title: str, a_name: str, a: dict, b_name: str, b: dict) -> str:
    lines = [f"**{title}**", "",
             f"| concurrency | {a_name} infer/s | {b_name} infer/s | ratio | {a_name} p50 µs | {b_name} p50 µs | "
             f"p50 ratio | {a_name} p99 µs | {b_name} p99 µs | p99 ratio |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c in a:
        x, y = a[c], b[c]
        lines.append(f"| {c} | {x['infer_per_s']:.0f} | {y['infer_per_s']:.0f} | {x['infer_per_s'] / y['infer_per_s']:.2f}x"
                     f" | {x['p50_us']:.0f} | {y['p50_us']:.0f} | {y['p50_us'] / x['p50_us']:.2f}x"
                     f" | {x['p99_us']:.0f} | {y['p99_us']:.0f} | {y['p99_us'] / x['p99_us']:.2f}x |")
    lines.append("")
    lines.append(f"(medians of the rounds; ratios > 1 favour {a_name}: throughput {a_name}/{b_name}, latency "
                 f"{b_name}/{a_name})")
    return "\n".join(lines)


def _name(kind: str, engine: str) -> str:
    """Result key: "pyserve" / "batched" / "unbatched" for the sync engine (as before), else kind_engine."""
    return kind if engine == "sync" else f"{kind}_{engine}"


def _engines(spec: str | None) -> list[str]:
    from pyserve.server._native_engine import native_available

    if spec is None:
        return ["sync", "aio"] + (["native"] if native_available() else [])
    engines = [e.strip() for e in spec.split(",") if e.strip()]
    bad = [e for e in engines if e not in ("sync", "aio", "native")]
    if bad or not engines:
        raise SystemExit(f"bench_server.py: error: --engines takes sync, aio, native; got {spec!r}")
    if "native" in engines and not native_available():
        raise SystemExit("bench_server.py: error: --engines native: pyserve._grpc_native is not built "
                         "(install libgrpc++-dev and rebuild)")
    return engines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=3.0, help="measurement window per point (default 3)")
    p.add_argument("--rounds", type=int, default=3, help="rounds, servers taking turns (default 3)")
    p.add_argument("--out", default="benchmarks/server/results.json")
    p.add_argument("--vs-client", choices=["grpc_load", "cpp", "tritonclient"], default="grpc_load",
                   help="client of pyserve vs KServe (perf_analyzer cannot drive KServe): grpc_load.py "
                   "(pre-serialized requests; default), grpc_load_cpp.cpp (the same in C++: needs grpc++ "
                   "to build) or a tritonclient.grpc.aio loop")
    p.add_argument("--skip-batching", action="store_true", help="only pyserve vs KServe (and the overhead)")
    p.add_argument("--overhead-requests", type=int, default=500,
                   help="requests for the p50 server overhead (concurrency 1; default 500)")
    p.add_argument("--engines", default=None,
                   help="pyserve gRPC engines to measure, comma-separated (sync, aio, native; default: all three, "
                   "native only where pyserve._grpc_native is built)")
    args = p.parse_args()
    engines = _engines(args.engines)
    if not (PA_VENV / "bin" / "perf_analyzer").exists() or not (KS_VENV / "bin" / "python").exists():
        print("no .venv-pa or .venv-kserve: run benchmarks/server/setup.sh first", file=sys.stderr)
        return 2
    results: dict = {"cpu_count": os.cpu_count(), "load_average_before": os.getloadavg(),
                     "seconds": args.seconds, "rounds": args.rounds}
    procs = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print("training LeNet-300-100 (2 epochs) ...", flush=True)
        artifact, acc = build_model(tmp)
        results["test_accuracy"] = acc
        print(f"  test accuracy {acc:.4f}", flush=True)
        try:
            plain_repo, batched_repo = write_repo(tmp, artifact, False), write_repo(tmp, artifact, True)
            plain, batched, pids = {}, {}, {}
            for engine in engines:  # one unbatched and one batched server per engine
                for repo, urls in ((plain_repo, plain), (batched_repo, batched)):
                    proc, url = start_pyserve(repo, "--grpc-engine", engine)
                    procs.append(proc)
                    urls[engine] = url
                    pids[url] = proc.pid
            proc, kserve = start_kserve(tmp / "lenet300.npz")
            procs.append(proc)
            pids[kserve] = proc.pid
            # perf_analyzer needs ModelConfig, which the KServe Python server does not implement
            try:
                perf_analyzer(kserve, 1, 1.0)
                results["kserve_perf_analyzer"] = "ok"
            except RuntimeError as exc:
                results["kserve_perf_analyzer"] = str(exc).strip().splitlines()[-1][-200:]
                print(f"  perf_analyzer cannot drive KServe: {results['kserve_perf_analyzer']}", flush=True)
            vs_client = "perf_analyzer" if results["kserve_perf_analyzer"] == "ok" else args.vs_client
            print(f"pyserve vs KServe ({vs_client} client) ...", flush=True)
            servers = {_name("pyserve", e): (plain[e], pids[plain[e]]) for e in engines}
            servers["kserve"] = (kserve, pids[kserve])
            results["vs_kserve"] = rounds(servers, CONCURRENCY, args.seconds, vs_client, args.rounds)
            print("server overhead per request at concurrency 1 (ModelStatistics) ...", flush=True)
            results["overhead"] = {e: server_overhead(plain[e], args.overhead_requests) for e in engines}
            print(f"  {results['overhead']}", flush=True)
            if not args.skip_batching:
                print("pyserve dynamic batching vs unbatched (perf_analyzer) ...", flush=True)
                servers = {}
                for e in engines:
                    servers[_name("batched", e)] = (batched[e], pids[batched[e]])
                    servers[_name("unbatched", e)] = (plain[e], pids[plain[e]])
                results["batching"] = rounds(servers, (1, 4, 16), args.seconds, "perf_analyzer", args.rounds)
        finally:
            for proc in procs:
                stop(proc)
    results["load_average_after"] = os.getloadavg()
    v, bt = results["vs_kserve"], results.get("batching")
    first = _name("pyserve", engines[0])
    for e in engines:
        print()
        print(table(f"pyserve ({e} engine) vs KServe Python server, LeNet-300-100, batch 1, client "
                    f"{v[first][1]['client']}", f"pyserve {e}", v[_name("pyserve", e)], "KServe", v["kserve"]))
    for e in engines[1:]:
        print()
        print(table(f"pyserve engines: {engines[0]} vs {e}", engines[0], v[first], e, v[_name("pyserve", e)]))
    if "cpu_us_per_request" in v[first][1]:
        print()
        print(cpu_table("Server CPU time per request (process tree, user + system)", v))
    for e in engines if bt else ():
        print()
        print(table(f"pyserve dynamic batching vs unbatched, {e} engine, perf_analyzer", "batched",
                    bt[_name("batched", e)], "unbatched", bt[_name("unbatched", e)]))
    if bt:
        print()
        print(cpu_table("Batching: server CPU time per request (process tree, user + system)", bt))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2, default=str))
    print(f"\nwrote {args.out}; load average before {results['load_average_before']}, after "
          f"{results['load_average_after']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
