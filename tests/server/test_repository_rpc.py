"""The model_repository extension (RepositoryIndex, RepositoryModelLoad, RepositoryModelUnload) with
tritonclient.grpc: control modes none and explicit, reload, failed reload, in-flight requests."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

tc = pytest.importorskip("tritonclient.grpc")

from pyserve.server import ServerThread  # noqa: E402
from test_server_grpc import expect_error, fp32_input  # noqa: E402  (tests/server is on sys.path)

ECHO = "backend: test-echo\n"


def _index(client) -> dict[str, tuple[str, str, str]]:
    return {m.name: (m.version, m.state, m.reason) for m in client.get_model_repository_index().models}


def _y(client, model, value=1.0, version=""):
    x = np.full((1, 2), value, np.float32)
    result = client.infer(model, [fp32_input(x)], model_version=version)
    return result.get_response().model_version, result.as_numpy("y")


# --- mode none (the session server) -------------------------------------------------------------


def test_index_in_mode_none_lists_every_model_with_state(client):
    index = _index(client)
    assert index["classifier"] == ("2", "READY", "")
    assert index["echo"] == ("1", "READY", "")
    version, state, reason = index["truncated"]
    assert (version, state) == ("", "UNAVAILABLE") and "truncated" in reason
    assert "unknown field 'max_batch'" in index["badconfig"][2]
    as_json = client.get_model_repository_index(as_json=True)
    assert {m["name"] for m in as_json["models"]} == set(index)


def test_load_and_unload_refused_in_mode_none(client):
    for call in (lambda: client.load_model("echo"), lambda: client.unload_model("echo")):
        expect_error(call, "UNAVAILABLE", "explicit model load / unload is not allowed",
                     "model control mode 'none'", "--model-control-mode explicit")
    assert client.is_model_ready("echo")  # nothing changed


# --- mode explicit -------------------------------------------------------------------------------


@pytest.fixture()
def explicit(tmp_path):
    srv = ServerThread(tmp_path, host="127.0.0.1", grpc_port=0, model_control_mode="explicit", exit_timeout_s=5)
    srv.repo_dir = tmp_path
    yield srv
    srv.stop()


def test_explicit_mode_loads_nothing_at_start_then_loads_on_request(explicit, write_model):
    write_model(explicit.repo_dir, "m", 1, echo_mode="echo", config=ECHO)
    explicit.start()
    c = tc.InferenceServerClient(explicit.url)
    assert c.is_server_ready()
    assert _index(c) == {"m": ("", "UNAVAILABLE", "not loaded")}
    expect_error(lambda: _y(c, "m"), "UNAVAILABLE", "model 'm' is not available: not loaded")
    c.load_model("m")
    assert c.is_model_ready("m") and _index(c)["m"] == ("1", "READY", "")
    version, y = _y(c, "m", 3.0)
    assert version == "1" and np.array_equal(y, [[6.0, 6.0]])
    # a model directory created after start is found on load
    write_model(explicit.repo_dir, "late", 4, echo_mode="echo", config=ECHO)
    c.load_model("late")
    assert _y(c, "late")[0] == "4"
    expect_error(lambda: c.load_model("ghost"), "NOT_FOUND", "no model directory 'ghost'")
    expect_error(lambda: c.unload_model("ghost"), "NOT_FOUND", "unknown model 'ghost'")
    expect_error(lambda: c.load_model("m", config='{"max_batch_size": 4}'), "INVALID_ARGUMENT",
                 "parameters ['config'] are not supported")
    c.close()


def test_reload_serves_new_version_and_failed_reload_keeps_old(explicit, write_model):
    write_model(explicit.repo_dir, "m", 1, echo_mode="echo", config=ECHO)
    explicit.server.repository.startup_models = ("*",)
    explicit.start()
    c = tc.InferenceServerClient(explicit.url)
    assert _y(c, "m")[0] == "1"
    write_model(explicit.repo_dir, "m", 2, echo_mode="echo", config=ECHO)
    c.load_model("m")
    assert _y(c, "m")[0] == "2" and list(c.get_model_metadata("m").versions) == ["2"]
    write_model(explicit.repo_dir, "m", 3, echo_mode="badload", config=ECHO)
    message = expect_error(lambda: c.load_model("m"), "INVALID_ARGUMENT", "failed to load model 'm'",
                           "deliberately broken test model", "version 2 keeps serving")
    assert "3" in message
    assert c.is_model_ready("m") and _y(c, "m")[0] == "2"
    assert _index(c)["m"] == ("2", "READY", "")
    # a bad config is refused naming the field, and version 2 still serves
    (explicit.repo_dir / "m" / "config.yaml").write_text(ECHO + "max_batch: 3\n")
    expect_error(lambda: c.load_model("m"), "INVALID_ARGUMENT", "unknown field 'max_batch'", "version 2 keeps serving")
    version, y = _y(c, "m", 5.0)
    assert version == "2" and np.array_equal(y, [[10.0, 10.0]])
    c.unload_model("m")
    assert not c.is_model_ready("m")
    assert _index(c)["m"] == ("", "UNAVAILABLE", "unloaded")
    expect_error(lambda: _y(c, "m"), "UNAVAILABLE", "model 'm' is not available: unloaded")
    c.unload_model("m")  # unloading an unloaded model is fine, as in Triton
    c.close()


def test_in_flight_requests_finish_on_the_old_version_during_reload_and_unload(explicit, write_model):
    write_model(explicit.repo_dir, "m", 1, echo_mode="slow", config=ECHO)  # 0.5 s per request
    explicit.server.repository.startup_models = ("m",)
    explicit.start()
    c = tc.InferenceServerClient(explicit.url)
    outcomes: dict[int, object] = {}

    def call(i):
        try:
            outcomes[i] = _y(c, "m", float(i))
        except Exception as exc:  # reported by the asserts below
            outcomes[i] = exc

    workers = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for w in workers:
        w.start()
    time.sleep(0.2)  # all four are inside version 1's backend
    write_model(explicit.repo_dir, "m", 2, echo_mode="echo", config=ECHO)
    t0 = time.monotonic()
    c.load_model("m")  # returns once version 2 serves; version 1 drains in the background
    assert time.monotonic() - t0 < 0.4
    assert _y(c, "m")[0] == "2"
    for w in workers:
        w.join(10)
    for i in range(4):
        assert not isinstance(outcomes[i], Exception), outcomes[i]
        version, y = outcomes[i]
        assert version == "1" and np.array_equal(y, [[2.0 * i, 2.0 * i]])
    # unload while a request runs: it completes, the next one is refused
    write_model(explicit.repo_dir, "m", 3, echo_mode="slow", config=ECHO)
    c.load_model("m")
    worker = threading.Thread(target=call, args=(7,))
    worker.start()
    time.sleep(0.2)
    c.unload_model("m")  # waits for the running request, then unloads
    worker.join(10)
    assert outcomes[7][0] == "3" and np.array_equal(outcomes[7][1], [[14.0, 14.0]])
    expect_error(lambda: _y(c, "m"), "UNAVAILABLE", "unloaded")
    c.close()


def test_unknown_startup_model_is_refused(tmp_path, write_model):
    write_model(tmp_path, "m", 1, echo_mode="echo", config=ECHO)
    srv = ServerThread(tmp_path, host="127.0.0.1", grpc_port=0, model_control_mode="explicit",
                       startup_models=["nope"])
    with pytest.raises(ValueError, match="start-up model\\(s\\) 'nope' not in"):
        srv.start()


def test_bad_control_mode_is_refused(tmp_path):
    with pytest.raises(ValueError, match="control_mode must be one of none, poll, explicit, got 'watch'"):
        ServerThread(tmp_path, host="127.0.0.1", grpc_port=0, model_control_mode="watch")


def test_index_ready_only_with_own_stub(server):
    import grpc

    from pyserve.protocol import codec
    from pyserve.protocol._generated import grpc_service_pb2 as pb

    with grpc.insecure_channel(server.url) as channel:
        stub = codec.inference_stub(channel)
        everything = codec.decode_repository_index(stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10))
        ready = codec.decode_repository_index(stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True), timeout=10))
    assert {e.name for e in ready} == {e.name for e in everything if e.state == "READY"}
    assert "classifier" in {e.name for e in ready} and "truncated" not in {e.name for e in ready}
    assert all(e.state == "READY" and e.version for e in ready)


def test_reload_under_load_loses_no_request(explicit, write_model):
    """Four clients send requests back to back while the model is reloaded three times: 0 failures,
    every answer right, and the answering version only moves forward."""
    write_model(explicit.repo_dir, "m", 1, echo_mode="delay", config=ECHO)  # 50 ms per request
    explicit.server.repository.startup_models = ("*",)
    explicit.start()
    stop = threading.Event()
    seen: list[list[tuple[str, bool]]] = [[] for _ in range(4)]
    errors: list[Exception] = []

    def client_loop(k):
        c = tc.InferenceServerClient(explicit.url)
        i = 0
        while not stop.is_set():
            value = float(k * 1000 + i)
            try:
                version, y = _y(c, "m", value)
                seen[k].append((version, bool(np.array_equal(y, [[2 * value, 2 * value]]))))
            except Exception as exc:
                errors.append(exc)
            i += 1
        c.close()

    threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    admin = tc.InferenceServerClient(explicit.url)
    for version in (2, 3, 4):
        time.sleep(0.3)
        write_model(explicit.repo_dir, "m", version, echo_mode="delay", config=ECHO)
        admin.load_model("m")
    time.sleep(0.3)
    stop.set()
    for t in threads:
        t.join(10)
    admin.close()
    assert errors == []
    assert all(ok for per_client in seen for _, ok in per_client)
    for per_client in seen:
        versions = [int(v) for v, _ in per_client]
        assert versions == sorted(versions)  # never back to an older version
    assert {v for per_client in seen for v, _ in per_client} >= {"1", "4"}
    assert sum(len(p) for p in seen) >= 10
