"""Prometheus metrics: scraped over HTTP after known traffic, compared with the counts we sent."""

from __future__ import annotations

import threading
import urllib.request

import numpy as np
import pytest

tc = pytest.importorskip("tritonclient.grpc")
pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from pyserve.server import ServerThread  # noqa: E402
from test_server_grpc import fp32_input  # noqa: E402  (tests/server is on sys.path)

BATCHED = """\
backend: test-echo
max_batch_size: 8
dynamic_batching:
  max_queue_delay_microseconds: 20000
"""


def _scrape(port: int) -> dict[tuple[str, tuple], float]:
    """``{(sample name, sorted labels): value}`` of the /metrics page."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("text/plain")
        text = reply.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _get(samples, name, model, version="1", **extra):
    labels = tuple(sorted({"model": model, "version": version, **extra}.items()))
    return samples.get((name, labels), 0.0)


def test_metrics_count_requests_durations_and_batches(tmp_path, write_model):
    write_model(tmp_path, "echo", 1, echo_mode="echo", config="backend: test-echo\n")
    write_model(tmp_path, "batched", 1, echo_mode="delay", config=BATCHED)
    with ServerThread(tmp_path, host="127.0.0.1", grpc_port=0, metrics_port=0) as srv:
        port = srv.server.metrics_bound_port
        assert port
        c = tc.InferenceServerClient(srv.url)
        n_ok, rows = 5, [1, 2, 3, 1, 1]
        for n in rows[:n_ok]:
            c.infer("echo", [fp32_input(np.ones((n, 2), np.float32))])
        for bad in (np.zeros((1, 3), np.float32), np.full((1, 2), -999, np.float32)):
            with pytest.raises(Exception):
                c.infer("echo", [fp32_input(bad)])
        # 8 concurrent single-row requests on the batched model
        threads = [threading.Thread(target=lambda: tc.InferenceServerClient(srv.url).infer(
            "batched", [fp32_input(np.ones((1, 2), np.float32))])) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        (stats,) = c.get_inference_statistics("batched").model_stats
        c.close()
        m = _scrape(port)

    assert _get(m, "pyserve_inference_request_success_total", "echo") == n_ok
    assert _get(m, "pyserve_inference_request_failure_total", "echo") == 2
    assert _get(m, "pyserve_request_duration_seconds_count", "echo") == n_ok + 2
    assert 0 < _get(m, "pyserve_request_duration_seconds_sum", "echo") < 30
    assert _get(m, "pyserve_request_duration_seconds_bucket", "echo", le="+Inf") == n_ok + 2
    # the wrong-shape request never reached the backend; the poisoned one did
    assert _get(m, "pyserve_inference_execution_total", "echo") == n_ok + 1
    assert _get(m, "pyserve_batch_size_count", "echo") == n_ok + 1
    # echo has max_batch_size 0: the server knows no batch dimension, so each execution is size 1
    assert _get(m, "pyserve_batch_size_sum", "echo") == n_ok + 1
    assert _get(m, "pyserve_queue_duration_seconds_count", "echo") == n_ok + 1
    assert _get(m, "pyserve_compute_duration_seconds_count", "echo") == n_ok + 1

    assert _get(m, "pyserve_inference_request_success_total", "batched") == 8
    executions = _get(m, "pyserve_inference_execution_total", "batched")
    assert executions == stats.execution_count < 8  # the same figure as ModelStatistics; batched
    assert _get(m, "pyserve_batch_size_sum", "batched") == 8
    assert _get(m, "pyserve_queue_duration_seconds_count", "batched") == 8  # one per request


def test_metrics_port_in_use_is_refused(tmp_path, write_model):
    import socket

    write_model(tmp_path, "echo", 1, echo_mode="echo", config="backend: test-echo\n")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(RuntimeError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            ServerThread(tmp_path, host="127.0.0.1", grpc_port=0, metrics_port=port).start()


def test_no_metrics_endpoint_by_default(server):
    assert server.server.metrics_bound_port is None


def _reference_samples(events) -> dict:
    """The same events through prometheus_client's own Counter/Histogram objects (what the exporter
    used before it kept plain counters): the reference the exporter's collector must reproduce."""
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

    from pyserve.server.metrics import BATCH_BUCKETS, DURATION_BUCKETS_S

    r = CollectorRegistry()
    labels = ("model", "version")
    success = Counter("pyserve_inference_request_success", "x", labels, registry=r)
    failure = Counter("pyserve_inference_request_failure", "x", labels, registry=r)
    executions = Counter("pyserve_inference_execution", "x", labels, registry=r)
    request = Histogram("pyserve_request_duration_seconds", "x", labels, buckets=DURATION_BUCKETS_S, registry=r)
    queue = Histogram("pyserve_queue_duration_seconds", "x", labels, buckets=DURATION_BUCKETS_S, registry=r)
    compute = Histogram("pyserve_compute_duration_seconds", "x", labels, buckets=DURATION_BUCKETS_S, registry=r)
    batch = Histogram("pyserve_batch_size", "x", labels, buckets=BATCH_BUCKETS, registry=r)
    for kind, model, version, *args in events:
        if kind == "request":
            ok, ns = args
            (success if ok else failure).labels(model, version).inc()
            request.labels(model, version).observe(ns / 1e9)
        else:
            rows, queue_ns, compute_ns = args
            executions.labels(model, version).inc()
            for q in queue_ns:
                queue.labels(model, version).observe(q / 1e9)
            compute.labels(model, version).observe(compute_ns / 1e9)
            batch.labels(model, version).observe(rows)
    return _parse(generate_latest(r).decode())


