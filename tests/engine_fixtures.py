"""Fixtures that run a test directory's server tests once per gRPC engine (sync, aio and native).

Imported by tests/{cli,server,traffic}/conftest.py. Servers built in tests read PYSERVE_GRPC_ENGINE
(set for the whole session group, so that module-scoped servers see it too, and inherited by
`pyserve serve` subprocesses); fixtures that start a server also take `grpc_engine`, so they are
rebuilt per engine. ``native`` (the grpc++ transport, pyserve._grpc_native) is skipped where
pyserve was built without libgrpc++-dev.
"""

from __future__ import annotations

import pytest

__all__ = ["grpc_engine", "_grpc_engine_env", "NATIVE_AVAILABLE"]


def _native_available() -> bool:
    try:
        import pyserve._grpc_native  # noqa: F401
    except ImportError:
        return False
    return True


NATIVE_AVAILABLE = _native_available()
_NATIVE = pytest.param("native", marks=pytest.mark.skipif(
    not NATIVE_AVAILABLE, reason="pyserve._grpc_native not built (needs libgrpc++-dev at build time)"))


@pytest.fixture(scope="session", params=["sync", "aio", _NATIVE])
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
