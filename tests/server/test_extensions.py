"""The model_configuration and statistics extensions, driven with tritonclient.grpc."""

from __future__ import annotations

import time

import numpy as np
import pytest

tc = pytest.importorskip("tritonclient.grpc")
from tritonclient.grpc import model_config_pb2 as mc  # noqa: E402

from pyserve import dtypes  # noqa: E402
from test_server_grpc import expect_error, fp32_input  # noqa: E402  (tests/server is on sys.path)


def test_server_metadata_lists_the_extensions(client):
    extensions = set(client.get_server_metadata().extensions)
    assert {"model_configuration", "statistics", "model_repository"} <= extensions


def test_model_config_of_the_classifier(client):
    cfg = client.get_model_config("classifier").config  # tritonclient's own ModelConfig class
    assert (cfg.name, cfg.platform, cfg.backend, cfg.max_batch_size) == ("classifier", "pyserve", "pyserve", 8)
    assert [(t.name, t.data_type, list(t.dims)) for t in cfg.input] == [("x", mc.TYPE_FP32, [8])]
    assert [(t.name, t.data_type, list(t.dims)) for t in cfg.output] == [
        ("logits", mc.TYPE_FP32, [4]),
        ("probs", mc.TYPE_FP32, [4]),
    ]
    assert cfg.WhichOneof("scheduling_choice") is None  # no dynamic batching configured
    assert [(g.kind, g.count) for g in cfg.instance_group] == [(mc.ModelInstanceGroup.KIND_CPU, 1)]
    assert cfg.version_policy.latest.num_versions == 1
    assert cfg.default_model_filename == "model.pyserve"
    as_json = client.get_model_config("classifier", as_json=True)["config"]
    assert as_json["max_batch_size"] == 8 and as_json["input"][0]["data_type"] == "TYPE_FP32"


def test_model_config_with_dynamic_batching(client):
    cfg = client.get_model_config("batched").config
    assert cfg.max_batch_size == 8 and cfg.backend == "test-echo" and cfg.platform == "test"
    assert cfg.WhichOneof("scheduling_choice") == "dynamic_batching"
    assert list(cfg.dynamic_batching.preferred_batch_size) == [4, 8]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 20000
    assert [(g.kind, g.count) for g in cfg.instance_group] == [(mc.ModelInstanceGroup.KIND_CPU, 2)]


def test_model_config_without_max_batch_size_keeps_full_dims(client):
    cfg = client.get_model_config("echo").config
    assert cfg.max_batch_size == 0
    assert [list(t.dims) for t in cfg.input] == [[-1, 2]]


@pytest.mark.parametrize("name", ["classifier", "batched", "echo"])
def test_metadata_and_config_agree_as_perf_analyzer_expects(client, name):
    """perf_analyzer: with max_batch_size > 0 the metadata shape is [-1] + config dims; datatypes agree."""
    md = client.get_model_metadata(name)
    cfg = client.get_model_config(name).config
    for meta, conf in ((md.inputs, cfg.input), (md.outputs, cfg.output)):
        assert [t.name for t in meta] == [t.name for t in conf]
        for m, c in zip(meta, conf, strict=True):
            assert mc.DataType.Name(c.data_type) == dtypes.from_name(m.datatype).triton_config
            expected = ([-1] + list(c.dims)) if cfg.max_batch_size > 0 else list(c.dims)
            assert list(m.shape) == expected


def test_model_config_errors(client):
    expect_error(lambda: client.get_model_config("no-such-model"), "NOT_FOUND", "unknown model 'no-such-model'")
    expect_error(lambda: client.get_model_config("truncated"), "UNAVAILABLE", "model 'truncated' is not available")
    expect_error(lambda: client.get_model_config("classifier", "1"), "NOT_FOUND", "no version '1'")


def _stats(client, name):
    (s,) = client.get_inference_statistics(name).model_stats
    return s


