"""The native gRPC engine: the sync engine's services on a grpc++ transport (``pyserve._grpc_native``).

Why: gRPC's Python layer costs about 410 µs of server CPU per RPC on grpc.aio and 211-451 µs on
the synchronous ``grpc.server`` for a handler that does nothing (``benchmarks/server/grpc_floor.py``;
docs/performance.md, "The gRPC floor"), more than pyserve's own work and LeNet's inference together.
grpc++ polls, parses HTTP/2 and frames messages in C++ threads without the GIL.

:class:`NativeServer` has the shape of ``grpc.Server`` that :mod:`pyserve.server.server` uses for the
``sync`` engine (``add_generic_rpc_handlers``, ``add_registered_method_handlers``,
``add_insecure_port``, ``add_secure_port``, ``start``, ``stop``), so that the native engine is the
sync engine with another transport: the same :class:`~pyserve.server._sync_engine.SyncInferenceServicer`,
traffic-admin, health and reflection servicers and the same
:class:`~pyserve.server.interceptors.SyncBearerTokenInterceptor` are registered on it, as
``grpc.RpcMethodHandler`` objects, and called with a :class:`_Context` that implements the parts of
``grpc.ServicerContext`` they use.

Per RPC: ``threads + 1`` C++ threads poll grpc++'s completion queue without the GIL; the one that
has read a new RPC's first request message takes the GIL and calls :meth:`NativeServer._dispatch`
itself (no hand-off to another thread): find the handler (through the interceptors), deserialize,
call it, serialize, and finish the RPC (a unary response and its status go out in one grpc++
operation). At most ``threads`` handlers run at once; RPCs beyond wait in a FIFO, and the thread
more than ``threads`` always polls. Streams read and write through the call, blocking the handler's
thread with the GIL released; a stream gives its handler slot back when it starts (one more polling
thread starts, and the stream's thread leaves when its handler returns), so open streams (a health
Watch, ModelStreamInfer) do not make unary RPCs wait, up to ``max_stream_threads`` streams at once.
Cancellation (client, deadline, shutdown) and the end of the RPC run the context's ``add_callback``
callbacks on one separate control thread, so they run even when every handler thread is blocked.

Unknown methods end UNIMPLEMENTED; a handler that raises ends UNKNOWN (as ``grpc.server``); oversize
messages are refused by grpc++ with RESOURCE_EXHAUSTED.

Errors: :func:`require_native` raises ValueError when the extension was not built (no libgrpc++).
"""

from __future__ import annotations

import atexit
import collections
import logging
import math
import re
import threading
import time
import weakref

import grpc

from pyserve.server._sync_engine import Deferred, SyncInflight

__all__ = ["NativeInflight", "NativeServer", "native_available", "require_native"]

log = logging.getLogger("pyserve.server")

_UNAVAILABLE_HELP = ("grpc_engine 'native' needs the pyserve._grpc_native extension, which this build of "
                     "pyserve does not have: install libgrpc++-dev and rebuild pyserve (pkg-config must find "
                     "grpc++; pip install --no-build-isolation -e .)")


def native_available() -> bool:
    """True when ``pyserve._grpc_native`` imports (pyserve was built with grpc++)."""
    try:
        import pyserve._grpc_native  # noqa: F401
    except ImportError:
        return False
    return True


def require_native():
    """The ``pyserve._grpc_native`` module; ValueError saying how to get it when it is missing."""
    try:
        import pyserve._grpc_native as native
    except ImportError as exc:
        raise ValueError(f"{_UNAVAILABLE_HELP} ({exc})") from None
    return native


class _HandlerCallDetails(collections.namedtuple("_HandlerCallDetails", ("method", "invocation_metadata")),
                          grpc.HandlerCallDetails):
    pass


class _Abort(Exception):
    """Raised by :meth:`_Context.abort` (grpc.server raises a bare Exception there too)."""


_OK = grpc.StatusCode.OK.value[0]
_CODES = {c.value[0]: c for c in grpc.StatusCode}


_DEFERRED_CANCELLED = "the RPC ended before its answer was ready"


def _noop() -> None:
    pass


