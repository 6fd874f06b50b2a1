"""The dynamic batcher on its own (asyncio, a recording fake backend), then through the server."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from pyserve.protocol.errors import InvalidArgument, Unavailable
from pyserve.server.scheduler import DirectScheduler, DynamicBatcher
from pyserve.server.stats import StatsRecorder


class Recorder:
    """Backend stand-in: y = x + 1 per row; records the rows of every execution; a request holding
    the value -1 fails on its own (so a batch holding one fails as a whole)."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.executions: list[list[int]] = []
        self.delay_s = delay_s

    async def infer(self, batch):
        self.executions.append([int(b["x"].shape[0]) for b in batch])
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        return [InvalidArgument("row holds -1") if (b["x"] == -1).any() else {"y": b["x"] + 1} for b in batch]


def _run(coro):
    return asyncio.run(coro)


def _x(rows: int, value: float, cols: int = 3) -> dict[str, np.ndarray]:
    return {"x": np.full((rows, cols), value, np.float32)}


def test_preferred_batch_size_then_the_rest_after_the_delay():
    async def main():
        backend, stats = Recorder(), StatsRecorder("m", "1")
        b = DynamicBatcher(backend, stats, max_batch_size=8, preferred_batch_sizes=[4], max_queue_delay_us=20_000)
        outs = await asyncio.gather(*(b.submit(_x(1, i), 1) for i in range(6)))
        await b.close()
        return backend, stats, outs

    backend, stats, outs = _run(main())
    assert backend.executions == [[4], [2]]  # one merged request of 4 rows, then one of 2
    for i, out in enumerate(outs):
        np.testing.assert_array_equal(out["y"], np.full((1, 3), i + 1, np.float32))
    snap = stats.snapshot()
    assert snap.execution_count == 2 and snap.queue.count == 6
    assert {s.batch_size: s.compute_infer.count for s in snap.batch_stats} == {4: 1, 2: 1}


def test_max_batch_size_caps_a_batch_and_rows_come_back_in_order():
    async def main():
        backend = Recorder()
        b = DynamicBatcher(backend, StatsRecorder("m", "1"), max_batch_size=8, max_queue_delay_us=1000)
        sizes = [3, 2, 1, 2, 3]  # 3+2+1+2 = 8, then 3
        outs = await asyncio.gather(*(b.submit({"x": np.arange(n * 3, dtype=np.float32).reshape(n, 3) + 100 * i}, n)
                                      for i, n in enumerate(sizes)))
        await b.close()
        return backend, sizes, outs

    backend, sizes, outs = _run(main())
    assert backend.executions == [[8], [3]]
    for i, (n, out) in enumerate(zip(sizes, outs, strict=True)):
        np.testing.assert_array_equal(out["y"], np.arange(n * 3, dtype=np.float32).reshape(n, 3) + 100 * i + 1)


def test_incompatible_shapes_are_never_batched_together():
    async def main():
        backend = Recorder()
        b = DynamicBatcher(backend, StatsRecorder("m", "1"), max_batch_size=8, max_queue_delay_us=5000)
        reqs = [_x(1, 1, cols=3), _x(1, 2, cols=5), _x(1, 3, cols=3), _x(1, 4, cols=5)]
        outs = await asyncio.gather(*(b.submit(r, 1) for r in reqs))
        await b.close()
        return backend, reqs, outs

    backend, reqs, outs = _run(main())
    assert sorted(map(tuple, backend.executions)) == [(2,), (2,)]
    for r, out in zip(reqs, outs, strict=True):
        np.testing.assert_array_equal(out["y"], r["x"] + 1)


def test_one_bad_request_fails_alone():
    async def main():
        backend = Recorder()
        b = DynamicBatcher(backend, StatsRecorder("m", "1"), max_batch_size=8, max_queue_delay_us=5000)
        values = [1, 2, -1, 4]
        outs = await asyncio.gather(*(b.submit(_x(1, v), 1) for v in values), return_exceptions=True)
        await b.close()
        return backend, values, outs

    backend, values, outs = _run(main())
    assert backend.executions == [[4], [1, 1, 1, 1]]  # the batch failed: re-run one by one
    for v, out in zip(values, outs, strict=True):
        if v == -1:
            assert isinstance(out, InvalidArgument) and "row holds -1" in str(out)
        else:
            np.testing.assert_array_equal(out["y"], np.full((1, 3), v + 1, np.float32))


