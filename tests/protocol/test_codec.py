"""Codec: every datatype round-trips through the wire format; malformed tensors are refused."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from pyserve import dtypes
from pyserve.protocol import codec
from pyserve.protocol._generated import grpc_service_pb2 as pb
from pyserve.protocol.errors import InvalidArgument
from pyserve.protocol.types import InferRequest, InferResponse, RequestedOutput, Tensor

RNG = np.random.default_rng(0)


def sample(datatype: str, shape=(2, 3)) -> np.ndarray:
    d = dtypes.from_name(datatype)
    n = int(np.prod(shape))
    if datatype == "BYTES":
        values = [b"", b"a", "h\u00e9llo".encode(), b"\x00\xff\x01", b"x" * 300, b"end"]
        return np.array((values * n)[:n], dtype=object).reshape(shape)
    if datatype == "BOOL":
        return RNG.integers(0, 2, size=shape).astype(bool)
    if datatype == "BF16":  # arbitrary bit patterns, NaN payloads included: must survive untouched
        return RNG.integers(0, 2**16, size=shape, dtype=np.uint16)
    if d.numpy.kind == "f":
        return RNG.standard_normal(shape).astype(d.numpy)
    info = np.iinfo(d.numpy)
    return RNG.integers(info.min, info.max, size=shape, dtype=d.numpy, endpoint=True)


ALL = [d.name for d in dtypes.DTYPES]


def assert_same(a: np.ndarray, b: np.ndarray):
    assert a.shape == b.shape
    if a.dtype == object:
        assert [bytes(x) for x in a.reshape(-1)] == [bytes(x) for x in b.reshape(-1)]
    else:
        assert a.dtype == b.dtype
        assert a.tobytes() == b.tobytes()  # bit-exact (NaNs, -0.0, BF16 patterns)


@pytest.mark.parametrize("datatype", ALL)
@pytest.mark.parametrize("shape", [(2, 3), (0, 4), (), (5,)])
def test_request_round_trip_raw(datatype, shape):
    data = sample(datatype, shape)
    req = InferRequest(
        model_name="m", model_version="3", id="req-1",
        inputs=(Tensor("x", datatype, data, {"p": 1}),),
        outputs=(RequestedOutput("y", {"flag": True}),),
        parameters={"s": "v", "d": 0.5, "big": 2**64 - 1, "neg": -7},
    )
    msg = codec.encode_infer_request(req)
    assert len(msg.raw_input_contents) == 1 and not msg.inputs[0].HasField("contents")
    wire = pb.ModelInferRequest.FromString(msg.SerializeToString())
    back = codec.decode_infer_request(wire)
    assert (back.model_name, back.model_version, back.id) == ("m", "3", "req-1")
    assert back.parameters == {"s": "v", "d": 0.5, "big": 2**64 - 1, "neg": -7}
    assert back.outputs == (RequestedOutput("y", {"flag": True}),)
    (t,) = back.inputs
    assert (t.name, t.datatype, t.shape, dict(t.parameters)) == ("x", datatype, shape, {"p": 1})
    assert_same(t.data, data)


@pytest.mark.parametrize("datatype", ALL)
def test_response_round_trip_always_raw(datatype):
    data = sample(datatype, (3, 2))
    resp = InferResponse("m", "1", (Tensor("y", datatype, data), Tensor("z", "FP32", sample("FP32"))), id="7")
    msg = codec.encode_infer_response(resp)
    assert len(msg.raw_output_contents) == 2
    assert not any(o.HasField("contents") for o in msg.outputs)
    back = codec.decode_infer_response(pb.ModelInferResponse.FromString(msg.SerializeToString()))
    assert back.id == "7" and [o.name for o in back.outputs] == ["y", "z"]
    assert back.outputs[0].datatype == datatype
    assert_same(back.outputs[0].data, data)


def test_raw_is_little_endian_and_bytes_length_prefixed():
    t = Tensor("x", "INT32", np.array([1, 256], dtype=np.int32))
    assert codec.tensor_to_raw(t) == b"\x01\x00\x00\x00\x00\x01\x00\x00"
    big = Tensor.from_numpy("x", np.array([1, 256], dtype=">i4"), "INT32")
    assert codec.tensor_to_raw(big) == codec.tensor_to_raw(t)
    s = Tensor.from_numpy("s", np.array([b"ab", b""], dtype=object), "BYTES")
    assert codec.tensor_to_raw(s) == struct.pack("<I", 2) + b"ab" + struct.pack("<I", 0)
    u = Tensor.from_numpy("u", np.array(["h\u00e9"]))  # str arrays are BYTES, UTF-8 on the wire
    assert u.datatype == "BYTES" and codec.tensor_to_raw(u) == struct.pack("<I", 3) + "h\u00e9".encode()


def test_fp16_bf16_raw_bits():
    fp16 = np.array([1.0, -0.0, np.inf, 65504.0], dtype=np.float16)
    t = codec.tensor_from_raw(fp16.tobytes(), "h", "FP16", (4,))
    assert t.data.dtype == np.float16 and t.data.tobytes() == fp16.tobytes()
    bf16_bits = np.array([0x3F80, 0xC000, 0x7FC1], dtype=np.uint16)  # 1.0, -2.0, a NaN payload
    t = codec.tensor_from_raw(bf16_bits.tobytes(), "b", "BF16", (3,))
    assert t.datatype == "BF16" and t.data.dtype == np.uint16
    assert t.data.tolist() == [0x3F80, 0xC000, 0x7FC1]


def _typed_request(datatype, field, values, shape):
    msg = pb.ModelInferRequest(model_name="m")
    t = msg.inputs.add(name="x", datatype=datatype, shape=shape)
    getattr(t.contents, field).extend(values)
    return msg


@pytest.mark.parametrize("datatype", [n for n in ALL if n in codec.CONTENTS_FIELD])
def test_typed_contents_decode(datatype):
    data = sample(datatype, (2, 2))
    values = [bytes(v) for v in data.reshape(-1)] if datatype == "BYTES" else data.reshape(-1).tolist()
    msg = _typed_request(datatype, codec.CONTENTS_FIELD[datatype], values, [2, 2])
    (t,) = codec.decode_infer_request(msg).inputs
    assert_same(t.data, data)


def test_contents_field_table_covers_every_datatype():
    assert set(codec.CONTENTS_FIELD) | {"FP16", "BF16"} == {d.name for d in dtypes.DTYPES}
    for field in codec.CONTENTS_FIELD.values():
        assert field in pb.InferTensorContents.DESCRIPTOR.fields_by_name


def test_byte_size_mismatch_names_expected_and_actual():
    msg = pb.ModelInferRequest(model_name="m")
    msg.inputs.add(name="x", datatype="FP32", shape=[2, 4])
    msg.raw_input_contents.append(b"\x00" * 28)
    with pytest.raises(InvalidArgument, match=r"input 'x'.*28 bytes; expected 32.*\[2, 4\].*FP32"):
        codec.decode_infer_request(msg)


def test_unknown_datatype_and_negative_shape():
    msg = pb.ModelInferRequest(model_name="m")
    msg.inputs.add(name="x", datatype="FP8", shape=[1])
    msg.raw_input_contents.append(b"\x00")
    with pytest.raises(InvalidArgument, match="unknown datatype 'FP8'"):
        codec.decode_infer_request(msg)
    msg.inputs[0].datatype, msg.inputs[0].shape[0] = "UINT8", -1
    with pytest.raises(InvalidArgument, match="negative dimension"):
        codec.decode_infer_request(msg)


def test_raw_count_must_match_inputs():
    msg = pb.ModelInferRequest(model_name="m")
    msg.inputs.add(name="a", datatype="UINT8", shape=[1])
    t = msg.inputs.add(name="b", datatype="UINT8", shape=[1])
    t.contents.uint_contents.append(3)
    msg.raw_input_contents.append(b"\x01")  # a raw, b typed: mixing
    with pytest.raises(InvalidArgument, match="1 entries for 2 input"):
        codec.decode_infer_request(msg)


def test_raw_and_typed_on_one_input_refused():
    msg = _typed_request("UINT8", "uint_contents", [1], [1])
    msg.raw_input_contents.append(b"\x01")
    with pytest.raises(InvalidArgument, match="both raw_input_contents and typed contents"):
        codec.decode_infer_request(msg)


def test_typed_contents_errors():
    with pytest.raises(InvalidArgument, match="3 element.*expected 4"):
        codec.decode_infer_request(_typed_request("FP32", "fp32_contents", [1, 2, 3], [2, 2]))
    with pytest.raises(InvalidArgument, match="expects contents.fp32_contents, got contents.fp64_contents"):
        codec.decode_infer_request(_typed_request("FP32", "fp64_contents", [1.0], [1]))
    with pytest.raises(InvalidArgument, match="FP16 has no typed contents"):
        codec.decode_infer_request(_typed_request("FP16", "fp32_contents", [1.0], [1]))
    with pytest.raises(InvalidArgument, match="out of range for INT8"):
        codec.decode_infer_request(_typed_request("INT8", "int_contents", [300], [1]))
    with pytest.raises(InvalidArgument, match="no data|0 element"):
        codec.decode_infer_request(_typed_request("FP32", "fp32_contents", [], [1]))


@pytest.mark.parametrize(
    "raw, match",
    [
        (struct.pack("<I", 5) + b"abc", "claims 5 bytes but only 3 remain"),
        (struct.pack("<I", 1) + b"a", "ends after 1 element"),
        (struct.pack("<I", 1) + b"a" + struct.pack("<I", 0) + b"zz", "2 byte"),
        (b"\x01\x00", "ends after 0 element"),
    ],
)
def test_malformed_bytes(raw, match):
    msg = pb.ModelInferRequest(model_name="m")
    msg.inputs.add(name="s", datatype="BYTES", shape=[2] if "ends after 1" in match or "2 byte" in match else [1])
    msg.raw_input_contents.append(raw)
    with pytest.raises(InvalidArgument, match=match):
        codec.decode_infer_request(msg)


def test_duplicate_input_names_refused():
    msg = pb.ModelInferRequest(model_name="m")
    for _ in range(2):
        msg.inputs.add(name="x", datatype="UINT8", shape=[1])
        msg.raw_input_contents.append(b"\x01")
    with pytest.raises(InvalidArgument, match="more than once"):
        codec.decode_infer_request(msg)


def test_tensor_type_checks():
    with pytest.raises(ValueError, match="held as numpy float32, got float64"):
        Tensor("x", "FP32", np.zeros(2))
    with pytest.raises(ValueError, match="unknown datatype"):
        Tensor("x", "FP8", np.zeros(2))


def test_metadata_round_trip():
    from pyserve.protocol.types import ModelMetadata, ServerMetadata, TensorMetadata

    md = ModelMetadata("m", ("2",), "pyserve", (TensorMetadata("x", "FP32", (-1, 4)),), (TensorMetadata("y", "INT64", (-1,)),))
    assert codec.decode_model_metadata(codec.encode_model_metadata(md)) == md
    sm = ServerMetadata("pyserve", "0.1.0", ("a", "b"))
    assert codec.decode_server_metadata(codec.encode_server_metadata(sm)) == sm


def test_config_data_type_round_trip_every_datatype():
    from tritonclient.grpc import model_config_pb2 as theirs_mc

    from pyserve import dtypes
    from pyserve.protocol import codec

    for d in dtypes.DTYPES:
        value = codec.config_data_type(d.name)
        assert theirs_mc.DataType.Name(value) == d.triton_config  # same number in tritonclient's enum
        assert codec.datatype_from_config(value) == d.name
    assert codec.config_data_type("BYTES") == theirs_mc.TYPE_STRING
    with pytest.raises(ValueError, match="TYPE_INVALID"):
        codec.datatype_from_config(0)


def test_model_config_and_statistics_round_trip():
    from pyserve.protocol import codec
    from pyserve.protocol.types import BatchStats, Duration, ModelConfigInfo, ModelStats, TensorMetadata

    info = ModelConfigInfo(
        name="m", platform="pyserve", backend="pyserve", max_batch_size=4,
        inputs=(TensorMetadata("x", "BF16", (-1, 3, 5)),), outputs=(TensorMetadata("y", "BYTES", (-1,)),),
        max_queue_delay_us=100, preferred_batch_sizes=(2, 4), instance_count=3, default_model_filename="model.pyserve",
    )
    msg = codec.encode_model_config(info)
    assert list(msg.config.input[0].dims) == [3, 5] and list(msg.config.output[0].dims) == []
    assert codec.decode_model_config(msg) == info
    stats = ModelStats(
        name="m", version="2", last_inference_ms=5, inference_count=7, execution_count=3,
        success=Duration(4, 400), fail=Duration(1, 10), queue=Duration(5, 50), compute_input=Duration(5, 5),
        compute_infer=Duration(5, 300), compute_output=Duration(5, 6),
        batch_stats=(BatchStats(1, Duration(1, 1), Duration(1, 100), Duration(1, 2)),),
    )
    assert codec.decode_model_statistics(codec.encode_model_statistics([stats])) == [stats]