_METADATA_KEY = re.compile(r"[0-9a-z_.\-]+\Z")


def _metadata_problem(metadata) -> str | None:
    """Why grpc++ would refuse ``metadata`` (pairs of key, value), or None if it is valid: keys are
    lowercase ``[0-9a-z_.-]``; values of keys ending in ``-bin`` are bytes or str, others printable
    ASCII str (0x20-0x7E)."""
    try:
        pairs = list(metadata or ())
        for key, value in pairs:
            if not isinstance(key, str) or not _METADATA_KEY.match(key):
                return f"key {key!r} is not lowercase [0-9a-z_.-]"
            if key.endswith("-bin"):
                if not isinstance(value, (bytes, str)):
                    return f"value of {key!r} is {type(value).__name__}, not bytes or str"
            elif not isinstance(value, str) or not all(" " <= ch <= "~" for ch in value):
                return f"value of {key!r} is not printable ASCII text (binary values need a '-bin' key)"
    except (TypeError, ValueError):
        return "metadata must be pairs of (key, value)"
    return None


class _Context(grpc.ServicerContext):
    """``grpc.ServicerContext`` over one native call (only the handler thread uses it, but for
    ``add_callback``, ``is_active`` and ``cancel``)."""

    __slots__ = ("_call", "_callbacks", "_ended", "_lock", "_code", "_details", "_trailing", "_metadata")

    deferrable = True  # a unary handler may answer with a Deferred (pyserve.server._sync_engine)

    def __init__(self, call) -> None:
        self._call = call
        self._callbacks: list = []
        self._ended = False
        self._lock = threading.Lock()
        self._code: grpc.StatusCode | None = None
        self._details: str | None = None
        self._trailing = None
        self._metadata = None
        self._initial_sent = False
        self._invalid_metadata: str | None = None
        self._deferred = False  # the handler returned a Deferred

    # --- the RPC -------------------------------------------------------------------------------
    def invocation_metadata(self):
        if self._metadata is None:
            self._metadata = self._call.metadata
        return self._metadata

    def peer(self) -> str:
        return self._call.peer

    def peer_identities(self):
        return None

    def peer_identity_key(self):
        return None

    def auth_context(self) -> dict:
        return {}

    def time_remaining(self) -> float | None:
        deadline = self._call.deadline
        if math.isinf(deadline):
            return None
        return max(0.0, deadline - time.time())

    def is_active(self) -> bool:
        return self._call.is_active()

    def cancel(self) -> None:
        self._call.cancel()

    def add_callback(self, callback) -> bool:
        """Run ``callback()`` when the RPC ends (cancelled or done); False if it already has.

        The first callback registers this context with the call, so that the transport reports the
        end (an RPC without callbacks costs no end-of-RPC task)."""
        with self._lock:
            if self._ended:
                return False
            self._callbacks.append(callback)
            first = len(self._callbacks) == 1
        if first:
            self._call.context = self
            if self._call.cancelled():  # cancelled before the transport knew of this context
                self._end()
            elif self._call.done():  # over before it knew of this context: no end notice will come
                self._end()
                self._call.context = None  # (the call and this context would hold each other)
        return True

    def _end(self) -> None:
        with self._lock:
            if self._ended:
                return
            self._ended = True
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            try:
                callback()
            except Exception:  # one broken callback must not skip the others
                log.exception("RPC termination callback failed")
        if self._deferred:  # its future may never end: an unanswered RPC must still be finished
            self._call.finish(grpc.StatusCode.CANCELLED.value[0], _DEFERRED_CANCELLED)

    # --- status --------------------------------------------------------------------------------
    def abort(self, code, details):
        if code == grpc.StatusCode.OK:
            log.error("abort() called with StatusCode.OK; returning UNKNOWN")
            code = grpc.StatusCode.UNKNOWN
        self._code, self._details = code, details
        raise _Abort()

    def abort_with_status(self, status):
        self._trailing = status.trailing_metadata
        self.abort(status.code, status.details)

    def set_code(self, code) -> None:
        self._code = code

    def set_details(self, details) -> None:
        self._details = details

    def code(self):
        return self._code

    def details(self):
        return self._details

    def set_trailing_metadata(self, trailing_metadata) -> None:
        # grpc++ aborts the whole process on metadata it cannot send: refuse it here instead, and
        # end the call INTERNAL as grpc.server does
        problem = _metadata_problem(trailing_metadata)
        if problem:
            self._invalid_metadata = problem
            self._trailing = None
            return
        self._trailing = trailing_metadata

    def trailing_metadata(self):
        return self._trailing

    def send_initial_metadata(self, initial_metadata) -> None:
        if self._initial_sent:  # a second send is an API misuse that grpc++ answers by aborting
            raise ValueError("Initial metadata no longer allowed!")
        problem = _metadata_problem(initial_metadata)
        if problem:
            raise ValueError(f"Invalid metadata: {problem}")
        self._initial_sent = True
        self._call.send_initial_metadata(initial_metadata)

    def set_compression(self, compression) -> None:
        pass

    def disable_next_message_compression(self) -> None:
        pass

    def _status(self) -> tuple[int, str]:
        if self._invalid_metadata:
            return grpc.StatusCode.INTERNAL.value[0], f"Invalid metadata: {self._invalid_metadata}"
        code = self._code
        return (_OK if code is None else code.value[0]), (self._details or "")


