"""The Open Inference Protocol v2 edge: protocol-neutral types, the error hierarchy, the codec.

Importing this package pulls in numpy only; the protobuf codec (:mod:`pyserve.protocol.codec`)
is imported explicitly by the server and clients that need it.
"""

from pyserve.protocol.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ServingError,
    Unavailable,
    Unimplemented,
)
from pyserve.protocol.types import (
    BatchStats,
    Duration,
    ModelConfigInfo,
    ModelIndexEntry,
    ModelStats,
    InferRequest,
    InferResponse,
    ModelMetadata,
    ParamValue,
    RequestedOutput,
    ServerMetadata,
    Tensor,
    TensorMetadata,
)

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
    "ParamValue",
    "Tensor",
    "RequestedOutput",
    "InferRequest",
    "InferResponse",
    "TensorMetadata",
    "ModelMetadata",
    "ServerMetadata",
    "ModelConfigInfo",
    "Duration",
    "BatchStats",
    "ModelStats",
    "ModelIndexEntry",
]
