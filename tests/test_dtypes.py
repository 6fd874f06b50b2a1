"""The one dtype table: every entry round-trips through protocol name, numpy and torch."""

from __future__ import annotations

import numpy as np
import pytest

from pyserve import dtypes

NAMES = [d.name for d in dtypes.DTYPES]


def test_names_unique_and_complete():
    assert len(set(NAMES)) == len(NAMES)
    assert set(NAMES) == {
        "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
        "FP16", "FP32", "FP64", "BF16", "BYTES",
    }


@pytest.mark.parametrize("name", NAMES)
def test_name_round_trip(name):
    d = dtypes.from_name(name)
    assert d.name == name
    assert dtypes.numpy_dtype(name) == d.numpy
    assert dtypes.byte_size(name) == d.byte_size
    if d.byte_size is not None:
        assert d.numpy.itemsize == d.byte_size
    assert d.triton_config == ("TYPE_STRING" if name == "BYTES" else f"TYPE_{name}")


@pytest.mark.parametrize("name", [n for n in NAMES if n not in ("BF16", "BYTES")])
def test_numpy_round_trip(name):
    assert dtypes.from_numpy(dtypes.numpy_dtype(name)).name == name
    # non-native byte order maps to the same protocol type
    assert dtypes.from_numpy(dtypes.numpy_dtype(name).newbyteorder(">")).name == name


def test_numpy_ambiguous_entries():
    assert dtypes.numpy_dtype("BF16") == np.uint16  # BF16 travels as uint16 bits ...
    assert dtypes.from_numpy(np.uint16).name == "UINT16"  # ... so uint16 means UINT16
    for dt in (np.dtype(object), np.dtype("S5"), np.dtype("U3")):
        assert dtypes.from_numpy(dt).name == "BYTES"


@pytest.mark.parametrize("name", [n for n in NAMES if n != "BYTES"])
def test_torch_round_trip(name):
    torch = pytest.importorskip("torch")
    t = dtypes.torch_dtype(name)
    assert isinstance(t, torch.dtype)
    assert dtypes.from_torch(t).name == name
    assert torch.empty((), dtype=t).element_size() == dtypes.byte_size(name)


def test_unknown_types_raise():
    with pytest.raises(ValueError, match="unknown datatype 'FP8'"):
        dtypes.from_name("FP8")
    with pytest.raises(ValueError, match="no KServe v2 datatype"):
        dtypes.from_numpy(np.complex64)
    with pytest.raises(ValueError, match="no torch dtype"):
        dtypes.torch_dtype("BYTES")
    torch = pytest.importorskip("torch")
    with pytest.raises(ValueError, match="no KServe v2 datatype"):
        dtypes.from_torch(torch.complex64)
