"""Graceful shutdown of the real ``pyserve serve`` process (subprocess): on SIGTERM the gRPC health
status turns NOT_SERVING at once, new RPCs are refused with UNAVAILABLE, every request already
accepted finishes with its right answer, and the process exits 0 within ``--exit-timeout-s``."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

tc = pytest.importorskip("tritonclient.grpc")
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

import pyserve  # noqa: E402
from test_server_grpc import fp32_input  # noqa: E402

LAUNCHER = Path(__file__).resolve().parent / "serve_with_test_backends.py"
READY = re.compile(r"^pyserve: serving (\d+) model\(s\) on (\S+):(\d+)$")
PKG_ROOT = str(Path(pyserve.__file__).resolve().parent.parent)


def _config(count: int) -> str:
    return f"backend: test-echo\ninstance_group: [{{count: {count}, kind: KIND_CPU}}]\n"


class Served:
    def __init__(self, repo: Path, *flags: str) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = PKG_ROOT + os.pathsep + env.get("PYTHONPATH", "")
        self.proc = subprocess.Popen(
            [sys.executable, str(LAUNCHER), "--model-repository", str(repo), "--grpc-port", "0",
             "--host", "127.0.0.1", *flags],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in self.proc.stdout], daemon=True).start()
        try:
            line = lines.get(timeout=120)
        except queue.Empty:
            self.proc.kill()
            raise AssertionError(f"no ready line; stderr:\n{self.proc.stderr.read()}") from None
        match = READY.match(line.strip())
        assert match, line
        self.url = f"127.0.0.1:{match.group(3)}"

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture()
def repo(tmp_path, write_model):
    write_model(tmp_path, "long", 1, echo_mode="sleep=2.0", config=_config(16))
    write_model(tmp_path, "short", 1, echo_mode="delay", config=_config(16))  # 50 ms per request
    return tmp_path


def _watch_health(url: str, statuses: list, started: threading.Event) -> None:
    """Record (time, status) of every update of a grpc.health.v1 Watch stream until it ends."""
    with grpc.insecure_channel(url) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            for resp in stub.Watch(health_pb2.HealthCheckRequest(service="")):
                statuses.append((time.monotonic(), resp.status))
                started.set()
        except grpc.RpcError:
            pass  # the server ended the stream on exit


def test_sigterm_under_load_loses_no_accepted_request(repo):
    # 8 handler threads (sync, native): the four 2 s requests must leave some for the loop clients
    served = Served(repo, "--exit-timeout-s", "10", "--grpc-threads", "8")
    try:
        statuses: list = []
        watching = threading.Event()
        threading.Thread(target=_watch_health, args=(served.url, statuses, watching), daemon=True).start()
        assert watching.wait(30) and statuses[-1][1] == health_pb2.HealthCheckResponse.SERVING

        # four 2-second requests that are in flight when SIGTERM comes ...
        long_results: dict[int, object] = {}

        def long_call(i):
            c = tc.InferenceServerClient(served.url)
            try:
                x = np.full((1, 2), float(i + 1), np.float32)
                long_results[i] = c.infer("long", [fp32_input(x)], client_timeout=60).as_numpy("y")
            except Exception as exc:
                long_results[i] = exc
            c.close()

        # ... and eight clients sending 50 ms requests back to back until the server refuses them
        ok_counts = [0] * 8
        errors: list[tuple[float, str]] = []
        wrong: list = []

        def loop_call(k):
            c = tc.InferenceServerClient(served.url)
            i = 0
            while True:
                x = np.full((1, 2), float(k * 10000 + i), np.float32)
                try:
                    y = c.infer("short", [fp32_input(x)], client_timeout=30).as_numpy("y")
                except InferenceServerException as exc:
                    errors.append((time.monotonic(), exc.status()))
                    break
                if not np.array_equal(y, 2 * x):
                    wrong.append((k, i))
                ok_counts[k] += 1
                i += 1
            c.close()

        threads = [threading.Thread(target=long_call, args=(i,)) for i in range(4)]
        threads += [threading.Thread(target=loop_call, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        started = repo / "long" / "1" / "model.started"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (started.exists() and len(started.read_text().split()) == 4):
            time.sleep(0.02)
        assert len(started.read_text().split()) == 4  # the four long requests are inside the backend
        while time.monotonic() < deadline and not all(ok_counts):
            time.sleep(0.02)
        assert all(ok_counts)  # and every loop client is running
        assert not long_results  # the long requests are still in flight at the signal
        sigterm_at = time.monotonic()
        served.proc.send_signal(signal.SIGTERM)
        rc = served.proc.wait(timeout=30)
        exited_at = time.monotonic()
        for t in threads:
            t.join(30)
        stderr = served.proc.stderr.read()

        assert rc == 0, stderr
        # every accepted request finished with the right answer
        for i in range(4):
            assert not isinstance(long_results[i], Exception), (long_results[i], stderr[-3000:])
            assert np.array_equal(long_results[i], np.full((1, 2), 2.0 * (i + 1), np.float32))
        assert wrong == []
        assert sum(ok_counts) >= 8
        # requests after SIGTERM were refused cleanly (UNAVAILABLE), none before it failed
        assert len(errors) == 8
        assert all(status == "StatusCode.UNAVAILABLE" for _, status in errors), errors
        assert all(t >= sigterm_at for t, _ in errors)
        # health said NOT_SERVING at once: long before the 2 s requests were done
        not_serving = [t for t, s in statuses if s == health_pb2.HealthCheckResponse.NOT_SERVING]
        assert not_serving and not_serving[0] - sigterm_at < 0.5, (statuses, sigterm_at)
        # the drain waited for the long requests (about 1 s left), then exited promptly
        assert 0.5 < exited_at - sigterm_at < 8, exited_at - sigterm_at
        assert "drained in" in stderr and "stopped" in stderr
    finally:
        served.close()


def test_requests_past_the_exit_timeout_are_cancelled_and_the_process_exits(repo):
    served = Served(repo, "--exit-timeout-s", "0.5")
    try:
        result: list = []

        def long_call():
            c = tc.InferenceServerClient(served.url)
            try:
                result.append(c.infer("long", [fp32_input(np.ones((1, 2), np.float32))], client_timeout=60))
            except InferenceServerException as exc:
                result.append(exc)
            c.close()

        t = threading.Thread(target=long_call)
        t.start()
        started = repo / "long" / "1" / "model.started"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not started.exists():
            time.sleep(0.02)
        t0 = time.monotonic()
        served.proc.send_signal(signal.SIGTERM)
        rc = served.proc.wait(timeout=30)
        elapsed = time.monotonic() - t0
        t.join(30)
        assert rc == 0
        assert elapsed < 5, elapsed  # 0.5 s grace, then the request is cancelled and the process exits
        assert isinstance(result[0], InferenceServerException)
        assert result[0].status() in ("StatusCode.CANCELLED", "StatusCode.UNAVAILABLE"), result[0].status()
        stderr = served.proc.stderr.read()
        assert "exit timeout (0.5 s): cancelling 1 RPC(s) still running (1 inference request(s))" in stderr, stderr
    finally:
        served.close()
