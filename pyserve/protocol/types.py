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
        if actual.newbyteorder("=") != expected and not (self.datatype == "BYTES" and actual.kind in "OSU"):
            raise ValueError(
                f"tensor {self.name!r}: datatype {self.datatype} is held as numpy {expected}, got {actual}"
            )

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.data.shape)

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
