"""Fixtures for the CLI tests: every test runs against both gRPC engines."""

from __future__ import annotations

from engine_fixtures import _grpc_engine_env, grpc_engine  # noqa: F401  (tests/engine_fixtures.py)
