"""The gRPC server: Open Inference Protocol v2 plus grpc.health.v1, on grpc.aio.

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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from pyserve.protocol import codec
from pyserve.server.dataplane import EXTENSIONS, DataPlane
from pyserve.server.interceptors import ErrorInterceptor
from pyserve.server.repository import ModelRepository
from pyserve.server.servicer import InferenceServicer

__all__ = ["Server", "DEFAULT_MAX_MESSAGE_BYTES"]

log = logging.getLogger("pyserve.server")

DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class Server:
    """A pyserve gRPC server over one model repository.

    Parameters
    ----------
    model_repository : directory laid out as ``<model>/<version>/model.pyserve``.
    host, grpc_port : where to listen; ``grpc_port=0`` lets the OS choose (see :attr:`bound_port`).
    max_message_bytes : largest request and response message, both directions (default 256 MiB).
    exit_timeout_s : grace period in-flight RPCs get on :meth:`stop`.
    infer_threads : size of the thread pool that loads models and runs inference
        (default ``min(4, cpu_count)``).
    extensions : protocol extensions listed in ServerMetadata (default: the implemented ones,
        ``model_configuration``, ``statistics``, ``model_repository``).
    model_control_mode : ``"none"`` (load every model at start; load/unload RPCs refused) or
        ``"explicit"`` (load ``startup_models`` at start, the rest through the repository RPCs).
    startup_models : models loaded at start in explicit mode; ``("*",)`` for all.
    metrics_port : serve Prometheus metrics on ``http://host:metrics_port/metrics`` (0: any free
        port, see :attr:`metrics_bound_port`); None (default): no metrics endpoint.
    traffic_config : a traffic config file (docs/traffic.md): routes, canary/A-B/shadow/interleave
        policies. Checked at :meth:`start` (TrafficConfigError, a ValueError, naming the field) and
        re-read every ``traffic_poll_s`` seconds when it changes. None: no routes until the
        ``pyserve.v1.TrafficControl`` admin RPCs add some.
    traffic_poll_s : seconds between checks of ``traffic_config``.
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
    ) -> None:
        if max_message_bytes <= 0:
            raise ValueError(f"max_message_bytes must be > 0, got {max_message_bytes}")
        if exit_timeout_s < 0:
            raise ValueError(f"exit_timeout_s must be >= 0, got {exit_timeout_s}")
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
            stats_sink=self.metrics,
        )
        self.dataplane = DataPlane(self.repository, extensions=extensions)
        from pyserve.server.traffic import TrafficRouter

        self.traffic = TrafficRouter(self.dataplane, config_path=traffic_config, poll_s=traffic_poll_s,
                                     registry=self.metrics.registry if self.metrics is not None else None)
        self.dataplane.router = self.traffic
        self._grpc: grpc.aio.Server | None = None
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
        if self.traffic.config_path is not None:  # fail fast on an invalid traffic config, before binding
            self.traffic.apply(self.traffic.load_file())
        if self.metrics is not None:
            self.metrics.start(self.host, self.metrics_port)  # RuntimeError naming the address
        self._stopped = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=self.infer_threads, thread_name_prefix="pyserve-infer")
        self.repository.executor = self._executor
        options = [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
        server = grpc.aio.server(interceptors=[ErrorInterceptor()], options=options)
        InferenceServicer(self.dataplane).add_to_server(server)
        from pyserve.server.traffic_service import TrafficControlServicer

        TrafficControlServicer(self.traffic).add_to_server(server)
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        try:
            self.bound_port = server.add_insecure_port(_address(self.host, self.grpc_port))
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
            self.bound_port = None
            raise RuntimeError(f"cannot listen on {_address(self.host, self.grpc_port)}{detail}")
        self._grpc = server
        await server.start()
        log.info("listening on %s; loading %s", self.address, self.model_repository)
        await self.repository.load_all()
        await self.traffic.start()
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)

    async def _set_health(self, status) -> None:
        for service in ("", codec.SERVICE_NAME):
            await self._health.set(service, status)

    async def stop(self, grace_s: float | None = None) -> None:
        """Graceful stop: health NOT_SERVING, refuse new RPCs, give in-flight ones ``grace_s``
        (default ``exit_timeout_s``) to finish, cancel the rest, unload the models."""
        if self._grpc is None or self._stopped is None or self._stopped.is_set():
            return
        grace = self.exit_timeout_s if grace_s is None else grace_s
        self.dataplane.stopping = True
        await self._health.enter_graceful_shutdown()
        await self._grpc.stop(grace)
        await self.traffic.stop()
        await self.repository.unload_all()
        if self.metrics is not None:
            self.metrics.stop()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        self._stopped.set()
        log.info("stopped")

    async def wait_for_termination(self) -> None:
        """Wait until :meth:`stop` has finished."""
        if self._stopped is not None:
            await self._stopped.wait()

    async def __aenter__(self) -> "Server":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()
