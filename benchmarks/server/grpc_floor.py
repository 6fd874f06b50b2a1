"""The gRPC floor: server CPU per ModelInfer RPC when the handler does no work at all.

    .venv/bin/python benchmarks/server/grpc_floor.py [--seconds 3] [--repeats 2]

A ``inference.GRPCInferenceService/ModelInfer`` handler that returns one canned, pre-serialized
ModelInferResponse (LeNet's [1, 10] FP32 logits) without looking at the request, served by
``grpc.aio`` (what pyserve and the KServe Python server use) and by the synchronous ``grpc.server``
(a 4-thread pool) and, where pyserve was built with grpc++, by pyserve's native engine (grpc++'s
completion queue polled by 4 + 1 threads, the one that read an RPC taking the GIL to run its
handler; ``pyserve.server._native_engine.NativeServer``), each loaded by
benchmarks/server/grpc_load.py at concurrency 1 and 16. For native, the CPU µs per request is also
split by thread (kernel thread names: ``pyserve-nworker`` = the polling threads that run handlers, the rest grpc++'s
own threads, e.g. ``default-executo``). Prints
infer/s and the server process's CPU time per request (user + system, all threads; the client runs
in its own process). No pyserve code runs in the handler: this is what gRPC's Python layer costs
per request before any decoding, validation, inference or encoding.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from pyserve.protocol import codec  # noqa: E402
from pyserve.protocol.types import InferResponse, Tensor  # noqa: E402
from pyserve.server._native_engine import native_available  # noqa: E402

RESPONSE = codec.encode_infer_response(InferResponse(
    model_name="lenet300", model_version="1", id="",
    outputs=(Tensor("logits", "FP32", np.zeros((1, 10), np.float32)),))).SerializeToString()


def _handlers(fn):
    return grpc.method_handlers_generic_handler(
        codec.SERVICE_NAME, {"ModelInfer": grpc.unary_unary_rpc_method_handler(fn)})  # bytes out as they are


def _load(port: int, concurrency: int, seconds: float) -> tuple[dict, float]:
    t0 = time.process_time()
    r = subprocess.run([sys.executable, str(Path(__file__).with_name("grpc_load.py")), "--url", f"127.0.0.1:{port}",
                        "--model", "lenet300", "--concurrency", str(concurrency), "--seconds", str(seconds)],
                       capture_output=True, text=True, check=True)
    d = json.loads(r.stdout)
    return d, (time.process_time() - t0) / (d["requests"] + 51) * 1e6  # + warm-up and check requests


async def _aio(concurrencies, seconds) -> list:
    async def handler(request, context):
        return RESPONSE

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((_handlers(handler),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    loop = asyncio.get_running_loop()
    out = [(c, *(await loop.run_in_executor(None, _load, port, c, seconds))) for c in concurrencies]
    await server.stop(0)
    return out


def _sync(concurrencies, seconds) -> list:
    server = grpc.server(ThreadPoolExecutor(4))
    server.add_generic_rpc_handlers((_handlers(lambda request, context: RESPONSE),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    out = [(c, *_load(port, c, seconds)) for c in concurrencies]
    server.stop(0)
    return out


def _native(concurrencies, seconds) -> list:
    """The same handler through pyserve's native engine: grpc++ transport, the C++ thread that read the
    RPC takes the GIL and runs NativeServer's dispatch (handler lookup, context, finish) as for every RPC."""
    from pyserve.server._native_engine import NativeServer

    import collections

    sys.path.insert(0, str(Path(__file__).parent))
    from engine_cpu import thread_comm, thread_cpu_s

    server = NativeServer(4)
    server.add_generic_rpc_handlers((_handlers(lambda request, context: RESPONSE),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    out = []
    for c in concurrencies:
        before = thread_cpu_s()
        d, cpu = _load(port, c, seconds)
        after = thread_cpu_s()
        parts: collections.Counter = collections.Counter()
        for tid, t in after.items():  # every thread but the main one is grpc++'s or the engine's
            parts[thread_comm(tid).removeprefix("native:")] += t - before.get(tid, 0.0)
        n = d["requests"] + 51
        d["parts"] = ", ".join(f"{k} {v / n * 1e6:.0f}" for k, v in parts.most_common() if v / n * 1e6 >= 1)
        out.append((c, d, cpu))
    server.stop(None)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    for _ in range(args.repeats):
        engines = [("grpc.aio", lambda: asyncio.run(_aio((1, 16), args.seconds))),
                   ("grpc sync", lambda: _sync((1, 16), args.seconds))]
        if native_available():
            engines.append(("native", lambda: _native((1, 16), args.seconds)))
        for name, run in engines:
            rows = run()
            text = ", ".join(f"c={c}: {d['infer_per_s']:.0f} infer/s, {cpu:.0f} µs CPU/request"
                             + (f" ({d['parts']})" if "parts" in d else "") for c, d, cpu in rows)
            print(f"{name:9s} {text} (load average {os.getloadavg()[0]:.1f})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
