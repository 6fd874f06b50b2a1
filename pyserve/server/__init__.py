"""pyserve's gRPC server (Open Inference Protocol v2 + grpc.health.v1) and its model repository."""

from pyserve.server._thread import ServerThread
from pyserve.server.dataplane import DataPlane
from pyserve.server.repository import ConfigError, Model, ModelConfig, ModelRepository, ModelState, VersionPolicy
from pyserve.server.server import DEFAULT_MAX_MESSAGE_BYTES, Server

__all__ = [
    "ConfigError",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DataPlane",
    "Model",
    "ModelConfig",
    "ModelRepository",
    "ModelState",
    "Server",
    "ServerThread",
    "VersionPolicy",
]
