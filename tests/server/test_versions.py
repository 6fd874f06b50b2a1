"""Version policies (latest N / all / specific) in config.yaml and config.pbtxt, per-version
ModelReady/ModelMetadata/ModelConfig/ModelInfer/ModelStatistics and the index, with tritonclient;
warm-up before a version serves; unchanged versions kept across a reload."""

from __future__ import annotations

import asyncio
import re

import numpy as np
import pytest

tc = pytest.importorskip("tritonclient.grpc")

from pyserve.server import ServerThread  # noqa: E402
from pyserve.server.repository import (  # noqa: E402
    ConfigError,
    ModelConfig,
    ModelRepository,
    VersionPolicy,
    warmup_inputs,
)
from test_server_grpc import expect_error, fp32_input  # noqa: E402

ECHO = "backend: test-echo\n"


# --- config and policy ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "yaml_text, pbtxt_text, policy",
    [
        ("", "", VersionPolicy("latest", 1)),
        ("version_policy: {latest: {num_versions: 2}}\n", "version_policy { latest { num_versions: 2 } }\n",
         VersionPolicy("latest", 2)),
        ("version_policy: {all: {}}\n", "version_policy { all { } }\n", VersionPolicy("all")),
        ("version_policy: {specific: {versions: [3, 1]}}\n", "version_policy { specific { versions: [3, 1] } }\n",
         VersionPolicy("specific", versions=(1, 3))),
    ],
)
def test_version_policy_reads_the_same_from_yaml_and_pbtxt(tmp_path, yaml_text, pbtxt_text, policy):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.yaml").write_text(yaml_text)
    assert ModelConfig.load(d).version_policy == policy
    (d / "config.yaml").unlink()
    (d / "config.pbtxt").write_text(pbtxt_text)
    assert ModelConfig.load(d).version_policy == policy


@pytest.mark.parametrize(
    "text, match",
    [
        ("version_policy: {latest: {num_versions: 0}}\n", "field 'version_policy.latest.num_versions' must be an integer >= 1"),
        ("version_policy: {newest: {}}\n", "field 'version_policy' must be one of latest, all, specific"),
        ("version_policy: {all: {}, latest: {}}\n", "field 'version_policy' must be one of"),
        ("version_policy: {specific: {versions: []}}\n", "field 'version_policy.specific.versions' must be a non-empty"),
        ("version_policy: {specific: {versions: [-1]}}\n", "field 'version_policy.specific.versions' must be a non-empty"),
        ("version_policy: {latest: {count: 2}}\n", "unknown field 'version_policy.latest.count'"),
        ("version_policy: latest\n", "field 'version_policy' must be one of"),
    ],
)
def test_bad_version_policy_names_the_field(tmp_path, text, match):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.yaml").write_text(text)
    with pytest.raises(ConfigError, match=re.escape(match)):
        ModelConfig.load(tmp_path / "m")


def test_policy_select():
    have = [1, 2, 5, 10]
    assert VersionPolicy().select(have) == [10]
    assert VersionPolicy("latest", 3).select(have) == [2, 5, 10]
    assert VersionPolicy("latest", 9).select(have) == have
    assert VersionPolicy("all").select([10, 2, 5, 1]) == have
    assert VersionPolicy("specific", versions=(2, 10)).select(have) == [2, 10]
    with pytest.raises(ValueError, match=re.escape("'version_policy.specific.versions' lists [3] but there is no such")):
        VersionPolicy("specific", versions=(2, 3)).select(have, "m")
    with pytest.raises(ValueError, match="no numeric version directory"):
        VersionPolicy("all").select([], "m")


def test_warmup_inputs_are_zeros_of_the_signature():
    from pyserve.backends import ModelSignature, TensorSpec

    sig = ModelSignature(
        inputs=(TensorSpec("a", "FP16", (-1, 3)), TensorSpec("b", "BYTES", (2,)), TensorSpec("c", "INT64", (-1, -1))),
        outputs=(),
    )
    w = warmup_inputs(sig)
    assert w["a"].dtype == np.float16 and w["a"].shape == (1, 3) and not w["a"].any()
    assert w["b"].dtype == object and list(w["b"]) == [b"", b""]
    assert w["c"].dtype == np.int64 and w["c"].shape == (1, 1)


# --- served versions over gRPC ------------------------------------------------------------------


