"""Server interceptor: turns pyserve's typed errors into gRPC status codes.

:class:`~pyserve.protocol.errors.ServingError` -> its ``code`` and message. Anything else is a
bug: INTERNAL with a generic message carrying a short reference, and the traceback logged under
that reference. Wraps every handler kind (unary/stream, request/response) that is a coroutine
function or an async generator function.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import uuid

import grpc

from pyserve.protocol.errors import ServingError

__all__ = ["ErrorInterceptor", "status_code"]

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


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        return handler._replace(
            unary_unary=_wrap(handler.unary_unary, method),
            unary_stream=_wrap(handler.unary_stream, method),
            stream_unary=_wrap(handler.stream_unary, method),
            stream_stream=_wrap(handler.stream_stream, method),
        )
