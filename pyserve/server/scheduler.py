"""Schedulers between the data plane and a backend: direct, or dynamic batching.

A scheduler takes one validated request (input name -> array, plus its batch size in rows) and
returns that request's outputs or raises the exception that failed it. It records each backend
execution in the model version's :class:`~pyserve.server.stats.StatsRecorder`.

- :class:`DirectScheduler`: one backend execution per request, at most ``instances`` at a time.
- :class:`DynamicBatcher`: Triton's dynamic batcher. Requests whose inputs agree on names,
  datatypes and every dimension but the first are concatenated along dim 0 into one execution of
  at most ``max_batch_size`` rows. A batch is formed when the oldest waiting request has waited
  ``max_queue_delay_us`` or when enough rows are waiting (the largest ``preferred_batch_sizes``
  entry, else ``max_batch_size``); if some prefix of the waiting requests sums to a preferred size,
  the largest such prefix is taken. The outputs are split back by rows. If the batched execution
  fails (or returns outputs whose dim 0 is not the batch's), every request of that batch is re-run
  on its own, so one bad request's error is its own and never fails the others.

Cancellation (a client cancelling, a deadline passing) frees what the request held: a request
waiting for a slot or in the batcher's queue leaves it; :class:`DirectScheduler` releases the slot
at once; a batch all of whose requests were cancelled has its execution cancelled, freeing the
instance. A backend running in a thread pool cannot be interrupted: that thread finishes its work
and the result is dropped.

Everything here runs on the event loop; backends do their work in a thread pool, except tiny ones:

**Inline execution** (:class:`ExecutionRunner`). Handing an execution to the thread pool and back
costs two thread wake-ups (tens of microseconds on an idle machine, milliseconds on a loaded one)
plus GIL hand-overs, more than the whole computation of a small model. A backend that offers
``infer_sync(batch)`` (the same work as ``infer``, called on the current thread) is therefore run
directly on the event loop when its measured execution time for batches of that size is below
``inline_max_us`` (default :data:`DEFAULT_INLINE_MAX_US` = 1000 µs). The time is measured on every
execution (in the pool or inline) as the CPU time of the thread that ran it (wall time in the pool
also counts waiting for the GIL and for a CPU), as an exponential moving average per batch-size
class (rows rounded up to a power of two); a class never measured runs in the pool first. So a long model, or
a large batch of a small one, never blocks the event loop for more than about ``inline_max_us``;
``inline_max_us=0`` turns inline execution off. Backends without ``infer_sync`` always use their
own ``infer``.

**Synchronous engine** (``Server(grpc_engine="sync")``). :meth:`DirectScheduler.submit_sync` runs
a request's execution on the calling thread, a handler thread of the synchronous ``grpc.server``
(already a pool thread, so the event loop is never involved and no thread hand-over is needed),
holding one of the same ``instances`` slots the event-loop path takes (:class:`Slots`).
"""

from __future__ import annotations

import _thread
import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from pyserve.backends.base import Backend, InferOutputs
from pyserve.protocol.errors import Internal, Unavailable
from pyserve.server.stats import ExecutionTiming, StatsRecorder

__all__ = ["Scheduler", "DirectScheduler", "DynamicBatcher", "ExecutionRunner", "Slots", "DEFAULT_INLINE_MAX_US"]

log = logging.getLogger("pyserve.server.scheduler")

_now = time.perf_counter_ns


#: Executions measured below this many microseconds of CPU run on the event loop (see the module
#: docstring). Measured on the shared 2-vCPU CI machine with its load average at 13-15
#: (benchmarks/server/profile_server.py, LeNet-300-100 at batch 1, the benchmark's model): the
#: model's CPU time per execution was 200-525 µs (about 75 µs when the machine is idle), and running
#: it inline instead of in the pool cut the server's CPU per request by 30-35% at concurrency 1 and
#: by 1-27% at 16. A bound of 1 ms keeps such models inline under that load while still sending
#: anything longer to the pool; the gRPC layer alone costs 560-740 µs of CPU per request there
#: (benchmarks/server/grpc_floor.py), so an inline execution below the bound delays the other
#: requests by about what one more request costs.
DEFAULT_INLINE_MAX_US = 1000

