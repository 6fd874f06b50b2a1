"""Prometheus metrics on an HTTP port (``pyserve serve --metrics-port``), fed by the statistics hook.

Served at ``http://HOST:PORT/metrics`` in the Prometheus text format, from a registry of the
server's own (so two servers in one process never share counters). Every series has the labels
``model`` and ``version``:

==========================================  =========  =====================================================
name                                        type       what
==========================================  =========  =====================================================
``pyserve_inference_request_success_total`` counter    requests that succeeded
``pyserve_inference_request_failure_total`` counter    requests that failed (any status) after the model was found
``pyserve_inference_execution_total``       counter    backend executions (one per dynamic batch)
``pyserve_request_duration_seconds``        histogram  per request, arrival to response
``pyserve_queue_duration_seconds``          histogram  per request, waiting for the scheduler
``pyserve_compute_duration_seconds``        histogram  per execution: inputs assembled, backend run, outputs split
``pyserve_batch_size``                      histogram  per execution: rows (sum of dim 0 of the batched requests)
==========================================  =========  =====================================================

The exporter implements :class:`pyserve.server.stats.StatsSink`; durations arrive in nanoseconds
and are observed in seconds.
"""

from __future__ import annotations

import logging

__all__ = ["PrometheusMetrics", "DURATION_BUCKETS_S", "BATCH_BUCKETS"]

log = logging.getLogger("pyserve.server.metrics")

#: Histogram buckets for durations, in seconds (100 µs .. 10 s).
DURATION_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                      5.0, 10.0)
#: Histogram buckets for batch sizes (rows).
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

_LABELS = ("model", "version")


class PrometheusMetrics:
    """The server's metrics and, once :meth:`start` ran, the HTTP endpoint serving them."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.success = Counter("pyserve_inference_request_success", "Inference requests that succeeded",
                               _LABELS, registry=r)
        self.failure = Counter("pyserve_inference_request_failure", "Inference requests that failed",
                               _LABELS, registry=r)
        self.executions = Counter("pyserve_inference_execution", "Backend executions (one per dynamic batch)",
                                  _LABELS, registry=r)
        self.request_duration = Histogram("pyserve_request_duration_seconds",
                                          "Request duration in the server, arrival to response",
                                          _LABELS, buckets=DURATION_BUCKETS_S, registry=r)
        self.queue_duration = Histogram("pyserve_queue_duration_seconds", "Time a request waited for the scheduler",
                                        _LABELS, buckets=DURATION_BUCKETS_S, registry=r)
        self.compute_duration = Histogram("pyserve_compute_duration_seconds",
                                          "Time of one backend execution (inputs, backend, outputs)",
                                          _LABELS, buckets=DURATION_BUCKETS_S, registry=r)
        self.batch_size = Histogram("pyserve_batch_size", "Rows per backend execution", _LABELS,
                                    buckets=BATCH_BUCKETS, registry=r)
        self._children: dict[tuple[str, str], tuple] = {}
        self._http = None
        self._thread = None
        self.bound_port: int | None = None

    # --- StatsSink ----------------------------------------------------------------------------------

    def _series(self, model: str, version: str) -> tuple:
        """The labelled children of every metric for one model version, looked up once (``labels()``
        takes a lock and builds a key on every call; this is on the per-request path)."""
        key = (model, version)
        series = self._children.get(key)
        if series is None:
            series = tuple(m.labels(model, version) for m in (
                self.success, self.failure, self.request_duration, self.executions, self.queue_duration,
                self.compute_duration, self.batch_size))
            self._children[key] = series
        return series

    def request_done(self, model: str, version: str, ok: bool, duration_ns: int) -> None:
        success, failure, duration = self._series(model, version)[:3]
        (success if ok else failure).inc()
        duration.observe(duration_ns / 1e9)

    def execution(self, model: str, version: str, batch_size: int, queue_ns: list[int], compute_ns: int) -> None:
        _, _, _, executions, queue, compute, batch = self._series(model, version)
        executions.inc()
        for q in queue_ns:
            queue.observe(q / 1e9)
        compute.observe(compute_ns / 1e9)
        batch.observe(batch_size)

    # --- HTTP endpoint ------------------------------------------------------------------------------

    def start(self, host: str, port: int) -> int:
        """Serve ``/metrics`` on ``host:port`` (port 0: any free port) in a daemon thread; the bound port.

        Raises RuntimeError naming the address if it cannot be bound.
        """
        from prometheus_client import start_http_server

        try:
            self._http, self._thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise RuntimeError(f"cannot serve metrics on {host}:{port}: {exc}") from None
        self.bound_port = int(self._http.server_port)
        log.info("metrics on http://%s:%d/metrics", host, self.bound_port)
        return self.bound_port

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
