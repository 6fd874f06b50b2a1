"""The TensorRT export path as far as it runs without TensorRT: build settings, profile shapes, the
config written for the `tensorrt` backend, and the builder API names (checked as strings against
the TensorRT 10/11 Python API documentation: the lean runtime has no builder). The real build is
marked `tensorrt` and skipped here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from pyserve.backends.base import ModelSignature, TensorSpec
from pyserve.backends.tensorrt_backend import ProfileRange
from pyserve.export import tensorrt as trt_export
from pyserve.export._repository import model_config_text
from pyserve.export.tensorrt import TensorRTOptions, profile_shapes

SIG = ModelSignature((TensorSpec("input_ids", "INT64", (-1, 16)), TensorSpec("attention_mask", "INT64", (-1, 16))),
                     (TensorSpec("embedding", "FP32", (-1, 384)),))


def test_profile_shapes_for_the_batch():
    opts = TensorRTOptions(min_batch=1, opt_batch=8, max_batch=32)
    prof = profile_shapes(SIG, opts)
    assert prof == {"input_ids": ProfileRange((1, 16), (8, 16), (32, 16)),
                    "attention_mask": ProfileRange((1, 16), (8, 16), (32, 16))}


def test_profile_shapes_of_fixed_inputs_are_fixed():
    sig = ModelSignature((TensorSpec("x", "FP32", (1, 784)),), (TensorSpec("y", "FP32", (1, 10)),))
    assert profile_shapes(sig, TensorRTOptions()) == {"x": ProfileRange((1, 784), (1, 784), (1, 784))}


@pytest.mark.parametrize("sig,kw,match", [
    (ModelSignature((TensorSpec("x", "FP32", (-1, -1)),), ()), {}, "only dimension 0 .* may be dynamic"),
    (ModelSignature((TensorSpec("x", "FP32", ()),), ()), {}, "is a scalar"),
    (ModelSignature((TensorSpec("x", "FP32", (-1, 3)),), ()), {"dynamic_batch": False}, "export with --dynamic-batch"),
])
def test_profile_shapes_refuses(sig, kw, match):
    with pytest.raises(ValueError, match=match):
        profile_shapes(sig, TensorRTOptions(), **kw)


@pytest.mark.parametrize("kw,match", [
    ({"min_batch": 0}, "min_batch must be an integer >= 1"),
    ({"min_batch": 4, "opt_batch": 2}, "min_batch <= opt_batch <= max_batch"),
    ({"opt_batch": 80, "max_batch": 64}, "min_batch <= opt_batch <= max_batch"),
    ({"workspace_bytes": 0}, "workspace_bytes must be"),
    ({"max_batch": True}, "max_batch must be"),
])
def test_options_are_checked(kw, match):
    with pytest.raises(ValueError, match=match):
        TensorRTOptions(**kw)


def test_tensorrt_config_loads_in_the_server_with_the_tensorrt_backend(tmp_path):
    from pyserve.server.repository import ModelConfig

    d = tmp_path / "minilm"
    d.mkdir()
    (d / "config.pbtxt").write_text(model_config_text("minilm", "tensorrt", SIG, max_batch_size=32))
    cfg = ModelConfig.load(d)
    assert cfg.backend == "tensorrt_plan" and cfg.max_batch_size == 32
    assert [(t.name, t.datatype, t.dims) for t in cfg.inputs] == [("input_ids", "INT64", (16,)),
                                                                  ("attention_mask", "INT64", (16,))]
    assert [(t.name, t.datatype, t.dims) for t in cfg.outputs] == [("embedding", "FP32", (384,))]


@pytest.mark.parametrize("fmt,key", [("onnx", 'platform: "onnxruntime_onnx"'), ("torch", 'backend: "torch"'),
                                     ("torchscript", 'platform: "pytorch_libtorch"')])
def test_config_names_the_backend(tmp_path, fmt, key):
    from pyserve.server.repository import ModelConfig

    text = model_config_text("m", fmt, SIG, max_batch_size=0)
    assert key in text
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.pbtxt").write_text(text)
    cfg = ModelConfig.load(tmp_path / "m")
    assert cfg.max_batch_size == 0 and cfg.inputs[0].dims == (-1, 16)


def test_batched_config_needs_a_batch_dimension():
    sig = ModelSignature((TensorSpec("x", "FP32", (1, 4)),), (TensorSpec("y", "FP32", (1, 2)),))
    with pytest.raises(ValueError, match="needs a variable first dimension"):
        model_config_text("m", "onnx", sig, max_batch_size=8)


#: The builder-side names of TensorRT's Python API (docs.nvidia.com/deeplearning/tensorrt/latest/
#: _static/python-api: Builder, IBuilderConfig, INetworkDefinition, ITensor, IOptimizationProfile,
#: ITimingCache, OnnxParser, NetworkDefinitionCreationFlag, MemoryPoolType), as in TensorRT 10 and 11.
DOCUMENTED_BUILDER_API = {
    "Logger", "Logger.WARNING", "Builder", "Builder.create_network", "Builder.create_builder_config",
    "Builder.create_optimization_profile", "Builder.build_serialized_network", "Builder.platform_has_fast_fp16",
    "NetworkDefinitionCreationFlag.STRONGLY_TYPED", "NetworkDefinitionCreationFlag.EXPLICIT_BATCH",
    "OnnxParser", "OnnxParser.parse", "OnnxParser.parse_from_file", "OnnxParser.num_errors", "OnnxParser.get_error",
    "IBuilderConfig.set_memory_pool_limit", "IBuilderConfig.add_optimization_profile",
    "IBuilderConfig.create_timing_cache", "IBuilderConfig.set_timing_cache", "IBuilderConfig.get_timing_cache",
    "IBuilderConfig.set_flag", "MemoryPoolType.WORKSPACE", "ITimingCache.serialize", "IOptimizationProfile.set_shape",
    "INetworkDefinition.num_inputs", "INetworkDefinition.get_input", "ITensor.name", "ITensor.shape",
}
#: Removed in TensorRT 11 (precision comes from a strongly typed network instead).
REMOVED_IN_TRT11 = ("BuilderFlag.FP16", "BuilderFlag.INT8", "IInt8EntropyCalibrator2", "IInt8Calibrator",
                    "int8_calibrator")


def test_builder_api_names_are_documented_and_cover_the_module():
    assert set(trt_export.BUILDER_API) <= DOCUMENTED_BUILDER_API
    tree = ast.parse(Path(trt_export.__file__).read_text())
    used = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "trt":
            used.add(node.attr)
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                and isinstance(node.value.value, ast.Name) and node.value.value.id == "trt"):
            used.add(f"{node.value.attr}.{node.attr}")
    api = set(trt_export.BUILDER_API)
    assert used and all(u in api or any(n.startswith(u + ".") for n in api) for u in used), used
    methods = {n.split(".", 1)[1] for n in trt_export.BUILDER_API if "." in n}
    src = Path(trt_export.__file__).read_text()
    for call in ("create_network", "create_builder_config", "parse_from_file", "set_memory_pool_limit",
                 "create_optimization_profile", "set_shape", "add_optimization_profile", "create_timing_cache",
                 "set_timing_cache", "build_serialized_network", "get_timing_cache"):
        assert f".{call}(" in src and call in methods, call


def test_no_api_removed_in_tensorrt_11():
    src = Path(trt_export.__file__).read_text().split('"""', 2)[2]  # code after the module docstring
    for name in REMOVED_IN_TRT11:
        assert name not in src, name


def test_build_without_tensorrt_says_so(tmp_path):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed")
    except ImportError:
        pass
    with pytest.raises(ImportError, match="needs the full TensorRT library"):
        trt_export.build_engine(tmp_path / "m.onnx", tmp_path / "m.plan", {}, TensorRTOptions())


@pytest.mark.tensorrt
def test_export_to_tensorrt_writes_plan_and_config(lenet, tmp_path):
    from pyserve.export import ExportRequest, run_export

    res = run_export(ExportRequest(source=lenet.fp32, to="tensorrt", repository=tmp_path, model="lenet_trt",
                                   dynamic_batch=True, max_batch_size=32, timing_cache=tmp_path / "timing.cache"))
    assert res.path == tmp_path / "lenet_trt" / "1" / "model.plan" and res.path.stat().st_size > 0
    assert 'platform: "tensorrt_plan"' in res.config_path.read_text()
    assert (tmp_path / "timing.cache").stat().st_size > 0
