"""Model repository: config.yaml checks and version choice (torch-free, with the test-echo backend)."""

from __future__ import annotations

import asyncio

import pytest

from pyserve.protocol.errors import NotFound, Unavailable
from pyserve.server.repository import ConfigError, ModelConfig, ModelRepository, ModelState


def _load(root):
    repo = ModelRepository(root)
    asyncio.run(repo.load_all())
    return repo


def test_config_defaults_without_file(tmp_path):
    (tmp_path / "m").mkdir()
    assert ModelConfig.load(tmp_path / "m") == ModelConfig(name="m", backend="pyserve", max_batch_size=0)


def test_config_empty_file_is_defaults(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.yaml").write_text("")
    assert ModelConfig.load(tmp_path / "m") == ModelConfig(name="m")


@pytest.mark.parametrize(
    "text, match",
    [
        ("max_batch: 4\n", "unknown field 'max_batch'; known fields: name, backend, max_batch_size, dynamic_batching, "
                            "instance_group"),
        ("name: other\n", "field 'name' is 'other'; it must equal the directory name 'm'"),
        ("backend: tensorflow\n", "unknown backend 'tensorflow'; known backends:"),
        ("max_batch_size: -1\n", "max_batch_size' must be an integer >= 0, got -1"),
        ("max_batch_size: true\n", "max_batch_size' must be an integer >= 0, got True"),
        ("- a\n- b\n", "expected a mapping of fields, got list"),
        ("name: [unclosed\n", "cannot read"),
    ],
)
def test_config_errors_name_the_field(tmp_path, text, match):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.yaml").write_text(text)
    with pytest.raises(ConfigError, match=match.replace("[", r"\[")) as info:
        ModelConfig.load(tmp_path / "m")
    assert "config.yaml" in str(info.value)


def test_highest_numeric_version_served(tmp_path, write_model):
    for v in (1, 9, 10):
        write_model(tmp_path, "m", v, echo_mode="echo", config="backend: test-echo\n")
    (tmp_path / "m" / "latest").mkdir()  # not numeric: ignored
    repo = _load(tmp_path)
    model = repo.get("m")
    assert model.ready and model.version == "10"
    assert repo.get("m", "10") is model
    with pytest.raises(NotFound, match="no version '9'"):
        repo.get("m", "9")


def test_refused_models_do_not_stop_others(tmp_path, write_model):
    write_model(tmp_path, "good", 1, echo_mode="echo", config="backend: test-echo\n")
    (tmp_path / "noversion").mkdir()
    write_model(tmp_path, "nofile", 2, echo_mode="echo", config="backend: test-echo\n")
    (tmp_path / "nofile" / "2" / "model.test").unlink()
    write_model(tmp_path, "oldonly", 1, echo_mode="echo", config="backend: test-echo\n")
    (tmp_path / "oldonly" / "3").mkdir()  # highest version has no artifact: refused, no fallback
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "README.txt").write_text("not a model")
    repo = _load(tmp_path)
    assert [m.name for m in repo.models] == ["good", "nofile", "noversion", "oldonly"]
    assert repo.get("good").state is ModelState.READY
    assert "no numeric version directory" in repo.get("noversion").reason
    assert "no model.test in the highest version directory" in repo.get("nofile").reason
    assert "no model.test" in repo.get("oldonly").reason
    with pytest.raises(Unavailable, match="model 'noversion' is not available: .*no numeric version"):
        repo.get_ready("noversion")
    with pytest.raises(NotFound, match="unknown model 'x'; known models: 'good', 'nofile'"):
        repo.get("x")


def test_missing_artifact_for_pyserve_backend(tmp_path):
    (tmp_path / "m" / "1").mkdir(parents=True)
    repo = _load(tmp_path)
    assert "no model.pyserve" in repo.get("m").reason


def test_empty_repository(tmp_path):
    repo = _load(tmp_path)
    assert repo.models == [] and repo.loaded
    with pytest.raises(NotFound, match="the repository has no models"):
        repo.get("m")
