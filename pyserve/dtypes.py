"""The one table of tensor data types: KServe v2 / Triton protocol name, numpy, torch, byte size.

Every conversion between protocol names, numpy dtypes and torch dtypes in pyserve goes through this
table; an unknown type raises :class:`ValueError` naming it (never ``None``, never a silent widening
such as BF16 to FP32). torch is imported only when a torch dtype is asked for.

BF16 has no numpy dtype: BF16 tensors travel as raw bytes and are viewed as ``uint16`` in numpy
(``numpy_dtype("BF16")`` is ``uint16``); torch has ``torch.bfloat16``. BYTES elements are
variable-length byte strings (numpy ``object`` arrays of ``bytes``); on the wire each element is a
4-byte little-endian length followed by the bytes (``byte_size`` is ``None``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["DType", "DTYPES", "from_name", "from_numpy", "from_torch", "numpy_dtype", "torch_dtype", "byte_size",
           "bf16_to_float32", "float32_to_bf16"]


@dataclass(frozen=True)
class DType:
    name: str                 # KServe v2 datatype string, e.g. "FP32"
    numpy: np.dtype           # numpy dtype used to hold it (BF16 -> uint16 bits, BYTES -> object)
    torch: str | None         # attribute of the torch module, e.g. "float32"; None where torch has none
    byte_size: int | None     # bytes per element; None for BYTES (variable length)
    triton_config: str        # Triton model-config enum name, e.g. "TYPE_FP32"


DTYPES: tuple[DType, ...] = (
    DType("BOOL", np.dtype(np.bool_), "bool", 1, "TYPE_BOOL"),
    DType("UINT8", np.dtype(np.uint8), "uint8", 1, "TYPE_UINT8"),
    DType("UINT16", np.dtype(np.uint16), "uint16", 2, "TYPE_UINT16"),
    DType("UINT32", np.dtype(np.uint32), "uint32", 4, "TYPE_UINT32"),
    DType("UINT64", np.dtype(np.uint64), "uint64", 8, "TYPE_UINT64"),
    DType("INT8", np.dtype(np.int8), "int8", 1, "TYPE_INT8"),
    DType("INT16", np.dtype(np.int16), "int16", 2, "TYPE_INT16"),
    DType("INT32", np.dtype(np.int32), "int32", 4, "TYPE_INT32"),
    DType("INT64", np.dtype(np.int64), "int64", 8, "TYPE_INT64"),
    DType("FP16", np.dtype(np.float16), "float16", 2, "TYPE_FP16"),
    DType("FP32", np.dtype(np.float32), "float32", 4, "TYPE_FP32"),
    DType("FP64", np.dtype(np.float64), "float64", 8, "TYPE_FP64"),
    DType("BF16", np.dtype(np.uint16), "bfloat16", 2, "TYPE_BF16"),
    DType("BYTES", np.dtype(object), None, None, "TYPE_STRING"),
)

_BY_NAME = {d.name: d for d in DTYPES}
# numpy -> protocol: BF16 shares uint16 and BYTES shares object, so the first entry wins
# (uint16 -> UINT16); bytes_/str_ arrays are BYTES.
_BY_NUMPY: dict[np.dtype, DType] = {}
for _d in DTYPES:
    _BY_NUMPY.setdefault(_d.numpy, _d)
_BY_TORCH = {d.torch: d for d in DTYPES if d.torch is not None}


def from_name(name: str) -> DType:
    """Look up a protocol datatype name (``"FP32"``); raises ValueError for an unknown name."""
    try:
        return _BY_NAME[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown datatype {name!r}; expected one of {', '.join(_BY_NAME)}"
        ) from None


def from_numpy(dtype) -> DType:
    """Protocol datatype for a numpy dtype; ``bytes_``/``str_``/``object`` arrays are BYTES."""
    dt = np.dtype(dtype)
    if dt.kind in ("S", "U", "O"):
        return _BY_NAME["BYTES"]
    try:
        return _BY_NUMPY[dt.newbyteorder("=") if dt.byteorder not in ("=", "|") else dt]
    except KeyError:
        raise ValueError(f"numpy dtype {dt} has no KServe v2 datatype") from None


def from_torch(dtype) -> DType:
    """Protocol datatype for a torch dtype (``torch.float32`` -> FP32); raises ValueError if none."""
    key = str(dtype).removeprefix("torch.")
    try:
        return _BY_TORCH[key]
    except KeyError:
        raise ValueError(f"torch dtype {dtype} has no KServe v2 datatype") from None


def numpy_dtype(name: str) -> np.dtype:
    """numpy dtype that holds protocol datatype ``name`` (BF16 -> uint16 bits)."""
    return from_name(name).numpy


def torch_dtype(name: str):
    """torch dtype for protocol datatype ``name``; raises ValueError for BYTES."""
    d = from_name(name)
    if d.torch is None:
        raise ValueError(f"datatype {name} has no torch dtype")
    import torch

    return getattr(torch, d.torch)


def byte_size(name: str) -> int | None:
    """Bytes per element of protocol datatype ``name``; None for BYTES (variable length)."""
    return from_name(name).byte_size


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    """BF16 as pyserve holds it (uint16 bit patterns, any shape) -> float32 values, exactly."""
    return (np.asarray(bits).astype(np.uint32) << 16).view(np.float32)


def float32_to_bf16(values) -> np.ndarray:
    """float32 values -> BF16 bit patterns (uint16), by truncation (the low 16 bits dropped)."""
    return (np.ascontiguousarray(values, np.float32).view(np.uint32) >> 16).astype(np.uint16)
