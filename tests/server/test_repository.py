"""Model repository: config.yaml checks and version choice (torch-free, with the test-echo backend)."""

from __future__ import annotations

import asyncio
import re

import numpy as np
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
        ("dynamic_batching: {}\n", "field 'dynamic_batching' needs 'max_batch_size' > 0 (got 0)"),
        ("backend: pyserve\nplatform: onnxruntime_onnx\n",
         "field 'platform' is 'onnxruntime_onnx' but field 'backend' is 'pyserve'; give only 'backend'"),
        ("max_batch_size: 4\ndynamic_batching: {max_queue_delay: 5}\n",
         "unknown field 'dynamic_batching.max_queue_delay'; known fields: max_queue_delay_microseconds, "
         "preferred_batch_size"),
        ("max_batch_size: 4\ndynamic_batching: {preferred_batch_size: [2, 8]}\n",
         "'dynamic_batching.preferred_batch_size' entries must be integers in 1..max_batch_size (4), got 8"),
        ("max_batch_size: 4\ndynamic_batching: {max_queue_delay_microseconds: -5}\n",
         "'dynamic_batching.max_queue_delay_microseconds' must be an integer >= 0, got -5"),
        ("instance_group: [{count: 0}]\n", "'instance_group[0].count' must be an integer >= 1, got 0"),
        ("instance_group: [{count: 2, kind: KIND_TPU}]\n", "'instance_group[0].kind' must be one of KIND_AUTO"),
        ("instance_group: [{count: 2, gpus: [0]}]\n", "unknown field 'instance_group[0].gpus'"),
        ("instance_group: 3\n", "field 'instance_group' must be a list of {count, kind}, got 3"),
    ],
)
def test_config_errors_name_the_field(tmp_path, text, match):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.yaml").write_text(text)
    with pytest.raises(ConfigError, match=re.escape(match)) as info:
        ModelConfig.load(tmp_path / "m")
    assert "config.yaml" in str(info.value)


def test_config_with_batching_and_instances(tmp_path):
    from pyserve.server.repository import DynamicBatchingConfig

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.yaml").write_text(
        "max_batch_size: 16\ndynamic_batching:\n  max_queue_delay_microseconds: 100\n  preferred_batch_size: [4, 16]\n"
        "instance_group:\n  - {count: 2, kind: KIND_CPU}\n  - {count: 1}\n"
    )
    assert ModelConfig.load(tmp_path / "m") == ModelConfig(
        name="m", max_batch_size=16, dynamic_batching=DynamicBatchingConfig(100, (4, 16)), instance_count=3
    )


def test_max_batch_size_needs_a_variable_first_dimension(tmp_path, write_model):
    from pyserve.backends import ModelSignature, TensorSpec, register_backend
    from pyserve.backends import registry

    class Fixed:
        platform = "test"
        ready = True
        signature = ModelSignature(inputs=(TensorSpec("x", "FP32", (1, 2)),), outputs=(TensorSpec("y", "FP32", (-1, 2)),))

        def __init__(self, path, *, executor=None):
            pass

        async def load(self):
            pass

        async def unload(self):
            pass

    register_backend("test-fixed", Fixed, "model.test")
    try:
        write_model(tmp_path, "m", 1, echo_mode="echo", config="backend: test-fixed\nmax_batch_size: 4\n")
        repo = _load(tmp_path)
    finally:
        registry._REGISTRY.pop("test-fixed", None)
    assert not repo.get("m").ready
    assert "field 'max_batch_size' is 4 but input 'x' has shape [1, 2]" in repo.get("m").reason


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


PBTXT = """
name: "m"
backend: "test-echo"
max_batch_size: 8
input [
  {
    name: "x"
    data_type: TYPE_FP32
    dims: [ 2 ]
  }
]
output [ { name: "y", data_type: TYPE_FP32, dims: [ -1 ] } ]
dynamic_batching { preferred_batch_size: [ 4, 8 ] max_queue_delay_microseconds: 100 }
instance_group [ { count: 2, kind: KIND_CPU } ]
"""

SAME_AS_YAML = """
backend: test-echo
max_batch_size: 8
input: [{name: x, data_type: TYPE_FP32, dims: [2]}]
output: [{name: y, data_type: FP32, dims: [-1]}]
dynamic_batching: {preferred_batch_size: [4, 8], max_queue_delay_microseconds: 100}
instance_group: [{count: 2, kind: KIND_CPU}]
"""


