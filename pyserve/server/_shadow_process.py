"""Shadow inference in a separate worker process at the lowest CPU priority.

Why a process: a shadow that runs in the server process shares its CPUs, its event loop and its
GIL with the primary. On a machine with few cores a CPU-heavy shadow mirrored on every request
slows the primary down (measured on the 2-vCPU CI machine: +54% to +103% primary p99 for a shadow
ten times as expensive). A thread at a low priority does not fix it: the GIL is one lock, and a
low-priority thread that holds it while the scheduler starves it of CPU blocks the primary's
threads too (priority inversion). A process has its own GIL and its own scheduling class.

The worker (``python -m pyserve.server._shadow_process``, started by :class:`ShadowProcess` on the
first shadow job) puts itself in the ``SCHED_IDLE`` scheduling class (Linux; the kernel runs it
only when a CPU would otherwise be idle, and preempts it as soon as a normal thread wakes) before
it imports torch, so every thread it creates inherits the class; where SCHED_IDLE is not available
it falls back to ``nice 19``. It opens the same model repository in explicit mode and loads a
shadow's model on its first job (and again when the server's loaded version changes, compared by
the version's file fingerprint), then runs each job through its own
:class:`~pyserve.server.dataplane.DataPlane` -- the same input checks, version choice and scheduler
as in the server -- and compares the answer with the primary's outputs
(:func:`pyserve.traffic.divergence`) there, so only a small result crosses back.

Costs: a second copy of each shadow model in memory (plus the worker's own Python, numpy, torch and
grpc: 392 MB resident, 258 MB private, measured with three LeNet shadows). Per mirrored request the
server's event loop pays little: the request's tensors go to the worker as their bytes (the
received ``raw_input_contents`` buffers the request's arrays are views of, and the primary's
output arrays), behind a small pickle of plain values (names, datatypes, shapes, parameters); jobs
are buffered and written in one write per slice (:meth:`ShadowProcess.flush`), and the worker sends
results back in batches (every :data:`RESULT_FLUSH_S` at most, one message for many jobs) that the
pipe protocol only buffers until the owner handles them (:meth:`ShadowProcess.process_results`;
the traffic router does it when no primary request is running). Under CPU pressure from anything at
normal priority the worker waits; the server's bounded per-route queue then fills and further shadow
copies are dropped and counted, which is the intended behaviour: shadows use only CPU time nobody
else wants.

Timeouts: each job carries its shadow's ``timeout_s``. Jobs run one at a time in the order sent, so
the server knows which job is running: the oldest one without a result. Its clock starts when the
result before it arrived (or the worker reported itself ready). A job whose model the worker must
load first reports ``loading`` and ``loaded``: the load (warm-up included) may take
:data:`LOAD_TIMEOUT_S`, and ``timeout_s`` applies from its end. A watchdog timer on the
server's loop checks it; when it has run longer than its ``timeout_s`` the job fails with kind
``timeout``, the worker is killed and started again at once (no back-off), and the jobs queued
behind the hung one -- which never started -- are sent to the new worker (those of the same model
would hang too: they end as ``unavailable``, drops). A worker starved of CPU (runnable, but
getting almost none) is not hung: see :meth:`ShadowProcess._starved`. So a hung shadow stalls
the others for one timeout plus one worker start (measured: see docs/traffic.md), and costs nothing
while no shadow hangs. (Chosen over one worker per shadow, which would keep a copy of the worker's
Python, numpy and torch -- about 390 MB resident -- per shadow model.)

Worker death: results the worker had finished but not sent when it died, and jobs it had not run,
come back with kind ``lost`` (not an error of the shadow model); copies that find the worker down
(it is restarting after an unexpected exit, or cannot start) come back with kind ``unavailable``
at once and the router counts them as drops (no latency). The worker dies with the server: it asks
the kernel for SIGKILL when its parent dies (``PR_SET_PDEATHSIG``, Linux) and also checks its parent
pid before each job.

Backends the worker cannot import are not run there: a backend registered as ``"module:attr"`` is
imported by name, one registered as a class or function by its module's name when that is how the
server imported it, else from its module's file (plug-ins loaded with importlib from a path);
anything else (a class defined in a function, a lambda) runs in the server process as before
(:meth:`ShadowProcess.portable`).

Wire format on the worker's stdin/stdout: each message is a 4-byte big-endian length, then its body.
The first message to the worker is the boot pickle; then one message per job (:func:`encode_job`:
a 4-byte meta length, a pickle of plain values, then the tensors' bytes); the worker answers with
pickled lists of plain result tuples. Both ends are the same program version started by the server;
nothing else writes to these pipes (the worker moves its stdout to a private descriptor and points
descriptor 1 at stderr, so a stray print cannot corrupt the stream).
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import inspect
import itertools
import logging
import math
import os
import pickle
import struct
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

__all__ = ["ShadowProcess", "ShadowResult", "PRIORITIES", "KINDS"]

log = logging.getLogger("pyserve.traffic.shadow")

#: ``idle``: SCHED_IDLE (fallback nice 19); ``nice``: nice 19 only; ``normal``: unchanged (for comparison).
PRIORITIES = ("idle", "nice", "normal")
#: Seconds the server waits before starting a worker again after one exited unexpectedly.
RESTART_BACKOFF_S = 5.0
_HEADER = struct.Struct(">I")
_META = struct.Struct(">I")
#: Seconds the worker gathers results before it sends them back in one message.
RESULT_FLUSH_S = 0.02
#: Seconds a shadow job may spend loading (or reloading) its model in the worker, warm-up included,
#: before it counts as a timeout (its ``timeout_s`` applies from the end of the load).
LOAD_TIMEOUT_S = 120.0
#: Seconds after a timeout during which new copies to the same model and version are not run (they
#: end as ``unavailable``: drops), so that a model that keeps hanging does not restart the worker,
#: and stall every other shadow, once per copy.
TIMEOUT_COOLOFF_S = 30.0
#: Each further timeout of the same model (with no good result between) doubles its cool-off, up to this.
TIMEOUT_COOLOFF_MAX_S = 600.0
#: Seconds a model that has timed out (no good result since) may spend (re)loading in a new worker:
#: a model that hangs usually hangs in its warm-up too, and LOAD_TIMEOUT_S would stall every shadow.
STRUCK_LOAD_TIMEOUT_S = 10.0
#: Seconds the watchdog watches a worker past a job's timeout before it decides it is starved of
#: CPU (not hung), and the largest share of that time in CPU a starved worker gets.
STARVED_PROBE_S = 0.5
STARVED_CPU_SHARE = 0.1
#: Added to a job's timeout before the watchdog acts (results wait up to RESULT_FLUSH_S in the worker).
RESULT_GRACE_S = 2 * RESULT_FLUSH_S + 0.01
#: Results the worker sends at once at most.
RESULT_BATCH_MAX = 256


#: :attr:`ShadowResult.kind` values: the job ran (``ok`` or ``error``), ran out of its ``timeout_s``
#: (``timeout``), was lost when the worker died (``lost``), or was not taken because the worker was
#: down or could not start (``unavailable``; the job never ran).
KINDS = ("ok", "error", "timeout", "lost", "unavailable")


@dataclass(frozen=True)
class ShadowResult:
    """One shadow job's outcome: ``latency_s`` measured inside the worker (the shadow model's own
    time, from the job's start there to its answer; for a timeout the time it ran before it was
    stopped; None when it never ran or its result was lost); ``divergence`` a
    :class:`pyserve.traffic.Divergence` or None; ``error`` the failure message ("" when ok);
    ``kind`` one of :data:`KINDS` (default: ``ok`` or ``error`` by ``ok``)."""

    ok: bool
    latency_s: float | None
    divergence: Any = None
    error: str = ""
    kind: str = ""

    def __post_init__(self) -> None:
        if not self.kind:
            object.__setattr__(self, "kind", "ok" if self.ok else "error")


def _backend_refs() -> list[tuple[str, str, str, str, str]]:
    """``(name, module, attr, file, artifact filename)`` of every registered backend the worker can
    import ("" file: by module name). Backends it cannot import are left out (see :meth:`ShadowProcess.portable`)."""
    from pyserve.backends import backend_names, get_backend

    out = []
    for name in backend_names():
        info = get_backend(name)
        f = info.factory
        if isinstance(f, str):
            module, _, attr = f.partition(":")
            out.append((name, module, attr, "", info.artifact_filename))
            continue
        module, attr = getattr(f, "__module__", None), getattr(f, "__qualname__", "")
        if not module or not attr or "<" in attr or "." in attr or module == "__main__":
            continue
        if getattr(sys.modules.get(module), attr, None) is f:
            out.append((name, module, attr, "", info.artifact_filename))
            continue
        path = _source_file(f)
        if path:
            out.append((name, module, attr, path, info.artifact_filename))
    return out


def _source_file(f) -> str:
    """The file that defines class or function ``f`` ("" if unknown), also for a module loaded with
    importlib from a path and never put in ``sys.modules``."""
    try:
        path = inspect.getfile(f)
    except (TypeError, OSError):
        path = ""
        code = getattr(f, "__code__", None)
        members = [code] if code is not None else [getattr(v, "__code__", None) for v in vars(f).values()]
        for c in members:
            if c is not None and os.path.isfile(c.co_filename):
                path = c.co_filename
                break
    return path if path and os.path.isfile(path) else ""


class _Pipes(asyncio.SubprocessProtocol):
    """The worker's stdout and exit, reported to its :class:`ShadowProcess` (no reader task: the
    event loop calls :meth:`pipe_data_received` with whatever bytes arrived)."""

    def __init__(self, owner: ShadowProcess) -> None:
        self.owner = owner
        self.transport: asyncio.SubprocessTransport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        if fd == 1:
            self.owner._received(self, data)

    def connection_lost(self, exc) -> None:  # the process exited and every pipe is closed
        self.owner._lost(self)


class ShadowProcess:
    """The server side of the shadow worker (see the module docstring).

    Parameters
    ----------
    repository_root : the model repository directory the server serves.
    priority : one of :data:`PRIORITIES` (default ``idle``).
    on_data : called (no arguments) when results arrived from the worker; the owner then calls
        :meth:`process_results` when it suits it (the traffic router does it when no primary request
        is running). None: results are handled as they arrive.

    :meth:`submit` encodes one job into a buffer and returns at once; :meth:`flush` writes every
    buffered job to the worker in one write; each job's ``done`` callback gets its
    :class:`ShadowResult` from :meth:`process_results` (results come back in batches, one read for
    many jobs). One worker process serves every route (jobs run one at a time, in the order sent).
    The process starts on the first job and is started again (after :data:`RESTART_BACKOFF_S`) if it
    exits; jobs in flight when it exits fail with the reason. Only the server's event loop calls it.
    """

    def __init__(self, repository_root: str | os.PathLike, *, priority: str = "idle", on_data=None) -> None:
        if priority not in PRIORITIES:
            raise ValueError(f"priority must be one of {', '.join(PRIORITIES)}, got {priority!r}")
        self.root = os.fspath(repository_root)
        self.priority = priority
        self.on_data = on_data
        self._pipes: _Pipes | None = None
        self._stdin: asyncio.WriteTransport | None = None
        self._starting: asyncio.Task | None = None
        self._pending: dict[int, Any] = {}  # job id -> done callback (in the order sent)
        self._jobs: dict[int, tuple] = {}  # job id -> (model, version, token, request, primary, timeout_s)
        self._head: int | None = None  # the job the worker runs now (the oldest sent without a result)
        self._head_since: float | None = None  # monotonic time its clock started (None: not yet)
        self._head_loading = False  # the worker said it is loading the head job's model
        self._watch_handle: asyncio.TimerHandle | None = None
        self._cooloff: dict[tuple[str, str], float] = {}  # (model, version) -> monotonic end of its cool-off
        self._strikes: dict[tuple[str, str], int] = {}  # (model, version) -> timeouts since its last good result
        self._ready = False  # the worker said it is ready (its imports are done)
        self._last_rx = 0.0  # monotonic time bytes last arrived from the worker
        self._ids = itertools.count(1)
        self._out: list = []  # encoded jobs not written yet
        self._tokens: dict[tuple[str, str], tuple] = {}  # (model, version) -> the token this worker has
        self._rbuf = bytearray()
        self._results: deque = deque()  # decoded (job, ok, latency_s, divergence, error) not handled yet
        self._down_until = 0.0
        self._down_reason = ""
        self._refs: list[tuple[str, str, str, str, str]] | None = None
        #: worker processes started (tests, status)
        self.starts = 0
        #: writes to the worker and result batches read back (tests, benchmarks)
        self.writes = 0
        self.batches = 0
        #: jobs failed by their timeout (the worker was killed and restarted each time)
        self.timeouts = 0
        #: timeouts not applied because the worker was waiting for CPU (its clock restarted)
        self.starved = 0

    @property
    def pid(self) -> int | None:
        t = self._pipes.transport if self._pipes is not None else None
        return t.get_pid() if t is not None and t.get_returncode() is None else None

    @property
    def in_flight(self) -> int:
        """Jobs submitted whose result has not been handled yet."""
        return len(self._pending)

    @property
    def has_results(self) -> bool:
        """Whether results wait for :meth:`process_results` (a whole message has arrived)."""
        if self._results:
            return True
        buf = self._rbuf
        return len(buf) >= _HEADER.size and len(buf) >= _HEADER.size + _HEADER.unpack_from(buf)[0]

    def portable(self, backend: str) -> bool:
        """True if the worker can import backend ``backend`` (else its shadows run in the server)."""
        if self._refs is None:
            self._refs = _backend_refs()
        return any(r[0] == backend for r in self._refs)

    # --- process lifecycle ---------------------------------------------------------------------------

    def _up(self) -> bool:
        return self._stdin is not None

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            self._refs = _backend_refs()
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
            transport, pipes = await loop.subprocess_exec(
                lambda: _Pipes(self), sys.executable, "-m", "pyserve.server._shadow_process",
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=None, env=env)
        except Exception as exc:  # noqa: BLE001 - a worker that cannot start is a shadow failure
            self._starting = None
            self._fail_all(f"shadow worker process unavailable: {exc}", "unavailable")
            self._down_until = time.monotonic() + RESTART_BACKOFF_S
            self._down_reason = f"shadow worker process unavailable: {exc}"
            log.error("%s", self._down_reason)
            return
        self.starts += 1
        self._pipes = pipes
        self._stdin = transport.get_pipe_transport(0)
        self._tokens.clear()
        self._ready = False
        self._head, self._head_since = None, None
        boot = {"root": self.root, "priority": self.priority, "backends": self._refs,
                "log_level": logging.getLogger().getEffectiveLevel(), "parent": os.getpid()}
        data = pickle.dumps(boot, protocol=pickle.HIGHEST_PROTOCOL)
        self._stdin.write(_HEADER.pack(len(data)) + data)
        self._starting = None
        log.info("shadow worker process %d started (priority %s)", transport.get_pid(), self.priority)
        # jobs submitted while it started were encoded without tokens this worker has not seen
        queued, self._out = self._out, []
        for job in queued:
            if job in self._pending and not self._end_if_stale(job):
                self._encode(job, *self._jobs[job][:5])
        self.flush()

    def _received(self, pipes: _Pipes, data: bytes) -> None:
        if pipes is not self._pipes:
            return
        self._last_rx = time.monotonic()
        self._rbuf += data
        if self.on_data is not None:
            self.on_data()
        else:
            self.process_results()

    def _lost(self, pipes: _Pipes) -> None:
        if pipes is not self._pipes:
            return
        self.process_results()  # what arrived before the end still counts
        code = pipes.transport.get_returncode() if pipes.transport is not None else None
        self._pipes, self._stdin = None, None
        self._rbuf.clear()
        reason = f"the shadow worker process exited (code {code})"
        if not self._stopping:
            self._down_until = time.monotonic() + RESTART_BACKOFF_S
            self._down_reason = f"{reason}; restarting it in at most {RESTART_BACKOFF_S:g} s"
            log.error("%s; the results of %d job(s) sent to it are lost", reason, len(self._pending))
        self._fail_all(reason, "lost")

    _stopping = False

    def _fail_all(self, reason: str, kind: str) -> None:
        """Every pending job ends with ``kind`` (``lost`` or ``unavailable``), without a latency."""
        pending, self._pending = self._pending, {}
        self._jobs.clear()
        self._out.clear()
        self._head, self._head_since = None, None
        if self._watch_handle is not None:
            self._watch_handle.cancel()
            self._watch_handle = None
        for done in pending.values():
            done(ShadowResult(False, None, None, reason, kind))

    # --- jobs ----------------------------------------------------------------------------------------

    def submit(self, model: str, version: str, token: tuple, request, primary: dict, done,
               timeout_s: float = math.inf) -> None:
        """Queue ``request`` (an :class:`~pyserve.protocol.types.InferRequest`) for ``model`` version
        ``version`` in the worker, to be compared with ``primary`` (output name -> array).
        ``token``: the server's ``(fingerprint, config)`` of that version (the worker reloads the
        model when its own differs). ``done(result)`` is called once with the
        :class:`ShadowResult` (at once, kind ``unavailable``, when the worker is down). ``timeout_s``:
        seconds the job may run in the worker (see the module docstring). Never raises for a failure
        of the shadow. Nothing is written until :meth:`flush`."""
        until = self._cooloff.get((model, version))
        if until is not None:
            if time.monotonic() < until:
                done(ShadowResult(False, None, None, f"not run: model {model!r} timed out and is suspended for "
                                                     f"{until - time.monotonic():.0f} s more", "unavailable"))
                return
            del self._cooloff[(model, version)]
        if not self._up():
            if self._starting is None:
                if time.monotonic() < self._down_until:
                    done(ShadowResult(False, None, None, f"shadow worker process unavailable: {self._down_reason}",
                                      "unavailable"))
                    return
                self._starting = asyncio.get_running_loop().create_task(self._start(),
                                                                        name="pyserve-shadow-process-start")
            job = next(self._ids)
            self._pending[job] = done
            self._jobs[job] = (model, version, token, request, primary, timeout_s)
            self._out.append(job)  # encoded once the worker runs
            return
        job = next(self._ids)
        self._pending[job] = done
        self._jobs[job] = (model, version, token, request, primary, timeout_s)
        self._encode(job, model, version, token, request, primary)

    def _encode(self, job, model, version, token, request, primary) -> None:
        key = (model, version)
        if self._tokens.get(key) == token:
            send_token = None
        else:
            self._tokens[key] = send_token = token
        self._out.append(encode_job(job, model, version, send_token, request, primary))

    def flush(self) -> None:
        """Write every job submitted since the last flush to the worker (one write)."""
        if not self._out or not self._up():
            return
        data = b"".join(self._out)
        self._out.clear()
        self.writes += 1
        try:
            self._stdin.write(data)
        except (ConnectionError, RuntimeError) as exc:  # closing: _lost fails the jobs
            log.debug("shadow worker process: write failed: %s", exc)
        self._watch(time.monotonic())

    def process_results(self, deadline: float | None = None) -> int:
        """Handle results that arrived (call their ``done`` callbacks), until ``time.perf_counter()``
        passes ``deadline`` (None: all of them). Returns how many were handled."""
        buf = self._rbuf
        while len(buf) >= _HEADER.size:
            (n,) = _HEADER.unpack_from(buf)
            if len(buf) < _HEADER.size + n:
                break
            batch = pickle.loads(memoryview(buf)[_HEADER.size: _HEADER.size + n])
            del buf[: _HEADER.size + n]
            self.batches += 1
            self._results.extend(batch)
        from pyserve.traffic.shadow import Divergence

        handled = 0
        results = self._results
        pending = self._pending
        jobs = self._jobs
        while results:
            r = results.popleft()
            if len(r) == 2:  # a marker: ("ready", 0) once the worker's imports are done, ("loaded", job)
                self._marker(*r)
                continue
            job, ok, latency_s, div, error = r
            done = pending.pop(job, None)
            spec = jobs.pop(job, None)
            if ok and spec is not None and self._strikes:
                self._strikes.pop((spec[0], spec[1]), None)
            if done is not None:
                done(ShadowResult(ok, latency_s, Divergence(*div) if div is not None else None, error))
            handled += 1
            if deadline is not None and time.perf_counter() > deadline:
                break
        if handled:
            self._watch(self._last_rx)
        return handled

    # --- timeouts ------------------------------------------------------------------------------------

    def _marker(self, what: str, job: int) -> None:
        if what == "ready":
            self._ready = True
            self._head, self._head_since = None, None
        elif what in ("loading", "loaded"):
            self._watch(self._last_rx)  # the head is this job now (the results before it came first)
            if job == self._head:
                # a model's (re)load is not timed by the shadow's timeout_s but by LOAD_TIMEOUT_S
                self._head_since = self._last_rx
                self._head_loading = what == "loading"
                if self._watch_handle is not None:
                    self._watch_handle.cancel()
                    self._watch_handle = None
        self._watch(self._last_rx)

    def _allowed_s(self, job: int) -> float:
        """Seconds job ``job`` may run before the watchdog acts: its ``timeout_s`` (or LOAD_TIMEOUT_S
        while its model loads) plus RESULT_GRACE_S, since a finished job's result can wait up to
        RESULT_FLUSH_S in the worker before it is sent."""
        timeout_s = self._jobs[job][5]
        if self._head_loading:
            load_s = STRUCK_LOAD_TIMEOUT_S if self._jobs_key(job) in self._strikes else LOAD_TIMEOUT_S
            return max(timeout_s, min(load_s, LOAD_TIMEOUT_S)) + RESULT_GRACE_S
        return timeout_s + RESULT_GRACE_S

    def _watch(self, since: float) -> None:
        """Note which job runs now (the oldest sent without a result; its clock starts at ``since``
        when it changed) and arm the watchdog for it."""
        if not self._up() or not self._ready:
            return
        head = next(iter(self._pending), None)
        if head != self._head:
            self._head, self._head_since = head, (since if head is not None else None)
            self._head_loading = False
        if head is None:
            return
        timeout_s = self._allowed_s(head)
        if self._watch_handle is None and math.isfinite(timeout_s):
            left = self._head_since + timeout_s - time.monotonic()
            self._watch_handle = asyncio.get_running_loop().call_later(max(0.0, left) + 0.001, self._watchdog)

    def _watchdog(self) -> None:
        self._watch_handle = None
        head = self._head
        if head is not None and head in self._pending and self._head_since is not None and \
                time.monotonic() - self._head_since < self._allowed_s(head):
            self._watch(self._last_rx)  # not overdue: re-arm, leave the results to the owner's slices
            return
        self.process_results()  # results that arrived meanwhile move the head on
        head = self._head
        if head is None or head not in self._pending or self._head_since is None:
            self._watch(self._last_rx)
            return
        timeout_s = self._allowed_s(head)
        now = time.monotonic()
        ran = now - self._head_since
        if ran < timeout_s:
            self._watch(self._last_rx)
            return
        if self._starved(head, now):
            return  # re-armed by _starved
        self._timed_out(head, ran)

    def _starved(self, head: int, now: float) -> bool:
        """Whether the worker is waiting for CPU rather than hung: at the lowest priority on a busy
        machine a job can wait longer than its timeout without running (the queue then fills and
        copies are dropped, as intended), and killing the worker for it would only repeat its start.
        A probe of STARVED_PROBE_S: the worker is runnable (state R) and got less than
        STARVED_CPU_SHARE of that time in CPU. Then the job's clock restarts. Linux /proc; elsewhere
        never starved."""
        pid = self.pid
        st = _proc_stat(pid) if pid is not None else None
        if st is None:
            return False
        state, cpu_s = st
        probe = self._probe
        if probe is None or probe[0] != head:
            if state != "R":
                return False  # asleep (waiting on something that does not come) or stopped: hung
            self._probe = (head, now, cpu_s)
            self._watch_handle = asyncio.get_running_loop().call_later(STARVED_PROBE_S, self._watchdog)
            return True
        self._probe = None
        _, t0, cpu0 = probe
        if state == "R" and cpu_s - cpu0 < STARVED_CPU_SHARE * (now - t0):
            self.starved += 1
            log.info("shadow job on model %r is past its timeout but the worker process is waiting for CPU (%.0f ms "
                     "of CPU in %.0f ms): its clock restarts", self._jobs[head][0], 1e3 * (cpu_s - cpu0),
                     1e3 * (now - t0))
            self._head_since = now
            self._watch(now)
            return True
        return False

    _probe: tuple | None = None

    def _end_if_stale(self, job: int) -> bool:
        """End job ``job`` now, not run, when its ``done`` callback says its copy is stale (it has a
        ``current()`` method returning False: the route's config changed since it was mirrored)."""
        current = getattr(self._pending.get(job), "current", None)
        if current is None or current():
            return False
        done = self._pending.pop(job)
        self._jobs.pop(job, None)
        done(ShadowResult(False, None, None, "not run: stale (the route's config changed)", "unavailable"))
        return True

    def drop_stale(self) -> int:
        """After a config change: end every job whose copy is now stale without running it (see
        :meth:`_end_if_stale`; the router counts them stale). When any of them had been sent to the
        running worker, that worker is killed and started again with the current jobs only: a stale
        copy there -- a hung shadow that a reload removed, or a backlog of a retargeted slow one --
        must not keep the other shadows waiting (nor run ahead of a current job whose clock the
        watchdog would then start too early). Returns how many jobs ended."""
        sent = self._up()
        n = sum(self._end_if_stale(j) for j in list(self._pending))
        if n and sent:
            self._restart(f"{n} job(s) it had became stale (the route's config changed)")
        return n

    def _kill(self, pipes) -> None:
        """Forget the worker process behind ``pipes`` and kill it (its exit, seen by _lost, is then
        ignored: this is not a failure); the pending jobs are queued again for the next worker
        (re-encoded by _start, which ends the stale ones)."""
        self._pipes, self._stdin = None, None
        self._rbuf.clear()
        self._head, self._head_since = None, None
        if pipes is not None and pipes.transport is not None:
            try:
                pipes.transport.kill()
            except ProcessLookupError:
                pass
            pipes.transport.close()
        self._out = list(self._pending)
        self._head_loading = False

    def _restart(self, why: str) -> None:
        """Kill the worker and start it again at once; pending jobs are resent to the new one."""
        pipes = self._pipes
        log.warning("shadow worker process %s is killed and started again: %s; %d job(s) are sent to the new one",
                    pipes.transport.get_pid() if pipes is not None and pipes.transport is not None else "?", why,
                    len(self._pending))
        if self._watch_handle is not None:
            self._watch_handle.cancel()
            self._watch_handle = None
        self._kill(pipes)
        if self._starting is None:
            self._starting = asyncio.get_running_loop().create_task(self._start(),
                                                                    name="pyserve-shadow-process-start")

    def _jobs_key(self, job: int) -> tuple[str, str]:
        return self._jobs[job][0], self._jobs[job][1]

    def _timed_out(self, job: int, ran_s: float) -> None:
        """Job ``job`` ran past its timeout: it fails (kind ``timeout``), the worker is killed and
        started again at once, and the jobs behind it (none of which started) go to the new one --
        except those of the same model and version, which would hang too: they end as
        ``unavailable`` (the router counts drops), as do its new copies for TIMEOUT_COOLOFF_S."""
        model = self._jobs[job][0]
        timeout_s = self._allowed_s(job)
        what = "loading its model" if self._head_loading else "running"
        key = self._jobs_key(job)
        done = self._pending.pop(job)
        self._jobs.pop(job)
        self.timeouts += 1
        pipes = self._pipes
        # the same model's copies queued behind it would hang too: not run (drops), so that one hung
        # model costs the other shadows one timeout per new copy of it, not one per queued copy
        same = [j for j in self._pending if self._jobs_key(j) == key]
        dropped = [(self._pending.pop(j), self._jobs.pop(j)) for j in same]
        # and so would the next ones, for a while: a back-off that doubles with each timeout in a row
        strikes = self._strikes[key] = self._strikes.get(key, 0) + 1
        cooloff_s = min(TIMEOUT_COOLOFF_S * 2 ** (strikes - 1), TIMEOUT_COOLOFF_MAX_S)
        self._cooloff[key] = time.monotonic() + cooloff_s
        log.warning("shadow job on model %r was %s for %.3f s, past its limit %g s: the worker process %s is killed "
                    "and started again; %d job(s) of other models queued behind it are sent to the new one, %d of "
                    "the same model are dropped, as are its new copies for %g s (timeout %d in a row)", model, what,
                    ran_s, timeout_s,
                    pipes.transport.get_pid() if pipes is not None and pipes.transport is not None else "?",
                    len(self._pending), len(dropped), cooloff_s, strikes)
        self._kill(pipes)
        self._starting = asyncio.get_running_loop().create_task(self._start(), name="pyserve-shadow-process-start")
        done(ShadowResult(False, ran_s, None, f"DEADLINE_EXCEEDED: the shadow was {what} past its limit "
                                              f"{timeout_s:g} s", "timeout"))
        for d, _ in dropped:
            d(ShadowResult(False, None, None, f"not run: model {model!r} timed out on the copy before it",
                           "unavailable"))

    async def run(self, model: str, version: str, token: tuple, request, primary: dict) -> ShadowResult:
        """:meth:`submit` one job, :meth:`flush` and wait for its result (tests, simple callers)."""
        fut = asyncio.get_running_loop().create_future()
        self.submit(model, version, token, request, primary,
                    lambda r: fut.done() or fut.set_result(r))
        self.flush()
        while not fut.done():
            await asyncio.sleep(0.005)
            self.process_results()
        return fut.result()

    async def stop(self, timeout_s: float = 1.0) -> None:
        """End the worker (closes its input; kills it after ``timeout_s``); jobs in flight end as ``lost``."""
        if self._watch_handle is not None:
            self._watch_handle.cancel()
            self._watch_handle = None
        if self._starting is not None:
            await asyncio.gather(self._starting, return_exceptions=True)
        pipes = self._pipes
        if pipes is None:
            return
        self._stopping = True
        try:
            self.flush()
            self._stdin.close()
            for kill in (False, True):
                if kill and self._pipes is pipes:
                    try:
                        pipes.transport.kill()
                    except ProcessLookupError:
                        pass
                deadline = time.monotonic() + timeout_s
                while self._pipes is pipes and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
        finally:
            pipes.transport.close()
            if self._pipes is pipes:
                self._pipes, self._stdin = None, None
            self._stopping = False
            self._fail_all("the shadow worker process was stopped", "lost")


def _proc_stat(pid: int) -> tuple[str, float] | None:
    """``(state, user + system CPU seconds of all its threads)`` of process ``pid`` from /proc
    (Linux), or None. ``state`` is ``"R"`` when any of its threads is running or runnable (the
    model may run in an executor thread while the main one waits), else the main thread's letter."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        state = fields[0]
        if state != "R":
            for tid in os.listdir(f"/proc/{pid}/task"):
                try:
                    with open(f"/proc/{pid}/task/{tid}/stat") as f:
                        if f.read().rsplit(")", 1)[1].split()[0] == "R":
                            state = "R"
                            break
                except OSError:
                    continue
    except (OSError, IndexError):
        return None
    return state, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def encode_job(job: int, model: str, version: str, token, request, primary: dict) -> bytes:
    """One job frame: ``[4-byte length][4-byte meta length][meta][tensor bytes...]``. ``meta`` is a
    pickle of plain values (no numpy, no pyserve types); each numeric tensor's bytes follow as they
    are in memory (the request's received ``raw_input_contents`` buffers, the primary's outputs),
    not re-encoded; only BYTES (object) tensors travel inside the meta pickle. ``token`` None: the
    worker already has this version's token."""
    raws: list = []
    ins = []
    for t in request.inputs:
        ins.append((t.name, t.datatype, *_tensor_meta(t.data, raws), dict(t.parameters) or None))
    outs = [(name, *_tensor_meta(a, raws)) for name, a in primary.items()]
    meta = pickle.dumps((job, model, version, token, request.id, dict(request.parameters) or None,
                         tuple((o.name, dict(o.parameters) or None) for o in request.outputs), ins, outs),
                        protocol=pickle.HIGHEST_PROTOCOL)
    n = _META.size + len(meta) + sum(r.nbytes for r in raws)
    return b"".join((_HEADER.pack(n), _META.pack(len(meta)), meta, *raws))


def _tensor_meta(a, raws: list) -> tuple:
    """``(dtype str, shape, nbytes, None)`` with the bytes appended to ``raws``, or, for an object
    array, ``(None, shape, 0, array)``."""
    import numpy as np

    if a.dtype.kind == "O" or a.dtype.fields is not None:
        return (None, a.shape, 0, a)
    if not a.flags.c_contiguous:
        a = np.ascontiguousarray(a)
    try:
        m = memoryview(a).cast("B") if a.size else memoryview(b"")
    except (TypeError, ValueError, NotImplementedError):  # a format memoryview does not know
        m = memoryview(a.tobytes())
    raws.append(m)
    return (a.dtype.str, a.shape, m.nbytes, None)


def decode_job(body) -> dict:
    """The inverse of :func:`encode_job` (``body`` without the length prefix): a dict with ``job``,
    ``model``, ``version``, ``token`` (None: unchanged), ``request`` (an InferRequest whose
    arrays are views of ``body``) and ``primary`` (output name -> array)."""
    import numpy as np

    from pyserve.protocol.types import InferRequest, RequestedOutput, Tensor

    body = memoryview(body)
    (m,) = _META.unpack_from(body)
    job, model, version, token, rid, params, outputs, ins, outs = pickle.loads(body[_META.size: _META.size + m])
    off = _META.size + m

    def array(dt, shape, nbytes, obj):
        nonlocal off
        if dt is None:
            return obj
        a = np.frombuffer(body[off: off + nbytes], dtype=np.dtype(dt)).reshape(shape)
        off += nbytes
        return a

    inputs = tuple(Tensor(name, datatype, array(dt, shape, nb, obj), tp or {})
                   for name, datatype, dt, shape, nb, obj, tp in ins)
    primary = {name: array(dt, shape, nb, obj) for name, dt, shape, nb, obj in outs}
    request = InferRequest(model_name=model, inputs=inputs, model_version=version, id=rid,
                           outputs=tuple(RequestedOutput(n, p or {}) for n, p in outputs),
                           parameters=params or {})
    return {"job": job, "model": model, "version": version, "token": token, "request": request,
            "primary": primary}


# --- the worker ----------------------------------------------------------------------------------------


def _lower_priority(priority: str) -> str:
    """Apply ``priority`` to this process (before any thread starts); returns what was applied."""
    if priority == "idle" and hasattr(os, "sched_setscheduler") and hasattr(os, "SCHED_IDLE"):
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            os.nice(19)  # SCHED_IDLE ignores nice; a later switch back to SCHED_OTHER would not
            return "SCHED_IDLE"
        except OSError:
            pass
    if priority in ("idle", "nice"):
        try:
            os.nice(19 - os.nice(0))
            return "nice 19"
        except OSError:
            return "normal (nice failed)"
    return "normal"


def _register(refs) -> None:
    from pyserve.backends import register_backend

    for name, module, attr, path, filename in refs:
        if path and module not in sys.modules:
            try:
                importlib.import_module(module)
                if getattr(sys.modules[module], "__file__", None) != path:
                    raise ImportError("another module of that name")
            except Exception:  # noqa: BLE001 - fall back to the file the server loaded it from
                spec = importlib.util.spec_from_file_location(module, path)
                mod = importlib.util.module_from_spec(spec)
                sys.modules[module] = mod
                spec.loader.exec_module(mod)
        register_backend(name, f"{module}:{attr}", filename)


async def _worker(boot: dict, rfd: int, wfd: int) -> None:
    from pyserve.protocol.errors import ServingError
    from pyserve.server.dataplane import DataPlane
    from pyserve.server.repository import ModelRepository
    from pyserve.traffic import divergence, output_arrays

    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 26)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(rfd, "rb", buffering=0))
    out = os.fdopen(wfd, "wb", buffering=0)
    repo = ModelRepository(boot["root"], control_mode="explicit")
    repo.loaded = True
    plane = DataPlane(repo)
    tried: dict[tuple[str, str], tuple] = {}
    tokens: dict[tuple[str, str], tuple] = {}
    results: list = []
    timer: list = [None]
    parent = boot.get("parent")

    def send() -> None:
        # results go back in batches (one message, one read on the server for many jobs)
        timer[0] = None
        if results:
            data = pickle.dumps(results, protocol=pickle.HIGHEST_PROTOCOL)
            results.clear()
            out.write(_HEADER.pack(len(data)) + data)

    def mark(*marker) -> None:
        # sent at once: the server's watchdog starts the running job's clock from it
        data = pickle.dumps([marker], protocol=pickle.HIGHEST_PROTOCOL)
        out.write(_HEADER.pack(len(data)) + data)

    mark("ready", 0)
    while True:
        try:
            head = await reader.readexactly(_HEADER.size)
            (n,) = _HEADER.unpack(head)
            msg = decode_job(await reader.readexactly(n))
        except asyncio.IncompleteReadError:
            send()
            return  # the server closed our input: stop
        if parent is not None and os.getppid() != parent:
            return  # the server is gone (where PR_SET_PDEATHSIG is not available): stop, do not drain
        t0 = time.perf_counter()
        key = (msg["model"], msg["version"])
        if msg["token"] is not None:
            tokens[key] = msg["token"]
        try:
            def loading(job=msg["job"]) -> None:
                if timer[0] is not None:
                    timer[0].cancel()
                send()  # the results before this job first, then the marker
                mark("loading", job)

            if await _fresh(repo, msg["model"], msg["version"], tokens.get(key, ()), tried, loading):
                mark("loaded", msg["job"])
                t0 = time.perf_counter()
            resp = await plane.infer_model(msg["request"])
            latency = time.perf_counter() - t0
            d = divergence(msg["primary"], output_arrays(resp.outputs))
            result = (True, latency, (d.rows, d.top1_agreement, d.max_abs_diff, d.cosine, d.comparable, d.outputs),
                      "")
        except ServingError as exc:
            result = (False, time.perf_counter() - t0, None, f"{exc.code}: {exc}")
        except Exception as exc:  # noqa: BLE001 - reported to the server, which counts it
            logging.getLogger("pyserve.traffic.shadow").exception("shadow job on %r failed", msg["model"])
            result = (False, time.perf_counter() - t0, None, f"INTERNAL: {type(exc).__name__}: {exc}")
        results.append((msg["job"], *result))  # plain values: this module runs as __main__ here
        if len(results) >= RESULT_BATCH_MAX:
            if timer[0] is not None:
                timer[0].cancel()
            send()
        elif timer[0] is None:
            timer[0] = loop.call_later(RESULT_FLUSH_S, send)


