"""``--model-control-mode poll``: new, changed and removed model directories are picked up; a new
version serves only after it has loaded and warmed up; a failed load keeps the old version; a
reload under load loses no request."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

tc = pytest.importorskip("tritonclient.grpc")

from pyserve.server import ServerThread  # noqa: E402
from test_server_grpc import expect_error, fp32_input  # noqa: E402

ECHO = "backend: test-echo\n"
POLL_S = 0.1


def _wait(predicate, timeout_s: float = 10.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError("condition not met within %.1f s" % timeout_s)


def _version(client, model="m", value=1.0):
    x = np.full((1, 2), value, np.float32)
    result = client.infer(model, [fp32_input(x)])
    assert np.array_equal(result.as_numpy("y"), 2 * x)
    return result.get_response().model_version


@pytest.fixture()
def poll(tmp_path):
    srv = ServerThread(tmp_path, host="127.0.0.1", grpc_port=0, model_control_mode="poll",
                       repository_poll_s=POLL_S, exit_timeout_s=5)
    srv.repo_dir = tmp_path
    yield srv
    srv.stop()


def test_poll_loads_new_reloads_changed_and_unloads_removed(poll, write_model):
    repo = poll.repo_dir
    write_model(repo, "m", 1, echo_mode="echo", config=ECHO)
    poll.start()
    c = tc.InferenceServerClient(poll.url)
    assert _version(c) == "1"
    # load/unload RPCs are refused in poll mode, as in Triton
    expect_error(lambda: c.load_model("m"), "UNAVAILABLE", "model control mode 'poll'")
    # a new version
    write_model(repo, "m", 2, echo_mode="echo", config=ECHO)
    _wait(lambda: _version(c) == "2")
    # a broken new version: version 2 keeps serving, and the failure is not retried every scan
    swaps = []
    poll.server.repository.on_swap = lambda name, version: swaps.append((name, version))
    write_model(repo, "m", 3, echo_mode="badload", config=ECHO)
    time.sleep(10 * POLL_S)
    assert _version(c) == "2" and c.is_model_ready("m") and swaps == []
    # fixing it (new file contents) is picked up
    (repo / "m" / "3" / "model.test").write_text("echo\n")
    _wait(lambda: _version(c) == "3")
    assert swaps == [("m", "3")]
    # a new model directory
    write_model(repo, "late", 5, echo_mode="echo", config=ECHO)
    _wait(lambda: c.is_model_ready("late"))
    assert _version(c, "late") == "5"
    # a changed config (policy all) is applied
    (repo / "m" / "config.yaml").write_text(ECHO + "version_policy: {all: {}}\n")
    _wait(lambda: c.is_model_ready("m", "1"))
    assert list(c.get_model_metadata("m").versions) == ["1", "2", "3"]
    # a removed directory: the model is gone
    import shutil

    shutil.rmtree(repo / "late")
    _wait(lambda: "late" not in {m.name for m in c.get_model_repository_index().models})
    expect_error(lambda: _version(c, "late"), "NOT_FOUND", "unknown model 'late'")
    c.close()


def test_new_version_serves_only_after_warm_up(poll, write_model):
    """Version 2's warm-up takes 0.5 s (``slow``): until it is done every answer comes from version 1."""
    write_model(poll.repo_dir, "m", 1, echo_mode="echo", config=ECHO)
    poll.start()
    swapped_at: dict[str, float] = {}
    poll.server.repository.on_swap = lambda name, version: swapped_at.setdefault(version, time.monotonic())
    c = tc.InferenceServerClient(poll.url)
    answers: list[tuple[float, str]] = []
    written_at = time.monotonic()
    write_model(poll.repo_dir, "m", 2, echo_mode="slow", config=ECHO)
    while "2" not in swapped_at and time.monotonic() - written_at < 10:
        version = _version(c)
        answers.append((time.monotonic(), version))  # when the answer came
    assert "2" in swapped_at
    assert swapped_at["2"] - written_at >= 0.5  # load + the 0.5 s warm-up came first
    assert {v for t, v in answers if t < swapped_at["2"]} == {"1"}
    assert len(answers) > 5
    assert _version(c) == "2"
    c.close()


