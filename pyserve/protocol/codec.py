"""The one place where Open Inference Protocol protobuf messages meet pyserve's own types.

Server side: :func:`decode_infer_request` (validates datatypes, byte sizes and element counts,
raising :class:`~pyserve.protocol.errors.InvalidArgument` that names expected and actual) and the
``encode_*`` functions for every response. Client side: :func:`encode_infer_request` and
:func:`decode_infer_response`. Nothing else in pyserve imports the generated ``*_pb2`` modules:
the service registration (:func:`add_inference_servicer`) and client stub (:func:`inference_stub`)
are here too.

Wire format of tensor data (KServe v2 gRPC): ``raw_input_contents``/``raw_output_contents`` hold one
``bytes`` per tensor, in tensor order: little-endian, row-major; BYTES tensors as, per element, a
4-byte little-endian length followed by the element's bytes. A request either puts every input in
``raw_input_contents`` or every input in its typed ``contents``; pyserve always answers raw (what
tritonclient's ``as_numpy`` reads).
"""

from __future__ import annotations

import math
import struct
import sys
from typing import Iterable, Mapping

import numpy as np

from pyserve import dtypes
from pyserve.protocol._generated import grpc_service_pb2 as pb
from pyserve.protocol._generated import grpc_service_pb2_grpc as pb_grpc
from pyserve.protocol._generated import model_config_pb2 as mc
from pyserve.protocol.errors import InvalidArgument
from pyserve.protocol.types import (
    BatchStats,
    Duration,
    InferRequest,
    InferResponse,
    ModelConfigInfo,
    ModelIndexEntry,
    ModelMetadata,
    ModelStats,
    ParamValue,
    RequestedOutput,
    ServerMetadata,
    Tensor,
    TensorMetadata,
)

__all__ = [
    "SERVICE_NAME",
    "add_inference_servicer",
    "inference_stub",
    "reflection_pool",
    "decode_infer_request",
    "encode_infer_request",
    "encode_infer_response",
    "decode_infer_response",
    "encode_stream_response",
    "encode_stream_error",
    "decode_model_ref",
    "encode_model_metadata_request",
    "encode_server_live",
    "encode_server_ready",
    "encode_model_ready",
    "encode_server_metadata",
    "decode_server_metadata",
    "encode_model_metadata",
    "decode_model_metadata",
    "tensor_to_raw",
    "tensor_from_raw",
    "CONTENTS_FIELD",
    "config_data_type",
    "datatype_from_config",
    "encode_model_config",
    "decode_model_config",
    "encode_model_statistics",
    "decode_model_statistics",
    "encode_repository_index",
    "decode_repository_index",
    "decode_repository_request",
    "encode_repository_load_response",
    "encode_repository_unload_response",
    "parse_model_config_text",
]

SERVICE_NAME = "inference.GRPCInferenceService"

#: Typed ``InferTensorContents`` field of each datatype. FP16 and BF16 have none: they travel raw.
CONTENTS_FIELD: dict[str, str] = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}

_LEN = struct.Struct("<I")
_LITTLE = sys.byteorder == "little"
#: Little-endian numpy dtype of each fixed-size datatype (built once: ``newbyteorder`` makes a new
#: dtype object on every call, and this is on the per-request path).
_WIRE_DTYPE = {d.name: d.numpy.newbyteorder("<") for d in dtypes.DTYPES if d.byte_size is not None}


# --- service plumbing -------------------------------------------------------------------------


def add_inference_servicer(servicer, server) -> None:
    """Register an ``inference.GRPCInferenceService`` implementation on a grpc(.aio) server."""
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)


def inference_stub(channel):
    """Client stub for ``inference.GRPCInferenceService`` on a grpc(.aio) channel."""
    return pb_grpc.GRPCInferenceServiceStub(channel)