async def _fresh(repo, model: str, version: str, token: tuple, tried: dict, loading=None) -> bool:
    """Load ``model`` if this worker has not, or reload it when the server's version changed
    (``token`` = the server's ``(fingerprint, config)`` of the version). A load that failed here is
    not retried for the same token (``tried``: (model, version) -> token of the last attempt): the
    job then fails fast in the data plane instead of every job paying a full load and warm-up.
    ``loading()`` is called just before a load. Returns True when it (re)loaded or tried to."""
    tok = tuple(token)

    def current():
        m = repo._models.get(model)  # noqa: SLF001 - the worker owns this repository
        mv = m.versions.get(version) if m is not None else None
        return None if mv is None else (mv.fingerprint, mv.config)

    if current() == tok:
        return False
    repo.discover()
    if current() == tok or tried.get((model, version)) == tok:
        return False
    tried[(model, version)] = tok
    if loading is not None:
        loading()
    await repo.load(model)
    return True


def _die_with_parent(parent: int | None) -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux ``PR_SET_PDEATHSIG``), so
    a worker whose server was killed does not run on; exit now if the parent is already gone."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            import signal

            libc = ctypes.CDLL(None, use_errno=True)
            PR_SET_PDEATHSIG = 1
            if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
                logging.getLogger("pyserve.traffic.shadow").warning(
                    "PR_SET_PDEATHSIG failed (errno %d)", ctypes.get_errno())
        except (OSError, AttributeError):  # no libc / no prctl: the per-job parent check remains
            pass
    if parent is not None and os.getppid() != parent:
        os._exit(0)


def main() -> int:
    wfd = os.dup(1)
    os.dup2(2, 1)  # a stray print goes to stderr, not into the result stream
    rfd = os.dup(0)
    stdin = os.fdopen(rfd, "rb", buffering=0)
    head = stdin.read(_HEADER.size)
    if len(head) < _HEADER.size:
        return 0
    (n,) = _HEADER.unpack(head)
    buf = b""
    while len(buf) < n:
        chunk = stdin.read(n - len(buf))
        if not chunk:
            return 0
        buf += chunk
    boot = pickle.loads(buf)
    _die_with_parent(boot.get("parent"))
    applied = _lower_priority(boot["priority"])  # before torch starts any thread
    logging.basicConfig(level=boot.get("log_level", logging.WARNING), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s shadow-worker %(name)s: %(message)s")
    logging.getLogger("pyserve.traffic.shadow").info("worker %d at priority %s", os.getpid(), applied)
    _register(boot["backends"])
    asyncio.run(_worker(boot, os.dup(rfd), wfd))
    return 0


if __name__ == "__main__":
    sys.exit(main())