_EMA_WEIGHT = 0.2  # weight of the newest execution in the moving average


#: CPU time of the calling thread: what an execution would hold the event loop for. Wall time
#: measured in the pool also counts waiting for the GIL and for a CPU, which on a busy server can
#: be many times the work itself and would keep a tiny model in the pool for good.
_cpu_now = time.thread_time_ns


def _timed(fn, batch):
    t0 = _cpu_now()
    result = fn(batch)
    return result, _cpu_now() - t0


class ExecutionRunner:
    """Runs one backend execution inline on the event loop or in ``executor`` (see the module
    docstring, "Inline execution").

    Parameters
    ----------
    backend : the backend; inline execution needs its optional ``infer_sync(batch) -> list``.
    executor : thread pool for executions not run inline (None: the loop's default executor).
    inline_max_us : executions whose measured time (µs, moving average per batch-size class) is
        below this run inline; 0 disables inline execution. ValueError when negative.
    """

    def __init__(self, backend: Backend, executor=None, inline_max_us: float = DEFAULT_INLINE_MAX_US) -> None:
        if inline_max_us < 0:
            raise ValueError(f"inline_max_us must be >= 0, got {inline_max_us}")
        self._backend, self._executor = backend, executor
        #: the backend's ``infer_sync``, or None (what :meth:`run_sync` calls)
        self.backend_sync = getattr(backend, "infer_sync", None)
        self._sync = self.backend_sync if inline_max_us > 0 else None
        self.inline_max_ns = int(inline_max_us * 1000)
        #: batch-size class (rows.bit_length()) -> moving average of the execution time in ns
        self.ema_ns: dict[int, float] = {}
        #: executions run inline / in the thread pool (or by the backend's own ``infer``)
        self.inline_count = 0
        self.pool_count = 0

    def runs_inline(self, rows: int) -> bool:
        """Whether an execution of ``rows`` rows would run on the event loop now."""
        if self._sync is None:
            return False
        ema = self.ema_ns.get(max(1, rows).bit_length())
        return ema is not None and ema < self.inline_max_ns

    def _observe(self, rows: int, ns: int) -> None:
        key = max(1, rows).bit_length()
        old = self.ema_ns.get(key)
        self.ema_ns[key] = float(ns) if old is None else old + _EMA_WEIGHT * (ns - old)

    async def run(self, batch: list, rows: int) -> list:
        """The backend's results for ``batch`` (one per request); ``rows``: rows in the batch."""
        if self._sync is None:
            self.pool_count += 1
            return await self._backend.infer(batch)
        if self.runs_inline(rows):
            return self.run_inline(batch, rows)
        self.pool_count += 1
        result, ns = await asyncio.get_running_loop().run_in_executor(self._executor, _timed, self._sync, batch)
        self._observe(rows, ns)
        return result


    def run_inline(self, batch: list, rows: int) -> list:
        """:meth:`run` when :meth:`runs_inline` said so: the backend's ``infer_sync`` on the event loop,
        measured (a caller that checked ``runs_inline`` first saves a coroutine)."""
        self.inline_count += 1
        t0 = _cpu_now()
        try:
            return self._sync(batch)
        finally:
            self._observe(rows, _cpu_now() - t0)

    def run_sync(self, batch: list, rows: int) -> list:
        """The backend's results for ``batch``, computed on the calling thread (not the event loop's;
        the synchronous gRPC engine's handler threads). Needs :attr:`backend_sync`."""
        self.inline_count += 1
        t0 = _cpu_now()
        try:
            return self.backend_sync(batch)
        finally:
            self._observe(rows, _cpu_now() - t0)