def test_lone_request_waits_for_the_queue_delay():
    async def main():
        stats = StatsRecorder("m", "1")
        b = DynamicBatcher(Recorder(), stats, max_batch_size=8, max_queue_delay_us=50_000)
        await b.submit(_x(1, 0), 1)
        await b.close()
        return stats.snapshot()

    snap = _run(main())
    assert snap.queue.count == 1 and snap.queue.ns >= 45_000_000  # ~50 ms (timer granularity)


def test_cancelled_request_leaves_the_queue_and_close_fails_the_rest():
    async def main():
        backend = Recorder(delay_s=0.05)
        b = DynamicBatcher(backend, StatsRecorder("m", "1"), max_batch_size=8, max_queue_delay_us=200_000)
        waiting = asyncio.ensure_future(b.submit(_x(1, 7), 1))
        await asyncio.sleep(0.01)
        waiting.cancel()
        await asyncio.sleep(0.01)
        assert b._queue == []
        pending = asyncio.ensure_future(b.submit(_x(1, 8), 1))
        await asyncio.sleep(0.01)
        await b.close()
        with pytest.raises(Unavailable, match="unloaded"):
            await pending
        with pytest.raises(Unavailable, match="unloading"):
            await b.submit(_x(1, 9), 1)
        return backend

    assert _run(main()).executions == []


def test_batch_cancelled_by_all_its_requests_frees_the_instance_and_partly_cancelled_one_runs_on():
    """Every request of a running batch cancelled: its execution is cancelled at once, so the one
    instance serves the next request without waiting out the 0.5 s backend call. One request of a
    batch cancelled: the execution goes on and the other request gets its rows."""

    class Slow(Recorder):
        def __init__(self):
            super().__init__(delay_s=0.5)
            self.cancelled = 0

        async def infer(self, batch):
            try:
                return await super().infer(batch)
            except asyncio.CancelledError:
                self.cancelled += 1
                raise

    async def main():
        backend = Slow()
        b = DynamicBatcher(backend, StatsRecorder("m", "1"), max_batch_size=2, max_queue_delay_us=1000)
        first = [asyncio.ensure_future(b.submit(_x(1, v), 1)) for v in (1, 2)]
        await asyncio.sleep(0.05)  # batched ([2]) and running
        for t in first:
            t.cancel()
        await asyncio.sleep(0.01)
        assert backend.cancelled == 1  # the execution was cancelled with its last request
        t0 = asyncio.get_running_loop().time()
        backend.delay_s = 0.0
        out = await b.submit(_x(1, 5), 1)
        waited = asyncio.get_running_loop().time() - t0
        np.testing.assert_array_equal(out["y"], np.full((1, 3), 6, np.float32))
        backend.delay_s = 0.1
        pair = [asyncio.ensure_future(b.submit(_x(1, v), 1)) for v in (7, 8)]
        await asyncio.sleep(0.05)
        pair[0].cancel()
        kept = await pair[1]
        np.testing.assert_array_equal(kept["y"], np.full((1, 3), 9, np.float32))
        await b.close()
        return backend, waited

    backend, waited = _run(main())
    assert waited < 0.3 and backend.cancelled == 1
    assert backend.executions == [[2], [1], [2]]


def test_direct_scheduler_limits_concurrency_to_the_instance_count():
    async def main():
        active, peak = 0, 0

        class Slow:
            async def infer(self, batch):
                nonlocal active, peak
                active += 1
                peak = max(peak, active)
                await asyncio.sleep(0.02)
                active -= 1
                return [{"y": b["x"]} for b in batch]

        s = DirectScheduler(Slow(), StatsRecorder("m", "1"), instances=2)
        await asyncio.gather(*(s.submit(_x(1, i), 1) for i in range(6)))
        return peak

    assert _run(main()) == 2


