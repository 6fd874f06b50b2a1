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
grpc: 392 MB resident, 258 MB private, measured with three LeNet shadows), and per mirrored request
one pickled copy of the request's inputs and of the primary's outputs through a pipe (the server
does that encoding on its event loop, off the request path: a LeNet job is 3.6 kB, about 0.1 ms to
encode measured on the 2-vCPU machine at load average 18). Under CPU pressure
from anything at normal priority the worker waits; the server's bounded per-route queue then fills
and further shadow copies are dropped and counted, which is the intended behaviour: shadows use
only CPU time nobody else wants.

Backends the worker cannot import are not run there: a backend registered as ``"module:attr"`` is
imported by name, one registered as a class or function by its module's name when that is how the
server imported it, else from its module's file (plug-ins loaded with importlib from a path);
anything else (a class defined in a function, a lambda) runs in the server process as before
(:meth:`ShadowProcess.portable`).

Wire format on the worker's stdin/stdout: a 4-byte big-endian length, then a pickle. Both ends are
the same program version started by the server; nothing else writes to these pipes (the worker
moves its stdout to a private descriptor and points descriptor 1 at stderr, so a stray print
cannot corrupt the stream).
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
from dataclasses import dataclass, replace
from typing import Any

__all__ = ["ShadowProcess", "ShadowResult", "PRIORITIES"]

log = logging.getLogger("pyserve.traffic.shadow")

#: ``idle``: SCHED_IDLE (fallback nice 19); ``nice``: nice 19 only; ``normal``: unchanged (for comparison).
PRIORITIES = ("idle", "nice", "normal")
#: Seconds the server waits before starting a worker again after one exited unexpectedly.
RESTART_BACKOFF_S = 5.0
_HEADER = struct.Struct(">I")


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


