"""The gRPC server: Open Inference Protocol v2 plus grpc.health.v1, on grpc.aio (engine ``aio``, the
default) or on the synchronous ``grpc.server`` (engine ``sync``); see :data:`GRPC_ENGINES`.

In-process use (tests, notebooks)::

    server = Server("models/", host="127.0.0.1", grpc_port=0)
    await server.start()            # binds, loads the repository, then reports SERVING
    print(server.bound_port)        # the port the OS chose for grpc_port=0
    ...
    await server.stop()             # stop accepting; in-flight RPCs get exit_timeout_s to finish

or from synchronous code, :class:`pyserve.server.ServerThread` runs one on its own event loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from pyserve._fileio import read_pem
from pyserve.protocol import codec
from pyserve.server.dataplane import EXTENSIONS, DataPlane
from pyserve.server.interceptors import BearerTokenInterceptor, InflightInterceptor, wrap_servicer
from pyserve.server.repository import ModelRepository
from pyserve.server.scheduler import DEFAULT_INLINE_MAX_US
from pyserve.server.servicer import InferenceServicer

__all__ = ["Server", "DEFAULT_MAX_MESSAGE_BYTES", "DEFAULT_GRPC_ENGINE", "DEFAULT_GRPC_THREADS",
           "DEFAULT_NATIVE_GRPC_THREADS", "GRPC_ENGINES", "read_tls_files"]

log = logging.getLogger("pyserve.server")

#: Default limit on request and response messages (issue 5: 64 MiB; gRPC's own default is 4 MiB).
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


#: The gRPC engines: ``sync`` hosts the services on the synchronous ``grpc.server`` (a thread pool of
#: ``grpc_threads``; ModelInfer of unbatched models runs entirely in the handler thread, see
#: :mod:`pyserve.server._sync_engine`), ``aio`` on ``grpc.aio`` (every RPC on the event loop),
#: ``native`` the sync engine's handlers on a grpc++ transport (``pyserve._grpc_native``, built when
#: libgrpc++-dev is installed; :mod:`pyserve.server._native_engine`).
GRPC_ENGINES = ("sync", "aio", "native")

#: The engine a Server uses when ``grpc_engine`` is not given: the ``PYSERVE_GRPC_ENGINE``
#: environment variable when set (one of :data:`GRPC_ENGINES`), else this.
DEFAULT_GRPC_ENGINE = "aio"  # sync measured slower on the quiet machine (docs/performance.md, "Server: the synchronous gRPC engine")

#: Handler threads of the sync engine. An open stream (ModelStreamInfer, a health Watch) holds one
#: for its lifetime, and so does a request waiting for the event loop (a batched model, a route);
#: RPCs beyond the free threads wait in the pool's queue. Measured on the 2-vCPU CI machine
#: (LeNet-300-100, concurrency 16, interleaved runs, process CPU per request): 4 threads about 760 µs,
#: 8 about 885 µs, 16 about 1160 µs (GIL hand-overs between more runnable threads), grpc.aio about
#: 1140 µs; 8 keeps most of the gain with more room for streams and slow requests.
DEFAULT_GRPC_THREADS = 8

#: Handler threads of the native engine (``threads + 1`` threads poll grpc++'s completion queue and
#: run the handlers; open streams run on threads of their own and requests waiting for the event
#: loop hold none, a request waiting for a dynamic batch holds one as on ``sync``). Fewer polling threads wake each other less: LeNet-300-100 at
#: batch 1, C++ closed-loop client, Zen 4, 2026-12-01, two runs each: 4 threads 4,512-4,829
#: infer/s at concurrency 4 and 5,840-6,357 at 16 (p99 7.7-10.3 ms), 8 threads 3,948-4,175 and
#: 5,194-5,473 (p99 20-21 ms), 2 threads 4,481-4,568 and 5,478-5,897.
DEFAULT_NATIVE_GRPC_THREADS = 4


#: A graceful stop ends the server once no RPC has started for this long (see Server._drained).
DRAIN_QUIET_S = 0.1


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class Server:
    """A pyserve gRPC server over one model repository.

    Parameters
    ----------
    model_repository : directory laid out as ``<model>/<version>/model.pyserve``.
    host, grpc_port : where to listen; ``grpc_port=0`` lets the OS choose (see :attr:`bound_port`).
    max_message_bytes : largest request and response message, both directions (default 64 MiB,
        :data:`DEFAULT_MAX_MESSAGE_BYTES`); larger messages get RESOURCE_EXHAUSTED.
    exit_timeout_s : grace period in-flight RPCs get on :meth:`stop`.
    infer_threads : size of the thread pool that loads models and runs inference
        (default ``min(4, cpu_count)``).
    extensions : protocol extensions listed in ServerMetadata (default: the implemented ones,
        ``model_configuration``, ``statistics``, ``model_repository``).
    model_control_mode : ``"none"`` (load every model at start; load/unload RPCs refused),
        ``"poll"`` (as none, then rescan the repository every ``repository_poll_s`` and load new,
        reload changed and unload removed models) or ``"explicit"`` (load ``startup_models`` at
        start, the rest through the repository RPCs).
    repository_poll_s : seconds between two scans in poll mode (> 0; default 15, as Triton).
    startup_models : models loaded at start in explicit mode; ``("*",)`` for all.
    metrics_port : serve Prometheus metrics on ``http://host:metrics_port/metrics`` (0: any free
        port, see :attr:`metrics_bound_port`); None (default): no metrics endpoint.
    traffic_config : a traffic config file (docs/traffic.md): routes, canary/A-B/shadow/interleave
        policies. Checked at :meth:`start` (TrafficConfigError, a ValueError, naming the field) and
        re-read every ``traffic_poll_s`` seconds when it changes. None: no routes until the
        ``pyserve.v1.TrafficControl`` admin RPCs add some.
    traffic_poll_s : seconds between checks of ``traffic_config``.
    shadow_isolation, shadow_priority : where traffic shadows run (``"process"``: a worker process at
        priority ``"idle"`` (SCHED_IDLE), ``"nice"`` or ``"normal"``; ``"inline"``: this process);
        see :class:`pyserve.server.traffic.TrafficRouter` and docs/traffic.md.
    tls_cert, tls_key : PEM files of the server's certificate (chain) and private key: serve TLS
        instead of plaintext. Both or neither.
    tls_client_ca : PEM file of the CA(s) client certificates must chain to: mutual TLS (a client
        without a valid certificate fails the handshake). Needs tls_cert and tls_key.
    auth_tokens : bearer tokens (e.g. from :func:`pyserve.server.interceptors.read_token_file`):
        every RPC but the gRPC health checks must carry ``authorization: Bearer <token>`` metadata,
        else UNAUTHENTICATED. None/empty: no authentication.
    inline_max_us : model executions measured below this many microseconds run on the event loop
        instead of the thread pool (two thread hand-overs saved per request; see
        :class:`pyserve.server.scheduler.ExecutionRunner`); 0: always the pool. Default 1000.
    grpc_engine : ``"sync"``, ``"aio"`` or ``"native"`` (:data:`GRPC_ENGINES`); None: the ``PYSERVE_GRPC_ENGINE``
        environment variable, else :data:`DEFAULT_GRPC_ENGINE`. With ``sync``, the direct (unbatched)
        executions of a backend with ``infer_sync`` run in the gRPC handler thread whatever
        ``inline_max_us`` says (the handler thread is a pool thread already); ``inline_max_us``
        still governs executions on the event loop (dynamic batches, routes). ``"native"``: the
        sync engine's handlers on grpc++ (:mod:`pyserve.server._native_engine`); ValueError when
        pyserve was built without libgrpc++-dev.
    grpc_threads : handler threads of the ``sync`` and ``native`` engines (default
        :data:`DEFAULT_GRPC_THREADS` for ``sync``, :data:`DEFAULT_NATIVE_GRPC_THREADS` for
        ``native``); every request waiting for a dynamic batch holds one; on ``sync`` so does
        every open stream and every request waiting for the event loop, on ``native`` neither.
    reflection : register gRPC server reflection (``grpc.reflection.v1alpha.ServerReflection``,
        what grpcio-reflection implements) for the inference and health services when
        grpcio-reflection is installed (the ``reflection`` extra); default True.

    Errors: ValueError naming the argument (bad values, unreadable TLS files).
    """

    def __init__(
        self,
        model_repository: str | os.PathLike,
        host: str = "0.0.0.0",
        grpc_port: int = 8001,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        exit_timeout_s: float = 30.0,
        infer_threads: int | None = None,
        extensions: Sequence[str] = EXTENSIONS,
        model_control_mode: str = "none",
        startup_models: Sequence[str] = (),
        metrics_port: int | None = None,
        traffic_config: str | os.PathLike | None = None,
        traffic_poll_s: float = 2.0,
        shadow_isolation: str = "process",
        shadow_priority: str = "idle",
        repository_poll_s: float = 15.0,
        tls_cert: str | os.PathLike | None = None,
        tls_key: str | os.PathLike | None = None,
        tls_client_ca: str | os.PathLike | None = None,
        auth_tokens: Sequence[str] | None = None,
        reflection: bool = True,
        inline_max_us: float = DEFAULT_INLINE_MAX_US,
        grpc_engine: str | None = None,
        grpc_threads: int | None = None,
    ) -> None:
        if grpc_engine is None:
            grpc_engine = os.environ.get("PYSERVE_GRPC_ENGINE") or DEFAULT_GRPC_ENGINE
            what = "PYSERVE_GRPC_ENGINE" if os.environ.get("PYSERVE_GRPC_ENGINE") else "grpc_engine"
        else:
            what = "grpc_engine"
        if grpc_engine not in GRPC_ENGINES:
            raise ValueError(f"{what} must be one of {', '.join(GRPC_ENGINES)}, got {grpc_engine!r}")
        if grpc_engine == "native":
            from pyserve.server._native_engine import require_native

            require_native()  # ValueError saying to install libgrpc++-dev and rebuild
        if grpc_threads is None:
            grpc_threads = DEFAULT_NATIVE_GRPC_THREADS if grpc_engine == "native" else DEFAULT_GRPC_THREADS
        if not isinstance(grpc_threads, int) or grpc_threads < 1:
            raise ValueError(f"grpc_threads must be an int >= 1, got {grpc_threads!r}")
        self.grpc_engine = grpc_engine
        self.grpc_threads = grpc_threads
        self._grpc_pool: ThreadPoolExecutor | None = None
        if max_message_bytes <= 0:
            raise ValueError(f"max_message_bytes must be > 0, got {max_message_bytes}")
        if exit_timeout_s < 0:
            raise ValueError(f"exit_timeout_s must be >= 0, got {exit_timeout_s}")
        if not repository_poll_s > 0:
            raise ValueError(f"repository_poll_s must be > 0, got {repository_poll_s}")
        self.repository_poll_s = float(repository_poll_s)
        self._poller: asyncio.Task | None = None
        self.model_repository = Path(model_repository)
        self.host = host
        self.grpc_port = int(grpc_port)
        self.max_message_bytes = int(max_message_bytes)
        self.exit_timeout_s = float(exit_timeout_s)
        self.infer_threads = infer_threads or max(1, min(4, os.cpu_count() or 1))
        self._executor: ThreadPoolExecutor | None = None
        if metrics_port is not None and not 0 <= metrics_port <= 65535:
            raise ValueError(f"metrics_port must be in 0..65535, got {metrics_port}")
        self.metrics_port = metrics_port
        self.metrics = None
        if metrics_port is not None:
            from pyserve.server.metrics import PrometheusMetrics

            self.metrics = PrometheusMetrics()
        self.repository = ModelRepository(
            self.model_repository, control_mode=model_control_mode, startup_models=startup_models,
            stats_sink=self.metrics, inline_max_us=inline_max_us,
        )
        self.dataplane = DataPlane(self.repository, extensions=extensions)
        from pyserve.server.traffic import TrafficRouter

        self.traffic = TrafficRouter(self.dataplane, config_path=traffic_config, poll_s=traffic_poll_s,
                                     registry=self.metrics.registry if self.metrics is not None else None,
                                     shadow_isolation=shadow_isolation, shadow_priority=shadow_priority)
        self.dataplane.router = self.traffic
        self._tls = read_tls_files(tls_cert, tls_key, tls_client_ca)
        self.auth_tokens = tuple(auth_tokens or ())
        self.reflection = bool(reflection)
        self.reflection_enabled = False
        if grpc_engine == "native":
            from pyserve.server._native_engine import NativeInflight

            self._inflight = NativeInflight()
        elif grpc_engine == "sync":
            from pyserve.server._sync_engine import SyncInflight

            self._inflight = SyncInflight()
        else:
            self._inflight = InflightInterceptor()
        self._grpc: grpc.aio.Server | grpc.Server | None = None
        self._health: health.aio.HealthServicer | None = None
        self.bound_port: int | None = None
        self._stopped: asyncio.Event | None = None

    @property
    def metrics_bound_port(self) -> int | None:
        """The port the metrics endpoint listens on (after :meth:`start`), or None without one."""
        return self.metrics.bound_port if self.metrics is not None else None

    @property
    def address(self) -> str:
        """``host:port`` actually bound (after :meth:`start`)."""
        return _address(self.host, self.bound_port if self.bound_port is not None else self.grpc_port)

    async def start(self) -> None:
        """Bind, start answering (live; not ready), load every model, then become ready/SERVING.

        Raises ValueError if the repository is not a directory, RuntimeError if the port cannot be
        bound. A model that fails to load does not raise: see :mod:`pyserve.server.repository`.
        """
        if self._grpc is not None:
            raise RuntimeError("server already started")
        self.repository.startup_names()  # fail fast on a missing directory or start-up model, before binding
        traffic_cfg = None
        if self.traffic.config_path is not None:  # fail fast on an invalid traffic config, before binding
            traffic_cfg = self.traffic.load_file()
            self.traffic.apply(traffic_cfg)
        if self.metrics is not None:
            self.metrics.start(self.host, self.metrics_port)  # RuntimeError naming the address
        self._stopped = asyncio.Event()
        self._stopping = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=self.infer_threads, thread_name_prefix="pyserve-infer")
        self.repository.executor = self._executor
        self.repository.handler_threads = self.grpc_threads if self.grpc_engine in ("sync", "native") else None
        options = [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
        if self.grpc_engine in ("sync", "native"):
            server = self._sync_server(options)
        else:
            server = self._aio_server(options)
        if self.reflection:
            self.reflection_enabled = _enable_reflection(server)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        try:
            address = _address(self.host, self.grpc_port)
            if self._tls is None:
                self.bound_port = server.add_insecure_port(address)
            else:
                creds = self._tls if self.grpc_engine == "native" else _server_credentials(*self._tls)
                self.bound_port = server.add_secure_port(address, creds)
        except RuntimeError as exc:
            self.bound_port = 0
            detail = f": {exc}"
        else:
            detail = ""
        if not self.bound_port:  # older grpc returns 0 instead of raising
            if self.metrics is not None:
                self.metrics.stop()
            self._executor.shutdown(wait=False)
            self._executor = None
            if self._grpc_pool is not None:
                self._grpc_pool.shutdown(wait=False)
                self._grpc_pool = None
            self.bound_port = None
            raise RuntimeError(f"cannot listen on {_address(self.host, self.grpc_port)}{detail}")
        self._grpc = server
        if self.grpc_engine in ("sync", "native"):
            server.start()
        else:
            await server.start()
        threads = f", {self.grpc_threads} handler threads" if self.grpc_engine in ("sync", "native") else ""
        log.info("listening on %s (gRPC engine %s%s); loading %s", self.address, self.grpc_engine, threads,
                 self.model_repository)
        await self.repository.load_all()
        if traffic_cfg is not None:
            # The versions a model serves are known only now: check the config in force again, and
            # refuse to start (TrafficConfigError, a ValueError) rather than serve a route whose
            # variants answer NOT_FOUND or UNAVAILABLE, or take different inputs.
            try:
                self.traffic.check_config(traffic_cfg)
            except ValueError:
                await self.stop(0)
                raise
        await self.traffic.start()
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        if self.repository.control_mode == "poll":
            self._poller = asyncio.ensure_future(self._poll_loop())

    def _auth_warning(self) -> None:
        if self._tls is None:
            log.warning("bearer-token auth without TLS: tokens travel in plaintext")

    def _aio_server(self, options) -> grpc.aio.Server:
        # error mapping and in-flight counting wrap pyserve's servicers once, here (wrap_servicer),
        # not as interceptors that grpc.aio would run on every call; only auth is an interceptor
        interceptors = []
        if self.auth_tokens:
            interceptors.append(BearerTokenInterceptor(self.auth_tokens))
            self._auth_warning()
        server = grpc.aio.server(interceptors=interceptors, options=options)
        codec.add_inference_servicer(
            wrap_servicer(InferenceServicer(self.dataplane), codec.SERVICE_NAME, self._inflight), server)
        from pyserve.protocol import traffic_codec
        from pyserve.server.traffic_service import TrafficControlServicer

        traffic_codec.add_traffic_servicer(
            wrap_servicer(TrafficControlServicer(self.traffic), traffic_codec.SERVICE_NAME, self._inflight), server)
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        return server

    def _sync_server(self, options) -> grpc.Server:
        """The synchronous ``grpc.server`` (engine ``sync``; :mod:`pyserve.server._sync_engine`) whose
        handlers hand work that needs the event loop to this (the running) loop."""
        from pyserve.protocol import traffic_codec
        from pyserve.server._sync_engine import SyncInferenceServicer, sync_servicer
        from pyserve.server.interceptors import SyncBearerTokenInterceptor
        from pyserve.server.traffic_service import TrafficControlServicer

        loop = asyncio.get_running_loop()
        interceptors = []
        if self.auth_tokens:
            interceptors.append(SyncBearerTokenInterceptor(self.auth_tokens))
            self._auth_warning()
        if self.grpc_engine == "native":  # the same handlers on the grpc++ transport and its worker threads
            from pyserve.server._native_engine import NativeServer

            server = NativeServer(self.grpc_threads, interceptors=interceptors, options=options)
            self._inflight.attach(server)
        else:
            self._grpc_pool = ThreadPoolExecutor(max_workers=self.grpc_threads, thread_name_prefix="pyserve-grpc")
            server = grpc.server(self._grpc_pool, interceptors=interceptors, options=options)
        codec.add_inference_servicer(
            SyncInferenceServicer(self.dataplane, InferenceServicer(self.dataplane), loop, self._inflight), server)
        traffic_codec.add_traffic_servicer(
            sync_servicer(TrafficControlServicer(self.traffic), traffic_codec.SERVICE_NAME, loop, self._inflight),
            server)
        self._health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        return server

    async def _poll_loop(self) -> None:
        """Poll mode: rescan the repository every ``repository_poll_s`` until :meth:`stop`."""
        while True:
            try:
                await asyncio.wait_for(self._stopping.wait(), self.repository_poll_s)
                return  # stopping: a scan in progress was let finish
            except asyncio.TimeoutError:
                pass
            try:
                await self.repository.poll()
            except Exception:  # a bug in one scan must not end polling
                log.exception("repository poll failed")

    async def _set_health(self, status) -> None:
        for service in ("", codec.SERVICE_NAME):
            if self.grpc_engine in ("sync", "native"):
                self._health.set(service, status)
            else:
                await self._health.set(service, status)

    async def stop(self, grace_s: float | None = None) -> None:
        """Graceful stop: health NOT_SERVING at once (pushed to Watch streams), new RPCs refused
        (UNAVAILABLE), running unary RPCs (until gRPC has sent their status) and running inferences
        of streams get ``grace_s`` seconds (default ``exit_timeout_s``) to finish; then what is left
        (long-lived streams, RPCs past the grace period) is cancelled, the poller stopped and the
        models unloaded."""
        if self._grpc is None or self._stopped is None or self._stopped.is_set():
            return
        grace = self.exit_timeout_s if grace_s is None else grace_s
        t0 = time.monotonic()
        self.dataplane.stopping = True
        sync = self.grpc_engine in ("sync", "native")
        if sync:
            self._health.enter_graceful_shutdown()  # NOT_SERVING at once, pushed to Watch streams
        else:
            await self._health.enter_graceful_shutdown()
        self._stopping.set()
        # refuse new RPCs at once; the running ones get the grace period, timed by the wait below
        # (gRPC's own grace is only a backstop, a little longer, so that the warning below is logged)
        if sync:
            self._grpc.stop(grace + 1.0)  # returns at once (an Event); with a grace it does not block
        else:
            # grpc.aio keeps accepting until the drain is over and pyserve answers the new RPCs
            # UNAVAILABLE itself: stopping grpc.aio now would end calls it has received but not yet
            # handed to this (busy) loop with CANCELLED (tests/server/test_shutdown.py, under load)
            self._inflight.refusing = True
        await asyncio.sleep(0)
        try:
            await asyncio.wait_for(self._drained(), grace)
        except asyncio.TimeoutError:
            log.warning("exit timeout (%.1f s): cancelling %d RPC(s) still running (%d inference request(s))",
                        grace, self._inflight.count, self.repository.inflight())
        if self._inflight.streams:  # let the last responses of inference streams reach the wire
            await asyncio.sleep(0.1)
        # nothing with a single response is running any more: end the streams (health Watch, idle
        # ModelStreamInfer) now rather than waiting for them until the grace period is over
        if sync:  # stop(None) cancels what is left and blocks until gRPC has shut down: not on the loop
            await asyncio.get_running_loop().run_in_executor(None, self._grpc.stop, None)
        else:
            await self._grpc.stop(None)
        await self.traffic.stop()
        if self._poller is not None:
            await asyncio.gather(self._poller, return_exceptions=True)
            self._poller = None
        log.info("drained in %.3f s", time.monotonic() - t0)
        await self.repository.unload_all()
        if self.metrics is not None:
            self.metrics.stop()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        if self._grpc_pool is not None:
            self._grpc_pool.shutdown(wait=False, cancel_futures=True)
        self._stopped.set()
        log.info("stopped")

    def _busy(self) -> int:
        return self._inflight.count + self.repository.inflight()

    async def _drained(self) -> None:
        """Return once no unary RPC and no inference (also those of streams) is running and no
        unary RPC has started for :data:`DRAIN_QUIET_S`. gRPC may have accepted RPCs just before the
        stop whose handlers have not run yet (on a busy event loop that takes tens of milliseconds);
        ending the server at the first idle moment would cancel them (CANCELLED) instead of letting
        them finish."""
        while True:
            await self._inflight.idle()
            await self.repository.drained()
            if self._busy():
                continue
            started = self._inflight.started
            await asyncio.sleep(DRAIN_QUIET_S)
            if not self._busy() and self._inflight.started == started:
                return

    async def wait_for_termination(self) -> None:
        """Wait until :meth:`stop` has finished."""
        if self._stopped is not None:
            await self._stopped.wait()

    async def __aenter__(self) -> "Server":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()


def read_tls_files(cert, key, client_ca) -> tuple[bytes, bytes, bytes | None] | None:
    """PEM bytes of (certificate chain, private key, client CA or None), or None without TLS.

    ValueError naming the argument when only one of cert/key is given, a client CA comes without
    them, or a file cannot be read or is not PEM."""
    if cert is None and key is None:
        if client_ca is not None:
            raise ValueError("tls_client_ca needs tls_cert and tls_key")
        return None
    if cert is None or key is None:
        raise ValueError("tls_cert and tls_key go together; got only " + ("tls_cert" if key is None else "tls_key"))
    out = []
    for what, path in (("tls_cert", cert), ("tls_key", key), ("tls_client_ca", client_ca)):
        if path is None:
            out.append(None)
            continue
        out.append(read_pem(path, what, key=what == "tls_key"))
    return out[0], out[1], out[2]


def _server_credentials(cert: bytes, key: bytes, client_ca: bytes | None):
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def _enable_reflection(server) -> bool:
    """Register gRPC reflection for the inference, traffic-admin and health services (and reflection itself).

    pyserve's stubs live in a private descriptor pool (see tools/gen_protos.py); health and
    reflection in protobuf's default pool. Reflection looks symbols up in both. False (logged) when
    grpcio-reflection is not installed.
    """
    try:
        from grpc_reflection.v1alpha import reflection
    except ImportError:
        log.info("grpcio-reflection is not installed (pip install 'pyserve[reflection]'): no server reflection")
        return False
    from pyserve.protocol import traffic_codec

    names = (codec.SERVICE_NAME, traffic_codec.SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server, pool=codec.reflection_pool())
    return True