@pytest.fixture(scope="module")
def versioned(tmp_path_factory, classifier_modules, write_model, grpc_engine):
    """A server with: ``cls_all`` (classifier v1 + v2, policy all), ``latest2`` (echo 1..3, latest 2),
    ``specific`` (echo 1..3, specific [1, 3]), ``missing`` (specific [4]: refused)."""
    repo = tmp_path_factory.mktemp("versions")
    for v in (1, 2):
        write_model(repo, "cls_all", v, artifact=classifier_modules[v][1],
                    config="max_batch_size: 8\nversion_policy: {all: {}}\n")
    for v in (1, 2, 3):
        write_model(repo, "latest2", v, echo_mode="echo", config=ECHO + "version_policy: {latest: {num_versions: 2}}\n")
        write_model(repo, "specific", v, echo_mode="echo", config=ECHO + "version_policy: {specific: {versions: [1, 3]}}\n")
        write_model(repo, "missing", v, echo_mode="echo", config=ECHO + "version_policy: {specific: {versions: [4]}}\n")
    srv = ServerThread(repo, host="127.0.0.1", grpc_port=0, exit_timeout_s=2).start()
    yield srv
    srv.stop()


@pytest.fixture()
def vclient(versioned):
    c = tc.InferenceServerClient(versioned.url)
    yield c
    c.close()


def test_each_served_version_answers_with_its_own_weights(vclient, classifier_modules):
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    expected = {}
    for v in (1, 2):
        with torch.no_grad():
            expected[v] = classifier_modules[v][0](torch.from_numpy(x))[0].numpy()
    assert not np.allclose(expected[1], expected[2], atol=1e-3)  # the two versions really differ
    for version in ("1", "2", ""):
        result = vclient.infer("cls_all", [fp32_input(x)], model_version=version)
        served = result.get_response().model_version
        assert served == (version or "2")  # no version: the highest served
        np.testing.assert_allclose(result.as_numpy("logits"), expected[int(served)], rtol=1e-5, atol=1e-5)
    expect_error(lambda: vclient.infer("cls_all", [fp32_input(x)], model_version="3"), "NOT_FOUND",
                 "model 'cls_all' has no version '3'; it serves versions 1, 2")


def test_ready_metadata_config_per_version(vclient):
    assert vclient.is_model_ready("cls_all", "1") and vclient.is_model_ready("cls_all", "2")
    assert not vclient.is_model_ready("cls_all", "3")
    md = vclient.get_model_metadata("cls_all", "1")
    assert list(md.versions) == ["1", "2"] and [t.name for t in md.outputs] == ["logits", "probs"]
    cfg = vclient.get_model_config("cls_all", "1").config
    assert cfg.version_policy.WhichOneof("policy_choice") == "all"
    assert cfg.max_batch_size == 8
    expect_error(lambda: vclient.get_model_metadata("cls_all", "7"), "NOT_FOUND", "has no version '7'")

    assert [vclient.is_model_ready("latest2", v) for v in ("1", "2", "3")] == [False, True, True]
    assert list(vclient.get_model_metadata("latest2").versions) == ["2", "3"]
    assert vclient.get_model_config("latest2").config.version_policy.latest.num_versions == 2
    expect_error(lambda: vclient.infer("latest2", [fp32_input(np.ones((1, 2), np.float32))], model_version="1"),
                 "NOT_FOUND", "it serves versions 2, 3")

    assert [vclient.is_model_ready("specific", v) for v in ("1", "2", "3")] == [True, False, True]
    assert list(vclient.get_model_config("specific").config.version_policy.specific.versions) == [1, 3]
    for v in ("1", "3"):
        r = vclient.infer("specific", [fp32_input(np.full((1, 2), 2.0, np.float32))], model_version=v)
        assert r.get_response().model_version == v and np.array_equal(r.as_numpy("y"), [[4.0, 4.0]])


def test_index_lists_every_served_version(vclient):
    index = [(m.name, m.version, m.state) for m in vclient.get_model_repository_index().models]
    assert ("cls_all", "1", "READY") in index and ("cls_all", "2", "READY") in index
    assert [v for n, v, _ in index if n == "latest2"] == ["2", "3"]
    assert [v for n, v, _ in index if n == "specific"] == ["1", "3"]
    (missing,) = [m for m in vclient.get_model_repository_index().models if m.name == "missing"]
    assert missing.state == "UNAVAILABLE" and missing.version == ""
    assert "'version_policy.specific.versions' lists [4] but there is no such version directory" in missing.reason


