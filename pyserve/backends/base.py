"""The one small interface every backend implements, and the signature types it reports.

A backend hosts one model version. Its life: constructed with the artifact path (cheap, no I/O),
``await load()`` (heavy work runs in a thread executor, never on the event loop), then any number
of ``await infer(batch)``, then ``await unload()``. One lifecycle style: async throughout.

Backends see numpy arrays only, never protobuf nor the protocol's request types. The data plane
validates input names, datatypes and shapes against :attr:`Backend.signature` before calling
:meth:`Backend.infer`.

Optional: ``infer_sync(batch) -> list[InferResult]``, the work of :meth:`Backend.infer` done on the
calling thread. A backend offering it lets the server run executions it measured as tiny (below
``inline_max_us``, 1000 µs by default) directly on the event loop, saving two thread hand-overs per
request (:class:`pyserve.server.scheduler.ExecutionRunner`); it must be safe to call from any one
thread at a time, and never block on I/O. Backends without it always run through :meth:`Backend.infer`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Protocol, Sequence, Union, runtime_checkable

import numpy as np

__all__ = ["TensorSpec", "ModelSignature", "Backend", "InferInputs", "InferOutputs", "InferResult"]


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output: protocol datatype name and shape; -1 marks the batch dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ModelSignature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


#: One request's inputs: input name -> array (dtype ``pyserve.dtypes.numpy_dtype(spec.datatype)``).
InferInputs = Mapping[str, np.ndarray]
#: One request's outputs: every output of the signature, name -> array of the declared datatype.
InferOutputs = dict[str, np.ndarray]
#: Per request: its outputs, or the exception that failed it (one bad request never fails the batch).
InferResult = Union[InferOutputs, BaseException]


@runtime_checkable
class Backend(Protocol):
    """What the server needs from a backend (see the module docstring for the lifecycle)."""

    #: ``platform`` reported in ModelMetadata, e.g. ``"pyserve"``.
    platform: str

    @property
    def ready(self) -> bool:
        """True between a successful :meth:`load` and :meth:`unload`."""
        ...

    @property
    def signature(self) -> ModelSignature:
        """Inputs and outputs; valid once loaded."""
        ...

    async def load(self) -> None:
        """Load the model; raises (e.g. ``ArtifactError``) with a message naming the problem."""
        ...

    async def infer(self, batch: Sequence[InferInputs]) -> list[InferResult]:
        """Run a batch of requests; one result per request, in order."""
        ...

    async def unload(self) -> None:
        ...