class _ChainedPool:
    """The descriptor-pool lookups gRPC reflection makes, answered from pyserve's private pool
    (the inference service) and then from protobuf's default pool (health, reflection)."""

    def __init__(self, *pools) -> None:
        self._pools = pools

    def _first(self, method: str, *args):
        for pool in self._pools:
            try:
                return getattr(pool, method)(*args)
            except KeyError:
                continue
        raise KeyError(args[0] if args else method)

    def FindFileByName(self, name):  # noqa: N802 (protobuf's DescriptorPool API)
        return self._first("FindFileByName", name)

    def FindFileContainingSymbol(self, symbol):  # noqa: N802
        return self._first("FindFileContainingSymbol", symbol)

    def FindMessageTypeByName(self, name):  # noqa: N802
        return self._first("FindMessageTypeByName", name)

    def FindExtensionByNumber(self, message, number):  # noqa: N802
        return self._first("FindExtensionByNumber", message, number)

    def FindAllExtensions(self, message):  # noqa: N802
        return self._first("FindAllExtensions", message)


def reflection_pool():
    """A descriptor pool for gRPC server reflection that sees pyserve's private pool (where the
    stubs register ``inference.*``, see tools/gen_protos.py) and protobuf's default pool."""
    from google.protobuf import descriptor_pool

    from pyserve.protocol._generated._pool import POOL

    return _ChainedPool(POOL, descriptor_pool.Default())


# --- tensors ----------------------------------------------------------------------------------


def _datatype(name: str, where: str) -> dtypes.DType:
    try:
        return dtypes.from_name(name)
    except ValueError:
        known = ", ".join(d.name for d in dtypes.DTYPES)
        raise InvalidArgument(f"{where}: unknown datatype {name!r}; expected one of {known}") from None


def _shape(dims: Iterable[int], where: str) -> tuple[int, ...]:
    shape = tuple(map(int, dims))
    if shape and min(shape) < 0:
        raise InvalidArgument(f"{where}: shape {list(shape)} has a negative dimension; a tensor's shape is concrete")
    return shape


def _fmt_shape(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _bytes_element(value) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, np.generic):
        return _bytes_element(value.item())
    return str(value).encode("utf-8")


def tensor_to_raw(tensor: Tensor) -> bytes:
    """Wire bytes of one tensor (little-endian row-major; BYTES length-prefixed)."""
    if tensor.datatype == "BYTES":
        parts = []
        for element in tensor.data.reshape(-1):
            b = _bytes_element(element)
            parts.append(_LEN.pack(len(b)))
            parts.append(b)
        return b"".join(parts)
    wire = _WIRE_DTYPE.get(tensor.datatype)
    if wire is None:
        wire = dtypes.numpy_dtype(tensor.datatype).newbyteorder("<")  # ValueError for an unknown name
    return np.ascontiguousarray(tensor.data, dtype=wire).tobytes()


def _unpack_bytes(buf: bytes, count: int, where: str, shape: tuple[int, ...]) -> np.ndarray:
    out = np.empty(count, dtype=object)
    offset, size = 0, len(buf)
    view = memoryview(buf)
    for i in range(count):
        if offset + 4 > size:
            raise InvalidArgument(
                f"{where}: BYTES data ends after {i} element(s); expected {count} for shape {_fmt_shape(shape)}"
            )
        (length,) = _LEN.unpack_from(buf, offset)
        offset += 4
        if offset + length > size:
            raise InvalidArgument(
                f"{where}: BYTES element {i} claims {length} bytes but only {size - offset} remain"
            )
        out[i] = bytes(view[offset : offset + length])
        offset += length
    if offset != size:
        raise InvalidArgument(
            f"{where}: BYTES data has {size - offset} byte(s) after the {count} element(s) "
            f"that shape {_fmt_shape(shape)} holds"
        )
    return out.reshape(shape)


def tensor_from_raw(buf: bytes, name: str, datatype: str, shape: tuple[int, ...], where: str | None = None) -> Tensor:
    """Decode one tensor's wire bytes, checking the byte size against ``shape`` and the datatype."""
    where = where or f"tensor '{name}'"
    dt = _datatype(datatype, where)
    shape = _shape(shape, where)
    count = math.prod(shape)
    if dt.byte_size is None:
        return Tensor(name, dt.name, _unpack_bytes(buf, count, where, shape))
    expected = count * dt.byte_size
    if len(buf) != expected:
        raise InvalidArgument(
            f"{where}: raw contents hold {len(buf)} bytes; expected {expected} "
            f"(shape {_fmt_shape(shape)} x {dt.name} at {dt.byte_size} byte(s) per element)"
        )
    arr = np.frombuffer(buf, dtype=_WIRE_DTYPE[dt.name]).reshape(shape)
    if not _LITTLE:
        arr = arr.astype(dt.numpy)
    return Tensor(name, dt.name, arr)


