"""Fixtures that run a test directory's server tests once per gRPC engine (sync and aio).

Imported by tests/{cli,server,traffic}/conftest.py. Servers built in tests read PYSERVE_GRPC_ENGINE
(set for the whole session group, so that module-scoped servers see it too, and inherited by
`pyserve serve` subprocesses); fixtures that start a server also take `grpc_engine`, so they are
rebuilt per engine.
"""

from __future__ import annotations

import pytest

__all__ = ["grpc_engine", "_grpc_engine_env"]


@pytest.fixture(scope="session", params=["sync", "aio"])
def grpc_engine(request):
    import os

    old = os.environ.get("PYSERVE_GRPC_ENGINE")
    os.environ["PYSERVE_GRPC_ENGINE"] = request.param
    yield request.param
    if old is None:
        os.environ.pop("PYSERVE_GRPC_ENGINE", None)
    else:
        os.environ["PYSERVE_GRPC_ENGINE"] = old


@pytest.fixture(autouse=True)
def _grpc_engine_env(grpc_engine, monkeypatch):
    monkeypatch.setenv("PYSERVE_GRPC_ENGINE", grpc_engine)
