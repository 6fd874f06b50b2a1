"""A light closed-loop gRPC load generator for ModelInfer (the benchmark's client for pyserve vs KServe).

    .venv/bin/python benchmarks/server/grpc_load.py --url 127.0.0.1:8001 --model lenet300 \\
        --concurrency 4 --seconds 3 [--input images --shape 1,784 --output logits]

One process, one grpc.aio channel, ``--concurrency`` coroutines each sending its next request as soon
as the previous answer arrives. The ``inference.ModelInferRequest`` (random FP32 data in
``raw_input_contents``) is serialized once and sent as bytes; answers are not deserialized, so the
client spends its CPU on gRPC alone (tritonclient builds and parses protobuf messages in Python on
every call: on a 2-core machine the client then takes a large share of the CPU the servers compete
for). The first answer is decoded and checked (the output's name and element count) before timing
starts. Prints one JSON line: ``infer_per_s``, ``p50_us``, ``p99_us``, ``requests``, ``client``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

METHOD = "/inference.GRPCInferenceService/ModelInfer"


def request_bytes(model: str, input_name: str, shape: tuple[int, ...], output: str | None, seed: int = 0) -> bytes:
    from pyserve.protocol import codec
    from pyserve.protocol.types import InferRequest, RequestedOutput, Tensor

    x = np.random.default_rng(seed).random(shape, dtype=np.float32)
    req = InferRequest(model_name=model, model_version="", id="", inputs=(Tensor(input_name, "FP32", x),),
                       outputs=(RequestedOutput(output),) if output else ())
    return codec.encode_infer_request(req).SerializeToString()


def check_answer(raw: bytes, output: str | None) -> None:
    from pyserve.protocol import codec
    from pyserve.protocol._generated import grpc_service_pb2 as pb

    resp = codec.decode_infer_response(pb.ModelInferResponse.FromString(raw))
    if not resp.outputs or (output and resp.outputs[0].name != output):
        raise RuntimeError(f"unexpected answer: {resp}")


async def load(url: str, payload: bytes, concurrency: int, seconds: float, output: str | None,
               warmup: int = 50) -> dict:
    import grpc

    async with grpc.aio.insecure_channel(url) as channel:
        call = channel.unary_unary(METHOD)  # no serializers: bytes in, bytes out
        check_answer(await call(payload, timeout=30), output)
        for _ in range(warmup):
            await call(payload, timeout=30)
        lat: list[int] = []
        stop_at = time.perf_counter() + seconds

        async def worker():
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter_ns()
                await call(payload, timeout=30)
                lat.append(time.perf_counter_ns() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    us = np.array(lat) / 1e3
    return {"infer_per_s": len(lat) / elapsed, "p50_us": float(np.percentile(us, 50)),
            "p99_us": float(np.percentile(us, 99)), "requests": len(lat), "client": "grpc_load"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--input", default="images")
    p.add_argument("--shape", default="1,784", help="input shape, comma-separated (default 1,784)")
    p.add_argument("--output", default=None, help="request only this output (default: all)")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--seconds", type=float, default=3.0)
    args = p.parse_args()
    shape = tuple(int(d) for d in args.shape.split(","))
    payload = request_bytes(args.model, args.input, shape, args.output)
    print(json.dumps(asyncio.run(load(args.url, payload, args.concurrency, args.seconds, args.output))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