class Slots:
    """A counting semaphore of ``n`` slots taken from the event loop (``await acquire()``) or from any
    other thread (:meth:`acquire_sync`), so that executions started both ways share one bound.

    ``release`` may be called from any thread. A waiter on the loop that is cancelled leaves the
    queue (or gives back a slot handed to it meanwhile); a thread waiting gives up when its
    ``is_active()`` turns false (checked every 50 ms).
    """

    def __init__(self, n: int) -> None:
        if n < 1:
            raise ValueError(f"Slots needs n >= 1, got {n}")
        self._free = n
        # one lock; the fast paths take it directly (Condition.__enter__ is a Python-level call)
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._waiters: collections.deque = collections.deque()  # futures of waiters on event loops
        self._sync_waiting = 0  # threads in acquire_sync's wait: only then does release notify

    @property
    def free(self) -> int:
        """Slots free now."""
        return self._free

    def acquire_sync(self, is_active=None) -> bool:
        """Take a slot, blocking; False (no slot taken) once ``is_active()`` is false."""
        with self._cond:
            while self._free == 0:
                self._sync_waiting += 1
                try:
                    self._cond.wait(0.05 if is_active is not None else None)
                finally:
                    self._sync_waiting -= 1
                if self._free == 0 and is_active is not None and not is_active():
                    return False
            self._free -= 1
            return True

    def try_acquire(self) -> bool:
        """Take a free slot if there is one and no waiter is queued before us (no await: the fast path
        of :meth:`acquire`); False otherwise."""
        with self._lock:
            if self._free > 0 and not self._waiters:
                self._free -= 1
                return True
            return False

    async def acquire(self) -> None:
        with self._lock:
            if self._free > 0 and not self._waiters:
                self._free -= 1
                return
            future = asyncio.get_running_loop().create_future()
            self._waiters.append(future)
        try:
            await future
        except asyncio.CancelledError:
            with self._lock:
                try:
                    self._waiters.remove(future)
                    queued = True
                except ValueError:
                    queued = False
            if not queued and future.done() and not future.cancelled():
                self.release()  # a slot was handed over just before the cancel: give it back
            raise

    def release(self) -> None:
        with self._lock:
            while self._waiters:
                future = self._waiters.popleft()
                if not future.done():
                    future.get_loop().call_soon_threadsafe(self._grant, future)
                    return
            self._free += 1
            if self._sync_waiting:
                self._cond.notify()

    def _grant(self, future: asyncio.Future) -> None:
        if future.done():  # cancelled after the hand-over was scheduled: pass the slot on
            self.release()
        else:
            future.set_result(None)

    async def __aenter__(self) -> "Slots":
        await self.acquire()
        return self

    async def __aexit__(self, *exc) -> None:
        self.release()


class Scheduler:
    """Interface: :meth:`submit` one request, :meth:`close` when the version is retired."""

    #: whether :meth:`submit_sync` may be called (synchronous gRPC engine; False: use :meth:`submit`)
    runs_sync = False

    def submit_sync(self, inputs: Mapping[str, np.ndarray], rows: int, is_active=None) -> InferOutputs | None:
        """Like :meth:`submit`, on the calling thread (see :attr:`runs_sync`); None when the request was
        cancelled (``is_active()`` false) before its execution started."""
        raise NotImplementedError

    async def submit(self, inputs: Mapping[str, np.ndarray], rows: int) -> InferOutputs:
        raise NotImplementedError

    async def close(self) -> None:
        return None


def _result(result) -> InferOutputs:
    if isinstance(result, BaseException):
        raise result
    if not isinstance(result, dict):
        raise Internal(f"the backend returned {type(result).__name__} for a request, not a dict of outputs")
    return result