def _populated_contents(contents: pb.InferTensorContents) -> list[str]:
    return [f.name for f, _ in contents.ListFields()]


def _tensor_from_contents(contents: pb.InferTensorContents, name: str, datatype: str, shape, where: str) -> Tensor:
    dt = _datatype(datatype, where)
    shape = _shape(shape, where)
    count = math.prod(shape)
    field = CONTENTS_FIELD.get(dt.name)
    populated = _populated_contents(contents)
    if field is None:
        raise InvalidArgument(f"{where}: {dt.name} has no typed contents field; send it in raw contents")
    stray = [f for f in populated if f != field]
    if stray:
        raise InvalidArgument(f"{where}: datatype {dt.name} expects contents.{field}, got contents.{stray[0]}")
    values = getattr(contents, field)
    if len(values) != count:
        raise InvalidArgument(
            f"{where}: contents.{field} has {len(values)} element(s); expected {count} for shape {_fmt_shape(shape)}"
        )
    if dt.name == "BYTES":
        arr = np.empty(count, dtype=object)
        for i, v in enumerate(values):
            arr[i] = bytes(v)
        return Tensor(name, dt.name, arr.reshape(shape))
    try:
        arr = np.array(values, dtype=dt.numpy).reshape(shape)
    except OverflowError as exc:
        raise InvalidArgument(f"{where}: contents.{field} has a value out of range for {dt.name} ({exc})") from None
    return Tensor(name, dt.name, arr)


# --- parameters -------------------------------------------------------------------------------


def _param_to_pb(value: ParamValue, out: pb.InferParameter) -> None:
    if isinstance(value, (bool, np.bool_)):
        out.bool_param = bool(value)
    elif isinstance(value, (int, np.integer)):
        v = int(value)
        if -(2**63) <= v < 2**63:
            out.int64_param = v
        elif 0 <= v < 2**64:
            out.uint64_param = v
        else:
            raise ValueError(f"parameter value {v} does not fit int64 or uint64")
    elif isinstance(value, (float, np.floating)):
        out.double_param = float(value)
    elif isinstance(value, str):
        out.string_param = value
    else:
        raise TypeError(f"parameter value must be bool, int, float or str, got {type(value).__name__}")


def _params_to_pb(params: Mapping[str, ParamValue], out) -> None:
    for key, value in params.items():
        _param_to_pb(value, out[key])


def _params_from_pb(params) -> dict[str, ParamValue]:
    result: dict[str, ParamValue] = {}
    for key, p in params.items():
        which = p.WhichOneof("parameter_choice")
        if which is not None:
            result[key] = getattr(p, which)
    return result


# --- inference --------------------------------------------------------------------------------


def _raw_fixed(buf: bytes, t) -> Tensor | None:
    """The fast path of :func:`tensor_from_raw` for a fixed-size datatype with a well-formed shape and
    byte size (the common request): the tensor, or None to let the full path decode it or raise its
    InvalidArgument. Builds no message text."""
    datatype = t.datatype
    wire = _WIRE_DTYPE.get(datatype)
    if wire is None or not _LITTLE:
        return None
    shape = tuple(t.shape)
    if shape and min(shape) < 0:
        return None
    count = 1
    for d in shape:
        count *= d
    if len(buf) != count * wire.itemsize:
        return None
    return Tensor._checked(t.name, datatype, np.frombuffer(buf, dtype=wire).reshape(shape))


