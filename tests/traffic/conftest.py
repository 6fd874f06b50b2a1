"""Fixtures for the traffic tests over gRPC: a repository with two real LeNet-300-100 variants
(fp32 ``lenet300`` and pruned + 4-bit codebook ``lenet300c``, built by examples/lenet300/variants.py)
plus an always-failing wrapper of the compressed one (``broken``)."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _variants_module():
    spec = importlib.util.spec_from_file_location("lenet_variants", ROOT / "examples/lenet300/variants.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def variants_module():
    return _variants_module()


@pytest.fixture(scope="session")
def lenet_built(tmp_path_factory, variants_module):
    """``(repo template dir, build info)``: the two variants and ``broken`` (mode fail)."""
    pytest.importorskip("torch")
    repo = tmp_path_factory.mktemp("lenet_repo")
    info = variants_module.build_variants(repo, n_train=2000, epochs=2)
    variants_module.register_faulty_backend()
    variants_module.write_faulty_model(repo, "broken", repo / "lenet300c/1/model.pyserve", "fail")
    return repo, info


@pytest.fixture()
def lenet_repo(lenet_built, tmp_path):
    """A fresh copy of the repository per test (tests may add models)."""
    src, _ = lenet_built
    dst = tmp_path / "repo"
    shutil.copytree(src, dst)
    return dst


# Every test here runs once per gRPC engine.
from engine_fixtures import _grpc_engine_env, grpc_engine  # noqa: E402,F401  (tests/engine_fixtures.py)