def _parse(text: str) -> dict:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if not s.name.endswith("_created"):
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_exporter_matches_prometheus_client_objects():
    """The exporter's plain counters + scrape-time collector give exactly the samples (names, labels,
    cumulative buckets, sums, counts) that prometheus_client's Counter/Histogram give for the same
    events, including values on bucket bounds, above every bound, and two model versions."""
    from prometheus_client import generate_latest

    from pyserve.server.metrics import PrometheusMetrics

    rng = np.random.default_rng(0)
    events = []
    for ns in [100_000, 250_000, 99_999, 10**10, 2 * 10**10, 0, 1]:  # bounds exactly, +Inf, zero
        events.append(("request", "m", "1", True, ns))
    for _ in range(300):
        model, version = ("m", "1") if rng.random() < 0.7 else ("n", "3")
        if rng.random() < 0.5:
            events.append(("request", model, version, bool(rng.random() < 0.9), int(rng.lognormal(13, 2))))
        else:
            rows = int(rng.choice([1, 2, 3, 16, 64, 1024, 2000]))
            queue = [int(rng.lognormal(11, 2)) for _ in range(int(rng.integers(1, 5)))]
            events.append(("execution", model, version, rows, queue, int(rng.lognormal(12, 2))))
    m = PrometheusMetrics()
    for kind, model, version, *args in events:
        (m.request_done if kind == "request" else m.execution)(model, version, *args)
    text = generate_latest(m.registry).decode()
    ours, ref = _parse(text), _reference_samples(events)
    assert set(ours) == set(ref)
    for key, value in ref.items():
        assert ours[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key
    # and both agree with a count by hand: 0, 1, 99,999 and 100,000 ns among the first events are <= 100 µs
    low = sum(1 for kind, model, _, *a in events if kind == "request" and model == "m" and a[1] <= 100_000)
    assert low >= 4 and _get(ours, "pyserve_request_duration_seconds_bucket", "m", le="0.0001") == low
    # every series has its _created sample, as prometheus_client's objects expose
    created = [line for line in text.splitlines() if line.startswith("pyserve_batch_size_created{")]
    assert len(created) == 2