def _decode_tensors(specs, raw, kind: str, raw_field: str) -> tuple[Tensor, ...]:
    n = len(specs)
    if raw and len(raw) != n:
        raise InvalidArgument(
            f"{raw_field} has {len(raw)} entries for {n} {kind}(s); expected one per {kind} "
            f"(a request sends either every {kind} raw or every {kind} in typed contents)"
        )
    tensors, seen = [], set()
    for i, t in enumerate(specs):
        name = t.name
        if name in seen:
            raise InvalidArgument(f"{kind} '{name}' appears more than once")
        seen.add(name)
        tensor = None
        if raw:
            if t.HasField("contents") and _populated_contents(t.contents):
                raise InvalidArgument(f"{kind} '{name}' has both {raw_field} and typed contents; send one or the other")
            tensor = _raw_fixed(raw[i], t)
            if tensor is None:
                tensor = tensor_from_raw(raw[i], name, t.datatype, t.shape, f"{kind} '{name}'")
        else:
            tensor = _tensor_from_contents(t.contents, name, t.datatype, t.shape, f"{kind} '{name}'")
        if t.parameters:
            params = _params_from_pb(t.parameters)
            if params:
                tensor = Tensor(tensor.name, tensor.datatype, tensor.data, params)
        tensors.append(tensor)
    return tuple(tensors)


def decode_infer_request(msg: pb.ModelInferRequest) -> InferRequest:
    """``ModelInferRequest`` -> :class:`InferRequest`; raises InvalidArgument for malformed tensors."""
    inputs = _decode_tensors(msg.inputs, msg.raw_input_contents, "input", "raw_input_contents")
    outputs = tuple(RequestedOutput(o.name, _params_from_pb(o.parameters)) for o in msg.outputs) \
        if msg.outputs else ()
    return InferRequest(
        model_name=msg.model_name,
        model_version=msg.model_version,
        id=msg.id,
        inputs=inputs,
        outputs=outputs,
        parameters=_params_from_pb(msg.parameters) if msg.parameters else {},
    )


def encode_infer_request(req: InferRequest) -> pb.ModelInferRequest:
    """:class:`InferRequest` -> ``ModelInferRequest`` with every input in ``raw_input_contents``."""
    msg = pb.ModelInferRequest(model_name=req.model_name, model_version=req.model_version, id=req.id)
    _params_to_pb(req.parameters, msg.parameters)
    for t in req.inputs:
        entry = msg.inputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
        _params_to_pb(t.parameters, entry.parameters)
        msg.raw_input_contents.append(tensor_to_raw(t))
    for o in req.outputs:
        entry = msg.outputs.add(name=o.name)
        _params_to_pb(o.parameters, entry.parameters)
    return msg


def encode_infer_response(resp: InferResponse) -> pb.ModelInferResponse:
    """:class:`InferResponse` -> ``ModelInferResponse``; outputs always in ``raw_output_contents``."""
    msg = pb.ModelInferResponse(model_name=resp.model_name, model_version=resp.model_version, id=resp.id)
    if resp.parameters:
        _params_to_pb(resp.parameters, msg.parameters)
    add, raw = msg.outputs.add, msg.raw_output_contents
    for t in resp.outputs:
        entry = add(name=t.name, datatype=t.datatype, shape=t.data.shape)
        if t.parameters:
            _params_to_pb(t.parameters, entry.parameters)
        raw.append(tensor_to_raw(t))
    return msg


def decode_infer_response(msg: pb.ModelInferResponse) -> InferResponse:
    """``ModelInferResponse`` -> :class:`InferResponse` (raw or typed output contents)."""
    outputs = _decode_tensors(msg.outputs, msg.raw_output_contents, "output", "raw_output_contents")
    return InferResponse(
        model_name=msg.model_name,
        model_version=msg.model_version,
        id=msg.id,
        outputs=outputs,
        parameters=_params_from_pb(msg.parameters),
    )


def encode_stream_response(resp: InferResponse) -> pb.ModelStreamInferResponse:
    return pb.ModelStreamInferResponse(infer_response=encode_infer_response(resp))


def encode_stream_error(message: str, request_id: str = "") -> pb.ModelStreamInferResponse:
    """A failed request on ModelStreamInfer: ``error_message`` set, the request id echoed."""
    return pb.ModelStreamInferResponse(
        error_message=message, infer_response=pb.ModelInferResponse(id=request_id)
    )


# --- health and metadata ----------------------------------------------------------------------


def encode_model_metadata_request(name: str, version: str = "") -> pb.ModelMetadataRequest:
    return pb.ModelMetadataRequest(name=name, version=version)


def decode_model_ref(msg) -> tuple[str, str]:
    """``(name, version)`` of a ModelReadyRequest or ModelMetadataRequest."""
    return msg.name, msg.version