def test_statistics_per_version(vclient):
    x = fp32_input(np.ones((1, 2), np.float32))
    before = {s.version: s.inference_count for s in vclient.get_inference_statistics("specific").model_stats}
    assert set(before) == {"1", "3"}
    for _ in range(2):
        vclient.infer("specific", [x], model_version="1")
    vclient.infer("specific", [x], model_version="3")
    after = {s.version: s.inference_count for s in vclient.get_inference_statistics("specific").model_stats}
    assert after["1"] - before["1"] == 2 and after["3"] - before["3"] == 1
    (only,) = vclient.get_inference_statistics("specific", "3").model_stats
    assert only.version == "3" and only.inference_count == after["3"]


def test_aio_client_per_version(versioned):
    import tritonclient.grpc.aio as aio

    async def main():
        c = aio.InferenceServerClient(versioned.url)
        try:
            assert await c.is_model_ready("latest2", "2")
            assert not await c.is_model_ready("latest2", "1")
            r = await c.infer("latest2", [fp32_input(np.ones((1, 2), np.float32))], model_version="2")
            return r.get_response().model_version
        finally:
            await c.close()

    assert asyncio.run(main()) == "2"


# --- reload: warm-up, unchanged versions kept ----------------------------------------------------


@pytest.fixture()
def explicit(tmp_path):
    srv = ServerThread(tmp_path, host="127.0.0.1", grpc_port=0, model_control_mode="explicit", exit_timeout_s=5,
                       startup_models=["*"])
    srv.repo_dir = tmp_path
    yield srv
    srv.stop()


def test_failed_warm_up_keeps_the_old_version(explicit, write_model):
    write_model(explicit.repo_dir, "m", 1, echo_mode="echo", config=ECHO)
    explicit.start()
    c = tc.InferenceServerClient(explicit.url)
    write_model(explicit.repo_dir, "m", 2, echo_mode="badwarmup", config=ECHO)
    expect_error(lambda: c.load_model("m"), "INVALID_ARGUMENT", "failed to load model 'm'",
                 "warm-up inference (zeros, -1 dims as 1) failed", "this model fails every request",
                 "version 1 keeps serving")
    r = c.infer("m", [fp32_input(np.ones((1, 2), np.float32))])
    assert r.get_response().model_version == "1"
    c.close()


def test_warm_up_refuses_a_new_model(tmp_path, write_model):
    write_model(tmp_path, "m", 1, echo_mode="badwarmup", config=ECHO)
    repo = ModelRepository(tmp_path)
    asyncio.run(repo.load_all())
    model = repo.get("m")
    assert not model.ready and "warm-up inference" in model.reason


def test_reload_keeps_unchanged_versions_and_loads_only_new_ones(explicit, write_model):
    cfg = ECHO + "version_policy: {latest: {num_versions: 2}}\n"
    write_model(explicit.repo_dir, "m", 1, echo_mode="echo", config=cfg)
    write_model(explicit.repo_dir, "m", 2, echo_mode="echo", config=cfg)
    swaps: list[tuple[str, str]] = []
    explicit.server.repository.on_swap = lambda name, version: swaps.append((name, version))
    explicit.start()
    assert sorted(swaps) == [("m", "1"), ("m", "2")]
    repo = explicit.server.repository
    v2 = repo.get("m").versions["2"]
    c = tc.InferenceServerClient(explicit.url)
    write_model(explicit.repo_dir, "m", 3, echo_mode="echo", config=cfg)
    c.load_model("m")
    assert swaps[2:] == [("m", "3")]  # only the new version was loaded (and warmed up)
    assert repo.get("m").versions["2"] is v2  # the unchanged one kept as it was
    assert [c.is_model_ready("m", v) for v in ("1", "2", "3")] == [False, True, True]
    # a changed config reloads every version; a changed model file reloads that version
    (explicit.repo_dir / "m" / "config.yaml").write_text(cfg + "max_batch_size: 4\n")
    c.load_model("m")
    assert sorted(swaps[3:]) == [("m", "2"), ("m", "3")]
    assert c.get_model_config("m", "2").config.max_batch_size == 4
    c.load_model("m")  # nothing changed: nothing reloaded
    assert len(swaps) == 5
    (explicit.repo_dir / "m" / "3" / "model.test").write_text("echo\n")  # a new file for version 3 only
    c.load_model("m")
    assert swaps[5:] == [("m", "3")]
    c.close()
