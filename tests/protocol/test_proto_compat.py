"""Our protos/ are wire-compatible with tritonclient's, and the committed stubs match protos/."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from pyserve.protocol._generated import grpc_service_pb2 as ours

theirs = pytest.importorskip("tritonclient.grpc.service_pb2")

ROOT = Path(__file__).resolve().parents[2]


def _all_messages(file_desc):
    def walk(desc):
        yield desc
        for nested in desc.nested_types:
            yield from walk(nested)

    for desc in file_desc.message_types_by_name.values():
        yield from walk(desc)


def _message_signature(desc):
    """Fields (name -> number, type, label, message/enum type, oneof), map-entry flag, oneofs."""
    from google.protobuf import descriptor_pb2

    proto = descriptor_pb2.DescriptorProto()
    desc.CopyToProto(proto)
    oneofs = [o.name for o in proto.oneof_decl]
    fields = {
        f.name: (
            f.number,
            f.type,
            f.label,
            # CopyToProto leaves type_name relative in some runtimes; the descriptor has the full name
            desc.fields_by_name[f.name].message_type.full_name if desc.fields_by_name[f.name].message_type else None,
            desc.fields_by_name[f.name].enum_type.full_name if desc.fields_by_name[f.name].enum_type else None,
            oneofs[f.oneof_index] if f.HasField("oneof_index") else None,
        )
        for f in proto.field
    }
    return {"fields": fields, "map_entry": proto.options.map_entry, "oneofs": sorted(oneofs)}


OUR_MESSAGES = {d.full_name: d for d in _all_messages(ours.DESCRIPTOR)}


def test_package_and_service_name():
    assert ours.DESCRIPTOR.package == "inference"
    assert "GRPCInferenceService" in ours.DESCRIPTOR.services_by_name


@pytest.mark.parametrize("full_name", sorted(OUR_MESSAGES))
def test_message_matches_tritonclient(full_name):
    their_pool = theirs.DESCRIPTOR.pool
    their = their_pool.FindMessageTypeByName(full_name)
    assert _message_signature(OUR_MESSAGES[full_name]) == _message_signature(their)


def test_core_messages_present():
    wanted = {
        "ServerLiveRequest", "ServerLiveResponse", "ServerReadyRequest", "ServerReadyResponse",
        "ModelReadyRequest", "ModelReadyResponse", "ServerMetadataRequest", "ServerMetadataResponse",
        "ModelMetadataRequest", "ModelMetadataResponse", "InferParameter", "InferTensorContents",
        "ModelInferRequest", "ModelInferResponse", "ModelStreamInferResponse",
    }
    assert {f"inference.{n}" for n in wanted} <= set(OUR_MESSAGES)


def test_service_methods_match_tritonclient():
    our_service = ours.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    their_service = theirs.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert len(our_service.methods) >= 7
    for m in our_service.methods:
        t = their_service.methods_by_name[m.name]
        assert m.input_type.full_name == t.input_type.full_name, m.name
        assert m.output_type.full_name == t.output_type.full_name, m.name
        for attr in ("client_streaming", "server_streaming"):
            if hasattr(m, attr):  # present in protobuf >= 5
                assert getattr(m, attr) == getattr(t, attr), (m.name, attr)
        # streaming flags also live in the serialized MethodDescriptorProto
        from google.protobuf import descriptor_pb2

        a, b = descriptor_pb2.MethodDescriptorProto(), descriptor_pb2.MethodDescriptorProto()
        m.CopyToProto(a)
        t.CopyToProto(b)
        assert (a.client_streaming, a.server_streaming) == (b.client_streaming, b.server_streaming), m.name


def test_messages_cross_the_wire_both_ways():
    req = ours.ModelInferRequest(model_name="m", model_version="2", id="42")
    t = req.inputs.add(name="x", datatype="FP32", shape=[1, 2])
    t.parameters["p"].string_param = "v"
    req.parameters["sequence_id"].uint64_param = 2**63 + 5
    req.outputs.add(name="y")
    req.raw_input_contents.append(b"\x00" * 8)
    back = theirs.ModelInferRequest.FromString(req.SerializeToString())
    assert back.id == "42" and back.inputs[0].parameters["p"].string_param == "v"
    assert back.parameters["sequence_id"].uint64_param == 2**63 + 5
    assert ours.ModelInferRequest.FromString(back.SerializeToString()) == req


def test_stubs_use_a_private_pool():
    from google.protobuf import descriptor_pool

    assert ours.DESCRIPTOR.pool is not descriptor_pool.Default()
    # tritonclient's file owns the default pool's inference.* symbols; ours did not collide with it
    assert descriptor_pool.Default().FindMessageTypeByName("inference.ModelInferRequest").file.name == "grpc_service.proto"


def _gen_protos():
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "tools" / "gen_protos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_stubs_match_protos():
    pytest.importorskip("grpc_tools")
    gen = _gen_protos()
    assert gen.check() == [], "stale stubs: run python tools/gen_protos.py"


def test_regenerated_stubs_equal_committed(tmp_path):
    """Regenerating gives the committed files, except protoc's version comment lines."""
    pytest.importorskip("grpc_tools")
    gen = _gen_protos()
    gen.generate(tmp_path)
    committed = ROOT / "pyserve" / "protocol" / "_generated"

    def version_line(text):
        return next((line for line in text.splitlines() if line.startswith("# Protobuf Python Version")), None)

    new, old = (d / "grpc_service_pb2.py" for d in (tmp_path, committed))
    if version_line(new.read_text()) != version_line(old.read_text()):
        pytest.skip(f"installed protoc differs from the one that generated the stubs ({version_line(old.read_text())});"
                    " test_committed_stubs_match_protos still compares the descriptors")
    for name in ("grpc_service_pb2.py", "grpc_service_pb2_grpc.py", "grpc_service_pb2.pyi"):
        assert (tmp_path / name).read_text() == (committed / name).read_text(), name
