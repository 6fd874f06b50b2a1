"""Backends: one small async interface (:class:`Backend`), registered by name.

Importing this package imports no backend implementation and no torch; :func:`create_backend`
imports the one a model asks for.
"""

from pyserve.backends.base import Backend, InferInputs, InferOutputs, InferResult, ModelSignature, TensorSpec
from pyserve.backends.registry import BackendInfo, backend_names, create_backend, get_backend, register_backend

__all__ = [
    "Backend",
    "BackendInfo",
    "InferInputs",
    "InferOutputs",
    "InferResult",
    "ModelSignature",
    "TensorSpec",
    "backend_names",
    "create_backend",
    "get_backend",
    "register_backend",
]
