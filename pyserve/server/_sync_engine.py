"""The synchronous gRPC engine: pyserve's services on ``grpc.server`` with a thread pool.

Why: a do-nothing ``grpc.aio`` handler costs 560-740 µs of server CPU per request on the 2-vCPU CI
machine, the same handler on the synchronous ``grpc.server`` 290-320 µs
(``benchmarks/server/grpc_floor.py``; README, "Server"). With ``Server(grpc_engine="sync")`` the
gRPC layer is the synchronous server; pyserve's asyncio machinery (repository loads and polling,
the dynamic batcher, traffic routes and shadows, drain) stays on the server's event loop, which
runs in the thread that called :meth:`~pyserve.server.server.Server.start`.

ModelInfer on a model whose scheduler runs on the calling thread (a
:class:`~pyserve.server.scheduler.DirectScheduler` over a backend with ``infer_sync``: the pyserve,
torch and onnxruntime backends without dynamic batching) is served entirely in the gRPC handler
thread: decode, validate, execute (holding one of the model's instance slots), encode; the event
loop is not involved. A dynamically batched model with such a backend is batched among the handler
threads (:meth:`~pyserve.server.scheduler.DynamicBatcher.submit_sync`). Everything else (routes,
backends without ``infer_sync``, the metadata, repository, statistics and traffic-admin RPCs) is
handed to the event loop with :func:`asyncio.run_coroutine_threadsafe` and the handler thread waits
for it.

Errors are mapped as by :mod:`pyserve.server.interceptors` (ServingError -> its status code; anything
else INTERNAL with a reference and the traceback logged). A client cancel or an expired deadline
cancels the handed-over coroutine (``context.add_callback``), which frees the slot or the batcher
queue entry; a direct execution checks ``context.is_active()`` before it starts. ModelStreamInfer
answers every request in order with per-response errors; an open stream holds one handler thread.

On the native engine, whose context is ``deferrable``, a unary handler whose answer waits for the
event loop returns a :class:`Deferred` instead of waiting, and the engine finishes the RPC from the
thread that completes it; streams there run on threads of their own
(pyserve.server._native_engine). A request waiting for a dynamic batch holds its thread on both.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import logging
import threading
import time
import types
import uuid

import grpc

from pyserve.protocol import codec
from pyserve.protocol.errors import ServingError
from pyserve.server.dataplane import DataPlane
from pyserve.server.interceptors import status_code
from pyserve.server.servicer import _routing_key

__all__ = ["Deferred", "SyncInflight", "SyncInferenceServicer", "deferrable", "sync_servicer"]

log = logging.getLogger("pyserve.server")


_MODEL_INFER = f"/{codec.SERVICE_NAME}/ModelInfer"


class _Cancelled(Exception):
    """The RPC ended (client cancel, deadline) before its work was done."""


class SyncInflight:
    """Counts running RPCs of the synchronous engine, for a graceful drain (the attributes of
    :class:`~pyserve.server.interceptors.InflightInterceptor`, updated from handler threads).

    ``count``: unary RPCs from the handler's start until gRPC has finished the RPC (its termination
    callback); ``streams``: open ModelStreamInfer streams; ``started``: unary RPCs started so far.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.count = 0
        self.streams = 0
        self.started = 0

    def begin(self, context) -> None:
        with self._lock:
            self.count += 1
            self.started += 1
        if not context.add_callback(self._done):  # the RPC has already ended
            self._done()

    def _done(self) -> None:
        with self._lock:
            self.count -= 1

    def begin_stream(self, context) -> None:
        with self._lock:
            self.streams += 1
        if not context.add_callback(self._stream_done):
            self._stream_done()

    def _stream_done(self) -> None:
        with self._lock:
            self.streams -= 1

    async def idle(self) -> None:
        """Return once no counted unary RPC is running (polled: the counter moves on other threads)."""
        while self.count:
            await asyncio.sleep(0.005)


