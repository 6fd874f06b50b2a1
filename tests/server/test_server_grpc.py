"""The server in-process on port 0, exercised with the real tritonclient.grpc client."""

from __future__ import annotations

import logging
import threading
import time

import grpc
import numpy as np
import pytest

tc = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

import pyserve  # noqa: E402
from pyserve.protocol import codec  # noqa: E402
from pyserve.protocol._generated import grpc_service_pb2 as pb  # noqa: E402


def fp32_input(data: np.ndarray, name: str = "x", datatype: str = "FP32"):
    t = tc.InferInput(name, list(data.shape), datatype)
    t.set_data_from_numpy(data)
    return t


def expect_error(fn, status: str, *fragments: str) -> str:
    with pytest.raises(InferenceServerException) as info:
        fn()
    exc = info.value
    assert exc.status() == f"StatusCode.{status}", (exc.status(), exc.message())
    for fragment in fragments:
        assert fragment in exc.message(), (fragment, exc.message())
    return exc.message()


# --- health and metadata ----------------------------------------------------------------------


def test_live_ready_and_server_metadata(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    md = client.get_server_metadata()
    assert md.name == "pyserve" and md.version == pyserve.__version__
    assert list(md.extensions) == ["model_configuration", "statistics", "model_repository"]


def test_model_metadata_serves_highest_version(client):
    md = client.get_model_metadata("classifier")
    assert md.name == "classifier" and list(md.versions) == ["2"] and md.platform == "pyserve"
    assert [(t.name, t.datatype, list(t.shape)) for t in md.inputs] == [("x", "FP32", [-1, 8])]
    assert [(t.name, t.datatype, list(t.shape)) for t in md.outputs] == [
        ("logits", "FP32", [-1, 4]),
        ("probs", "FP32", [-1, 4]),
    ]


def test_model_ready(client):
    assert client.is_model_ready("classifier")
    assert client.is_model_ready("classifier", "2")
    assert not client.is_model_ready("classifier", "1")  # present on disk, not served
    for name in ("truncated", "bitflipped", "badconfig", "no-such-model"):
        assert not client.is_model_ready(name), name


def test_grpc_health_service(server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(server.url) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


# --- inference --------------------------------------------------------------------------------


def test_infer_matches_the_module(client, classifier_modules, server):
    import torch

    # the classifier (Linear/ReLU/softmax) is served by the straight-line NumPy plan, not the GraphModule
    assert server.server.repository.get("classifier").current.backend.graph_executor == "plan"

    module = classifier_modules[2][0]
    x = np.random.default_rng(1).standard_normal((5, 8)).astype(np.float32)
    result = client.infer("classifier", [fp32_input(x)])
    with torch.no_grad():
        logits, probs = (t.numpy() for t in module(torch.from_numpy(x)))
    np.testing.assert_allclose(result.as_numpy("logits"), logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.as_numpy("probs"), probs, rtol=1e-5, atol=1e-6)
    response = result.get_response()
    assert response.model_name == "classifier" and response.model_version == "2"
    assert len(response.raw_output_contents) == 2


def test_requested_outputs_subset_and_order(client):
    x = np.ones((2, 8), dtype=np.float32)
    result = client.infer("classifier", [fp32_input(x)], outputs=[tc.InferRequestedOutput("probs")])
    assert [o.name for o in result.get_response().outputs] == ["probs"]
    assert result.as_numpy("logits") is None
    np.testing.assert_allclose(result.as_numpy("probs").sum(axis=1), 1.0, rtol=1e-5)
    result = client.infer(
        "classifier", [fp32_input(x)], outputs=[tc.InferRequestedOutput("probs"), tc.InferRequestedOutput("logits")]
    )
    assert [o.name for o in result.get_response().outputs] == ["probs", "logits"]
    expect_error(
        lambda: client.infer("classifier", [fp32_input(x)], outputs=[tc.InferRequestedOutput("nope")]),
        "INVALID_ARGUMENT", "no output 'nope'", "'logits'", "'probs'",
    )


def test_request_id_echoed(client):
    result = client.infer("classifier", [fp32_input(np.zeros((1, 8), np.float32))], request_id="req-42")
    assert result.get_response().id == "req-42"


def test_explicit_version(client):
    x = np.zeros((1, 8), np.float32)
    assert client.infer("classifier", [fp32_input(x)], model_version="2").get_response().model_version == "2"
    expect_error(lambda: client.infer("classifier", [fp32_input(x)], model_version="1"),
                 "NOT_FOUND", "no version '1'", "serves version 2")


def test_typed_contents_accepted_with_own_stub(server):
    x = np.arange(16, dtype=np.float32).reshape(2, 8)
    req = pb.ModelInferRequest(model_name="classifier", id="typed")
    t = req.inputs.add(name="x", datatype="FP32", shape=[2, 8])
    t.contents.fp32_contents.extend(x.reshape(-1).tolist())
    with grpc.insecure_channel(server.url) as channel:
        response = codec.inference_stub(channel).ModelInfer(req, timeout=30)
    decoded = codec.decode_infer_response(response)
    assert decoded.id == "typed" and [o.name for o in decoded.outputs] == ["logits", "probs"]
    assert len(response.raw_output_contents) == 2  # answered raw even though asked typed


def test_stream_infer_one_response_per_request_in_order(server):
    results, done = [], threading.Event()

    def callback(result, error):
        results.append((result, error))
        if len(results) == 3:
            done.set()

    c = tc.InferenceServerClient(server.url)
    c.start_stream(callback)
    try:
        x = fp32_input(np.ones((1, 8), np.float32))
        c.async_stream_infer("classifier", [x], request_id="a")
        c.async_stream_infer("no-such-model", [x], request_id="b")
        c.async_stream_infer("classifier", [x], request_id="c")
        assert done.wait(30)
    finally:
        c.stop_stream()
        c.close()
    (r1, e1), (r2, e2), (r3, e3) = results
    assert e1 is None and r1.get_response().id == "a"
    assert r2 is None and "NOT_FOUND" in e2.message() and "no-such-model" in e2.message()
    assert e3 is None and r3.get_response().id == "c"


# --- errors -----------------------------------------------------------------------------------


def test_unknown_model_not_found(client):
    x = fp32_input(np.zeros((1, 8), np.float32))
    expect_error(lambda: client.infer("no-such-model", [x]), "NOT_FOUND", "unknown model 'no-such-model'", "classifier")
    expect_error(lambda: client.get_model_metadata("no-such-model"), "NOT_FOUND", "no-such-model")


def test_wrong_input_name(client):
    x = fp32_input(np.zeros((1, 8), np.float32), name="image")
    expect_error(lambda: client.infer("classifier", [x]), "INVALID_ARGUMENT",
                 "no input 'image'", "expected inputs: 'x' (FP32 [-1, 8])")


def test_missing_input(client):
    # the echo model expects 'x'; send nothing
    expect_error(lambda: client.infer("echo", []), "INVALID_ARGUMENT", "expects input 'x'", "request inputs: none")


def test_wrong_datatype(client):
    x = fp32_input(np.zeros((1, 8), np.float64), datatype="FP64")
    expect_error(lambda: client.infer("classifier", [x]), "INVALID_ARGUMENT", "expected datatype FP32, got FP64")


def test_byte_size_mismatch(client):
    x = fp32_input(np.zeros((2, 8), np.float32))
    x.set_shape([3, 8])  # 64 bytes of data, shape says 96
    expect_error(lambda: client.infer("classifier", [x]), "INVALID_ARGUMENT",
                 "input 'x'", "64 bytes", "expected 96", "[3, 8]")


def test_wrong_shape(client):
    x = fp32_input(np.zeros((2, 7), np.float32))
    expect_error(lambda: client.infer("classifier", [x]), "INVALID_ARGUMENT",
                 "expected shape [-1, 8]", "got [2, 7]")


def test_max_batch_size(client):
    x = fp32_input(np.zeros((9, 8), np.float32))
    expect_error(lambda: client.infer("classifier", [x]), "INVALID_ARGUMENT",
                 "batch size 9 exceeds the model's max_batch_size 8")


@pytest.mark.parametrize("name, fragment", [("truncated", "truncated"), ("bitflipped", "checksum")])
def test_corrupt_artifact_unavailable(client, name, fragment):
    x = fp32_input(np.zeros((1, 8), np.float32))
    message = expect_error(lambda: client.infer(name, [x]), "UNAVAILABLE", f"model '{name}' is not available")
    assert fragment in message.lower()
    expect_error(lambda: client.get_model_metadata(name), "UNAVAILABLE", name)
    # the good model keeps serving
    assert client.infer("classifier", [x]).as_numpy("logits").shape == (1, 4)


def test_bad_config_refused_with_field_named(client):
    x = fp32_input(np.zeros((1, 8), np.float32))
    expect_error(lambda: client.infer("badconfig", [x]), "UNAVAILABLE", "unknown field 'max_batch'", "max_batch_size")


def test_refusals_are_logged(server):
    reasons = {m.name: m.reason for m in server.server.repository.models if not m.ready}
    assert set(reasons) == {"truncated", "bitflipped", "badconfig"}
    assert "checksum" in reasons["bitflipped"].lower()


def test_unexpected_error_is_internal_and_generic(client, caplog):
    x = fp32_input(np.ones((1, 2), np.float32))
    with caplog.at_level(logging.ERROR, logger="pyserve.server"):
        message = expect_error(lambda: client.infer("explode", [x]), "INTERNAL", "internal error (ref ")
    assert "secret" not in message
    assert "secret detail from the backend" in caplog.text  # the traceback went to the log
    assert "Traceback" in caplog.text or any(r.exc_info for r in caplog.records)


def test_echo_backend_round_trip(client):
    x = np.array([[1.5, -2.0]], np.float32)
    np.testing.assert_array_equal(client.infer("echo", [fp32_input(x)]).as_numpy("y"), 2 * x)


# --- server lifecycle -------------------------------------------------------------------------



def test_message_size_limit(tmp_path, write_model):
    from pyserve.server import ServerThread

    write_model(tmp_path, "echo", 1, echo_mode="echo", config="backend: test-echo\n")
    with ServerThread(tmp_path, host="127.0.0.1", grpc_port=0, max_message_bytes=4096) as srv:
        c = tc.InferenceServerClient(srv.url)
        small = np.zeros((10, 2), np.float32)
        assert c.infer("echo", [fp32_input(small)]).as_numpy("y").shape == (10, 2)
        big = np.zeros((1024, 2), np.float32)  # 8 KiB > 4 KiB
        expect_error(lambda: c.infer("echo", [fp32_input(big)]), "RESOURCE_EXHAUSTED")
        c.close()


def test_default_message_size_limit_is_64_mib(tmp_path, write_model):
    """Default limit 64 MiB both ways (issue 5): 16 MiB requests and answers pass (over gRPC's own
    4 MiB default), 64 MiB + 1 row is RESOURCE_EXHAUSTED, and the server keeps serving."""
    from pyserve.server import ServerThread
    from pyserve.server.server import DEFAULT_MAX_MESSAGE_BYTES

    assert DEFAULT_MAX_MESSAGE_BYTES == 64 * 1024 * 1024
    write_model(tmp_path, "echo", 1, echo_mode="echo", config="backend: test-echo\n")
    with ServerThread(tmp_path, host="127.0.0.1", grpc_port=0) as srv:
        assert srv.server.max_message_bytes == DEFAULT_MAX_MESSAGE_BYTES
        c = tc.InferenceServerClient(srv.url)
        mid = np.full((2 * 1024 * 1024, 2), 1.5, np.float32)  # 16 MiB of data
        y = c.infer("echo", [fp32_input(mid)]).as_numpy("y")
        assert y.shape == mid.shape and float(y[0, 0]) == 3.0 and float(y[-1, 1]) == 3.0
        rows = DEFAULT_MAX_MESSAGE_BYTES // 8 + 1  # 8 bytes per row: data alone is over the limit
        expect_error(lambda: c.infer("echo", [fp32_input(np.zeros((rows, 2), np.float32))]), "RESOURCE_EXHAUSTED")
        assert c.infer("echo", [fp32_input(np.ones((1, 2), np.float32))]).as_numpy("y").tolist() == [[2.0, 2.0]]
        c.close()


def test_graceful_stop_lets_in_flight_requests_finish(tmp_path, write_model):
    from pyserve.server import ServerThread

    write_model(tmp_path, "slow", 1, echo_mode="slow", config="backend: test-echo\n")
    srv = ServerThread(tmp_path, host="127.0.0.1", grpc_port=0).start()
    url = srv.url
    c = tc.InferenceServerClient(url)
    outcome = {}

    def call():
        try:
            outcome["y"] = c.infer("slow", [fp32_input(np.ones((1, 2), np.float32))]).as_numpy("y")
        except Exception as exc:  # pragma: no cover - reported below
            outcome["error"] = exc

    worker = threading.Thread(target=call)
    worker.start()
    time.sleep(0.2)  # the request is in flight (the backend sleeps 0.5 s)
    t0 = time.monotonic()
    srv.stop(grace_s=5)
    worker.join(10)
    assert "error" not in outcome, outcome.get("error")
    np.testing.assert_array_equal(outcome["y"], [[2.0, 2.0]])
    assert time.monotonic() - t0 < 5  # stop returned once the in-flight request finished
    c.close()
    c2 = tc.InferenceServerClient(url)
    with pytest.raises(InferenceServerException):
        c2.is_server_live(client_timeout=2)
    c2.close()


def test_missing_repository_is_refused(tmp_path):
    from pyserve.server import ServerThread

    with pytest.raises(ValueError, match="is not a directory"):
        ServerThread(tmp_path / "nope", host="127.0.0.1", grpc_port=0).start()


def test_live_but_not_ready_while_loading(tmp_path, write_model):
    """The async API: live as soon as bound, ready and SERVING only once the repository loaded."""
    import asyncio

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from pyserve.server import Server

    write_model(tmp_path, "m", 1, echo_mode="slowload", config="backend: test-echo\n")

    async def main():
        server = Server(tmp_path, host="127.0.0.1", grpc_port=0)
        starting = asyncio.create_task(server.start())
        while server.bound_port is None:
            await asyncio.sleep(0.01)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.bound_port}") as channel:
            stub = codec.inference_stub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            assert (await stub.ServerLive(pb.ServerLiveRequest(), wait_for_ready=True)).live
            assert not (await stub.ServerReady(pb.ServerReadyRequest())).ready
            assert not (await stub.ModelReady(pb.ModelReadyRequest(name="m"))).ready
            check = await health.Check(health_pb2.HealthCheckRequest(service=""))
            assert check.status == health_pb2.HealthCheckResponse.NOT_SERVING
            await starting
            assert (await stub.ServerReady(pb.ServerReadyRequest())).ready
            assert (await stub.ModelReady(pb.ModelReadyRequest(name="m"))).ready
            check = await health.Check(health_pb2.HealthCheckRequest(service=""))
            assert check.status == health_pb2.HealthCheckResponse.SERVING
        await server.stop(0)

    asyncio.run(main())


# --- a traffic route named with a model version -------------------------------------------------------


@pytest.mark.parametrize("cli_client", ["tritonclient", "pyserve"])
def test_a_route_with_a_model_version_is_refused_clearly(tmp_path, write_model, capsys, cli_client):
    """A route picks the version itself: its metadata/config with a version give INVALID_ARGUMENT
    naming the route and the model to call instead (not NOT_FOUND "unknown model"), ModelReady says
    false, and `pyserve infer --model ROUTE --model-version 1` prints that one line, exit 2."""
    from pyserve.cli.main import main
    from pyserve.server import ServerThread

    write_model(tmp_path / "repo", "echo", 1, echo_mode="echo", config="backend: test-echo\n")
    cfg = tmp_path / "traffic.yaml"
    cfg.write_text("version: 1\nroutes:\n  front:\n    policy: canary\n    variants:\n"
                   "      a: {model: echo, version: 1, weight_percent: 100}\n")
    np.save(tmp_path / "x.npy", np.ones((1, 2), np.float32))
    with ServerThread(tmp_path / "repo", host="127.0.0.1", grpc_port=0, traffic_config=cfg) as s:
        c = tc.InferenceServerClient(s.url)
        assert c.get_model_metadata("front").name == "echo"  # without a version: the first variant's model
        for call in (lambda: c.get_model_metadata("front", "1"), lambda: c.get_model_config("front", "1")):
            expect_error(call, "INVALID_ARGUMENT", "'front' is a traffic route", "send no model version (got '1')",
                         "model 'echo' version 1")
        assert c.is_model_ready("front") and not c.is_model_ready("front", "1")
        c.close()
        assert main(["infer", "--url", s.url, "--model", "front", "--model-version", "1", "--input",
                     str(tmp_path / "x.npy"), "--client", cli_client]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "INVALID_ARGUMENT: 'front' is a traffic route" in err[0], err


def test_a_bfloat16_torch_model_serves_bf16_through_tritonclient(tmp_path):
    """BF16 in and out through tritonclient (raw bytes, the protocol's only BF16 form) on a
    bfloat16 torch.export model: the answer equals torch's bfloat16 result (its float32 value)."""
    tc = pytest.importorskip("tritonclient.grpc")
    torch = pytest.importorskip("torch")
    ml_dtypes = pytest.importorskip("ml_dtypes")
    from pyserve.server import ServerThread

    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 4).to(torch.bfloat16).eval()
    d = tmp_path / "bf16" / "1"
    d.mkdir(parents=True)
    batch = torch.export.Dim("batch", min=1, max=64)
    torch.export.save(torch.export.export(lin, (torch.randn(2, 16).bfloat16(),), dynamic_shapes=({0: batch},)),
                      str(d / "model.pt2"))
    (tmp_path / "bf16" / "config.yaml").write_text("backend: torch\nmax_batch_size: 8\n")
    x = torch.randn(3, 16).bfloat16()
    with ServerThread(tmp_path, host="127.0.0.1", grpc_port=0) as srv:
        c = tc.InferenceServerClient(srv.url)
        t = tc.InferInput("input__0", [3, 16], "BF16")
        t.set_data_from_numpy(x.float().numpy().astype(ml_dtypes.bfloat16))  # exact: x is bfloat16
        got = c.infer("bf16", [t]).as_numpy("output__0").astype(np.float32)
        c.close()
    with torch.no_grad():
        expected = lin(x).float().numpy()
    np.testing.assert_array_equal(got, expected)