class DirectScheduler(Scheduler):
    """One backend execution per request; at most ``instances`` executions at a time."""

    def __init__(self, backend: Backend, stats: StatsRecorder, *, instances: int = 1, executor=None,
                 inline_max_us: float = DEFAULT_INLINE_MAX_US) -> None:
        if instances < 1:
            raise ValueError(f"instances must be >= 1, got {instances}")
        self._backend, self._stats = backend, stats
        self.runner = ExecutionRunner(backend, executor, inline_max_us)
        self._slots = Slots(instances)
        self.runs_sync = self.runner.backend_sync is not None

    async def submit(self, inputs: Mapping[str, np.ndarray], rows: int) -> InferOutputs:
        t0 = _now()
        slots, runner = self._slots, self.runner
        if not slots.try_acquire():
            await slots.acquire()
        try:
            t1 = _now()
            if runner.runs_inline(rows):
                (result,) = runner.run_inline([inputs], rows)
            else:
                (result,) = await runner.run([inputs], rows)
            t2 = _now()
        finally:
            slots.release()
        self._stats.execution_one(rows, t1 - t0, t2 - t1)
        return _result(result)

    def submit_sync(self, inputs: Mapping[str, np.ndarray], rows: int, is_active=None) -> InferOutputs | None:
        t0 = _now()
        if not self._slots.acquire_sync(is_active):
            return None
        try:
            if is_active is not None and not is_active():  # cancelled or past its deadline meanwhile
                return None
            t1 = _now()
            (result,) = self.runner.run_sync([inputs], rows)
            t2 = _now()
        finally:
            self._slots.release()
        self._stats.execution_one(rows, t1 - t0, t2 - t1)
        return _result(result)


class _Running:
    """A batch being executed: its execution task and how many of its requests still want it."""

    __slots__ = ("execution", "live")

    def __init__(self, execution: asyncio.Future, live: int) -> None:
        self.execution, self.live = execution, live


@dataclass(eq=False)
class _Pending:
    inputs: Mapping[str, np.ndarray]
    rows: int
    key: tuple
    arrival_ns: int
    future: asyncio.Future = field(repr=False)
    #: the batch it was taken into (None while it waits in the queue)
    running: _Running | None = field(default=None, repr=False)


_QUEUED, _RUNNING, _DONE = 0, 1, 2


class _SyncPending:
    """A request of a handler thread in :meth:`DynamicBatcher.submit_sync`: queued, taken into a
    running batch, or done (``result``: outputs, an exception, or None when it left cancelled).
    :meth:`wake` wakes its thread (:meth:`sleep`) when it is done or handed the lead (``leading``);
    the thread re-checks both after every wake-up, so wakes that come together count as one.

    The wake-up is a bare lock held while nobody has woken the thread (released by :meth:`wake`,
    taken back by :meth:`sleep`), not a ``threading.Event``, whose Condition allocates a lock and
    makes several Python-level calls per wait: two threads waking each other in turn took 19-21 us
    of CPU per round trip this way against 47-54 us with Events (2026-12-01)."""

    __slots__ = ("inputs", "rows", "key", "arrival_ns", "state", "result", "leading", "_signal")

    def __init__(self, inputs: Mapping[str, np.ndarray], rows: int, key: tuple, arrival_ns: int) -> None:
        self.inputs, self.rows, self.key, self.arrival_ns = inputs, rows, key, arrival_ns
        self.state = _QUEUED
        self.result = None
        self.leading = False
        self._signal = _thread.allocate_lock()
        self._signal.acquire()

    def wake(self) -> None:
        """Wake the request's thread (set ``state``/``leading`` first); a no-op when already woken."""
        try:
            self._signal.release()
        except RuntimeError:  # woken already and not asleep again yet: that wake-up covers this one
            pass

    def sleep(self, timeout: float | None) -> bool:
        """Wait until woken (True) or ``timeout`` seconds (None: no limit) passed (False)."""
        return self._signal.acquire(True, -1 if timeout is None else timeout)

    def finish(self, result) -> None:
        self.result = result
        self.state = _DONE
        self.wake()


