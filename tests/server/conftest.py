"""Fixtures for the server tests: real artifacts in a model repository, an in-process server on
port 0, a tritonclient client, and a tiny torch-free ``test-echo`` backend for the error paths."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from pyserve.backends import ModelSignature, TensorSpec, register_backend
from pyserve.backends import registry as _registry


class EchoBackend:
    """``x`` FP32 [-1, 2] -> ``y = 2 x``. The artifact file's text picks a behaviour:
    ``echo``, ``slow`` (sleeps 0.5 s per batch), ``delay`` (sleeps 0.05 s per batch), ``slowload``
    (sleeps 0.5 s in load), ``explode`` (fails every request whose x is not all zeros with a
    RuntimeError; the all-zero warm-up passes, so the model loads), ``badwarmup`` (fails every
    request, so the warm-up refuses the version), ``badload`` (load raises), ``sleep=S`` (sleeps
    S seconds per batch that holds a non-zero x, so the all-zero warm-up is quick; each such batch
    first appends a line to ``model.started`` beside the model file). In every mode a request holding the value -999 fails alone with INVALID_ARGUMENT, and
    :attr:`calls` records the dim 0 of every request of every ``infer`` call (one list per call)."""

    calls: list = []  # shared by all instances: [(path, [rows of each request])]

    platform = "test"

    def __init__(self, path: Path, *, executor=None) -> None:
        self.path = path
        self.mode = None

    @property
    def ready(self) -> bool:
        return self.mode is not None

    @property
    def signature(self) -> ModelSignature:
        return ModelSignature(inputs=(TensorSpec("x", "FP32", (-1, 2)),), outputs=(TensorSpec("y", "FP32", (-1, 2)),))

    async def load(self) -> None:
        mode = self.path.read_text().strip()
        if mode == "slowload":
            await asyncio.sleep(0.5)
        if mode == "badload":
            raise ValueError(f"{self.path}: deliberately broken test model")
        self.mode = mode

    async def infer(self, batch):
        from pyserve.protocol.errors import InvalidArgument

        EchoBackend.calls.append((self.path, [int(np.asarray(inputs["x"]).shape[0]) for inputs in batch]))
        if self.mode == "slow":
            await asyncio.sleep(0.5)
        if self.mode == "delay":
            await asyncio.sleep(0.05)
        if self.mode.startswith("sleep=") and any(np.asarray(inputs["x"]).any() for inputs in batch):
            with open(self.path.with_suffix(".started"), "a") as f:  # lets a test see it in flight
                f.write(f"{len(batch)}\n")
            await asyncio.sleep(float(self.mode[len("sleep="):]))
        if self.mode == "explode":
            return [RuntimeError("secret detail from the backend") if np.asarray(inputs["x"]).any()
                    else {"y": np.asarray(inputs["x"]) * 2} for inputs in batch]
        if self.mode == "badwarmup":
            return [RuntimeError("this model fails every request") for _ in batch]
        return [
            InvalidArgument("poisoned request: x holds -999") if (np.asarray(inputs["x"]) == -999).any()
            else {"y": np.asarray(inputs["x"]) * 2}
            for inputs in batch
        ]

    async def unload(self) -> None:
        self.mode = None


@pytest.fixture(scope="session", autouse=True)
def echo_backend():
    register_backend("test-echo", EchoBackend, "model.test")
    yield
    _registry._REGISTRY.pop("test-echo", None)


def _write_model(repo: Path, name: str, version: int, *, artifact: bytes | None = None, echo_mode: str | None = None,
                config: str | None = None) -> Path:
    d = repo / name
    (d / str(version)).mkdir(parents=True, exist_ok=True)
    if config is not None:
        (d / "config.yaml").write_text(config)
    if artifact is not None:
        path = d / str(version) / "model.pyserve"
        path.write_bytes(artifact)
    else:
        path = d / str(version) / "model.test"
        path.write_text(echo_mode or "echo")
    return path


@pytest.fixture(scope="session")
def write_model():
    """``write_model(repo, name, version, artifact=bytes | echo_mode=str, config=yaml text)``."""
    return _write_model


class TwoHeads:
    """Factory for the test classifier: x [N, 8] -> (logits [N, 4], probs [N, 4])."""

    @staticmethod
    def build(seed: int):
        import torch

        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.body = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))

            def forward(self, x):
                logits = self.body(x)
                return logits, torch.softmax(logits, dim=-1)

        torch.manual_seed(seed)
        return Net().eval()


@pytest.fixture(scope="session")
def classifier_modules(tmp_path_factory):
    """``{version: (module, artifact bytes)}`` for versions 1 and 2 of the test classifier."""
    torch = pytest.importorskip("torch")
    from pyserve.artifact import save

    out = {}
    d = tmp_path_factory.mktemp("artifacts")
    for version, seed in ((1, 1), (2, 2)):
        module = TwoHeads.build(seed)
        path = d / f"v{version}.pyserve"
        save(path, module, (torch.randn(2, 8),), model_name="classifier", input_names=["x"],
             output_names=["logits", "probs"])
        out[version] = (module, path.read_bytes())
    return out


@pytest.fixture(scope="session")
def repository(tmp_path_factory, classifier_modules, write_model) -> Path:
    repo = tmp_path_factory.mktemp("repo")
    v1, v2 = classifier_modules[1][1], classifier_modules[2][1]
    write_model(repo, "classifier", 1, artifact=v1, config="name: classifier\nmax_batch_size: 8\n")
    write_model(repo, "classifier", 2, artifact=v2)
    write_model(repo, "truncated", 1, artifact=v2[: len(v2) // 2])
    flipped = bytearray(v2)
    flipped[-3] ^= 0x10  # inside the last weight blob: caught by its SHA-256
    write_model(repo, "bitflipped", 1, artifact=bytes(flipped))
    write_model(repo, "badconfig", 1, artifact=v2, config="max_batch: 4\n")
    write_model(repo, "echo", 1, echo_mode="echo", config="backend: test-echo\n")
    write_model(repo, "explode", 1, echo_mode="explode", config="backend: test-echo\n")
    write_model(repo, "batched", 1, echo_mode="delay", config=BATCHED_CONFIG)
    return repo


BATCHED_CONFIG = """\
backend: test-echo
max_batch_size: 8
dynamic_batching:
  max_queue_delay_microseconds: 20000
  preferred_batch_size: [4, 8]
instance_group:
  - count: 2
    kind: KIND_CPU
"""


@pytest.fixture(scope="session")
def server(repository, grpc_engine):
    from pyserve.server import ServerThread

    srv = ServerThread(repository, host="127.0.0.1", grpc_port=0, exit_timeout_s=2, grpc_engine=grpc_engine)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture()
def client(server):
    import tritonclient.grpc as tc

    c = tc.InferenceServerClient(server.url)
    yield c
    c.close()


# Every test here runs once per gRPC engine.
from engine_fixtures import _grpc_engine_env, grpc_engine  # noqa: E402,F401  (tests/engine_fixtures.py)
