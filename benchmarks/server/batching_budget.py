"""Where a request's server CPU goes, and the most dynamic batching can give for bench_server's model.

    .venv/bin/python benchmarks/server/batching_budget.py [--n 2000] [--seconds 3] [--out budget.json]

Measures, on this machine, the CPU time per request (thread or process CPU, not wall time, so that
other load on a shared machine matters less) of each part of serving bench_server.py's model
(LeNet-300-100, fp32, the pyserve backend, OMP_NUM_THREADS=1) at batch 1:

- ``grpc_floor_us``: a synchronous ``grpc.server`` (8 threads, as pyserve's sync engine) whose
  ModelInfer handler returns canned bytes, loaded by grpc_load.py at concurrency 16: gRPC's own
  per-RPC cost (benchmarks/server/grpc_floor.py), process CPU per request.
- ``protobuf_us``: parsing the ModelInferRequest and serializing the response (the generated
  handler does it, outside the floor above).
- ``pyserve_us``: pyserve's decode, validation, scheduling, statistics and encoding:
  ``DataPlane.infer_model_sync`` + ``codec.encode_infer_response`` minus the model's own compute.
- ``compute_b1_us``: the backend's ``infer_sync`` for one row; ``compute_b16_per_row_us``: for a
  16-row batch, divided by 16.
- ``batcher_us``: what the dynamic batcher adds per request on the sync engine (the hand-over to the
  event loop and back, queueing, concatenating and splitting): 16 threads each doing what a handler
  thread does for a batched model (parse, decode, ``DataPlane.infer_model`` through the
  DynamicBatcher via ``run_coroutine_threadsafe``, encode, serialize), process CPU per request, minus
  protobuf, pyserve's own work and the compute per row at batch 16.

From those: CPU per request unbatched = floor + protobuf + pyserve + compute_b1; batched = floor +
the batched path measured whole (``batched_path_process_cpu_us``: protobuf, pyserve, batcher and the
compute at the rows per execution it reached; ``batcher_us`` can come out negative because
``pyserve_us`` holds per-execution work, such as the statistics of an execution, that batching
shares out too). On a CPU-bound server the throughput ratio batched/unbatched is at most
``batching_bound`` = unbatched / batched, and never more than ``floor_only_bound`` = unbatched /
floor (everything but gRPC's per-RPC work free). Prints JSON (also to ``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def write_repo(repo: Path, artifact: Path) -> Path:
    """``repo/plain`` and ``repo/batched``: ``artifact`` unbatched, and with dynamic batching (1 ms
    queue delay, preferred batch 16); returns ``repo``."""
    for name, config in (("plain", "max_batch_size: 64\n"),
                         ("batched", "max_batch_size: 64\ndynamic_batching:\n  max_queue_delay_microseconds: 1000\n"
                                     "  preferred_batch_size: [16]\n")):
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "1" / "model.pyserve").write_bytes(artifact.read_bytes())
        (repo / name / "config.yaml").write_text(config)
    return repo

def _cpu_us(fn, n: int) -> float:
    """Median over 5 blocks of the calling thread's CPU µs per call of ``fn()``."""
    per = []
    for _ in range(5):
        t0 = time.thread_time_ns()
        for _ in range(max(1, n // 5)):
            fn()
        per.append((time.thread_time_ns() - t0) / max(1, n // 5) / 1e3)
    return float(np.median(per))


def grpc_floor_us(seconds: float) -> float:
    import grpc

    import grpc_floor

    server = grpc.server(ThreadPoolExecutor(8))
    server.add_generic_rpc_handlers((grpc_floor._handlers(lambda request, context: grpc_floor.RESPONSE),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        _, cpu = grpc_floor._load(port, 16, seconds)
    finally:
        server.stop(0)
    return cpu


async def _measure(repo: Path, n: int) -> dict:
    from pyserve.protocol import codec
    from pyserve.protocol._generated import grpc_service_pb2 as pb
    from pyserve.protocol.types import InferRequest, Tensor
    from pyserve.server.dataplane import DataPlane
    from pyserve.server.repository import ModelRepository

    out = {}
    repository = ModelRepository(repo)
    repository.executor = ThreadPoolExecutor(2)
    await repository.load_all()
    dp = DataPlane(repository)
    rng = np.random.default_rng(0)
    x1 = rng.random((1, 784), dtype=np.float32)
    x16 = rng.random((16, 784), dtype=np.float32)
    req = InferRequest(model_name="plain", model_version="", id="", inputs=(Tensor("images", "FP32", x1),))
    raw = codec.encode_infer_request(req).SerializeToString()
    resp = dp.infer_model_sync(req)
    resp_pb = codec.encode_infer_response(resp)

    def protobuf():
        pb.ModelInferRequest.FromString(raw)
        resp_pb.SerializeToString()

    out["protobuf_us"] = _cpu_us(protobuf, n)
    backend = repository.get("plain").current.backend
    out["compute_b1_us"] = _cpu_us(lambda: backend.infer_sync([{"images": x1}]), n)
    out["compute_b16_per_row_us"] = _cpu_us(lambda: backend.infer_sync([{"images": x16}]), n // 4) / 16

    def direct():
        codec.encode_infer_response(dp.infer_model_sync(codec.decode_infer_request(pb.ModelInferRequest.FromString(raw))))

    direct_us = _cpu_us(direct, n)
    out["pyserve_us"] = direct_us - out["protobuf_us"] - out["compute_b1_us"]

    # the batched path as the sync engine takes it: 16 handler threads, each waiting on the loop
    loop = asyncio.get_running_loop()
    braw = codec.encode_infer_request(
        InferRequest(model_name="batched", model_version="", id="", inputs=(Tensor("images", "FP32", x1),))
    ).SerializeToString()
    per_thread = max(1, n // 16)
    done = threading.Barrier(17)

    def client():  # what a sync-engine handler thread does for a batched model
        for _ in range(per_thread):
            req = codec.decode_infer_request(pb.ModelInferRequest.FromString(braw))
            resp = asyncio.run_coroutine_threadsafe(dp.infer_model(req), loop).result()
            codec.encode_infer_response(resp).SerializeToString()
        done.wait()

    cpu0 = time.process_time()
    mv = repository.get("batched").current
    e0 = mv.stats.execution_count
    threads = [threading.Thread(target=client) for _ in range(16)]
    for t in threads:
        t.start()
    await loop.run_in_executor(None, done.wait)
    cpu = (time.process_time() - cpu0) / (16 * per_thread) * 1e6
    out["batched_rows_per_execution"] = 16 * per_thread / max(1, mv.stats.execution_count - e0)
    # protobuf and pyserve's own work are in both paths; the batcher's extra is what remains
    out["batcher_us"] = cpu - (out["protobuf_us"] + out["pyserve_us"] + out["compute_b16_per_row_us"])
    out["batched_path_process_cpu_us"] = cpu
    await repository.unload_all()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=2000, help="calls per in-process measurement (default 2000)")
    p.add_argument("--seconds", type=float, default=3.0, help="gRPC floor window (default 3)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    import bench_server

    result: dict = {"load_average_before": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        artifact, acc = bench_server.build_model(tmp)
        result["test_accuracy"] = acc
        repo = write_repo(tmp / "repo", artifact)
        result.update(asyncio.run(_measure(repo, args.n)))
    result["grpc_floor_us"] = grpc_floor_us(args.seconds)
    base = result["grpc_floor_us"] + result["protobuf_us"] + result["pyserve_us"]
    result["unbatched_cpu_us"] = base + result["compute_b1_us"]
    # the batched path measured whole (protobuf, pyserve, batcher, compute at the rows per execution
    # it reached) plus the floor, which batching cannot share: every request is still its own RPC
    result["batched_cpu_us"] = result["grpc_floor_us"] + result["batched_path_process_cpu_us"]
    result["batching_bound"] = result["unbatched_cpu_us"] / result["batched_cpu_us"]
    # even if protobuf, pyserve and the model cost nothing once batched, the floor stays
    result["floor_only_bound"] = result["unbatched_cpu_us"] / result["grpc_floor_us"]
    result["load_average_after"] = os.getloadavg()
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
