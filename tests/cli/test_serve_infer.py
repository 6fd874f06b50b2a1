"""``pyserve serve`` and ``pyserve infer`` as real subprocesses talking over gRPC."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import pyserve

torch = pytest.importorskip("torch")

PKG_ROOT = str(Path(pyserve.__file__).resolve().parent.parent)
READY = re.compile(r"^pyserve: serving (\d+) model\(s\) on (\S+):(\d+)$")


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = PKG_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def pyserve_cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "pyserve.cli.main", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=_env())


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from pyserve.artifact import save

    torch.manual_seed(0)
    module = torch.nn.Linear(4, 3).eval()
    repo = tmp_path_factory.mktemp("repo")
    save(repo / "lin" / "1" / "model.pyserve", module, (torch.randn(2, 4),), model_name="lin",
         input_names=["x"], output_names=["scores"])
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "1" / "model.pyserve").write_bytes(b"not an artifact")
    return repo, module


@pytest.fixture(scope="module")
def served(model, grpc_engine):
    repo, _ = model
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyserve.cli.main", "serve", "--model-repository", str(repo), "--grpc-port", "0",
         "--host", "127.0.0.1", "--exit-timeout-s", "5", "--grpc-engine", grpc_engine],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        line = lines.get(timeout=90)
    except queue.Empty:
        proc.kill()
        pytest.fail(f"pyserve serve printed no ready line; stderr:\n{proc.stderr.read()}")
    match = READY.match(line.strip())
    assert match, line
    yield proc, int(match.group(1)), f"127.0.0.1:{match.group(3)}"
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_ready_line_counts_served_models(served):
    _, n_models, _ = served
    assert n_models == 1  # 'broken' is refused and logged


@pytest.mark.parametrize("client", ["tritonclient", "pyserve"])
def test_infer_prints_and_saves_outputs(served, model, tmp_path, client):
    _, _, url = served
    _, module = model
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    out = pyserve_cli("infer", "--url", url, "--model", "lin", "--input", tmp_path / "x.npy",
                      "--output", tmp_path / "y.npy", "--client", client, "--id", "r1")
    assert out.returncode == 0, out.stderr
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).numpy()
    saved = np.load(tmp_path / "y.npy")
    np.testing.assert_allclose(saved, expected, rtol=1e-5, atol=1e-6)
    assert "model lin version 1" in out.stdout
    assert "output scores: FP32 [3, 3]" in out.stdout
    assert f"argmax per row: {expected.argmax(axis=1).tolist()}" in out.stdout


@pytest.mark.parametrize(
    "client, model_name, dtype, fragment",
    [
        ("tritonclient", "nope", np.float32, "NOT_FOUND: unknown model 'nope'"),
        ("tritonclient", "lin", np.float64, "INVALID_ARGUMENT: input 'x' of model 'lin': expected datatype FP32, got FP64"),
        ("tritonclient", "broken", np.float32, "UNAVAILABLE: model 'broken' is not available"),
        ("pyserve", "broken", np.float32, "UNAVAILABLE: model 'broken' is not available"),
        ("pyserve", "lin", np.float64, "INVALID_ARGUMENT: input 'x' of model 'lin': expected datatype FP32, got FP64"),
    ],
)
def test_infer_server_errors_one_line_exit_2(served, tmp_path, client, model_name, dtype, fragment):
    _, _, url = served
    np.save(tmp_path / "x.npy", np.zeros((1, 4), dtype))
    out = pyserve_cli("infer", "--url", url, "--model", model_name, "--input", tmp_path / "x.npy", "--client", client)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyserve infer: error: "), out.stderr
    assert fragment in lines[0]
    assert "--tls-ca" not in lines[0]  # the TLS hint is for a failed connection, not a status the server sent


def test_infer_missing_input_file(served, tmp_path):
    _, _, url = served
    out = pyserve_cli("infer", "--url", url, "--model", "lin", "--input", tmp_path / "missing.npy")
    assert out.returncode == 2 and "no such file" in out.stderr


def test_serve_missing_repository_exit_2(tmp_path):
    out = pyserve_cli("serve", "--model-repository", tmp_path / "nope", "--grpc-port", "0", timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("pyserve serve: error: model repository")


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--load-model", "lin"], "--load-model needs --model-control-mode explicit"),
        (["--model-control-mode", "explicit", "--load-model", "nope"], "start-up model(s) 'nope' not in"),
    ],
)
def test_serve_control_mode_errors_exit_2(model, extra, fragment):
    repo, _ = model
    out = pyserve_cli("serve", "--model-repository", repo, "--grpc-port", "0", *extra, timeout=60)
    assert out.returncode == 2
    assert fragment in out.stderr.strip().splitlines()[-1]


def test_sigterm_stops_gracefully(served):
    proc, _, _ = served
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    stderr = proc.stderr.read()
    assert "refused" in stderr and "broken" in stderr  # the refusal was logged with its reason
    assert "stopped" in stderr


def test_serve_flag_ranges_named(tmp_path):
    import subprocess
    import sys

    for flags, expect in ((["--infer-threads", "0"], "--infer-threads must be >= 1"),
                          (["--max-message-mb", "1e12"], "--max-message-mb must be below 2048"),
                          (["--inline-max-us", "-1"], "--inline-max-us must be >= 0 and below 1e9 (0 = never "
                                                      "inline), got -1.0"),
                          (["--inline-max-us", "inf"], "--inline-max-us must be >= 0 and below 1e9"),
                          (["--traffic-poll-s", "nan"], "--traffic-poll-s must be > 0 and finite, got nan"),
                          (["--exit-timeout-s", "nan"], "--exit-timeout-s must be >= 0 and finite, got nan"),
                          (["--traffic-shadow-isolation", "inline", "--traffic-shadow-priority", "nice"],
                           "--traffic-shadow-isolation inline starts no worker")):
        proc = subprocess.run([sys.executable, "-m", "pyserve", "serve", "--model-repository", str(tmp_path),
                               "--grpc-port", "0", *flags], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and expect in proc.stderr and "Traceback" not in proc.stderr


def test_output_piped_into_a_closed_pipe_ends_quietly(tmp_path):
    """`pyserve ... | head -1`: head closes the pipe early; no BrokenPipeError traceback."""
    import os
    import subprocess
    import sys

    torch = __import__("pytest").importorskip("torch")
    from pyserve.artifact import save

    net = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(60)])
    save(tmp_path / "m.pyserve", net, (torch.randn(2, 8),), model_name="deep")
    r, w = os.pipe()
    proc = subprocess.Popen([sys.executable, "-m", "pyserve", "inspect", "--json", str(tmp_path / "m.pyserve")],
                            stdout=w, stderr=subprocess.PIPE)
    os.close(w)
    with os.fdopen(r, "rb") as reader:
        reader.read(10)  # like `head -c 10`: read a little, then close the pipe
    _, err = proc.communicate(timeout=120)
    assert b"Traceback" not in err and b"BrokenPipeError" not in err, err.decode()
