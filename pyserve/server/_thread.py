"""Run a :class:`~pyserve.server.server.Server` on its own event loop in a background thread."""

from __future__ import annotations

import asyncio
import threading

from pyserve.server.server import Server

__all__ = ["ServerThread"]


class ServerThread:
    """A server for synchronous callers (tests, notebooks, benchmarks)::

        with ServerThread("models/", host="127.0.0.1", grpc_port=0) as srv:
            client = tritonclient.grpc.InferenceServerClient(srv.url)

    Arguments are those of :class:`Server`. :meth:`start` returns once the repository has loaded
    (or raises what :meth:`Server.start` raised); :meth:`stop` stops gracefully and joins.
    """

    def __init__(self, *args, **kwargs) -> None:
        self.server = Server(*args, **kwargs)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None

    @property
    def bound_port(self) -> int | None:
        return self.server.bound_port

    @property
    def url(self) -> str:
        """``localhost:PORT`` (or ``host:PORT`` for a specific host) for clients."""
        host = self.server.host
        host = "localhost" if host in ("0.0.0.0", "::", "[::]") else host
        return f"{host}:{self.server.bound_port}"

    def start(self, timeout_s: float = 120.0) -> "ServerThread":
        self._thread = threading.Thread(target=self._run, name="pyserve-server", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout_s):
            raise TimeoutError(f"server did not start within {timeout_s} s")
        if self._error is not None:
            self._thread.join()
            raise self._error
        return self

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self.server.start())
        except BaseException as exc:  # reported to start()'s caller
            self._error = exc
            self._started.set()
            loop.close()
            return
        self._started.set()
        try:
            loop.run_until_complete(self.server.wait_for_termination())
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def stop(self, grace_s: float | None = None, timeout_s: float = 60.0) -> None:
        if self._loop is None or self._thread is None or not self._thread.is_alive():
            return
        future = asyncio.run_coroutine_threadsafe(self.server.stop(grace_s), self._loop)
        future.result(timeout_s)
        self._thread.join(timeout_s)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
