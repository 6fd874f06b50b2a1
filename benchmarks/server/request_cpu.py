"""pyserve's own CPU per ModelInfer request, part by part, without gRPC (aio engine's path).

    .venv/bin/python benchmarks/server/request_cpu.py [--n 3000] [--rounds 5] [--metrics]
    .venv/bin/python benchmarks/server/request_cpu.py --compare OTHER_SRC [--rounds 7]   # A/B

Serves bench_server.py's model shape (LeNet-300-100, 784-300-100-10, fp32, a dense ``.pyserve``
artifact, random weights: only the arithmetic matters here) from a :class:`ModelRepository` on an
event loop in this process, and measures the **calling thread's CPU time** per request
(``time.thread_time_ns``: other load on a shared machine changes it much less than wall time) of:

- ``parse_us`` / ``serialize_us``: protobuf ``ModelInferRequest.FromString`` and the response's
  ``SerializeToString`` (gRPC's generated handler does these, outside pyserve's code);
- ``decode_us``: :func:`codec.decode_infer_request`; ``encode_us``: :func:`codec.encode_infer_response`;
- ``validate_us``: :meth:`DataPlane._prepare` (input/output checks against the signature);
- ``stats_us``: the statistics of one request and one execution (:class:`StatsRecorder`, with the
  Prometheus sink when ``--metrics``);
- ``compute_us``: the backend's ``infer_sync`` at batch 1 (the model itself);
- ``servicer_us``: the whole aio ModelInfer handler as the server registers it
  (:func:`wrap_servicer` around :class:`InferenceServicer`: in-flight counting, error mapping,
  decode, routing check, data plane, inline execution, encode) on a parsed message, and
  ``pyserve_us`` = servicer_us - compute_us: pyserve's own work per request;
- ``null_servicer_us`` / ``batched_null_servicer_us``: the same two handler paths with the model's
  inline call replaced by one that returns zeros of the output's shape (``null_model_us``, about
  1 µs): **pyserve's own CPU per request** with no model arithmetic and no cache effects of it;
- ``batched_servicer_us``: the same handler on a dynamically batched copy of the model
  (``max_queue_delay_microseconds`` 1000, preferred batch 16), 16 requests in flight at once on the
  loop (what concurrency 16 gives the event loop); ``batched_pyserve_us`` = that minus the compute
  per row at the batch size reached (``compute_b16_row_us``), i.e. pyserve's work plus the batcher's.

Each figure is the median of ``--rounds`` blocks of ``--n`` calls. ``--compare DIR`` runs this
script alternately (``--rounds`` interleaved rounds, one subprocess each) with this checkout's
``pyserve`` and with the ``pyserve`` package found in ``DIR`` (e.g. an older commit's Python files:
``git archive COMMIT pyserve | tar -x -C DIR`` and copy the built ``pyserve/_C*.so`` into
``DIR/pyserve``), and prints both medians and the ratio other/this per figure. Prints JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[2]
if os.environ.get("REQUEST_CPU_SRC"):
    # --compare's child: import pyserve from that directory, not from the editable install (whose
    # import hook would otherwise win over sys.path)
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__]
    sys.path.insert(0, os.environ["REQUEST_CPU_SRC"])

FIGURES = ("parse_us", "decode_us", "validate_us", "stats_us", "compute_us", "encode_us", "serialize_us",
           "servicer_us", "pyserve_us", "batched_servicer_us", "compute_b16_row_us", "batched_pyserve_us",
           "batched_rows_per_execution", "null_model_us", "null_servicer_us", "batched_null_servicer_us")


def _write_repo(root: Path) -> Path:
    import torch

    from pyserve.artifact import save

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(784, 300), torch.nn.ReLU(), torch.nn.Linear(300, 100), torch.nn.ReLU(),
                              torch.nn.Linear(100, 10)).eval()
    art = root / "lenet300.pyserve"
    save(art, net, (torch.randn(2, 784),), model_name="lenet300", input_names=["images"], output_names=["logits"])
    from batching_budget import write_repo  # the same two models the per-request budget measures

    return write_repo(root / "repo", art)


class _Context:
    """What pyserve's aio servicer uses of ``grpc.aio.ServicerContext``."""

    def __init__(self) -> None:
        self.callbacks = []

    def add_done_callback(self, fn) -> None:
        self.callbacks.append(fn)

    def invocation_metadata(self):
        return ()

    async def abort(self, code, details):  # pragma: no cover - a benchmark request never fails
        raise RuntimeError(f"{code}: {details}")

    def done(self) -> None:
        for fn in self.callbacks:
            fn(self)
        self.callbacks.clear()