@pytest.mark.parametrize("kwargs, match", [
    ({"max_batch_size": 0}, "max_batch_size must be >= 1"),
    ({"max_batch_size": 4, "preferred_batch_sizes": [5]}, r"preferred_batch_sizes \[5\] are outside 1..max_batch_size"),
    ({"max_batch_size": 4, "max_queue_delay_us": -1}, "max_queue_delay_us must be >= 0"),
    ({"max_batch_size": 4, "instances": 0}, "instances must be >= 1"),
])
def test_batcher_arguments_checked(kwargs, match):
    async def main():
        DynamicBatcher(Recorder(), StatsRecorder("m", "1"), **kwargs)

    with pytest.raises(ValueError, match=match):
        _run(main())


# --- through the server, with tritonclient ------------------------------------------------------


def test_concurrent_requests_are_batched_and_each_gets_its_own_rows(client, server):
    tc = pytest.importorskip("tritonclient.grpc")
    from pyserve.backends import get_backend

    EchoBackend = get_backend("test-echo").resolve()  # conftest's class, with its call log

    def stats():
        (s,) = client.get_inference_statistics("batched").model_stats
        return s

    before = stats()
    calls_before = len(EchoBackend.calls)
    n_requests, rows = 16, [1 + (i % 2) for i in range(16)]
    results: dict[int, object] = {}

    def call(i):
        c = tc.InferenceServerClient(server.url)
        x = (np.arange(rows[i] * 2, dtype=np.float32).reshape(rows[i], 2) + 1000 * i)
        t = tc.InferInput("x", list(x.shape), "FP32")
        t.set_data_from_numpy(x)
        try:
            results[i] = (x, c.infer("batched", [t]).as_numpy("y"))
        except Exception as exc:
            results[i] = exc
        c.close()

    threads = [threading.Thread(target=call, args=(i,)) for i in range(n_requests)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for i in range(n_requests):
        assert not isinstance(results[i], Exception), results[i]
        x, y = results[i]
        np.testing.assert_array_equal(y, 2 * x)  # exactly its own rows
    after = stats()
    executions = after.execution_count - before.execution_count
    assert after.inference_count - before.inference_count == sum(rows)
    assert after.inference_stats.success.count - before.inference_stats.success.count == n_requests
    assert executions < n_requests  # batched
    batch_rows = [r for path, call_rows in EchoBackend.calls[calls_before:] if "batched" in str(path)
                  for r in call_rows]
    assert len(batch_rows) == executions and sum(batch_rows) == sum(rows) and max(batch_rows) <= 8


def test_a_poisoned_request_in_a_batch_fails_alone_through_the_server(client, server):
    tc = pytest.importorskip("tritonclient.grpc")
    from tritonclient.utils import InferenceServerException

    def call(i):
        c = tc.InferenceServerClient(server.url)
        x = np.full((1, 2), -999 if i == 3 else i, np.float32)
        t = tc.InferInput("x", [1, 2], "FP32")
        t.set_data_from_numpy(x)
        try:
            return c.infer("batched", [t]).as_numpy("y")
        finally:
            c.close()

    results = _threads(call, 8)  # an InferenceServerException is kept as request 3's result
    for i in range(8):
        if i == 3:
            assert isinstance(results[i], InferenceServerException)
            assert results[i].status() == "StatusCode.INVALID_ARGUMENT" and "poisoned" in results[i].message()
        else:
            np.testing.assert_array_equal(results[i], np.full((1, 2), 2 * i, np.float32))


def test_dynamic_batching_with_the_pyserve_backend_matches_the_module(tmp_path, classifier_modules, write_model):
    """A real artifact: batched rows through one forward pass equal the module's per-request outputs."""
    tc = pytest.importorskip("tritonclient.grpc")
    torch = pytest.importorskip("torch")
    from pyserve.server import ServerThread

    module, artifact = classifier_modules[2]
    write_model(tmp_path, "clf", 1, artifact=artifact, config=(
        "max_batch_size: 16\ndynamic_batching:\n  max_queue_delay_microseconds: 50000\n"))
    rng = np.random.default_rng(7)
    xs = [rng.standard_normal((1 + i % 3, 8)).astype(np.float32) for i in range(12)]
    results: dict[int, object] = {}
    with ServerThread(tmp_path, host="127.0.0.1", grpc_port=0) as srv:
        def call(i):
            c = tc.InferenceServerClient(srv.url)
            t = tc.InferInput("x", list(xs[i].shape), "FP32")
            t.set_data_from_numpy(xs[i])
            try:
                results[i] = c.infer("clf", [t]).as_numpy("logits")
            except Exception as exc:
                results[i] = exc
            c.close()

        threads = [threading.Thread(target=call, args=(i,)) for i in range(len(xs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        c = tc.InferenceServerClient(srv.url)
        (s,) = c.get_inference_statistics("clf").model_stats
        c.close()
    with torch.no_grad():
        for i, x in enumerate(xs):
            assert not isinstance(results[i], Exception), results[i]
            np.testing.assert_allclose(results[i], module(torch.from_numpy(x))[0].numpy(), rtol=1e-5, atol=1e-5)
    assert s.inference_count == sum(x.shape[0] for x in xs)
    assert s.execution_count < len(xs)


# --- inline execution (ExecutionRunner) ---------------------------------------------------------------


class SyncBackend:
    """y = x + 1 with an ``infer_sync``; records the thread of every execution; an execution of
    ``slow_rows`` rows or more works ``slow_s`` seconds of its thread's CPU time (hashing, which
    releases the GIL as torch's kernels do; the runner measures CPU time, so a sleep would not do)."""

    def __init__(self, slow_rows: int = 10**9, slow_s: float = 0.0) -> None:
        self.threads: list[tuple[int, int]] = []  # (rows, thread id)
        self.slow_rows, self.slow_s = slow_rows, slow_s

    def infer_sync(self, batch):
        import time

        rows = sum(int(b["x"].shape[0]) for b in batch)
        self.threads.append((rows, threading.get_ident()))
        if rows >= self.slow_rows:
            import hashlib

            block, t0 = bytes(1 << 18), time.thread_time()
            while time.thread_time() - t0 < self.slow_s:
                hashlib.sha256(block).digest()
        return [{"y": b["x"] + 1} for b in batch]

    async def infer(self, batch):  # what a backend's async path does: the same work in a thread
        return await asyncio.get_running_loop().run_in_executor(None, self.infer_sync, batch)


def test_fast_executions_move_inline_after_one_measured_in_the_pool():
    async def main():
        backend = SyncBackend()
        s = DirectScheduler(backend, StatsRecorder("m", "1"), inline_max_us=100_000)  # 100 ms: all "fast"
        runner = s.runner
        outs = [await s.submit(_x(1, i), 1) for i in range(5)]
        return backend, runner, outs, threading.get_ident()

    backend, runner, outs, loop_thread = _run(main())
    for i, out in enumerate(outs):
        np.testing.assert_array_equal(out["y"], np.full((1, 3), i + 1, np.float32))
    threads = [t for _, t in backend.threads]
    assert threads[0] != loop_thread  # never measured: the pool
    assert threads[1:] == [loop_thread] * 4  # then on the event loop's own thread
    assert (runner.pool_count, runner.inline_count) == (1, 4)


def test_slow_executions_and_unmeasured_batch_sizes_stay_in_the_pool():
    from pyserve.server.scheduler import ExecutionRunner

    async def main():
        backend = SyncBackend(slow_rows=8, slow_s=0.005)  # 8+ rows: 5 ms of CPU, far above 1 ms
        runner = ExecutionRunner(backend, None, inline_max_us=1000)
        loop_thread = threading.get_ident()
        for _ in range(3):
            await runner.run([_x(1, 0)], 1)  # 1 row: fast, inline from the second on
        assert runner.runs_inline(1) and not runner.runs_inline(8)  # 8 rows: another class, never measured
        ticks = 0

        async def ticker():  # the event loop keeps running while the slow executions run
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.001)

        t = asyncio.ensure_future(ticker())
        for _ in range(4):
            await runner.run([_x(8, 0)], 8)
        t.cancel()
        slow = [tid for rows, tid in backend.threads if rows == 8]
        assert loop_thread not in slow and not runner.runs_inline(8)
        assert runner.ema_ns[(8).bit_length()] >= 4_000_000
        return ticks

    assert _run(main()) >= 4  # at least one tick per slow execution: the loop was never held


def test_inline_execution_can_be_turned_off_and_needs_infer_sync():
    from pyserve.server.scheduler import ExecutionRunner

    async def main():
        off = ExecutionRunner(SyncBackend(), None, inline_max_us=0)
        plain = ExecutionRunner(Recorder(), None)  # no infer_sync: always the backend's infer
        for _ in range(3):
            await off.run([_x(1, 0)], 1)
            await plain.run([_x(1, 0)], 1)
        return off, plain

    off, plain = _run(main())
    assert (off.inline_count, off.pool_count) == (0, 3) and not off.runs_inline(1)
    assert (plain.inline_count, plain.pool_count) == (0, 3)
    with pytest.raises(ValueError, match="inline_max_us must be >= 0, got -1"):
        ExecutionRunner(SyncBackend(), None, inline_max_us=-1)


def test_batcher_runs_measured_tiny_batches_inline_and_splits_rows():
    async def main():
        backend = SyncBackend()
        stats = StatsRecorder("m", "1")
        b = DynamicBatcher(backend, stats, max_batch_size=8, max_queue_delay_us=20_000, inline_max_us=100_000)
        first = await asyncio.gather(*(b.submit(_x(1, i), 1) for i in range(4)))  # measured in the pool
        second = await asyncio.gather(*(b.submit(_x(1, 10 + i), 1) for i in range(4)))  # inline
        await b.close()
        return backend, b.runner, first + second, threading.get_ident(), stats.snapshot()

    backend, runner, outs, loop_thread, snap = _run(main())
    for out, v in zip(outs, [0, 1, 2, 3, 10, 11, 12, 13], strict=True):
        np.testing.assert_array_equal(out["y"], np.full((1, 3), v + 1, np.float32))
    assert [rows for rows, _ in backend.threads] == [4, 4]
    assert backend.threads[0][1] != loop_thread and backend.threads[1][1] == loop_thread
    assert snap.execution_count == 2 and snap.inference_count == 0  # request_done is the data plane's


@pytest.mark.parametrize("inline_max_us", [0, 1_000_000])
def test_pyserve_backend_runs_inline_through_the_server_with_the_same_answers(
        tmp_path, classifier_modules, write_model, inline_max_us):
    """The real pyserve backend (its ``infer_sync``) behind the server: with inline execution allowed
    (a bound far above this tiny model's time, so machine load cannot flip it) every request after
    the first runs on the event loop; with 0, none does; the answers equal the torch module's."""
    tc = pytest.importorskip("tritonclient.grpc")
    torch = pytest.importorskip("torch")
    from pyserve.server import ServerThread

    module, artifact = classifier_modules[1]
    write_model(tmp_path, "clf", 1, artifact=artifact, config="max_batch_size: 8\n")
    xs = [np.random.default_rng(i).standard_normal((1 + i % 3, 8)).astype(np.float32) for i in range(6)]
    with ServerThread(tmp_path, host="127.0.0.1", grpc_port=0, inline_max_us=inline_max_us) as srv:
        c = tc.InferenceServerClient(srv.url)
        outs = []
        for x in xs:
            t = tc.InferInput("x", list(x.shape), "FP32")
            t.set_data_from_numpy(x)
            r = c.infer("clf", [t])
            outs.append((r.as_numpy("logits"), r.as_numpy("probs")))
        (s,) = c.get_inference_statistics("clf").model_stats
        c.close()
        runner = srv.server.repository.get("clf").current.scheduler.runner
        counts = (runner.inline_count, runner.pool_count)
        engine = srv.server.grpc_engine
    with torch.no_grad():
        for x, (logits, probs) in zip(xs, outs, strict=True):
            ref_logits, ref_probs = module(torch.from_numpy(x))
            np.testing.assert_allclose(logits, ref_logits.numpy(), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(probs, ref_probs.numpy(), rtol=1e-5, atol=1e-6)
    assert s.inference_count == sum(x.shape[0] for x in xs) and s.execution_count == len(xs)
    # rows 1, 2, 3, 1, 2, 3: classes 1, 2 and 2 (rows 2 and 3) are each measured once in the pool;
    # the sync engine runs every execution in its gRPC handler thread, whatever inline_max_us says
    if engine in ("sync", "native"):  # native: the sync engine's handlers on grpc++
        assert counts == (6, 0)
    else:
        assert counts == ((0, 6) if inline_max_us == 0 else (4, 2))


# --- the handler threads' batcher (submit_sync: sync and native engines) ------------------------


class SyncRecorder:
    """y = x + 1 per row, with ``infer_sync`` only used here; records the rows of every execution;
    a request holding -1 fails on its own (so a batch holding one fails as a whole)."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.executions: list[list[int]] = []
        self.delay_s = delay_s
        self.lock = threading.Lock()

    def infer_sync(self, batch):
        import time

        with self.lock:
            self.executions.append([int(b["x"].shape[0]) for b in batch])
        if self.delay_s:
            time.sleep(self.delay_s)
        return [InvalidArgument("row holds -1") if (b["x"] == -1).any() else {"y": b["x"] + 1} for b in batch]

    async def infer(self, batch):
        raise AssertionError("the handler threads' batcher must not use the event loop")


def _threads(fn, n: int, timeout: float = 30.0) -> dict:
    """fn(i) on n threads started at once; {i: result or exception}."""
    out: dict = {}
    start = threading.Barrier(n)

    def run(i):
        start.wait()
        try:
            out[i] = fn(i)
        except Exception as exc:  # noqa: BLE001 - the test looks at it
            out[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "a submit_sync thread hung"
    return out


def _with_batcher(body, **kwargs):
    """body(batcher, backend, stats) run in a thread while the batcher lives on an event loop."""
    async def main():
        backend, stats = kwargs.pop("backend", None) or SyncRecorder(), StatsRecorder("m", "1")
        b = DynamicBatcher(backend, stats, **kwargs)
        assert b.runs_sync
        try:
            return await asyncio.get_running_loop().run_in_executor(None, body, b, backend, stats)
        finally:
            await b.close()

    return _run(main())


def test_sync_batcher_batches_threads_and_each_gets_its_own_rows():
    rows = [1 + (i % 3) for i in range(16)]

    def body(b, backend, stats):
        return _threads(lambda i: b.submit_sync(_x(rows[i], 100 + i), rows[i]), 16), backend, stats

    outs, backend, stats = _with_batcher(body, max_batch_size=8, preferred_batch_sizes=[8],
                                         max_queue_delay_us=50_000)
    for i in range(16):
        assert not isinstance(outs[i], Exception), outs[i]
        np.testing.assert_array_equal(outs[i]["y"], np.full((rows[i], 3), 101 + i, np.float32))
    sizes = [e[0] for e in backend.executions]
    assert all(len(e) == 1 for e in backend.executions)  # one merged input per execution
    assert sum(sizes) == sum(rows) and max(sizes) <= 8
    assert len(sizes) < 16  # batched: 16 threads released together, a 50 ms delay
    snap = stats.snapshot()
    assert snap.execution_count == len(sizes) and snap.queue.count == 16


def _timed_rows(n: int):
    """A _with_batcher body: n threads submit one row each (value i); (outputs, seconds, backend)."""
    import time

    def body(b, backend, stats):
        t0 = time.perf_counter()
        outs = _threads(lambda i: b.submit_sync(_x(1, i), 1), n)
        return outs, time.perf_counter() - t0, backend

    return body


def test_sync_batcher_preferred_size_then_the_rest_after_the_delay():
    outs, took, backend = _with_batcher(_timed_rows(6), max_batch_size=8, preferred_batch_sizes=[4],
                                        max_queue_delay_us=300_000)
    assert sorted(e[0] for e in backend.executions) == [2, 4]
    assert took >= 0.25  # the last two waited for the queue delay
    for i in range(6):
        np.testing.assert_array_equal(outs[i]["y"], np.full((1, 3), i + 1, np.float32))


def test_sync_batcher_lone_request_waits_only_the_delay():
    import time

    def body(b, backend, stats):
        t0 = time.perf_counter()
        out = b.submit_sync(_x(2, 5), 2)
        return out, time.perf_counter() - t0

    out, took = _with_batcher(body, max_batch_size=8, preferred_batch_sizes=[4], max_queue_delay_us=30_000)
    np.testing.assert_array_equal(out["y"], np.full((2, 3), 6, np.float32))
    assert 0.025 <= took < 2.0


def test_sync_batcher_one_bad_request_fails_alone():
    def body(b, backend, stats):
        return _threads(lambda i: b.submit_sync(_x(1, -1 if i == 2 else i), 1), 6), backend

    outs, backend = _with_batcher(body, max_batch_size=8, preferred_batch_sizes=[6], max_queue_delay_us=200_000)
    assert isinstance(outs[2], InvalidArgument) and "-1" in str(outs[2])
    for i in (0, 1, 3, 4, 5):
        np.testing.assert_array_equal(outs[i]["y"], np.full((1, 3), i + 1, np.float32))
    assert [6] in backend.executions  # the batch ran, failed, and was re-run one by one


def test_sync_batcher_incompatible_shapes_run_apart():
    def body(b, backend, stats):
        return _threads(lambda i: b.submit_sync(_x(1, i, cols=3 + i % 2), 1), 8), backend

    outs, backend = _with_batcher(body, max_batch_size=8, preferred_batch_sizes=[4], max_queue_delay_us=100_000)
    for i in range(8):
        np.testing.assert_array_equal(outs[i]["y"], np.full((1, 3 + i % 2), i + 1, np.float32))
    assert sum(e[0] for e in backend.executions) == 8 and len(backend.executions) >= 2


def test_sync_batcher_cancelled_request_leaves_the_queue_and_close_fails_waiters():
    import time

    def body(b, backend, stats):
        cancelled = threading.Event()
        res = {}

        def lone():  # alone with a long delay; its client goes away after 0.1 s
            res["cancel"] = b.submit_sync(_x(1, 7), 1, is_active=lambda: not cancelled.is_set())

        t = threading.Thread(target=lone)
        t.start()
        time.sleep(0.1)
        cancelled.set()
        t.join(5)
        assert not t.is_alive()
        return res, backend

    res, backend = _with_batcher(body, max_batch_size=8, preferred_batch_sizes=[8], max_queue_delay_us=10_000_000)
    assert res["cancel"] is None and backend.executions == []  # left the queue, never ran

    async def main():
        backend = SyncRecorder()
        b = DynamicBatcher(backend, StatsRecorder("m", "1"), max_batch_size=8, preferred_batch_sizes=[8],
                           max_queue_delay_us=10_000_000)
        loop = asyncio.get_running_loop()
        waiting = [loop.run_in_executor(None, b.submit_sync, _x(1, i), 1) for i in range(3)]
        await asyncio.sleep(0.2)
        await b.close()
        outs = await asyncio.gather(*waiting, return_exceptions=True)
        with pytest.raises(Unavailable):
            b.submit_sync(_x(1, 0), 1)
        return outs, backend

    outs, backend = _run(main())
    assert all(isinstance(o, Unavailable) for o in outs), outs
    assert backend.executions == []


class _Peak(SyncRecorder):
    """SyncRecorder that sleeps ``delay_s`` per execution and records the most executions at once;
    ``infer`` runs ``infer_sync`` in a thread (what the pyserve backend's async path does)."""

    def __init__(self, delay_s: float):
        super().__init__(delay_s=delay_s)
        self.now = self.peak = 0

    def infer_sync(self, batch):
        with self.lock:
            self.now += 1
            self.peak = max(self.peak, self.now)
        try:
            return super().infer_sync(batch)
        finally:
            with self.lock:
                self.now -= 1

    async def infer(self, batch):
        return await asyncio.get_running_loop().run_in_executor(None, self.infer_sync, batch)


def test_sync_batcher_instances_bound_concurrent_executions():
    def body(b, backend, stats):
        return _threads(lambda i: b.submit_sync(_x(1, i), 1), 12), backend

    outs, backend = _with_batcher(body, backend=_Peak(0.05), max_batch_size=2, max_queue_delay_us=0, instances=2)
    for i in range(12):
        np.testing.assert_array_equal(outs[i]["y"], np.full((1, 3), i + 1, np.float32))
    assert backend.peak <= 2 and max(e[0] for e in backend.executions) <= 2


def test_sync_batcher_stops_waiting_when_every_handler_thread_waits():
    # 4 handler threads, preferred 16, a 20 s delay: the 4 requests go as one batch at once
    outs, took, backend = _with_batcher(_timed_rows(4), max_batch_size=16, preferred_batch_sizes=[16],
                                        max_queue_delay_us=20_000_000, handler_threads=4)
    assert took < 5.0 and backend.executions == [[4]]
    for i in range(4):
        np.testing.assert_array_equal(outs[i]["y"], np.full((1, 3), i + 1, np.float32))


def test_event_loop_and_handler_thread_batches_share_the_instance_count():
    async def main():
        backend = _Peak(0.05)
        b = DynamicBatcher(backend, StatsRecorder("m", "1"), max_batch_size=1, instances=1, inline_max_us=0)
        loop = asyncio.get_running_loop()
        on_loop = [b.submit(_x(1, i), 1) for i in range(4)]  # traffic routes, streams: the loop's side
        on_threads = [loop.run_in_executor(None, b.submit_sync, _x(1, 10 + i), 1) for i in range(4)]
        outs = await asyncio.gather(*on_loop, *on_threads)
        await b.close()
        return outs, backend

    outs, backend = _run(main())
    for out, v in zip(outs, [0, 1, 2, 3, 10, 11, 12, 13]):
        np.testing.assert_array_equal(out["y"], np.full((1, 3), v + 1, np.float32))
    assert backend.peak == 1 and len(backend.executions) == 8


def test_sync_batcher_leader_cancelled_while_the_instance_is_busy_leaves_at_once():
    import time

    def body(b, backend, stats):
        first = threading.Thread(target=b.submit_sync, args=(_x(1, 1), 1))
        first.start()  # runs alone for 1.5 s, holding the one instance
        time.sleep(0.2)
        cancelled = threading.Event()
        res = {}

        def second():  # the next leader, waiting for the instance; its client goes away after 0.1 s
            t0 = time.perf_counter()
            res["out"] = b.submit_sync(_x(1, 2), 1, is_active=lambda: not cancelled.is_set())
            res["took"] = time.perf_counter() - t0

        t = threading.Thread(target=second)
        t.start()
        time.sleep(0.1)
        cancelled.set()
        t.join(5)
        first.join(5)
        return res, backend

    res, backend = _with_batcher(body, backend=_Peak(1.5), max_batch_size=1, instances=1)
    assert res["out"] is None and res["took"] < 0.8  # not after the running batch's 1.5 s
    assert backend.executions == [[1]]  # the cancelled request never ran


def test_sync_pending_wake_ups_that_come_together_count_once_and_none_is_lost():
    """The handler-thread batcher's wake-up (a bare lock): a wake before the sleep is not lost,
    two wakes before one sleep wake it once (the thread re-checks its state), a sleep with nothing
    to wake it times out, and a wake from another thread ends a sleep at once."""
    import time

    from pyserve.server.scheduler import _SyncPending

    p = _SyncPending({}, 1, (), 0)
    assert p.sleep(0.01) is False
    p.wake()
    p.wake()  # already woken: a no-op, not an error
    assert p.sleep(0.01) is True
    assert p.sleep(0.01) is False
    t = threading.Timer(0.05, p.finish, args=("done",))
    t0 = time.perf_counter()
    t.start()
    assert p.sleep(5.0) is True
    assert time.perf_counter() - t0 < 2.0 and p.result == "done"
    t.join()