class ShadowProcess:
    """The server side of the shadow worker (see the module docstring).

    Parameters
    ----------
    repository_root : the model repository directory the server serves.
    priority : one of :data:`PRIORITIES` (default ``idle``).

    :meth:`run` sends one job and waits for its result; one worker process serves every route (jobs
    run one at a time, in the order sent). The process starts on the first job and is started again
    (after :data:`RESTART_BACKOFF_S`) if it exits; jobs in flight when it exits fail with the
    reason. Only coroutines of the server's event loop call it.
    """

    def __init__(self, repository_root: str | os.PathLike, *, priority: str = "idle") -> None:
        if priority not in PRIORITIES:
            raise ValueError(f"priority must be one of {', '.join(PRIORITIES)}, got {priority!r}")
        self.root = os.fspath(repository_root)
        self.priority = priority
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task | None = None
        self._pending: dict[int, asyncio.Future] = {}
        self._ids = itertools.count(1)
        self._lock = asyncio.Lock()
        self._down_until = 0.0
        self._down_reason = ""
        self._refs: list[tuple[str, str, str, str, str]] | None = None
        #: worker processes started (tests, status)
        self.starts = 0

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.returncode is None else None

    def portable(self, backend: str) -> bool:
        """True if the worker can import backend ``backend`` (else its shadows run in the server)."""
        if self._refs is None:
            self._refs = _backend_refs()
        return any(r[0] == backend for r in self._refs)

    async def _ensure(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            return
        async with self._lock:
            if self._proc is not None and self._proc.returncode is None:
                return
            if time.monotonic() < self._down_until:
                raise RuntimeError(self._down_reason)
            self._refs = _backend_refs()
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "pyserve.server._shadow_process",
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env,
                limit=1 << 26)
            self.starts += 1
            boot = {"root": self.root, "priority": self.priority, "backends": self._refs,
                    "log_level": logging.getLogger().getEffectiveLevel()}
            self._write(boot)
            self._reader = asyncio.get_running_loop().create_task(self._read(self._proc),
                                                                  name="pyserve-shadow-process-reader")
            log.info("shadow worker process %d started (priority %s)", self._proc.pid, self.priority)

    def _write(self, obj) -> None:
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        self._proc.stdin.write(_HEADER.pack(len(data)) + data)

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        try:
            while True:
                head = await proc.stdout.readexactly(_HEADER.size)
                (n,) = _HEADER.unpack(head)
                job, ok, latency_s, div, error = pickle.loads(await proc.stdout.readexactly(n))
                fut = self._pending.pop(job, None)
                if fut is not None and not fut.done():
                    fut.set_result(ShadowResult(ok, latency_s, div, error))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("shadow worker process: bad message")
            proc.kill()
        code = await proc.wait()
        reason = f"the shadow worker process exited (code {code})"
        if self._proc is proc:
            self._down_until = time.monotonic() + RESTART_BACKOFF_S
            self._down_reason = f"{reason}; restarting it in at most {RESTART_BACKOFF_S:g} s"
            log.error("%s; jobs in flight fail", reason)
        for job, fut in list(self._pending.items()):
            if not fut.done():
                fut.set_result(ShadowResult(False, 0.0, None, reason))
            self._pending.pop(job, None)

    async def run(self, model: str, version: str, token: tuple, request, primary: dict) -> ShadowResult:
        """Run ``request`` (an :class:`~pyserve.protocol.types.InferRequest`) on ``model`` version
        ``version`` in the worker and compare with ``primary`` (output name -> array). ``token``:
        the server's ``(fingerprint, config)`` of that version; the worker reloads the model when
        its own differs. Never raises for a failure of the shadow: the result says ``ok=False``
        and why."""
        try:
            await self._ensure()
        except Exception as exc:  # noqa: BLE001 - a worker that cannot start is a shadow failure
            return ShadowResult(False, 0.0, None, f"shadow worker process unavailable: {exc}")
        job = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[job] = fut
        try:
            self._write({"job": job, "model": model, "version": version, "token": token,
                         "request": replace(request, model_name=model, model_version=version),
                         "primary": primary})
            await self._proc.stdin.drain()
            return await fut
        except (ConnectionError, BrokenPipeError) as exc:
            return ShadowResult(False, 0.0, None, f"the shadow worker process is gone: {exc}")
        finally:
            self._pending.pop(job, None)

    async def stop(self, timeout_s: float = 1.0) -> None:
        """End the worker (closes its input; kills it after ``timeout_s``)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.returncode is None:
            try:
                proc.stdin.close()
                await asyncio.wait_for(proc.wait(), timeout_s)
            except (asyncio.TimeoutError, ConnectionError, ProcessLookupError):
                proc.kill()
                await proc.wait()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)
            self._reader = None


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
    from pyserve.traffic import divergence

    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 26)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(rfd, "rb", buffering=0))
    out = os.fdopen(wfd, "wb", buffering=0)
    repo = ModelRepository(boot["root"], control_mode="explicit")
    repo.loaded = True
    plane = DataPlane(repo)
    tried: dict[tuple[str, str], tuple] = {}

    def send(obj) -> None:
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        out.write(_HEADER.pack(len(data)) + data)

    while True:
        try:
            head = await reader.readexactly(_HEADER.size)
        except asyncio.IncompleteReadError:
            return  # the server closed our input: stop
        (n,) = _HEADER.unpack(head)
        msg = pickle.loads(await reader.readexactly(n))
        t0 = time.perf_counter()
        try:
            await _fresh(repo, msg["model"], msg["version"], msg["token"], tried)
            resp = await plane.infer_model(msg["request"])
            latency = time.perf_counter() - t0
            div = divergence(msg["primary"], {t.name: t.data for t in resp.outputs})
            result = (True, latency, div, "")
        except ServingError as exc:
            result = (False, time.perf_counter() - t0, None, f"{exc.code}: {exc}")
        except Exception as exc:  # noqa: BLE001 - reported to the server, which counts it
            logging.getLogger("pyserve.traffic.shadow").exception("shadow job on %r failed", msg["model"])
            result = (False, time.perf_counter() - t0, None, f"INTERNAL: {type(exc).__name__}: {exc}")
        send((msg["job"], *result))  # plain values: this module runs as __main__ here


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
