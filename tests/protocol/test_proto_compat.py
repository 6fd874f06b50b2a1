"""Our protos/ are wire-compatible with tritonclient's, and the committed stubs match protos/."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from pyserve.protocol._generated import grpc_service_pb2 as ours
from pyserve.protocol._generated import model_config_pb2 as ours_mc

theirs = pytest.importorskip("tritonclient.grpc.service_pb2")
theirs_mc = pytest.importorskip("tritonclient.grpc.model_config_pb2")

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


OUR_MESSAGES = {d.full_name: d for f in (ours.DESCRIPTOR, ours_mc.DESCRIPTOR) for d in _all_messages(f)}

#: Messages of Triton's model_config.proto that pyserve declares only in part (the fields it sets):
#: every declared field must equal Triton's, and the omitted ones are listed so that a field
#: dropped by mistake fails the test.
SUBSET_MESSAGES = {
    "inference.ModelConfig": {
        "batch_input", "batch_output", "optimization", "sequence_batching", "ensemble_scheduling",
        "cc_model_filenames", "metric_tags", "parameters", "model_warmup", "model_operations",
        "model_transaction_policy", "model_repository_agents", "response_cache", "model_metrics",
    },
    "inference.ModelInstanceGroup": {"rate_limiter", "secondary_devices"},
    "inference.ModelDynamicBatching": {"default_queue_policy", "priority_queue_policy"},
}


def test_package_and_service_name():
    assert ours.DESCRIPTOR.package == "inference"
    assert "GRPCInferenceService" in ours.DESCRIPTOR.services_by_name


@pytest.mark.parametrize("full_name", sorted(OUR_MESSAGES))
def test_message_matches_tritonclient(full_name):
    their_pool = theirs.DESCRIPTOR.pool
    their = their_pool.FindMessageTypeByName(full_name)
    mine, theirs_sig = _message_signature(OUR_MESSAGES[full_name]), _message_signature(their)
    omitted = SUBSET_MESSAGES.get(full_name, set())
    assert set(theirs_sig["fields"]) - set(mine["fields"]) == omitted
    theirs_sig["fields"] = {k: v for k, v in theirs_sig["fields"].items() if k not in omitted}
    if omitted:  # a oneof we declare holds only the members we declare
        theirs_sig["oneofs"] = sorted({v[5] for v in theirs_sig["fields"].values() if v[5]})
    assert mine == theirs_sig


def _all_enums(file_desc):
    def walk(desc):
        yield from desc.enum_types
        for nested in desc.nested_types:
            yield from walk(nested)

    yield from file_desc.enum_types_by_name.values()
    for desc in file_desc.message_types_by_name.values():
        yield from walk(desc)


OUR_ENUMS = {e.full_name: e for e in _all_enums(ours_mc.DESCRIPTOR)}


@pytest.mark.parametrize("full_name", sorted(OUR_ENUMS))
def test_enum_matches_tritonclient(full_name):
    their = theirs.DESCRIPTOR.pool.FindEnumTypeByName(full_name)
    assert [(v.name, v.number) for v in OUR_ENUMS[full_name].values] == [(v.name, v.number) for v in their.values]


def test_model_config_file_name_and_import():
    """Same file name and package as Triton's, and grpc_service.proto imports it like Triton's does."""
    assert ours_mc.DESCRIPTOR.name == theirs_mc.DESCRIPTOR.name == "model_config.proto"
    assert ours_mc.DESCRIPTOR.package == "inference"
    assert [d.name for d in ours.DESCRIPTOR.dependencies] == [d.name for d in theirs.DESCRIPTOR.dependencies]
    assert ours_mc.DESCRIPTOR.pool is ours.DESCRIPTOR.pool  # one private pool for both files


def test_model_config_crosses_the_wire():
    cfg = ours_mc.ModelConfig(name="m", platform="pyserve", backend="pyserve", max_batch_size=8)
    cfg.input.add(name="x", data_type=ours_mc.TYPE_FP32, dims=[8])
    cfg.output.add(name="y", data_type=ours_mc.TYPE_STRING, dims=[-1])
    cfg.dynamic_batching.preferred_batch_size.extend([4, 8])
    cfg.dynamic_batching.max_queue_delay_microseconds = 500
    cfg.instance_group.add(name="m", kind=ours_mc.ModelInstanceGroup.KIND_CPU, count=2)
    cfg.version_policy.latest.num_versions = 1
    back = theirs_mc.ModelConfig.FromString(cfg.SerializeToString())
    assert back.WhichOneof("scheduling_choice") == "dynamic_batching"
    assert list(back.dynamic_batching.preferred_batch_size) == [4, 8]
    assert back.input[0].data_type == theirs_mc.TYPE_FP32 and list(back.input[0].dims) == [8]
    assert back.output[0].data_type == theirs_mc.TYPE_STRING
    assert back.instance_group[0].kind == theirs_mc.ModelInstanceGroup.KIND_CPU
    assert back.version_policy.WhichOneof("policy_choice") == "latest"
    assert ours_mc.ModelConfig.FromString(back.SerializeToString()) == cfg


def test_core_messages_present():
    wanted = {
        "ServerLiveRequest", "ServerLiveResponse", "ServerReadyRequest", "ServerReadyResponse",
        "ModelReadyRequest", "ModelReadyResponse", "ServerMetadataRequest", "ServerMetadataResponse",
        "ModelMetadataRequest", "ModelMetadataResponse", "InferParameter", "InferTensorContents",
        "ModelInferRequest", "ModelInferResponse", "ModelStreamInferResponse",
        "ModelConfigRequest", "ModelConfigResponse", "ModelConfig", "ModelStatisticsRequest",
        "ModelStatisticsResponse", "ModelStatistics", "InferStatistics", "StatisticDuration",
        "InferBatchStatistics", "RepositoryIndexRequest", "RepositoryIndexResponse",
        "RepositoryModelLoadRequest", "RepositoryModelLoadResponse", "RepositoryModelUnloadRequest",
        "RepositoryModelUnloadResponse", "ModelRepositoryParameter",
    }
    assert {f"inference.{n}" for n in wanted} <= set(OUR_MESSAGES)


def test_service_methods_match_tritonclient():
    our_service = ours.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    their_service = theirs.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert len(our_service.methods) >= 12
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
    for name in ("grpc_service_pb2.py", "grpc_service_pb2_grpc.py", "grpc_service_pb2.pyi", "model_config_pb2.py",
                 "model_config_pb2.pyi", "_pool.py"):
        assert (tmp_path / name).read_text() == (committed / name).read_text(), name