def _fit(queue: list, key: tuple, max_rows: int, live=None) -> tuple[list, int]:
    """The requests of ``key`` in ``queue`` (arrival order; those ``live`` calls dead skipped) that fit
    in one batch of ``max_rows``; their rows."""
    chosen, rows = [], 0
    for p in queue:
        if p.key != key or (live is not None and not live(p)):
            continue
        if rows + p.rows > max_rows:
            break
        chosen.append(p)
        rows += p.rows
    return chosen, rows


def _prefer(chosen: list, preferred: tuple[int, ...]) -> list:
    """The longest prefix of ``chosen`` whose rows add up to a preferred batch size, else all of it."""
    if preferred:
        total, best = 0, 0
        for i, p in enumerate(chosen):
            total += p.rows
            if total in preferred:
                best = i + 1
        if best:
            return chosen[:best]
    return chosen


def _merge(batch: list) -> Mapping[str, np.ndarray]:
    """One input dict for a batch: each input concatenated along dim 0 (the request's own for one)."""
    if len(batch) == 1:
        return batch[0].inputs
    return {name: np.concatenate([p.inputs[name] for p in batch], axis=0) for name in batch[0].inputs}


def _key(inputs: Mapping[str, np.ndarray]) -> tuple:
    """Requests with equal keys can be concatenated along dim 0."""
    return tuple((name, a.dtype.str, a.shape[1:]) for name, a in sorted(inputs.items()))