def test_statistics_count_requests_rows_and_failures(client):
    before = _stats(client, "echo")
    sizes = [1, 2, 3, 1, 1]
    t0 = time.time_ns()
    for n in sizes:
        x = np.full((n, 2), n, np.float32)
        np.testing.assert_array_equal(client.infer("echo", [fp32_input(x)]).as_numpy("y"), 2 * x)
    for bad in (np.zeros((1, 3), np.float32), np.full((1, 2), -999, np.float32)):  # wrong shape; poisoned
        with pytest.raises(Exception):
            client.infer("echo", [fp32_input(bad)])
    wall_ns = time.time_ns() - t0
    after = _stats(client, "echo")
    assert (after.name, after.version) == ("echo", "1")
    st, st0 = after.inference_stats, before.inference_stats

    def delta(field):
        a, b = getattr(st, field), getattr(st0, field)
        return a.count - b.count, a.ns - b.ns

    assert delta("success")[0] == len(sizes)
    assert delta("fail")[0] == 2
    # echo has max_batch_size 0: one inference per request; the poisoned request reached the backend
    assert after.inference_count - before.inference_count == len(sizes)
    assert after.execution_count - before.execution_count == len(sizes) + 1
    for stage in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert delta(stage)[0] == len(sizes) + 1, stage
    success_ns, fail_ns = delta("success")[1], delta("fail")[1]
    assert 0 < delta("compute_infer")[1] <= success_ns + fail_ns
    assert success_ns + fail_ns <= wall_ns  # the server's time is within the client's
    assert abs(after.last_inference / 1000 - time.time()) < 60


def test_statistics_batch_sizes_and_inference_count_with_max_batch_size(client):
    before = _stats(client, "classifier")
    sizes = [1, 2, 3, 1]
    for n in sizes:
        client.infer("classifier", [fp32_input(np.zeros((n, 8), np.float32))])
    after = _stats(client, "classifier")
    assert after.inference_count - before.inference_count == sum(sizes)  # rows, as Triton counts
    assert after.execution_count - before.execution_count == len(sizes)
    counts_before = {b.batch_size: b.compute_infer.count for b in before.batch_stats}
    counts_after = {b.batch_size: b.compute_infer.count for b in after.batch_stats}
    grown = {k: v - counts_before.get(k, 0) for k, v in counts_after.items() if v != counts_before.get(k, 0)}
    assert grown == {1: 2, 2: 1, 3: 1}


def test_statistics_of_all_models_and_errors(client):
    names = {s.name for s in client.get_inference_statistics().model_stats}
    assert {"classifier", "echo", "batched", "explode"} <= names
    assert not names & {"truncated", "bitflipped", "badconfig"}  # only models that serve
    expect_error(lambda: client.get_inference_statistics("no-such-model"), "NOT_FOUND", "unknown model")
    expect_error(lambda: client.get_inference_statistics("classifier", "7"), "NOT_FOUND", "no version '7'")
    as_json = client.get_inference_statistics("classifier", as_json=True)
    assert as_json["model_stats"][0]["name"] == "classifier"


def test_extension_rpcs_with_the_aio_client(server):
    """tritonclient.grpc.aio drives the same extension RPCs."""
    import asyncio

    aio = pytest.importorskip("tritonclient.grpc.aio")
    from tritonclient.utils import InferenceServerException

    async def main():
        c = aio.InferenceServerClient(server.url)
        try:
            assert "statistics" in (await c.get_server_metadata()).extensions
            cfg = (await c.get_model_config("classifier")).config
            assert cfg.max_batch_size == 8 and [list(t.dims) for t in cfg.input] == [[8]]
            before = (await c.get_inference_statistics("echo")).model_stats[0].inference_count
            x = tc.InferInput("x", [3, 2], "FP32")
            x.set_data_from_numpy(np.ones((3, 2), np.float32))
            await c.infer("echo", [x])
            after = (await c.get_inference_statistics("echo")).model_stats[0].inference_count
            index = {m.name: m.state for m in (await c.get_model_repository_index()).models}
            with pytest.raises(InferenceServerException, match="explicit model load / unload is not allowed"):
                await c.load_model("echo")
            with pytest.raises(InferenceServerException, match="explicit model load / unload is not allowed"):
                await c.unload_model("echo")
        finally:
            await c.close()
        return after - before, index

    delta, index = asyncio.run(main())
    assert delta == 1  # echo has max_batch_size 0: one inference per request
    assert index["classifier"] == "READY" and index["truncated"] == "UNAVAILABLE"