def _failure(exc: BaseException, method: str) -> tuple[grpc.StatusCode, str]:
    """The status and message an RPC that raised ``exc`` ends with (logged with a reference when
    it is not a ServingError)."""
    if isinstance(exc, ServingError):
        return status_code(exc), str(exc)
    if isinstance(exc, _Cancelled):
        return grpc.StatusCode.CANCELLED, "the request was cancelled or passed its deadline before it ran"
    ref = uuid.uuid4().hex[:12]
    log.error("internal error in %s (ref %s)", method, ref, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error (ref {ref}); see the server log"


class Deferred:
    """A unary handler's answer that is not ready when the handler returns, for engines whose
    context says ``deferrable`` (the native engine's): the engine frees the handler thread and
    finishes the RPC with ``resolve(future)`` (the response message, or :meth:`context.abort`)
    once ``future`` (a ``concurrent.futures.Future``) is done, on whichever thread completes it.
    The future must end when the RPC does (cancelled by a ``context.add_callback``)."""

    __slots__ = ("future", "resolve")

    def __init__(self, future: concurrent.futures.Future, resolve) -> None:
        self.future = future
        self.resolve = resolve


def _deferred(future: concurrent.futures.Future, encode, context, method: str) -> Deferred:
    """A :class:`Deferred` whose response is ``encode(result)`` (or the result when ``encode`` is
    None), with the error mapping of the synchronous handlers."""

    def resolve(done: concurrent.futures.Future):
        try:
            try:
                value = done.result()
            except concurrent.futures.CancelledError:
                raise _Cancelled() from None
            return value if encode is None else encode(value)
        except Exception as exc:  # noqa: BLE001 - mapped to a status below
            code, message = _failure(exc, method)
        context.abort(code, message)

    return Deferred(future, resolve)


def deferrable(context) -> bool:
    """True when the engine behind ``context`` takes a :class:`Deferred` answer."""
    return getattr(context, "deferrable", False)


class _LoopCaller:
    """Runs coroutines on the server's event loop for a handler thread, cancelling them when the RPC
    ends first."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def start(self, coro, context) -> concurrent.futures.Future:
        """The coroutine scheduled on the loop, cancelled when the RPC ends first; not waited for."""
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        if not context.add_callback(future.cancel):
            future.cancel()
        return future

    def call(self, coro, context, holder: list | None = None):
        """The coroutine's result; its exception re-raised; :class:`_Cancelled` when the RPC ended.
        ``holder``: a stream's one-element list whose entry the stream's termination callback
        cancels (instead of one callback per message)."""
        if holder is None:
            future = self.start(coro, context)
        else:
            future = asyncio.run_coroutine_threadsafe(coro, self._loop)
            holder[0] = future
            if not context.is_active():
                future.cancel()
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            raise _Cancelled() from None
        finally:
            if holder is not None:
                holder[0] = None


class SyncInferenceServicer:
    """``inference.GRPCInferenceService`` for the synchronous engine (see the module docstring).

    ``aio_servicer``: the :class:`~pyserve.server.servicer.InferenceServicer` whose coroutines serve
    every RPC but ModelInfer and ModelStreamInfer, on ``loop``."""

    def __init__(self, dataplane: DataPlane, aio_servicer, loop: asyncio.AbstractEventLoop,
                 inflight: SyncInflight) -> None:
        self._dp = dataplane
        self._loop = _LoopCaller(loop)
        self._inflight = inflight
        for name in dir(type(aio_servicer)):
            if name.startswith("_") or name in ("ModelInfer", "ModelStreamInfer", "add_to_server"):
                continue
            behavior = getattr(aio_servicer, name)
            if inspect.iscoroutinefunction(behavior):
                setattr(self, name, _unary_on_loop(behavior, f"/{codec.SERVICE_NAME}/{name}", self._loop, inflight))

    def _infer(self, request, context, holder: list | None = None, defer: bool = False):
        """The InferResponse of one decoded request, on this thread when its model allows; with
        ``defer``, work for the event loop comes back as its ``concurrent.futures.Future``."""
        arrival_ns = time.perf_counter_ns()
        req = codec.decode_infer_request(request)
        dp = self._dp
        if dp.is_route(req.model_name):
            return self._on_loop(dp.infer(req, _routing_key(context), arrival_ns), context, holder, defer)
        response = dp.infer_model_sync(req, arrival_ns, context.is_active)
        if response is NotImplemented:
            return self._on_loop(dp.infer_model(req, arrival_ns), context, holder, defer)
        if response is None:
            raise _Cancelled()
        return response

    def _on_loop(self, coro, context, holder, defer: bool):
        if defer:
            return self._loop.start(coro, context)
        return self._loop.call(coro, context, holder)

    def ModelInfer(self, request, context):
        self._inflight.begin(context)
        try:
            response = self._infer(request, context, defer=deferrable(context))
            if isinstance(response, concurrent.futures.Future):  # the handler thread is not held
                return _deferred(response, codec.encode_infer_response, context, _MODEL_INFER)
            return codec.encode_infer_response(response)
        except Exception as exc:  # noqa: BLE001 - mapped to a status below
            code, message = _failure(exc, _MODEL_INFER)
        context.abort(code, message)

    def ModelStreamInfer(self, request_iterator, context):
        self._inflight.begin_stream(context)
        holder: list = [None]

        def cancel_current() -> None:
            future = holder[0]
            if future is not None:
                future.cancel()

        context.add_callback(cancel_current)
        for request in request_iterator:
            try:
                response = codec.encode_stream_response(self._infer(request, context, holder))
            except _Cancelled:
                return
            except ServingError as exc:
                response = codec.encode_stream_error(f"{exc.code}: {exc}", request.id)
            except Exception:
                ref = uuid.uuid4().hex[:12]
                log.exception("internal error in ModelStreamInfer (ref %s)", ref)
                response = codec.encode_stream_error(f"INTERNAL: internal error (ref {ref}); see the server log",
                                                     request.id)
            yield response


def _unary_on_loop(behavior, method: str, loop: _LoopCaller, inflight: SyncInflight | None):
    """A synchronous unary handler that runs the coroutine ``behavior(request, context)`` on the loop."""

    def handler(request, context):
        if inflight is not None:
            inflight.begin(context)
        try:
            if deferrable(context):  # the handler thread is not held while the loop works
                return _deferred(loop.start(behavior(request, context), context), None, context, method)
            return loop.call(behavior(request, context), context)
        except Exception as exc:  # noqa: BLE001 - mapped to a status below
            code, message = _failure(exc, method)
        context.abort(code, message)

    return handler


def sync_servicer(servicer, service: str, loop: asyncio.AbstractEventLoop, inflight: SyncInflight | None = None):
    """``servicer`` (coroutine methods, as for grpc.aio) as synchronous handlers that run each
    coroutine on ``loop``, with the error mapping and in-flight counting of the aio engine; pass the
    result to the generated ``add_..._to_server``. Streaming methods are not supported (ValueError)."""
    caller = _LoopCaller(loop)
    ns = types.SimpleNamespace()
    for name in dir(type(servicer)):
        if name.startswith("_"):
            continue
        behavior = getattr(servicer, name)
        if inspect.isasyncgenfunction(behavior):
            raise ValueError(f"sync_servicer: {service}/{name} streams responses; not supported")
        if inspect.iscoroutinefunction(behavior):
            setattr(ns, name, _unary_on_loop(behavior, f"/{service}/{name}", caller, inflight))
    return ns