class DynamicBatcher(Scheduler):
    """Dynamic batching (see the module docstring).

    Parameters
    ----------
    max_batch_size : most rows (sum of the requests' dim 0) in one execution; >= 1.
    preferred_batch_sizes : batch sizes to aim for, each in 1..max_batch_size (may be empty).
    max_queue_delay_us : longest time in microseconds the oldest waiting request waits for others.
    instances : executions that may run at once (one worker task each).
    executor, inline_max_us : where executions run (:class:`ExecutionRunner`).
    handler_threads : the gRPC engine's handler threads that call :meth:`submit_sync` (None:
        unknown); once that many requests wait in the threads' queue, the leader stops waiting
        for more (each holds a handler thread: no further request can come).
    """

    def __init__(
        self,
        backend: Backend,
        stats: StatsRecorder,
        *,
        max_batch_size: int,
        preferred_batch_sizes: Sequence[int] = (),
        max_queue_delay_us: int = 0,
        instances: int = 1,
        executor=None,
        inline_max_us: float = DEFAULT_INLINE_MAX_US,
        handler_threads: int | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1 for dynamic batching, got {max_batch_size}")
        bad = [p for p in preferred_batch_sizes if not 1 <= p <= max_batch_size]
        if bad:
            raise ValueError(f"preferred_batch_sizes {bad} are outside 1..max_batch_size ({max_batch_size})")
        if max_queue_delay_us < 0:
            raise ValueError(f"max_queue_delay_us must be >= 0, got {max_queue_delay_us}")
        if instances < 1:
            raise ValueError(f"instances must be >= 1, got {instances}")
        self._backend, self._stats = backend, stats
        self.runner = ExecutionRunner(backend, executor, inline_max_us)
        self.max_batch_size = max_batch_size
        self.preferred = tuple(sorted(set(preferred_batch_sizes)))
        self.delay_ns = int(max_queue_delay_us) * 1000
        self._target = self.preferred[-1] if self.preferred else max_batch_size
        self._queue: list[_Pending] = []
        self._wake = asyncio.Event()
        self._closed = False
        self._workers = [asyncio.ensure_future(self._work()) for _ in range(instances)]
        # the handler threads' side (submit_sync): its own queue, a leader thread forming batches;
        # _instances bounds the executions of both sides together (the event loop's take it too)
        self.runs_sync = self.runner.backend_sync is not None
        self._instances = Slots(instances)
        self._tcond = threading.Condition(threading.Lock())
        self._tqueue: list[_SyncPending] = []
        self._leader: _SyncPending | None = None
        self._leader_waiting = False
        self.handler_threads = handler_threads

    async def submit(self, inputs: Mapping[str, np.ndarray], rows: int) -> InferOutputs:
        if self._closed:
            raise Unavailable("the model version is unloading")
        if rows > self.max_batch_size:  # the data plane checks this first; keep the invariant here
            raise Internal(f"request of {rows} rows exceeds max_batch_size {self.max_batch_size}")
        pending = _Pending(inputs, rows, _key(inputs), _now(), asyncio.get_running_loop().create_future())
        self._queue.append(pending)
        self._wake.set()
        try:
            return _result(await pending.future)
        finally:
            if not pending.future.done():  # cancelled while waiting: leave the queue
                pending.future.cancel()
            running = pending.running
            if running is None:  # still queued (cancelled, or the version closed)
                if pending in self._queue:
                    self._queue.remove(pending)
            elif pending.future.cancelled():
                # cancelled while its batch runs: when no request of the batch wants it any more, the
                # execution is cancelled too, freeing the instance
                running.live -= 1
                if running.live == 0 and not running.execution.done():
                    running.execution.cancel()

    async def close(self) -> None:
        """Stop the workers; requests still waiting fail with UNAVAILABLE."""
        self._closed = True
        for w in self._workers:
            w.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        for p in self._queue:
            if not p.future.done():
                p.future.set_exception(Unavailable("the model version was unloaded"))
        self._queue.clear()
        with self._tcond:
            waiting, self._tqueue = self._tqueue, []
            self._tcond.notify_all()
        for p in waiting:
            p.finish(Unavailable("the model version was unloaded"))

    # --- the handler threads' side ---------------------------------------------------------------
    def submit_sync(self, inputs: Mapping[str, np.ndarray], rows: int, is_active=None) -> InferOutputs | None:
        """:meth:`submit` on the calling handler thread (synchronous and native gRPC engines), without
        the event loop: the requests of the handler threads are batched among themselves by the
        same rules. One waiting thread at a time leads: it takes an instance slot, waits for the
        target rows or the oldest request's delay, takes the batch, hands the lead to the next
        waiting request's thread and runs the batch on its own thread, delivering every request's
        outputs. None when ``is_active()`` turned false while the request was still queued (a
        request already taken into a batch gets its result)."""
        if self._closed:
            raise Unavailable("the model version is unloading")
        if rows > self.max_batch_size:
            raise Internal(f"request of {rows} rows exceeds max_batch_size {self.max_batch_size}")
        me = _SyncPending(inputs, rows, _key(inputs), _now())
        with self._tcond:
            if self._closed:  # checked with the queue held: close() drains after setting _closed
                raise Unavailable("the model version is unloading")
            self._tqueue.append(me)
            if self._leader is None:
                self._leader = me
                me.leading = True
            elif self._leader_waiting:
                self._tcond.notify()  # the leader re-checks its rows
        while True:
            if me.leading:
                me.leading = False
                self._lead(me, is_active)
                if me.state == _DONE:
                    break
                continue
            woken = me.sleep(0.05 if is_active is not None else None)
            if woken:
                if me.state == _DONE:
                    break
                continue  # handed the lead
            if is_active is not None and not is_active():
                with self._tcond:
                    if me.state == _QUEUED:
                        self._tqueue.remove(me)
                        me.state = _DONE
                        me.result = None
                        if self._leader is me:  # handed the lead just now: pass it on
                            self._pass_lead()
                        return None
        if me.result is None:
            return None
        return _result(me.result)

    def _pass_lead(self) -> None:
        """With ``_tcond`` held: the lead to the oldest queued request's thread, or to nobody."""
        nxt = next((p for p in self._tqueue if p.state == _QUEUED), None)
        self._leader = nxt
        if nxt is not None:
            nxt.leading = True
            nxt.wake()

    def _lead(self, me: "_SyncPending", is_active) -> None:
        """Take a slot, form one batch, hand the lead on, run the batch."""
        if not self._instances.acquire_sync(is_active):  # cancelled while the instances were busy:
            with self._tcond:  # leave now (a follower leaves within 50 ms) and pass the lead on
                if me.state == _QUEUED:
                    self._tqueue.remove(me)
                    me.state, me.result = _DONE, None
                self._pass_lead()
            return
        try:
            with self._tcond:
                while True:
                    if self._closed:  # fail what close() may not have seen yet
                        waiting, self._tqueue, self._leader = self._tqueue, [], None
                        for p in waiting:
                            p.finish(Unavailable("the model version was unloaded"))
                        return
                    if not self._tqueue:
                        self._leader = None
                        return
                    if me.state == _QUEUED and is_active is not None and not is_active():
                        self._tqueue.remove(me)
                        me.state, me.result = _DONE, None
                        self._pass_lead()
                        return
                    first = self._tqueue[0]
                    chosen, rows = _fit(self._tqueue, first.key, self.max_batch_size)
                    wait_ns = first.arrival_ns + self.delay_ns - _now()
                    everyone = self.handler_threads is not None and len(self._tqueue) >= self.handler_threads
                    if rows < self._target and rows < self.max_batch_size and wait_ns > 0 and not everyone:
                        self._leader_waiting = True
                        self._tcond.wait(min(wait_ns / 1e9, 0.05))
                        self._leader_waiting = False
                        continue
                    batch = self._sync_form(chosen)
                    for p in batch:
                        p.state = _RUNNING
                    self._pass_lead()
                    break
            self._run_sync_batch(batch)
        finally:
            self._instances.release()

    def _sync_form(self, chosen: list["_SyncPending"]) -> list["_SyncPending"]:
        chosen = _prefer(chosen, self.preferred)
        taken = set(map(id, chosen))
        self._tqueue = [p for p in self._tqueue if id(p) not in taken]
        return chosen

    def _run_sync_batch(self, batch: list["_SyncPending"]) -> None:
        """The batch's execution on this thread (as :meth:`_execute`), every request finished."""
        try:
            t0 = _now()
            merged, total = _merge(batch), sum(p.rows for p in batch)
            t1 = _now()
            (result,) = self.runner.run_sync([merged], total)
            if self._delivered(batch, result, total, t0, t1, _now(), _SyncPending.finish):
                return
            t4 = _now()
            results = self.runner.run_sync([p.inputs for p in batch], total)
            self._delivered_each(batch, results, t4, _SyncPending.finish)
        except BaseException as exc:  # a bug in batching itself: fail this batch, keep serving
            log.error("dynamic batcher: batch of %d request(s) failed", len(batch), exc_info=exc)
            for p in batch:
                if p.state != _DONE:
                    p.finish(exc if isinstance(exc, Exception) else Internal(f"batch interrupted: {exc!r}"))
            if not isinstance(exc, Exception):
                raise

    def _candidates(self, key: tuple) -> tuple[list[_Pending], int]:
        """The waiting requests of ``key``, in arrival order, that fit in one batch; their rows."""
        return _fit(self._queue, key, self.max_batch_size, lambda p: not p.future.done())

    def _form(self, key: tuple) -> list[_Pending]:
        chosen = _prefer(self._candidates(key)[0], self.preferred)
        for p in chosen:
            self._queue.remove(p)
        return chosen

    async def _work(self) -> None:
        while not self._closed:
            self._queue = [p for p in self._queue if not p.future.done()]
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            first = self._queue[0]
            _, rows = self._candidates(first.key)
            wait_ns = first.arrival_ns + self.delay_ns - _now()
            if rows < self._target and rows < self.max_batch_size and wait_ns > 0:
                # wait for more requests or the delay, whichever comes first (a timer setting the
                # event: cheaper than asyncio.wait_for, which wraps the wait in a task each time)
                self._wake.clear()
                timer = asyncio.get_running_loop().call_later(wait_ns / 1e9, self._wake.set)
                try:
                    await self._wake.wait()
                finally:
                    timer.cancel()
                continue
            batch = self._form(first.key)
            if batch:
                # the execution runs as its own task so that, if every request of the batch is
                # cancelled (client cancel, deadline), it is cancelled too and this instance is free
                execution = asyncio.ensure_future(self._execute(batch))
                running = _Running(execution, len(batch))  # no await since _form: all still live
                for p in batch:
                    p.running = running
                try:
                    await asyncio.wait({execution})
                except asyncio.CancelledError:  # close(): the version is unloading
                    execution.cancel()
                    for p in batch:
                        if not p.future.done():
                            p.future.set_exception(Unavailable("the model version was unloaded"))
                    raise
                if execution.cancelled():
                    log.debug("dynamic batcher: every request of a batch of %d was cancelled; execution "
                              "cancelled", len(batch))
                    continue
                exc = execution.exception()
                if exc is not None:  # a bug in batching itself: fail this batch, keep serving
                    log.error("dynamic batcher: batch of %d request(s) failed", len(batch), exc_info=exc)
                    for p in batch:
                        if not p.future.done():
                            p.future.set_exception(exc)

    async def _execute(self, batch: list[_Pending]) -> None:
        # one instance bound for both sides: the handler threads' leaders hold _instances while they
        # run a batch; without taking it here a count-1 model ran an event-loop batch (a traffic route,
        # a shadow) and a handler-thread batch at once
        async with self._instances:
            t0 = _now()
            merged, total = _merge(batch), sum(p.rows for p in batch)
            t1 = _now()
            (result,) = await self.runner.run([merged], total)
            if self._delivered(batch, result, total, t0, t1, _now(), _deliver):
                return
            t4 = _now()
            results = await self.runner.run([p.inputs for p in batch], total)
            self._delivered_each(batch, results, t4, _deliver)

    def _delivered(self, batch: list, result, total: int, t0: int, t1: int, t2: int, deliver) -> bool:
        """Record a batch's execution (started ``t0``, run ``t1``..``t2``) and ``deliver(p, outputs)``
        each request its rows; False (nothing delivered) when the batch failed or its outputs do not
        split, and each request must run on its own so that an error stays with its request."""
        queue_ns = [t0 - p.arrival_ns for p in batch]
        if len(batch) == 1:
            self._stats.execution(ExecutionTiming(total, queue_ns, t1 - t0, t2 - t1, _now() - t2))
            deliver(batch[0], result)
            return True
        parts = _split(result, [p.rows for p in batch], total)
        self._stats.execution(ExecutionTiming(total, queue_ns, t1 - t0, t2 - t1, _now() - t2))
        if parts is None:
            log.info("batch of %d request(s) failed (%s); running them one by one", len(batch), _describe(result))
            return False
        for p, outputs in zip(batch, parts, strict=True):
            deliver(p, outputs)
        return True

    def _delivered_each(self, batch: list, results: list, t4: int, deliver) -> None:
        """Record and deliver the one-by-one re-run (started ``t4``) of a failed batch."""
        each_ns = (_now() - t4) // len(batch)
        for p, r in zip(batch, results, strict=True):
            self._stats.execution(ExecutionTiming(p.rows, [0], 0, each_ns, 0))
            deliver(p, r)


def _describe(result) -> str:
    if isinstance(result, BaseException):
        return f"{type(result).__name__}: {result}"
    return "outputs do not split by rows"


def _split(result, rows: list[int], total: int) -> list[InferOutputs] | None:
    """Per-request outputs of a batched result, or None if it failed or does not split by rows."""
    if not isinstance(result, dict):
        return None
    for array in result.values():
        if not isinstance(array, np.ndarray) or array.ndim == 0 or array.shape[0] != total:
            return None
    offsets = np.cumsum([0, *rows])
    return [
        {name: array[offsets[i] : offsets[i + 1]] for name, array in result.items()} for i in range(len(rows))
    ]


def _deliver(p: _Pending, result) -> None:
    if p.future.done():
        return
    if isinstance(result, BaseException):
        p.future.set_exception(result)
    else:
        p.future.set_result(result)
