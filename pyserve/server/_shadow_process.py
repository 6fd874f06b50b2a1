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
import os
import pickle
import struct
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

__all__ = ["ShadowProcess", "ShadowResult", "PRIORITIES"]

log = logging.getLogger("pyserve.traffic.shadow")

#: ``idle``: SCHED_IDLE (fallback nice 19); ``nice``: nice 19 only; ``normal``: unchanged (for comparison).
PRIORITIES = ("idle", "nice", "normal")
#: Seconds the server waits before starting a worker again after one exited unexpectedly.
RESTART_BACKOFF_S = 5.0
_HEADER = struct.Struct(">I")
_META = struct.Struct(">I")
#: Seconds the worker gathers results before it sends them back in one message.
RESULT_FLUSH_S = 0.02
#: Results the worker sends at once at most.
RESULT_BATCH_MAX = 256


@dataclass(frozen=True)
class ShadowResult:
    """One shadow job's outcome: ``latency_s`` measured inside the worker (the shadow model's own
    time, from the job's start there to its answer); ``divergence`` a
    :class:`pyserve.traffic.Divergence` or None; ``error`` the failure message ("" when ok)."""

    ok: bool
    latency_s: float
    divergence: Any = None
    error: str = ""


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
        self._pending: dict[int, Any] = {}  # job id -> done callback
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
            self._fail_all(f"shadow worker process unavailable: {exc}")
            self._down_until = time.monotonic() + RESTART_BACKOFF_S
            self._down_reason = f"shadow worker process unavailable: {exc}"
            log.error("%s", self._down_reason)
            return
        self.starts += 1
        self._pipes = pipes
        self._stdin = transport.get_pipe_transport(0)
        self._tokens.clear()
        boot = {"root": self.root, "priority": self.priority, "backends": self._refs,
                "log_level": logging.getLogger().getEffectiveLevel()}
        data = pickle.dumps(boot, protocol=pickle.HIGHEST_PROTOCOL)
        self._stdin.write(_HEADER.pack(len(data)) + data)
        self._starting = None
        log.info("shadow worker process %d started (priority %s)", transport.get_pid(), self.priority)
        # jobs submitted while it started were encoded without tokens this worker has not seen
        queued, self._out = self._out, []
        for job, model, version, token, request, primary in queued:
            self._encode(job, model, version, token, request, primary)
        self.flush()

    def _received(self, pipes: _Pipes, data: bytes) -> None:
        if pipes is not self._pipes:
            return
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
        self._out.clear()
        self._rbuf.clear()
        reason = f"the shadow worker process exited (code {code})"
        if not self._stopping:
            self._down_until = time.monotonic() + RESTART_BACKOFF_S
            self._down_reason = f"{reason}; restarting it in at most {RESTART_BACKOFF_S:g} s"
            log.error("%s; jobs in flight fail", reason)
        self._fail_all(reason)

    _stopping = False

    def _fail_all(self, reason: str) -> None:
        pending, self._pending = self._pending, {}
        self._out.clear()
        for done in pending.values():
            done(ShadowResult(False, 0.0, None, reason))

    # --- jobs ----------------------------------------------------------------------------------------

    def submit(self, model: str, version: str, token: tuple, request, primary: dict, done) -> None:
        """Queue ``request`` (an :class:`~pyserve.protocol.types.InferRequest`) for ``model`` version
        ``version`` in the worker, to be compared with ``primary`` (output name -> array).
        ``token``: the server's ``(fingerprint, config)`` of that version (the worker reloads the
        model when its own differs). ``done(result)`` is called once with the
        :class:`ShadowResult` (at once when the worker is down). Never raises for a failure of the
        shadow. Nothing is written until :meth:`flush`."""
        if not self._up():
            if self._starting is None:
                if time.monotonic() < self._down_until:
                    done(ShadowResult(False, 0.0, None, f"shadow worker process unavailable: {self._down_reason}"))
                    return
                self._starting = asyncio.get_running_loop().create_task(self._start(),
                                                                        name="pyserve-shadow-process-start")
            job = next(self._ids)
            self._pending[job] = done
            self._out.append((job, model, version, token, request, primary))  # encoded once it runs
            return
        job = next(self._ids)
        self._pending[job] = done
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
        while results:
            job, ok, latency_s, div, error = results.popleft()
            done = pending.pop(job, None)
            if done is not None:
                done(ShadowResult(ok, latency_s, Divergence(*div) if div is not None else None, error))
            handled += 1
            if deadline is not None and time.perf_counter() > deadline:
                break
        return handled

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
        """End the worker (closes its input; kills it after ``timeout_s``); jobs in flight fail."""
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
            self._fail_all("the shadow worker process was stopped")


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

    def send() -> None:
        # results go back in batches (one message, one read on the server for many jobs)
        timer[0] = None
        if results:
            data = pickle.dumps(results, protocol=pickle.HIGHEST_PROTOCOL)
            results.clear()
            out.write(_HEADER.pack(len(data)) + data)

    while True:
        try:
            head = await reader.readexactly(_HEADER.size)
            (n,) = _HEADER.unpack(head)
            msg = decode_job(await reader.readexactly(n))
        except asyncio.IncompleteReadError:
            send()
            return  # the server closed our input: stop
        t0 = time.perf_counter()
        key = (msg["model"], msg["version"])
        if msg["token"] is not None:
            tokens[key] = msg["token"]
        try:
            await _fresh(repo, msg["model"], msg["version"], tokens.get(key, ()), tried)
            resp = await plane.infer_model(msg["request"])
            latency = time.perf_counter() - t0
            d = divergence(msg["primary"], output_arrays(resp.outputs))
            result = (True, latency, (d.rows, d.top1_agreement, d.max_abs_diff, d.cosine, d.comparable), "")
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


async def _fresh(repo, model: str, version: str, token: tuple, tried: dict) -> None:
    """Load ``model`` if this worker has not, or reload it when the server's version changed
    (``token`` = the server's ``(fingerprint, config)`` of the version). A load that failed here is
    not retried for the same token (``tried``: (model, version) -> token of the last attempt): the
    job then fails fast in the data plane instead of every job paying a full load and warm-up."""
    tok = tuple(token)

    def current():
        m = repo._models.get(model)  # noqa: SLF001 - the worker owns this repository
        mv = m.versions.get(version) if m is not None else None
        return None if mv is None else (mv.fingerprint, mv.config)

    if current() == tok:
        return
    repo.discover()
    if current() == tok or tried.get((model, version)) == tok:
        return
    tried[(model, version)] = tok
    await repo.load(model)


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
    applied = _lower_priority(boot["priority"])  # before torch starts any thread
    logging.basicConfig(level=boot.get("log_level", logging.WARNING), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s shadow-worker %(name)s: %(message)s")
    logging.getLogger("pyserve.traffic.shadow").info("worker %d at priority %s", os.getpid(), applied)
    _register(boot["backends"])
    asyncio.run(_worker(boot, os.dup(rfd), wfd))
    return 0


if __name__ == "__main__":
    sys.exit(main())