def encode_server_live(live: bool) -> pb.ServerLiveResponse:
    return pb.ServerLiveResponse(live=live)


def encode_server_ready(ready: bool) -> pb.ServerReadyResponse:
    return pb.ServerReadyResponse(ready=ready)


def encode_model_ready(ready: bool) -> pb.ModelReadyResponse:
    return pb.ModelReadyResponse(ready=ready)


def encode_server_metadata(md: ServerMetadata) -> pb.ServerMetadataResponse:
    return pb.ServerMetadataResponse(name=md.name, version=md.version, extensions=list(md.extensions))


def decode_server_metadata(msg: pb.ServerMetadataResponse) -> ServerMetadata:
    return ServerMetadata(name=msg.name, version=msg.version, extensions=tuple(msg.extensions))


def encode_model_metadata(md: ModelMetadata) -> pb.ModelMetadataResponse:
    msg = pb.ModelMetadataResponse(name=md.name, versions=list(md.versions), platform=md.platform)
    for src, dst in ((md.inputs, msg.inputs), (md.outputs, msg.outputs)):
        for t in src:
            dst.add(name=t.name, datatype=t.datatype, shape=list(t.shape))
    return msg


def decode_model_metadata(msg: pb.ModelMetadataResponse) -> ModelMetadata:
    def tensors(items) -> tuple[TensorMetadata, ...]:
        return tuple(TensorMetadata(t.name, t.datatype, tuple(t.shape)) for t in items)

    return ModelMetadata(
        name=msg.name,
        versions=tuple(msg.versions),
        platform=msg.platform,
        inputs=tensors(msg.inputs),
        outputs=tensors(msg.outputs),
    )


# --- extensions: model configuration, statistics, repository ---------------------------------


def config_data_type(datatype: str) -> int:
    """Triton ``DataType`` enum value of a protocol datatype (``"BYTES"`` -> ``TYPE_STRING``)."""
    return mc.DataType.Value(dtypes.from_name(datatype).triton_config)


def datatype_from_config(value: int) -> str:
    """Protocol datatype of a Triton ``DataType`` enum value; ValueError for TYPE_INVALID/unknown."""
    name = mc.DataType.Name(value) if value in mc.DataType.values() else str(value)
    for d in dtypes.DTYPES:
        if d.triton_config == name:
            return d.name
    raise ValueError(f"Triton data type {name} has no protocol datatype")


def _config_dims(shape: tuple[int, ...], max_batch_size: int) -> list[int]:
    # Triton's dims exclude the batch dimension when max_batch_size > 0
    return list(shape[1:] if max_batch_size > 0 else shape)


def encode_model_config(info: ModelConfigInfo) -> pb.ModelConfigResponse:
    """:class:`ModelConfigInfo` -> ``ModelConfigResponse`` (Triton's ``inference.ModelConfig``)."""
    cfg = mc.ModelConfig(
        name=info.name,
        platform=info.platform,
        backend=info.backend,
        max_batch_size=info.max_batch_size,
        default_model_filename=info.default_model_filename,
    )
    kind, numbers = info.version_policy
    if kind == "all":
        cfg.version_policy.all.SetInParent()
    elif kind == "specific":
        cfg.version_policy.specific.versions.extend(numbers)
    else:
        cfg.version_policy.latest.num_versions = numbers[0] if numbers else 1
    for t in info.inputs:
        cfg.input.add(name=t.name, data_type=config_data_type(t.datatype), dims=_config_dims(t.shape, info.max_batch_size))
    for t in info.outputs:
        cfg.output.add(name=t.name, data_type=config_data_type(t.datatype), dims=_config_dims(t.shape, info.max_batch_size))
    if info.max_queue_delay_us is not None:
        cfg.dynamic_batching.max_queue_delay_microseconds = info.max_queue_delay_us
        cfg.dynamic_batching.preferred_batch_size.extend(info.preferred_batch_sizes)
    cfg.instance_group.add(
        name=info.name, kind=mc.ModelInstanceGroup.Kind.Value(info.instance_kind), count=info.instance_count
    )
    return pb.ModelConfigResponse(config=cfg)