def _request_iterator(call, first, deserializer):
    if first is None:
        return
    yield deserializer(first) if deserializer else first
    while True:
        data = call.read()
        if data is None:
            return
        yield deserializer(data) if deserializer else data


class NativeInflight(SyncInflight):
    """:class:`~pyserve.server._sync_engine.SyncInflight` for the native engine: a unary RPC is counted
    by the transport from ``begin`` until grpc++ has finished it (no end-of-RPC callback into Python);
    streams are counted as by the sync engine. :meth:`attach` the :class:`NativeServer` first."""

    def __init__(self) -> None:  # SyncInflight's, but ``count`` is the property below
        self._lock = threading.Lock()
        self.streams = 0
        self.started = 0
        self._engine = None

    def attach(self, server: "NativeServer") -> None:
        self._engine = server._engine

    @property
    def count(self) -> int:
        return self._engine.counted() if self._engine is not None else 0

    def begin(self, context) -> None:
        with self._lock:
            self.started += 1
        context._call.count_until_done()


_live: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:  # worker threads must be joined before the interpreter goes away
    for server in list(_live):
        server.stop(None)


class NativeServer:
    """A ``grpc.Server``-shaped server on ``pyserve._grpc_native`` (see the module docstring).

    Parameters
    ----------
    threads : unary handlers that run at once; one more thread polls.
    interceptors : ``grpc.ServerInterceptor`` objects, applied in order as ``grpc.server`` does.
    options : gRPC channel options; ``grpc.max_receive_message_length`` and
        ``grpc.max_send_message_length`` (bytes) are used, the rest ignored.
    max_stream_threads : streams (streaming requests or responses) that each run on a thread of
        their own rather than holding one of the ``threads`` slots for as long as they stay open;
        past this many at once (or when no thread can be started) a new stream holds a slot until
        it ends (default 256).

    One port per server: the first ``add_*_port`` binds and starts the grpc++ server, so the port is
    known at once (handlers must be registered before it); :meth:`start` is then a no-op.
    Errors: ValueError when the extension is missing (:func:`require_native`) or on bad arguments.
    """

    def __init__(self, threads: int, interceptors=(), options=(), max_stream_threads: int = 256) -> None:
        native = require_native()
        if not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be an int >= 1, got {threads!r}")
        if not isinstance(max_stream_threads, int) or max_stream_threads < 0:
            raise ValueError(f"max_stream_threads must be an int >= 0, got {max_stream_threads!r}")
        opts = dict(options)
        self._max_receive = int(opts.get("grpc.max_receive_message_length", 4 * 1024 * 1024))
        self._max_send = int(opts.get("grpc.max_send_message_length", 2**31 - 1))
        if self._max_send < 0:
            self._max_send = 2**31 - 1
        self._interceptors = tuple(interceptors)
        self._methods: dict = {}
        self._generic: list = []
        self._engine = native.Engine(self._dispatch, self._ended, threads, max_stream_threads)
        self._bound = False
        self._stop_lock = threading.Lock()
        self._stopped = threading.Event()
        _live.add(self)

    # --- registration (what the generated add_*_to_server functions call) -----------------------
    def add_generic_rpc_handlers(self, generic_rpc_handlers) -> None:
        self._generic.extend(generic_rpc_handlers)

    def add_registered_method_handlers(self, service_name, method_handlers) -> None:
        for name, handler in method_handlers.items():
            self._methods.setdefault(f"/{service_name}/{name}", handler)

    def add_insecure_port(self, address: str) -> int:
        return self._bind(address, None)

    def add_secure_port(self, address: str, credentials) -> int:
        """``credentials``: (certificate chain PEM bytes, private key PEM bytes, client CA PEM bytes
        or None) — mutual TLS when a client CA is given (pyserve.server.server.read_tls_files)."""
        if not (isinstance(credentials, tuple) and len(credentials) == 3):
            raise ValueError("NativeServer.add_secure_port: credentials must be (cert_chain, private_key, "
                             "client_ca or None) PEM bytes")
        return self._bind(address, credentials)

    def _bind(self, address: str, tls) -> int:
        if self._bound:
            raise ValueError("NativeServer: one listening port per server")
        self._bound = True
        port = self._engine.start(address, self._max_receive, self._max_send, tls)
        if not port:
            raise RuntimeError(self._engine.error or f"cannot bind {address}")
        return port

    def start(self) -> None:
        if not self._bound:
            raise RuntimeError("NativeServer.start: add a port first")

    def stop(self, grace: float | None) -> threading.Event:
        """As ``grpc.Server.stop``: new RPCs are refused (UNAVAILABLE) at once; with ``grace`` None
        what still runs is cancelled now and this blocks until the server has shut down (running
        handlers have returned and the threads are joined), else the running RPCs get up to
        ``grace`` seconds (in the background) and the returned Event is set at the end, as soon as
        none is left. Called from a handler or an ``add_callback`` callback of this server (which
        cannot wait for itself), the shutdown goes on in the background and the Event says when it
        is over."""
        if not self._bound:
            self._stopped.set()
            return self._stopped
        self._engine.refuse()
        if grace is None and not self._engine.on_engine_thread():
            self._shutdown(0.0)
        else:  # a later stop(None) must not wait for this grace period: a thread, not Shutdown(deadline)
            waiter = threading.Thread(target=self._after_grace, args=(0.0 if grace is None else float(grace),),
                                      name="pyserve-native-stop", daemon=True)
            waiter.start()
        return self._stopped

    def _after_grace(self, grace: float) -> None:
        deadline = time.monotonic() + grace
        while self._engine.active() > 0 and not self._stopped.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._stopped.wait(min(left, 0.005))
        self._shutdown(0.0)

    def _shutdown(self, grace: float) -> None:
        with self._stop_lock:
            if self._stopped.is_set():
                return
            self._engine.shutdown(grace)  # GIL released while grpc++ drains
            self._engine.stop()
            self._stopped.set()
            _live.discard(self)

    def wait_for_termination(self, timeout=None) -> bool:
        return self._stopped.wait(timeout)

    # --- per RPC (on the C++ handler threads, GIL held) ------------------------------------------
    def _find(self, details):
        handler = self._methods.get(details.method)
        if handler is not None:
            return handler
        for generic in self._generic:
            handler = generic.service(details)
            if handler is not None:
                return handler
        return None

    def _lookup(self, call, context):
        if not self._interceptors:
            handler = self._methods.get(call.method)
            if handler is not None:
                return handler
        details = _HandlerCallDetails(call.method, context.invocation_metadata())
        continuation = self._find
        for interceptor in reversed(self._interceptors):
            continuation = _bind_interceptor(interceptor, continuation)
        return continuation(details)

    def _dispatch(self, call, kind: int) -> None:
        context = _Context(call)
        try:
            handler = self._lookup(call, context)
        except Exception:
            log.exception("interceptor failed for %s", call.method)
            call.finish(grpc.StatusCode.UNKNOWN.value[0], "Exception in interceptor")
            return
        if handler is None:
            call.finish(grpc.StatusCode.UNIMPLEMENTED.value[0], "Method not found!")
            return
        if not call.is_active():  # cancelled or past its deadline while it waited for a worker
            call.finish(grpc.StatusCode.CANCELLED.value[0], "the RPC ended before a worker took it")
            return
        if handler.request_streaming:
            first = call.first
            request = _request_iterator(call, first, handler.request_deserializer)
        else:
            first = call.first
            if first is None:  # as grpc.server answers a unary method called without its message
                call.finish(grpc.StatusCode.UNIMPLEMENTED.value[0],
                            f'"{call.method}" requires exactly one request message.')
                return
            try:
                request = handler.request_deserializer(first) if handler.request_deserializer else first
            except Exception:
                log.exception("cannot deserialize the request of %s", call.method)
                call.finish(grpc.StatusCode.INTERNAL.value[0], "Exception deserializing request!")
                return
        if handler.request_streaming or handler.response_streaming:
            self._engine.release_slot()  # a stream may stay open for long: it holds no handler slot
        self._respond(call, context, handler, request, None)

    def _respond(self, call, context, handler, request, deferred) -> None:
        """Run the handler (or, with ``deferred``, resolve its :class:`Deferred` answer, whose
        future is done) and finish the call with its response or status."""
        serializer = handler.response_serializer
        try:
            if deferred is not None:
                response = deferred.resolve(deferred.future)
            elif handler.response_streaming:
                behavior = handler.stream_stream if handler.request_streaming else handler.unary_stream
                for response in behavior(request, context):
                    context._initial_sent = True  # the first write sends the initial metadata
                    if not call.write(serializer(response) if serializer else response):
                        break
                response = None
            else:
                behavior = handler.stream_unary if handler.request_streaming else handler.unary_unary
                response = behavior(request, context)
                if type(response) is Deferred:  # finished when its future is done; this thread goes on
                    context._deferred = True
                    call.defer()
                    # the end of the RPC must reach _Context._end (registered before the future can
                    # finish the RPC: a context set on a call already over would never be released)
                    if not context.add_callback(_noop):
                        call.finish(grpc.StatusCode.CANCELLED.value[0], _DEFERRED_CANCELLED)
                    response.future.add_done_callback(
                        lambda _f, d=response: self._resolve(call, context, handler, d))
                    return
        except _Abort:
            code, details = context._status()
            call.finish(code, details, None, context._trailing)
            return
        except Exception as exc:  # as grpc.server: UNKNOWN, and the traceback logged
            log.exception("exception calling application %s", call.method)
            code, details = context._status()
            if code == _OK:
                code, details = grpc.StatusCode.UNKNOWN.value[0], f"Exception calling application: {exc}"
            call.finish(code, details, None, context._trailing)
            return
        code, details = context._status()
        if response is not None and code == _OK:
            try:
                data = serializer(response) if serializer else response
            except Exception:
                log.exception("cannot serialize the response of %s", call.method)
                call.finish(grpc.StatusCode.INTERNAL.value[0], "Failed to serialize response!")
                return
            call.finish(code, details, data, context._trailing)
        elif response is None and code == _OK and not handler.response_streaming:
            call.finish(grpc.StatusCode.INTERNAL.value[0], "the handler returned no response", None, context._trailing)
        else:
            call.finish(code, details, None, context._trailing)

    def _resolve(self, call, context, handler, deferred) -> None:
        """A Deferred's future is done (on the thread that completed it): finish the RPC, whatever
        resolving raises (nothing else would: the polling thread's backstop has passed)."""
        try:
            self._respond(call, context, handler, None, deferred)
        except BaseException as exc:  # noqa: BLE001 - the RPC is finished first, whatever it was
            log.exception("cannot finish the deferred answer of %s", call.method)
            call.finish(grpc.StatusCode.INTERNAL.value[0], "internal error: the deferred answer could not be sent")
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise

    @staticmethod
    def _ended(call, kind: int) -> None:
        context = call.context
        if context is not None:
            context._end()


def _bind_interceptor(interceptor, continuation):
    return lambda details: interceptor.intercept_service(continuation, details)