def test_reload_under_load_in_poll_mode_loses_no_request(poll, write_model):
    """Four clients send back to back while three new versions appear on disk: 0 failures, every
    answer right, versions only move forward."""
    write_model(poll.repo_dir, "m", 1, echo_mode="delay", config=ECHO)  # 50 ms per request
    poll.start()
    stop = threading.Event()
    seen: list[list[str]] = [[] for _ in range(4)]
    errors: list[Exception] = []

    def client_loop(k):
        c = tc.InferenceServerClient(poll.url)
        i = 0
        while not stop.is_set():
            try:
                seen[k].append(_version(c, "m", float(k * 1000 + i)))
            except Exception as exc:
                errors.append(exc)
            i += 1
        c.close()

    threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    admin = tc.InferenceServerClient(poll.url)
    for version in (2, 3, 4):
        time.sleep(0.3)
        write_model(poll.repo_dir, "m", version, echo_mode="delay", config=ECHO)
        _wait(lambda: admin.get_model_metadata("m").versions == [str(version)])
    time.sleep(0.3)
    stop.set()
    for t in threads:
        t.join(10)
    admin.close()
    assert errors == []
    for per_client in seen:
        assert [int(v) for v in per_client] == sorted(int(v) for v in per_client)
    assert {v for per_client in seen for v in per_client} >= {"1", "4"}
    assert sum(len(p) for p in seen) >= 10


def _scaled_artifact(tmp_path, scale: float) -> bytes:
    """A pyserve artifact of y = scale * x (one Linear(2, 2), served by the NumPy plan)."""
    torch = pytest.importorskip("torch")
    from pyserve.artifact import save

    net = torch.nn.Linear(2, 2)
    with torch.no_grad():
        net.weight.copy_(scale * torch.eye(2))
        net.bias.zero_()
    path = tmp_path / f"scaled{scale}.pyserve"
    save(path, net.eval(), (torch.randn(2, 2),), model_name="m", input_names=["x"], output_names=["y"])
    return path.read_bytes()


@pytest.mark.parametrize("config", ["max_batch_size: 8\n",
                                    "max_batch_size: 8\ndynamic_batching: {max_queue_delay_microseconds: 2000, "
                                    "preferred_batch_size: [4]}\n"], ids=["direct", "batched"])
def test_reload_under_load_of_a_pyserve_model_loses_no_request(poll, write_model, tmp_path, config, monkeypatch):
    """The pyserve backend (infer_sync: on the sync and native engines the request runs on the
    handler thread, which picks the version itself) while new versions appear: 0 failures, each
    answer is its own rows times its version, versions only move forward. The pick is slowed down
    (3 ms) so that a reload lands between a handler thread's pick and its hold on the version."""
    from pyserve.server.dataplane import DataPlane

    serving = DataPlane._serving

    def slow_serving(self, request):
        picked = serving(self, request)
        time.sleep(0.003)
        return picked

    monkeypatch.setattr(DataPlane, "_serving", slow_serving)
    art = {v: _scaled_artifact(tmp_path, float(v)) for v in (1, 2, 3)}
    write_model(poll.repo_dir, "m", 1, artifact=art[1], config=config)
    poll.start()
    stop = threading.Event()
    seen: list[list[int]] = [[] for _ in range(6)]
    errors: list = []

    def client_loop(k):
        c = tc.InferenceServerClient(poll.url)
        i = 0
        while not stop.is_set():
            x = np.full((1, 2), float(k * 1000 + i), np.float32)
            try:
                result = c.infer("m", [fp32_input(x)])
                version = int(result.get_response().model_version)
                if not np.array_equal(result.as_numpy("y"), version * x):
                    errors.append(("wrong rows", k, i, version))
                seen[k].append(version)
            except Exception as exc:  # noqa: BLE001 - collected and asserted empty
                errors.append(exc)
            i += 1
        c.close()

    threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    admin = tc.InferenceServerClient(poll.url)
    for version in (2, 3):
        time.sleep(0.4)
        write_model(poll.repo_dir, "m", version, artifact=art[version], config=config)
        _wait(lambda: admin.get_model_metadata("m").versions == [str(version)])
    time.sleep(0.4)
    stop.set()
    for t in threads:
        t.join(10)
    admin.close()
    assert errors == []
    for per_client in seen:
        assert per_client == sorted(per_client)
    assert {v for per_client in seen for v in per_client} >= {1, 3}
