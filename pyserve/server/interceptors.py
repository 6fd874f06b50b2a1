"""Server interceptors: typed errors to gRPC status codes; in-flight counting; bearer-token auth.

:class:`ErrorInterceptor`: :class:`~pyserve.protocol.errors.ServingError` -> its ``code`` and message. Anything else is a
bug: INTERNAL with a generic message carrying a short reference, and the traceback logged under
that reference. Wraps every handler kind (unary/stream, request/response) that is a coroutine
function or an async generator function.
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import logging
import uuid

import grpc

from pyserve.protocol.errors import ServingError

__all__ = [
    "AUTH_EXEMPT_PREFIXES",
    "BearerTokenInterceptor",
    "SyncBearerTokenInterceptor",
    "ErrorInterceptor",
    "InflightInterceptor",
    "read_token_file",
    "status_code",
    "wrap_servicer",
]

log = logging.getLogger("pyserve.server")


def status_code(exc: ServingError) -> grpc.StatusCode:
    """The grpc.StatusCode an error class carries (INTERNAL if the name is not a status code)."""
    return getattr(grpc.StatusCode, exc.code, grpc.StatusCode.INTERNAL)


async def _abort(exc: BaseException, context: grpc.aio.ServicerContext, method: str):
    if isinstance(exc, ServingError):
        await context.abort(status_code(exc), str(exc))
    ref = uuid.uuid4().hex[:12]
    log.error("internal error in %s (ref %s)", method, ref, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error (ref {ref}); see the server log")


def _wrap_coroutine(behavior, method: str):
    async def wrapper(request, context):
        try:
            return await behavior(request, context)
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as exc:
            await _abort(exc, context, method)

    return wrapper


def _wrap_async_gen(behavior, method: str):
    async def wrapper(request, context):
        try:
            async for response in behavior(request, context):
                yield response
        except (grpc.aio.AbortError, asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as exc:
            await _abort(exc, context, method)

    return wrapper


def _wrap(behavior, method: str):
    if behavior is None:
        return None
    if inspect.isasyncgenfunction(behavior):
        return _wrap_async_gen(behavior, method)
    if inspect.iscoroutinefunction(behavior):
        return _wrap_coroutine(behavior, method)
    return behavior  # sync behaviours are not used by pyserve's servicers


class _CachedWrap:
    """Wrapped handlers cached per method: gRPC hands an interceptor the same handler object for a
    method on every call, so the wrapping (closures, ``inspect`` checks, ``_replace``) is done once
    per method instead of once per RPC. A different handler object for a method is wrapped anew."""

    def __init__(self) -> None:
        self._cache: dict[str, tuple[object, object]] = {}

    def cached(self, method: str, handler, wrap):
        hit = self._cache.get(method)
        if hit is not None and hit[0] is handler:
            return hit[1]
        wrapped = wrap(handler)
        if len(self._cache) < 1024:  # methods are a small fixed set; never grow without bound
            self._cache[method] = (handler, wrapped)
        return wrapped


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self) -> None:
        self._wrapped = _CachedWrap()

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        return self._wrapped.cached(method, handler, lambda h: h._replace(
            unary_unary=_wrap(h.unary_unary, method),
            unary_stream=_wrap(h.unary_stream, method),
            stream_unary=_wrap(h.stream_unary, method),
            stream_stream=_wrap(h.stream_stream, method),
        ))


def wrap_servicer(servicer, service: str, inflight: "InflightInterceptor | None" = None):
    """``servicer`` with every RPC method wrapped once, for registration, as :class:`InflightInterceptor`
    (outer, when given) and :class:`ErrorInterceptor` (inner) wrap it; pass the result to the
    generated ``add_..._to_server``. ``service``: the full service name, for the log.

    The result behaves as the interceptors do, without their cost on every call: grpc.aio runs an
    interceptor chain (a coroutine per interceptor, the handler lookup) for every RPC, which took
    about 7% of the server's CPU per ModelInfer request on the benchmark's small model. Services
    registered without this wrapping (gRPC health, reflection) are not counted in flight.
    """
    import types

    ns = types.SimpleNamespace()
    for name in dir(type(servicer)):
        if name.startswith("_"):
            continue
        behavior = getattr(servicer, name)
        method = f"/{service}/{name}"
        if inspect.isasyncgenfunction(behavior):
            wrapped = _wrap_async_gen(behavior, method)
            if inflight is not None:
                wrapped = inflight._wrap_stream(wrapped)
        elif inspect.iscoroutinefunction(behavior):
            if inflight is not None:
                wrapped = inflight._wrap_with_errors(behavior, method)
            else:
                wrapped = _wrap_coroutine(behavior, method)
        else:
            wrapped = behavior
        setattr(ns, name, wrapped)
    return ns


# --- in-flight counting (graceful drain) ---------------------------------------------------------

#: What an RPC arriving during a graceful stop is answered (UNAVAILABLE: clients retry elsewhere).
SHUTTING_DOWN = "the server is shutting down; retry on another replica"


class InflightInterceptor(grpc.aio.ServerInterceptor):
    """Counts running RPCs, so a graceful stop can wait for them and then end the long-lived
    streams (health Watch) at once instead of waiting out the whole grace period. The server applies
    its wrappers once, at registration, through :func:`wrap_servicer` (so only pyserve's own
    services are counted); it still works as an interceptor too.

    ``count``: RPCs with a single response (unary-unary, stream-unary), from the call until gRPC
    has sent the status (the RPC's done callback), so a drained server has flushed its responses.
    ``streams``: open response streams other than the health service's (ModelStreamInfer); their
    inference requests are counted by the repository's per-version in-flight counters.
    """

    def __init__(self) -> None:
        self.count = 0
        self.streams = 0
        #: unary RPCs started so far (a graceful stop watches it for RPCs arriving late)
        self.started = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._wrapped = _CachedWrap()
        #: set by a graceful stop of the aio engine: pyserve answers new RPCs UNAVAILABLE itself (not
        #: counted) while gRPC keeps accepting them, so that calls gRPC had received but not yet handed
        #: to the event loop get UNAVAILABLE too, instead of CANCELLED when gRPC shuts down
        self.refusing = False

    async def idle(self) -> None:
        """Return once no counted unary RPC is running."""
        while self.count:
            await self._idle.wait()

    def _done(self, _context=None) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    def _stream_done(self, _context=None) -> None:
        self.streams -= 1

    def _wrap(self, behavior):
        async def wrapper(request, context):
            if self.refusing:
                await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
            self.count += 1
            self.started += 1
            self._idle.clear()
            try:
                context.add_done_callback(self._done)
            except Exception:  # pragma: no cover - a gRPC without done callbacks: count the handler
                try:
                    return await behavior(request, context)
                finally:
                    self._done()
            return await behavior(request, context)

        return wrapper

    def _wrap_with_errors(self, behavior, method: str):
        """``self._wrap(_wrap_coroutine(behavior, method))`` as one coroutine instead of two (this is
        every unary RPC's path): counted in flight, errors mapped."""
        done = self._done

        async def wrapper(request, context):
            if self.refusing:
                await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
            self.count += 1
            self.started += 1
            self._idle.clear()
            try:
                context.add_done_callback(done)
            except Exception:  # pragma: no cover - a gRPC without done callbacks: count the handler
                try:
                    return await _wrap_coroutine(behavior, method)(request, context)
                finally:
                    done()
            try:
                return await behavior(request, context)
            except (grpc.aio.AbortError, asyncio.CancelledError):
                raise
            except Exception as exc:
                await _abort(exc, context, method)

        return wrapper

    def _wrap_stream(self, behavior):
        async def wrapper(request, context):
            if self.refusing:
                await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
            self.streams += 1
            context.add_done_callback(self._stream_done)
            async for response in behavior(request, context):
                yield response

        return wrapper

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method or ""
        counted_stream = not method.startswith(AUTH_EXEMPT_PREFIXES)

        def unary(b):
            return self._wrap(b) if inspect.iscoroutinefunction(b) else b

        def stream(b):
            return self._wrap_stream(b) if counted_stream and inspect.isasyncgenfunction(b) else b

        return self._wrapped.cached(method, handler, lambda h: h._replace(
            unary_unary=unary(h.unary_unary),
            stream_unary=unary(h.stream_unary),
            unary_stream=stream(h.unary_stream),
            stream_stream=stream(h.stream_stream),
        ))


# --- bearer-token authentication -----------------------------------------------------------------

#: Methods any caller may use without a token: the gRPC health service, so that load balancers and
#: Kubernetes gRPC probes (which cannot send metadata) keep working.
AUTH_EXEMPT_PREFIXES = ("/grpc.health.v1.Health/",)


def read_token_file(path) -> tuple[str, ...]:
    """The bearer tokens of ``path``: one per line; blank lines and lines starting with ``#`` are
    skipped (several lines allow rotation without downtime). ValueError naming the file when it
    cannot be read or holds no token, or when a token holds whitespace."""
    from pathlib import Path

    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"auth token file {str(path)!r}: cannot read: {exc}") from None
    tokens = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if any(c.isspace() for c in line):
            raise ValueError(f"auth token file {str(path)!r} line {number}: a token must not contain whitespace")
        tokens.append(line)
    if not tokens:
        raise ValueError(f"auth token file {str(path)!r} holds no token (one per line)")
    return tuple(tokens)


def _deny(message: str):
    async def deny(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return deny


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses, with UNAUTHENTICATED, every RPC whose metadata lacks ``authorization: Bearer
    <token>`` for one of ``tokens`` (compared in constant time), except the methods under
    :data:`AUTH_EXEMPT_PREFIXES` (health checks)."""

    def __init__(self, tokens) -> None:
        tokens = tuple(tokens)
        if not tokens or not all(isinstance(t, str) and t for t in tokens):
            raise ValueError("BearerTokenInterceptor needs at least one non-empty token")
        self._tokens = tuple(t.encode() for t in tokens)

    def _authorized(self, metadata) -> tuple[bool, str]:
        values = [v for k, v in (metadata or ()) if k.lower() == "authorization"]
        if not values:
            return False, "missing 'authorization: Bearer <token>' metadata"
        value = values[0]
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return False, "the 'authorization' metadata must be 'Bearer <token>'"
        given = token.strip().encode("utf-8", "replace")
        ok = False
        for t in self._tokens:  # every token compared, in constant time each
            ok |= hmac.compare_digest(given, t)
        return ok, "" if ok else "invalid bearer token"

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method or ""
        if method.startswith(AUTH_EXEMPT_PREFIXES):
            return await continuation(handler_call_details)
        ok, why = self._authorized(handler_call_details.invocation_metadata)
        handler = await continuation(handler_call_details)
        if ok or handler is None:
            return handler
        log.info("refused %s: %s", method, why)
        return _with_every_kind(handler, _deny(f"unauthenticated: {why}"))


def _with_every_kind(handler, behaviour):
    """``handler`` (a grpc.RpcMethodHandler) with its one kind of behaviour (unary/stream in and out)
    replaced by ``behaviour``."""
    return handler._replace(
        unary_unary=behaviour if handler.unary_unary else None,
        unary_stream=behaviour if handler.unary_stream else None,
        stream_unary=behaviour if handler.stream_unary else None,
        stream_stream=behaviour if handler.stream_stream else None,
    )


def _deny_sync(message: str):
    def deny(request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return deny


class SyncBearerTokenInterceptor(grpc.ServerInterceptor):
    """:class:`BearerTokenInterceptor` for the synchronous ``grpc.server`` (the ``sync`` engine):
    the same tokens, exemptions and messages."""

    def __init__(self, tokens) -> None:
        self._check = BearerTokenInterceptor(tokens)

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method or ""
        if method.startswith(AUTH_EXEMPT_PREFIXES):
            return continuation(handler_call_details)
        ok, why = self._check._authorized(handler_call_details.invocation_metadata)
        handler = continuation(handler_call_details)
        if ok or handler is None:
            return handler
        log.info("refused %s: %s", method, why)
        return _with_every_kind(handler, _deny_sync(f"unauthenticated: {why}"))
