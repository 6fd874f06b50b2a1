"""The one error hierarchy of the serving path; each class carries its gRPC status code.

Raise these anywhere between the servicer and the data plane; the server's interceptor
(:mod:`pyserve.server.interceptors`) turns them into a gRPC status with the exception's message.
Anything that is not a :class:`ServingError` becomes INTERNAL with a generic message and a logged
traceback. The code is held as the *name* of a ``grpc.StatusCode`` member so that this module
imports nothing of grpc.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "ServingError",
    "InvalidArgument",
    "NotFound",
    "FailedPrecondition",
    "ResourceExhausted",
    "DeadlineExceeded",
    "Unavailable",
    "Unimplemented",
    "Internal",
]


class ServingError(Exception):
    """Base class: a request failed for a reason its status code and message tell the client."""

    code: ClassVar[str] = "INTERNAL"  # name of a grpc.StatusCode member

    @property
    def message(self) -> str:
        return str(self)


class InvalidArgument(ServingError):
    """The request is malformed: unknown datatype, wrong input name/datatype/shape, bad byte size."""

    code = "INVALID_ARGUMENT"


class NotFound(ServingError):
    """No such model (or no such version of it) in the repository."""

    code = "NOT_FOUND"


class FailedPrecondition(ServingError):
    code = "FAILED_PRECONDITION"


class ResourceExhausted(ServingError):
    code = "RESOURCE_EXHAUSTED"


class DeadlineExceeded(ServingError):
    code = "DEADLINE_EXCEEDED"


class Unavailable(ServingError):
    """The model exists but cannot serve: its artifact failed to load, or the server is stopping."""

    code = "UNAVAILABLE"


class Unimplemented(ServingError):
    """A protocol feature pyserve does not implement (e.g. classification outputs)."""

    code = "UNIMPLEMENTED"


class Internal(ServingError):
    """A server-side bug; the message the client sees is generic, the log has the details."""

    code = "INTERNAL"