def _block_us(fn, n: int) -> float:
    t0 = time.thread_time_ns()
    for _ in range(n):
        fn()
    return (time.thread_time_ns() - t0) / n / 1e3


async def _ablock_us(make, n: int, concurrency: int = 1) -> float:
    """CPU µs of this thread per call of ``await make()``, ``concurrency`` calls in flight at once."""
    per = max(1, n // concurrency)

    async def loop():
        for _ in range(per):
            await make()

    t0 = time.thread_time_ns()
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    return (time.thread_time_ns() - t0) / (per * concurrency) / 1e3


async def measure(repo: Path, n: int, rounds: int, metrics: bool) -> dict:
    import numpy as np

    from pyserve.protocol import codec
    from pyserve.protocol._generated import grpc_service_pb2 as pb
    from pyserve.protocol.types import InferRequest, Tensor
    from pyserve.server.dataplane import DataPlane
    from pyserve.server.interceptors import InflightInterceptor, wrap_servicer
    from pyserve.server.repository import ModelRepository
    from pyserve.server.servicer import InferenceServicer
    from pyserve.server.stats import ExecutionTiming

    sink = None
    if metrics:
        from pyserve.server.metrics import PrometheusMetrics

        sink = PrometheusMetrics()
    repository = ModelRepository(repo, stats_sink=sink)
    await repository.load_all()
    dp = DataPlane(repository)
    servicer = wrap_servicer(InferenceServicer(dp), codec.SERVICE_NAME, InflightInterceptor())
    rng = np.random.default_rng(0)
    x1 = rng.random((1, 784), dtype=np.float32)
    x16 = rng.random((16, 784), dtype=np.float32)
    msgs = {}
    for name in ("plain", "batched"):
        req = InferRequest(model_name=name, inputs=(Tensor("images", "FP32", x1),))
        msgs[name] = codec.encode_infer_request(req).SerializeToString()
    msg = pb.ModelInferRequest.FromString(msgs["plain"])
    bmsg = pb.ModelInferRequest.FromString(msgs["batched"])
    req = codec.decode_infer_request(msg)
    resp = await dp.infer(req)
    resp_pb = codec.encode_infer_response(resp)
    model = repository.get("plain")
    mv = model.current
    backend = mv.backend
    # the runner measures an execution before running it inline: warm it up to its steady state
    for _ in range(50):
        await dp.infer(req)
    stats = repository.stats_recorder("scratch", "1")
    stats._sink = sink  # noqa: SLF001 - the same sink the served versions have
    timing = ExecutionTiming(1, [1000], 0, 50_000, 0)

    one = getattr(stats, "execution_one", None)  # the direct scheduler's call where it exists

    def stats_once():
        if one is not None:
            one(1, 1000, 50_000)
        else:
            stats.execution(timing)
        stats.request_done(True, 100_000, 1)

    def null_model(batch):  # the model's place taken by (almost) nothing: pyserve's work alone
        return [{"logits": np.zeros((len(next(iter(b.values()))), 10), np.float32)} for b in batch]

    async def servicer_call(m):
        ctx = _Context()
        out = await servicer.ModelInfer(m, ctx)
        ctx.done()
        return out

    plain = lambda: servicer_call(msg)  # noqa: E731
    batched = lambda: servicer_call(bmsg)  # noqa: E731
    bmv = repository.get("batched").current
    parts = {k: [] for k in FIGURES}
    for _ in range(rounds):
        parts["parse_us"].append(_block_us(lambda: pb.ModelInferRequest.FromString(msgs["plain"]), n))
        parts["decode_us"].append(_block_us(lambda: codec.decode_infer_request(msg), n))
        parts["validate_us"].append(_block_us(lambda: dp._prepare(model, mv, req), n))  # noqa: SLF001
        parts["stats_us"].append(_block_us(stats_once, n))
        parts["compute_us"].append(_block_us(lambda: backend.infer_sync([{"images": x1}]), n))
        parts["compute_b16_row_us"].append(_block_us(lambda: backend.infer_sync([{"images": x16}]), max(1, n // 8)) / 16)
        parts["encode_us"].append(_block_us(lambda: codec.encode_infer_response(resp), n))
        parts["serialize_us"].append(_block_us(resp_pb.SerializeToString, n))
        parts["servicer_us"].append(await _ablock_us(plain, n))
        e0, c0 = bmv.stats.execution_count, bmv.stats.inference_count
        parts["batched_servicer_us"].append(await _ablock_us(batched, n, 16))
        parts["batched_rows_per_execution"].append(
            (bmv.stats.inference_count - c0) / max(1, bmv.stats.execution_count - e0))
        parts["null_model_us"].append(_block_us(lambda: null_model([{"images": x1}]), n))
        for version, key, make, conc in ((mv, "null_servicer_us", plain, 1), (bmv, "batched_null_servicer_us", batched, 16)):
            runner = version.scheduler.runner
            real = runner._sync  # noqa: SLF001 - swapped for the measurement only
            runner._sync = null_model  # noqa: SLF001
            try:
                parts[key].append(await _ablock_us(make, n, conc))
            finally:
                runner._sync = real  # noqa: SLF001
    out = {k: statistics.median(v) for k, v in parts.items() if v}
    out["pyserve_us"] = out["servicer_us"] - out["compute_us"]
    out["batched_pyserve_us"] = out["batched_servicer_us"] - out["compute_b16_row_us"]
    out["inline_executions"] = mv.scheduler.runner.inline_count
    out["pool_executions"] = mv.scheduler.runner.pool_count
    await repository.unload_all()
    return out


def _run_one(src: Path | None, args) -> dict:
    env = dict(os.environ, REQUEST_CPU_SRC=str(src))
    cmd = [sys.executable, __file__, "--n", str(args.n), "--rounds", "1", "--repo", str(args.repo)]
    if args.metrics:
        cmd.append("--metrics")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(r.stdout)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=3000, help="calls per block (default 3000)")
    p.add_argument("--rounds", type=int, default=5, help="blocks (or, with --compare, interleaved runs)")
    p.add_argument("--metrics", action="store_true", help="with the Prometheus sink (pyserve serve --metrics-port)")
    p.add_argument("--compare", type=Path, default=None, metavar="DIR",
                   help="A/B: a directory holding another pyserve package (see the module docstring)")
    p.add_argument("--repo", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.compare is None:
        if not os.environ.get("REQUEST_CPU_SRC"):
            sys.path.insert(0, str(ROOT))
        with tempfile.TemporaryDirectory() as tmp:
            repo = args.repo or _write_repo(Path(tmp))
            out = asyncio.run(measure(repo, args.n, args.rounds, args.metrics))
        import pyserve

        out["pyserve_from"] = str(Path(pyserve.__file__).parent)
        print(json.dumps(out, indent=2))
        return 0
    if not (args.compare / "pyserve" / "__init__.py").is_file():
        print(f"request_cpu.py: --compare {args.compare}: no pyserve package there", file=sys.stderr)
        return 2
    load0 = os.getloadavg()
    runs: dict[str, list[dict]] = {"this": [], "other": []}
    with tempfile.TemporaryDirectory() as tmp:
        sys.path.insert(0, str(ROOT))
        args.repo = _write_repo(Path(tmp))
        for _ in range(args.rounds):
            runs["this"].append(_run_one(ROOT, args))
            runs["other"].append(_run_one(args.compare, args))
    result = {"load_average_before": load0, "load_average_after": os.getloadavg(), "rounds": args.rounds,
              "n": args.n, "metrics": args.metrics, "other": str(args.compare)}
    for k in FIGURES:
        a = statistics.median(r[k] for r in runs["this"])
        b = statistics.median(r[k] for r in runs["other"])
        result[k] = {"this": round(a, 2), "other": round(b, 2), "other/this": round(b / a, 3) if a else None}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
