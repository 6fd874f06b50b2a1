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

Cost on the request path: the sink does not update ``prometheus_client`` Counter/Histogram objects
per event (each ``inc``/``observe`` takes its own lock, about 10-14 µs per request for the six
updates of a request and its execution, measured with ``benchmarks/server/request_cpu.py``); it
adds to plain per-series counters and bucket counts under one lock per event, and a custom
collector turns them into the same Prometheus families (names, labels, buckets, ``_created``
samples) when ``/metrics`` is scraped.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time

__all__ = ["PrometheusMetrics", "DURATION_BUCKETS_S", "BATCH_BUCKETS"]

log = logging.getLogger("pyserve.server.metrics")

#: Histogram buckets for durations, in seconds (100 µs .. 10 s).
DURATION_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                      5.0, 10.0)
#: Histogram buckets for batch sizes (rows).
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

_LABELS = ("model", "version")

#: (name, help) of the counters and (name, help, buckets) of the histograms, in exposition order
_COUNTERS = (
    ("pyserve_inference_request_success", "Inference requests that succeeded"),
    ("pyserve_inference_request_failure", "Inference requests that failed"),
    ("pyserve_inference_execution", "Backend executions (one per dynamic batch)"),
)
_HISTOGRAMS = (
    ("pyserve_request_duration_seconds", "Request duration in the server, arrival to response", DURATION_BUCKETS_S),
    ("pyserve_queue_duration_seconds", "Time a request waited for the scheduler", DURATION_BUCKETS_S),
    ("pyserve_compute_duration_seconds", "Time of one backend execution (inputs, backend, outputs)",
     DURATION_BUCKETS_S),
    ("pyserve_batch_size", "Rows per backend execution", BATCH_BUCKETS),
)


class _Series:
    """The counters and histograms of one (model, version): plain numbers under one lock."""

    __slots__ = ("lock", "created", "success", "failure", "executions", "hist")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.created = time.time()
        self.success = self.failure = self.executions = 0
        # per histogram: [per-bucket counts (last: above every bound, +Inf), sum]
        self.hist = [[[0] * (len(b) + 1), 0.0] for _, _, b in _HISTOGRAMS]


class _Collector:
    """Builds the Prometheus families from every :class:`_Series` at scrape time."""

    def __init__(self, series: dict) -> None:
        self._series = series

    def describe(self):
        return []  # families are built on collect; nothing to check at registration

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
        from prometheus_client.samples import Sample
        from prometheus_client.utils import floatToGoString

        snapshot = []
        for key, series in list(self._series.items()):
            with series.lock:
                snapshot.append((key, series.created, (series.success, series.failure, series.executions),
                                 [(list(counts), total) for counts, total in series.hist]))
        snapshot.sort(key=lambda item: item[0])
        for i, (name, doc) in enumerate(_COUNTERS):
            family = CounterMetricFamily(name, doc, labels=_LABELS)
            for labels, created, counts, _ in snapshot:
                family.add_metric(labels, counts[i], created=created)
            yield family
        for i, (name, doc, bounds) in enumerate(_HISTOGRAMS):
            family = HistogramMetricFamily(name, doc, labels=_LABELS)
            les = [floatToGoString(b) for b in bounds] + ["+Inf"]
            for labels, created, _, hists in snapshot:
                counts, total = hists[i]
                cumulative, acc = [], 0
                for le, c in zip(les, counts):
                    acc += c
                    cumulative.append((le, acc))
                family.add_metric(labels, cumulative, total)
                family.samples.append(Sample(name + "_created", dict(zip(_LABELS, labels)), created))
            yield family


class PrometheusMetrics:
    """The server's metrics and, once :meth:`start` ran, the HTTP endpoint serving them."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry

        self.registry = CollectorRegistry(auto_describe=True)
        self._series: dict[tuple[str, str], _Series] = {}
        self._series_lock = threading.Lock()
        self.registry.register(_Collector(self._series))
        self._http = None
        self._thread = None
        self.bound_port: int | None = None

    # --- StatsSink ----------------------------------------------------------------------------------

    def _get(self, model: str, version: str) -> _Series:
        series = self._series.get((model, version))
        if series is None:
            with self._series_lock:
                series = self._series.setdefault((model, version), _Series())
        return series

    def request_done(self, model: str, version: str, ok: bool, duration_ns: int) -> None:
        series = self._get(model, version)
        seconds = duration_ns / 1e9
        # bisect_left: the first bound >= the value, the bucket prometheus_client's observe() picks
        i = bisect.bisect_left(DURATION_BUCKETS_S, seconds)
        with series.lock:
            if ok:
                series.success += 1
            else:
                series.failure += 1
            h = series.hist[0]
            h[0][i] += 1
            h[1] += seconds

    def execution(self, model: str, version: str, batch_size: int, queue_ns: list[int], compute_ns: int) -> None:
        series = self._get(model, version)
        bounds, bisect_left = DURATION_BUCKETS_S, bisect.bisect_left
        compute_s = compute_ns / 1e9
        with series.lock:
            series.executions += 1
            _, queue, compute, batch = series.hist
            for q in queue_ns:
                q /= 1e9
                queue[0][bisect_left(bounds, q)] += 1
                queue[1] += q
            compute[0][bisect_left(bounds, compute_s)] += 1
            compute[1] += compute_s
            batch[0][bisect.bisect_left(BATCH_BUCKETS, batch_size)] += 1
            batch[1] += batch_size

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
