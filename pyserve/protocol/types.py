"""Protocol-neutral request and response types of the serving path.

The codec (:mod:`pyserve.protocol.codec`) converts between these and the Open Inference Protocol's
protobuf messages; the data plane and the backends see only these (and numpy arrays). Tensor data
is a numpy array whose dtype is ``pyserve.dtypes.numpy_dtype(datatype)``: BF16 travels as
``uint16`` bits, BYTES as an ``object`` array of ``bytes``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Union

import numpy as np

from pyserve import dtypes

__all__ = [
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

#: A request/tensor parameter value (InferParameter's oneof: bool, int64/uint64, double, string).
ParamValue = Union[bool, int, float, str]


@dataclass(frozen=True)
class Tensor:
    """A named tensor: protocol datatype plus a numpy array holding it (shape = ``data.shape``)."""

    name: str
    datatype: str
    data: np.ndarray
    parameters: Mapping[str, ParamValue] = field(default_factory=dict)

    def __post_init__(self) -> None:
        expected = dtypes.numpy_dtype(self.datatype)  # ValueError for an unknown datatype
        if not isinstance(self.data, np.ndarray):
            raise TypeError(f"tensor {self.name!r}: data must be a numpy array, got {type(self.data).__name__}")
        actual = self.data.dtype
        # the native-order comparison first: newbyteorder() builds a new dtype object on every call
        if (actual != expected and actual.newbyteorder("=") != expected
                and not (self.datatype == "BYTES" and actual.kind in "OSU")):
            raise ValueError(
                f"tensor {self.name!r}: datatype {self.datatype} is held as numpy {expected}, got {actual}"
            )

    @classmethod
    def _checked(cls, name: str, datatype: str, data: np.ndarray,
                 parameters: Mapping[str, ParamValue] | None = None) -> "Tensor":
        """A Tensor without :meth:`__post_init__`'s checks, for the codec's decoder, which has already
        made ``data`` with ``numpy_dtype(datatype)`` (in wire byte order) itself. Not for other callers:
        a wrong pairing is not caught here."""
        obj = object.__new__(cls)
        obj.__dict__.update(name=name, datatype=datatype, data=data,
                            parameters={} if parameters is None else parameters)
        return obj

    @property
    def shape(self) -> tuple[int, ...]:
        """``data.shape`` (numpy gives Python ints)."""
        return self.data.shape

    @classmethod
    def from_numpy(cls, name: str, data: np.ndarray, datatype: str | None = None) -> "Tensor":
        """Wrap ``data``; the datatype defaults to the one the dtype table gives its numpy dtype."""
        data = np.asarray(data)
        if datatype is None:
            datatype = dtypes.from_numpy(data.dtype).name
        if datatype == "BYTES" and data.dtype.kind in "SU":
            data = data.astype(object)
        return cls(name, datatype, data)


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    parameters: Mapping[str, ParamValue] = field(default_factory=dict)


@dataclass(frozen=True)
class InferRequest:
    """One inference request. ``outputs`` empty means every output, in the model's order."""

    model_name: str
    inputs: tuple[Tensor, ...]
    model_version: str = ""
    id: str = ""
    outputs: tuple[RequestedOutput, ...] = ()
    parameters: Mapping[str, ParamValue] = field(default_factory=dict)


@dataclass(frozen=True)
class InferResponse:
    model_name: str
    model_version: str
    outputs: tuple[Tensor, ...]
    id: str = ""
    parameters: Mapping[str, ParamValue] = field(default_factory=dict)


@dataclass(frozen=True)
class TensorMetadata:
    """Name, datatype and shape of a model input or output; -1 marks a variable (batch) dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ModelMetadata:
    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorMetadata, ...]
    outputs: tuple[TensorMetadata, ...]


@dataclass(frozen=True)
class ServerMetadata:
    name: str
    version: str
    extensions: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModelConfigInfo:
    """A model's configuration as the ModelConfig RPC reports it (Triton's model_config subset).

    ``inputs``/``outputs`` carry the *full* shapes (batch dimension included, -1 where variable);
    the codec drops the batch dimension from Triton's ``dims`` when ``max_batch_size > 0``.
    ``max_queue_delay_us`` is None when the model has no dynamic batching.
    """

    name: str
    platform: str
    backend: str
    max_batch_size: int
    inputs: tuple[TensorMetadata, ...]
    outputs: tuple[TensorMetadata, ...]
    max_queue_delay_us: int | None = None
    preferred_batch_sizes: tuple[int, ...] = ()
    instance_count: int = 1
    instance_kind: str = "KIND_CPU"
    default_model_filename: str = ""
    #: Triton's version_policy: ``("latest", (N,))``, ``("all", ())`` or ``("specific", (v, ...))``
    version_policy: tuple[str, tuple[int, ...]] = ("latest", (1,))


@dataclass(frozen=True)
class Duration:
    """How many times something happened and its cumulative duration in nanoseconds."""

    count: int = 0
    ns: int = 0


@dataclass(frozen=True)
class BatchStats:
    """Executions of one batch size (rows, i.e. dim 0 summed over the batched requests)."""

    batch_size: int
    compute_input: Duration
    compute_infer: Duration
    compute_output: Duration


@dataclass(frozen=True)
class ModelStats:
    """A snapshot of one model version's statistics (Triton's ModelStatistics).

    success/fail: requests and their total time from arrival to response. queue, compute_input,
    compute_infer, compute_output: per request, the time waiting for the scheduler, assembling the
    backend's inputs, running the backend, splitting and checking its outputs (a request batched
    with others is charged the whole batch's compute time, as Triton does). inference_count: sum of
    the successful requests' batch sizes (1 per request for a model with max_batch_size 0);
    execution_count: backend executions. last_inference_ms: milliseconds since the epoch, 0 if none.
    """

    name: str
    version: str
    last_inference_ms: int = 0
    inference_count: int = 0
    execution_count: int = 0
    success: Duration = Duration()
    fail: Duration = Duration()
    queue: Duration = Duration()
    compute_input: Duration = Duration()
    compute_infer: Duration = Duration()
    compute_output: Duration = Duration()
    batch_stats: tuple[BatchStats, ...] = ()


@dataclass(frozen=True)
class ModelIndexEntry:
    """One model of the repository index: state READY, LOADING, UNLOADING or UNAVAILABLE."""

    name: str
    version: str
    state: str
    reason: str = ""
