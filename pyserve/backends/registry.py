"""Backends by name. The registry holds import paths, so importing it imports no backend (nor torch).

Add a backend: implement :class:`pyserve.backends.base.Backend` in a module, then either add it to
``_BUILTIN`` below or call :func:`register_backend` (e.g. from a plug-in) before the server starts.
A model's ``config.yaml`` picks its backend with ``backend: NAME`` (default ``pyserve``).

Built in: ``pyserve`` (``model.pyserve``), ``torch`` (``model.pt2``, torch.export), ``pytorch_libtorch``
and ``pytorch`` (``model.pt``, TorchScript), ``onnxruntime``/``onnxruntime_onnx`` (``model.onnx``),
``tensorrt``/``tensorrt_plan`` (``model.plan``). The second names are Triton's ``platform`` values, so
a Triton ``config.pbtxt`` with ``platform: "onnxruntime_onnx"`` loads unchanged.
"""

from __future__ import annotations

import importlib
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Union

from pyserve.backends.base import Backend

__all__ = ["BackendInfo", "register_backend", "get_backend", "backend_names", "create_backend"]

#: ``factory(artifact_path, *, executor) -> Backend``, given directly or as ``"module:attr"``.
Factory = Callable[..., Backend]


@dataclass(frozen=True)
class BackendInfo:
    name: str
    factory: Union[str, Factory]
    #: File a model version directory holds for this backend, e.g. ``model.pyserve``.
    artifact_filename: str

    def resolve(self) -> Factory:
        if not isinstance(self.factory, str):
            return self.factory
        module, _, attr = self.factory.partition(":")
        return getattr(importlib.import_module(module), attr)


_REGISTRY: dict[str, BackendInfo] = {}


def register_backend(name: str, factory: Union[str, Factory], artifact_filename: str) -> None:
    """Register (or replace) backend ``name``."""
    if not name or not isinstance(name, str):
        raise ValueError(f"backend name must be a non-empty string, got {name!r}")
    _REGISTRY[name] = BackendInfo(name, factory, artifact_filename)


def backend_names() -> list[str]:
    return sorted(_REGISTRY)


def get_backend(name: str) -> BackendInfo:
    """Registry entry for ``name``; ValueError naming the known backends if there is none."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; known backends: {', '.join(backend_names())}") from None


def create_backend(name: str, artifact_path: Path, *, executor: Executor | None = None) -> Backend:
    """Construct (not load) backend ``name`` for the artifact at ``artifact_path``."""
    return get_backend(name).resolve()(Path(artifact_path), executor=executor)


register_backend("pyserve", "pyserve.backends.pyserve_backend:PyserveBackend", "model.pyserve")
# torch.export programs (.pt2) and TorchScript (.pt, Triton's pytorch_libtorch platform); one class loads both.
register_backend("torch", "pyserve.backends.torch_backend:TorchBackend", "model.pt2")
register_backend("pytorch_libtorch", "pyserve.backends.torch_backend:TorchBackend", "model.pt")
register_backend("pytorch", "pyserve.backends.torch_backend:TorchBackend", "model.pt")
register_backend("onnxruntime", "pyserve.backends.onnxruntime_backend:OnnxRuntimeBackend", "model.onnx")
register_backend("onnxruntime_onnx", "pyserve.backends.onnxruntime_backend:OnnxRuntimeBackend", "model.onnx")
register_backend("tensorrt", "pyserve.backends.tensorrt_backend:TensorRTBackend", "model.plan")
register_backend("tensorrt_plan", "pyserve.backends.tensorrt_backend:TensorRTBackend", "model.plan")
