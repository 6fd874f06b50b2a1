"""Per model version statistics (the ``statistics`` extension) and the hook metrics subscribe to.

:class:`StatsRecorder` accumulates counts and nanoseconds; :meth:`StatsRecorder.snapshot` gives the
protocol-neutral :class:`~pyserve.protocol.types.ModelStats` the ModelStatistics RPC encodes. Updates
come from the event loop and, with the synchronous gRPC engine, from its handler threads: a lock
keeps the counters whole (uncontended, well under a microsecond per update). An optional
:class:`StatsSink` (the Prometheus exporter, :mod:`pyserve.server.metrics`) sees the same events.

Stages, per request (Triton's definitions): ``queue`` from the scheduler accepting the request to
its batch starting; ``compute_input`` assembling the backend's inputs (concatenating a dynamic
batch); ``compute_infer`` the backend call; ``compute_output`` splitting and checking the outputs.
``success``/``fail`` count requests with their duration in the server: from the servicer receiving
the request message (before pyserve decodes and validates it) until the data plane has the response
(encoding it to protobuf, a few microseconds for small outputs, and gRPC's own work are not
included). Server overhead = that duration - queue - compute.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Protocol

from pyserve.protocol.types import BatchStats, Duration, ModelStats

__all__ = ["StatsRecorder", "StatsSink", "ExecutionTiming"]


class StatsSink(Protocol):
    """Receives what :class:`StatsRecorder` records (durations in nanoseconds)."""

    def request_done(self, model: str, version: str, ok: bool, duration_ns: int) -> None: ...

    def execution(self, model: str, version: str, batch_size: int, queue_ns: list[int], compute_ns: int) -> None: ...


@dataclass(frozen=True)
class ExecutionTiming:
    """One backend execution of ``len(queue_ns)`` requests holding ``batch_size`` rows in all."""

    batch_size: int
    queue_ns: list[int]
    input_ns: int
    infer_ns: int
    output_ns: int


class _Acc:
    __slots__ = ("count", "ns")

    def __init__(self) -> None:
        self.count = 0
        self.ns = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += max(0, int(ns))

    def freeze(self) -> Duration:
        return Duration(self.count, self.ns)


class StatsRecorder:
    """Statistics of one model version (see the module docstring for the stages)."""

    def __init__(self, name: str, version: str, sink: StatsSink | None = None) -> None:
        self.name, self.version, self._sink = name, version, sink
        self.inference_count = 0
        self.execution_count = 0
        self.last_inference_ms = 0
        self._success, self._fail, self._queue = _Acc(), _Acc(), _Acc()
        self._input, self._infer, self._output = _Acc(), _Acc(), _Acc()
        self._batches: dict[int, tuple[_Acc, _Acc, _Acc]] = {}
        self._lock = threading.Lock()

    def request_done(self, ok: bool, duration_ns: int, inferences: int = 1) -> None:
        """A request finished: ``ok`` with ``inferences`` rows (its batch size), or failed."""
        with self._lock:
            (self._success if ok else self._fail).add(duration_ns)
            if ok:
                self.inference_count += inferences
            self.last_inference_ms = int(time.time() * 1000)
        if self._sink is not None:
            self._sink.request_done(self.name, self.version, ok, duration_ns)

    def execution(self, timing: ExecutionTiming) -> None:
        """One backend execution; each of its requests is charged the whole batch's compute time."""
        n = len(timing.queue_ns)
        with self._lock:
            self.execution_count += 1
            for q in timing.queue_ns:
                self._queue.add(q)
            self._input.add(timing.input_ns * n, n)
            self._infer.add(timing.infer_ns * n, n)
            self._output.add(timing.output_ns * n, n)
            accs = self._batches.setdefault(timing.batch_size, (_Acc(), _Acc(), _Acc()))
            for acc, ns in zip(accs, (timing.input_ns, timing.infer_ns, timing.output_ns), strict=True):
                acc.add(ns)
        if self._sink is not None:
            compute = timing.input_ns + timing.infer_ns + timing.output_ns
            self._sink.execution(self.name, self.version, timing.batch_size, list(timing.queue_ns), compute)

    def execution_one(self, batch_size: int, queue_ns: int, infer_ns: int) -> None:
        """:meth:`execution` of a single request with no input/output assembly time (the direct
        scheduler's executions), without building an :class:`ExecutionTiming`: this is on every
        request's path."""
        queue_ns = max(0, int(queue_ns))
        infer_ns = max(0, int(infer_ns))
        with self._lock:
            self.execution_count += 1
            q, i, inp, out = self._queue, self._infer, self._input, self._output
            q.count += 1
            q.ns += queue_ns
            i.count += 1
            i.ns += infer_ns
            inp.count += 1
            out.count += 1
            accs = self._batches.get(batch_size)
            if accs is None:
                accs = self._batches[batch_size] = (_Acc(), _Acc(), _Acc())
            accs[0].count += 1
            accs[1].add(infer_ns)
            accs[2].count += 1
        if self._sink is not None:
            self._sink.execution(self.name, self.version, batch_size, [queue_ns], infer_ns)

    def snapshot(self) -> ModelStats:
        with self._lock:
            return self._snapshot()

    def _snapshot(self) -> ModelStats:
        return ModelStats(
            name=self.name,
            version=self.version,
            last_inference_ms=self.last_inference_ms,
            inference_count=self.inference_count,
            execution_count=self.execution_count,
            success=self._success.freeze(),
            fail=self._fail.freeze(),
            queue=self._queue.freeze(),
            compute_input=self._input.freeze(),
            compute_infer=self._infer.freeze(),
            compute_output=self._output.freeze(),
            batch_stats=tuple(
                BatchStats(size, *(a.freeze() for a in accs)) for size, accs in sorted(self._batches.items())
            ),
        )