def test_config_pbtxt_equals_the_same_config_in_yaml(tmp_path, write_model):
    from pyserve.server.repository import DynamicBatchingConfig, TensorDecl

    write_model(tmp_path, "m", 1, echo_mode="echo")
    (tmp_path / "m" / "config.pbtxt").write_text(PBTXT)
    from_pbtxt = ModelConfig.load(tmp_path / "m")
    assert from_pbtxt == ModelConfig(
        name="m", backend="test-echo", max_batch_size=8, dynamic_batching=DynamicBatchingConfig(100, (4, 8)),
        instance_count=2, inputs=(TensorDecl("x", "FP32", (2,)),), outputs=(TensorDecl("y", "FP32", (-1,)),),
    )
    assert _load(tmp_path).get("m").ready  # declarations match the echo backend's signature
    (tmp_path / "m" / "config.pbtxt").unlink()
    (tmp_path / "m" / "config.yaml").write_text(SAME_AS_YAML)
    assert ModelConfig.load(tmp_path / "m") == from_pbtxt


@pytest.mark.parametrize(
    "text, match",
    [
        ("optimization { }\n", "1:1: field 'optimization' of ModelConfig is unknown or not supported by pyserve"),
        ("max_batch_size: 2\nsequence_batching { }\n", "2:1: field 'sequence_batching' of ModelConfig is unknown"),
        ('instance_group [ { count: 1 rate_limiter { } } ]\n', "field 'rate_limiter' of ModelInstanceGroup is unknown"),
        ('version_policy { latest { num_versions: 0 } }\n',
         "field 'version_policy.latest.num_versions' must be an integer >= 1, got 0"),
        ('version_policy { specific { } }\n', "field 'version_policy.specific.versions' must be a non-empty list"),
        ('input [ { name: "x" data_type: TYPE_FP32 dims: [2] reshape { shape: [2] } } ]\n',
         "field 'input[0].reshape' is not supported by pyserve"),
        ("max_batch_size: 4\ndynamic_batching { preserve_ordering: true }\n",
         "field 'dynamic_batching.preserve_ordering' is not supported"),
        ("no_such_field: 1\n", "field 'no_such_field' of ModelConfig is unknown or not supported"),
        ("max_batch_size: lots\n", "max_batch_size"),
        ('platform: "tensorflow_savedmodel"\n', "field 'platform': unknown backend 'tensorflow_savedmodel'"),
        ("dynamic_batching { }\n", "field 'dynamic_batching' needs 'max_batch_size' > 0"),
    ],
)
def test_config_pbtxt_errors_name_the_field(tmp_path, text, match):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.pbtxt").write_text(text)
    with pytest.raises(ConfigError, match=re.escape(match)) as info:
        ModelConfig.load(tmp_path / "m")
    assert "config.pbtxt" in str(info.value)


