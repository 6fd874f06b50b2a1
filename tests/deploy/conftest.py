"""Fixtures of the deploy/ tests; the helpers are in deploy_helpers.py (a plain module, so that
its name cannot clash with the other test folders' conftest modules)."""

from __future__ import annotations

import pytest

from deploy_helpers import DOCKERFILE, Dockerfile, read_dockerfile


@pytest.fixture(scope="session")
def dockerfile() -> Dockerfile:
    return read_dockerfile(DOCKERFILE)