def decode_model_config(msg: pb.ModelConfigResponse) -> ModelConfigInfo:
    """``ModelConfigResponse`` -> :class:`ModelConfigInfo` (the batch dimension put back as -1)."""
    cfg = msg.config

    def tensors(items) -> tuple[TensorMetadata, ...]:
        lead = (-1,) if cfg.max_batch_size > 0 else ()
        return tuple(TensorMetadata(t.name, datatype_from_config(t.data_type), lead + tuple(t.dims)) for t in items)

    batching = cfg.dynamic_batching if cfg.HasField("dynamic_batching") else None
    group = cfg.instance_group[0] if cfg.instance_group else None
    return ModelConfigInfo(
        name=cfg.name,
        platform=cfg.platform,
        backend=cfg.backend,
        max_batch_size=cfg.max_batch_size,
        inputs=tensors(cfg.input),
        outputs=tensors(cfg.output),
        max_queue_delay_us=batching.max_queue_delay_microseconds if batching is not None else None,
        preferred_batch_sizes=tuple(batching.preferred_batch_size) if batching is not None else (),
        instance_count=sum(g.count for g in cfg.instance_group) if cfg.instance_group else 1,
        instance_kind=mc.ModelInstanceGroup.Kind.Name(group.kind) if group is not None else "KIND_CPU",
        default_model_filename=cfg.default_model_filename,
        version_policy=_policy_from_pb(cfg.version_policy),
    )


def _policy_from_pb(vp) -> tuple[str, tuple[int, ...]]:
    which = vp.WhichOneof("policy_choice")
    if which == "all":
        return "all", ()
    if which == "specific":
        return "specific", tuple(int(v) for v in vp.specific.versions)
    return "latest", (int(vp.latest.num_versions) if which == "latest" else 1,)


def _duration(d: Duration, out) -> None:
    out.count, out.ns = d.count, d.ns


def encode_model_statistics(stats) -> pb.ModelStatisticsResponse:
    """Iterable of :class:`ModelStats` -> ``ModelStatisticsResponse``."""
    msg = pb.ModelStatisticsResponse()
    for s in stats:
        entry = msg.model_stats.add(
            name=s.name,
            version=s.version,
            last_inference=s.last_inference_ms,
            inference_count=s.inference_count,
            execution_count=s.execution_count,
        )
        st = entry.inference_stats
        for field in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output"):
            _duration(getattr(s, field), getattr(st, field))
        st.cache_hit.SetInParent()
        st.cache_miss.SetInParent()
        for b in s.batch_stats:
            be = entry.batch_stats.add(batch_size=b.batch_size)
            for field in ("compute_input", "compute_infer", "compute_output"):
                _duration(getattr(b, field), getattr(be, field))
    return msg


def decode_model_statistics(msg: pb.ModelStatisticsResponse) -> list[ModelStats]:
    def d(x) -> Duration:
        return Duration(int(x.count), int(x.ns))

    out = []
    for e in msg.model_stats:
        st = e.inference_stats
        out.append(ModelStats(
            name=e.name, version=e.version, last_inference_ms=e.last_inference,
            inference_count=e.inference_count, execution_count=e.execution_count,
            success=d(st.success), fail=d(st.fail), queue=d(st.queue), compute_input=d(st.compute_input),
            compute_infer=d(st.compute_infer), compute_output=d(st.compute_output),
            batch_stats=tuple(
                BatchStats(b.batch_size, d(b.compute_input), d(b.compute_infer), d(b.compute_output))
                for b in e.batch_stats
            ),
        ))
    return out


def encode_repository_index(entries) -> pb.RepositoryIndexResponse:
    msg = pb.RepositoryIndexResponse()
    for e in entries:
        msg.models.add(name=e.name, version=e.version, state=e.state, reason=e.reason)
    return msg


def decode_repository_index(msg: pb.RepositoryIndexResponse) -> list[ModelIndexEntry]:
    return [ModelIndexEntry(m.name, m.version, m.state, m.reason) for m in msg.models]


def decode_repository_request(msg) -> tuple[str, str, dict]:
    """``(repository_name, model_name, parameters)`` of a RepositoryModelLoad/UnloadRequest."""
    params = {}
    for key, p in msg.parameters.items():
        which = p.WhichOneof("parameter_choice")
        if which is not None:
            params[key] = getattr(p, which)
    return msg.repository_name, msg.model_name, params