def test_both_config_files_refused(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.pbtxt").write_text("")
    (tmp_path / "m" / "config.yaml").write_text("")
    with pytest.raises(ConfigError, match="both config.yaml and config.pbtxt; keep one"):
        ModelConfig.load(tmp_path / "m")


@pytest.mark.parametrize(
    "decl, match",
    [
        ("input: [{name: z, data_type: TYPE_FP32, dims: [2]}]\n", "field 'input' declares ['z']; the model's inputs are ['x']"),
        ("input: [{name: x, data_type: TYPE_INT64, dims: [2]}]\n", "field 'input[0].data_type' is INT64; the model's input 'x' is FP32"),
        ("input: [{name: x, data_type: TYPE_FP32, dims: [3]}]\n", "field 'input[0].dims' is [3]; the model's input 'x' has dims [2] (batch dimension excluded)"),
        ("output: [{name: y, data_type: TYPE_FP32, dims: [-1, 2]}]\n", "field 'output[0].dims' is [-1, 2]"),
        ("input: [{name: x, data_type: FLOAT, dims: [2]}]\n", "field 'input[0].data_type' must be a TYPE_* name"),
        ("input: [{name: x, data_type: TYPE_FP32, dims: [2], format: FORMAT_NCHW}]\n", "unknown field 'input[0].format'"),
    ],
)
def test_declared_inputs_and_outputs_must_match_the_signature(tmp_path, write_model, decl, match):
    write_model(tmp_path, "m", 1, echo_mode="echo", config="backend: test-echo\nmax_batch_size: 8\n" + decl)
    model = _load(tmp_path).get("m")
    assert not model.ready
    assert match in model.reason


def test_several_artifacts_load_concurrently(tmp_path, write_model, classifier_modules):
    """torch.export's deserializer has global state: concurrent loads in the pool must not collide."""
    from concurrent.futures import ThreadPoolExecutor

    artifact = classifier_modules[2][1]
    names = [f"m{i}" for i in range(4)]
    for name in names:
        write_model(tmp_path, name, 1, artifact=artifact)
    with ThreadPoolExecutor(4) as pool:
        repo = ModelRepository(tmp_path, executor=pool)
        asyncio.run(repo.load_all())
    assert {m.name: m.reason for m in repo.models} == {n: "" for n in names}


def _softmax_artifact(tmp_path, dim: int) -> bytes:
    torch = pytest.importorskip("torch")
    from pyserve.artifact import save

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(6, 3)

        def forward(self, x):
            return torch.softmax(self.fc(x), dim=dim)

    torch.manual_seed(0)
    path = tmp_path / f"softmax{dim}.pyserve"
    save(path, Net().eval(), (torch.randn(2, 6),), model_name="m", input_names=["x"], output_names=["p"])
    return path.read_bytes()


@pytest.mark.parametrize(("dim", "batching", "warned"), [(0, True, True), (-1, True, False), (0, False, False)])
def test_a_batched_model_that_mixes_batch_rows_is_served_with_a_warning(tmp_path, write_model, caplog, dim, batching,
                                                                         warned):
    """A softmax over dim 0 makes a row's output depend on the other rows of its batch: with
    dynamic_batching, load warns (the model still serves); a softmax over the last dim, or no
    dynamic batching, loads without that warning."""
    import logging

    config = "max_batch_size: 8\n" + ("dynamic_batching: {max_queue_delay_microseconds: 100}\n" if batching else "")
    write_model(tmp_path, "m", 1, artifact=_softmax_artifact(tmp_path, dim), config=config)
    with caplog.at_level(logging.WARNING, logger="pyserve.server.repository"):
        repo = _load(tmp_path)
    assert repo.get("m").ready
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    mixing = [m for m in messages if "mixes the rows of a batch" in m]
    assert bool(mixing) == warned, messages
    if warned:
        assert "model 'm' version 1" in mixing[0] and "output 'p'" in mixing[0]


class _RowModel:
    """A backend for check_rows_independent: x [-1, 4] of ``in_type`` -> y [-1, 4] of ``out_type``
    (BF16 as uint16 bit patterns, as the protocol carries it) computed by ``fn`` on float32 rows."""

    def __init__(self, fn, in_type="FP32", out_type="FP32"):
        from pyserve.backends import ModelSignature, TensorSpec

        self.fn, self.in_type, self.out_type = fn, in_type, out_type
        self.signature = ModelSignature(inputs=(TensorSpec("x", in_type, (-1, 4)),),
                                        outputs=(TensorSpec("y", out_type, (-1, 4)),))

    async def infer(self, batch):
        out = []
        for inputs in batch:
            x = np.asarray(inputs["x"])
            x = (x.astype(np.uint32) << 16).view(np.float32) if self.in_type == "BF16" else x.astype(np.float32)
            y = np.asarray(self.fn(x), np.float32)
            out.append({"y": (y.view(np.uint32) >> 16).astype(np.uint16) if self.out_type == "BF16" else y})
        return out


@pytest.mark.parametrize(("name", "fn", "in_type", "out_type", "independent"), [
    ("centred over dim 0, FP32 in", lambda x: x - x.mean(0, keepdims=True), "FP32", "FP32", False),
    ("centred over dim 0, BF16 in", lambda x: x - x.mean(0, keepdims=True), "BF16", "FP32", False),
    ("per row, BF16 out", lambda x: x * 2, "FP32", "BF16", True),
    # +0.0 alone, -1e-30 in a batch: the same number, different BF16 bit patterns
    ("signed zero, BF16 out", lambda x: np.where(np.arange(len(x))[:, None] > 0, -1e-30, 0.0) * np.ones_like(x),
     "FP32", "BF16", True),
    ("random (not a row mixer)", lambda x: x + np.random.default_rng().standard_normal(x.shape), "FP32", "FP32", True),
])
def test_row_independence_check_decodes_bf16_and_skips_random_models(caplog, name, fn, in_type, out_type,
                                                                      independent):
    import logging

    from pyserve.server.repository import check_rows_independent

    with caplog.at_level(logging.INFO, logger="pyserve.server.repository"):
        assert asyncio.run(check_rows_independent(_RowModel(fn, in_type, out_type), "model 'm'")) is independent
    assert not any("not checked: " in r.getMessage() and "run to run" not in r.getMessage() for r in caplog.records)
    warned = any("mixes the rows of a batch" in r.getMessage() for r in caplog.records)
    assert warned is (not independent)
    if name.startswith("random"):
        assert any("changes from run to run" in r.getMessage() for r in caplog.records)