def encode_repository_load_response() -> pb.RepositoryModelLoadResponse:
    return pb.RepositoryModelLoadResponse()


def encode_repository_unload_response() -> pb.RepositoryModelUnloadResponse:
    return pb.RepositoryModelUnloadResponse()


#: config.pbtxt fields pyserve reads, per message; any other field that is set is refused.
_PBTXT_FIELDS = {
    "": {"name", "platform", "backend", "max_batch_size", "input", "output", "dynamic_batching", "instance_group",
         "version_policy"},
    "input": {"name", "data_type", "dims"},
    "output": {"name", "data_type", "dims"},
    "dynamic_batching": {"max_queue_delay_microseconds", "preferred_batch_size"},
    "instance_group": {"name", "count", "kind"},
}


def _refuse_unsupported(msg, kind: str, where: str) -> None:
    for f, _ in msg.ListFields():
        if f.name not in _PBTXT_FIELDS[kind]:
            raise ValueError(f"field '{where}{f.name}' is not supported by pyserve; supported here: "
                             f"{', '.join(sorted(_PBTXT_FIELDS[kind]))}")


def parse_model_config_text(text: str) -> dict:
    """A Triton ``config.pbtxt`` (protobuf text format of ``inference.ModelConfig``) as the dict of
    config.yaml fields it sets (``data_type`` as the ``TYPE_*`` name).

    Raises ValueError naming the field: text-format errors (an unknown field, a bad value, with
    line:column) and fields of Triton's config that pyserve does not implement (e.g. ``optimization``,
    ``sequence_batching``).
    """
    from google.protobuf import text_format

    msg = mc.ModelConfig()
    try:
        text_format.Parse(text, msg)
    except text_format.ParseError as exc:
        import re

        # pyserve's model_config.proto declares only the fields it implements, so Triton's other
        # fields (optimization, sequence_batching, ...) land here too
        m = re.search(r'^(\d+:\d+) : Message type "inference\.(\w+)" has no field named "(\w+)"', str(exc))
        if m:
            raise ValueError(f"{m.group(1)}: field '{m.group(3)}' of {m.group(2)} is unknown or not supported by "
                             "pyserve") from None
        raise ValueError(str(exc)) from None
    _refuse_unsupported(msg, "", "")
    raw: dict = {}
    for key in ("name", "platform", "backend"):
        if getattr(msg, key):
            raw[key] = getattr(msg, key)
    if msg.max_batch_size:
        raw["max_batch_size"] = msg.max_batch_size
    for kind in ("input", "output"):
        entries = getattr(msg, kind)
        for i, t in enumerate(entries):
            _refuse_unsupported(t, kind, f"{kind}[{i}].")
        if entries:
            raw[kind] = [{"name": t.name, "data_type": mc.DataType.Name(t.data_type), "dims": list(t.dims)}
                         for t in entries]
    if msg.HasField("dynamic_batching"):
        db = msg.dynamic_batching
        _refuse_unsupported(db, "dynamic_batching", "dynamic_batching.")
        raw["dynamic_batching"] = {"max_queue_delay_microseconds": db.max_queue_delay_microseconds,
                                   "preferred_batch_size": list(db.preferred_batch_size)}
    if msg.HasField("version_policy"):
        which = msg.version_policy.WhichOneof("policy_choice")
        if which == "latest":
            raw["version_policy"] = {"latest": {"num_versions": msg.version_policy.latest.num_versions}}
        elif which == "specific":
            raw["version_policy"] = {"specific": {"versions": list(msg.version_policy.specific.versions)}}
        else:  # "all", or an empty version_policy {} (Triton's default: latest 1)
            raw["version_policy"] = {"all": {}} if which == "all" else {}
    groups = []
    for i, g in enumerate(msg.instance_group):
        _refuse_unsupported(g, "instance_group", f"instance_group[{i}].")
        group = {"kind": mc.ModelInstanceGroup.Kind.Name(g.kind) if g.kind else "KIND_CPU"}
        if g.count:
            group["count"] = g.count
        groups.append(group)
    if groups:
        raw["instance_group"] = groups
    return raw
