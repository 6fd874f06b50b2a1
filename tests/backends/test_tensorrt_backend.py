"""The tensorrt backend without TensorRT: profile choice, shape checks, I/O description from an engine
(a stand-in object with TensorRT 10's tensor API), the refusal without a GPU, and every runtime API
name it uses checked against the real lean bindings (imported in a subprocess; no Runtime is ever
created). The end-to-end run is marked `tensorrt` and skipped where TensorRT or a GPU is missing."""

from __future__ import annotations

import ast
import asyncio
import enum
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pyserve.backends import tensorrt_backend as trtb
from pyserve.backends.base import ModelSignature, TensorSpec
from pyserve.backends.tensorrt_backend import EngineIO, ProfileRange, check_input_shape, choose_profile

IO = EngineIO(
    inputs=(("ids", "INT64", (-1, 16)), ("mask", "INT64", (-1, 16))),
    outputs=(("emb", "FP32", (-1, 384)),),
    profiles=(
        {"ids": ProfileRange((1, 16), (4, 16), (8, 16)), "mask": ProfileRange((1, 16), (4, 16), (8, 16))},
        {"ids": ProfileRange((1, 16), (32, 16), (64, 16)), "mask": ProfileRange((1, 16), (32, 16), (64, 16))},
    ),
)


@pytest.mark.parametrize("batch,profile", [(1, 0), (8, 0), (9, 1), (64, 1)])
def test_choose_profile_takes_the_tightest_range_holding_the_batch(batch, profile):
    assert choose_profile(IO, {"ids": (batch, 16), "mask": (batch, 16)}) == profile


def test_choose_profile_refuses_with_the_ranges():
    with pytest.raises(ValueError, match=r"profile 0: batch 1\.\.8, profile 1: batch 1\.\.64.*dimension 0 is 65"):
        choose_profile(IO, {"ids": (65, 16), "mask": (65, 16)})
    with pytest.raises(ValueError, match="dimension 1 is 17"):
        choose_profile(IO, {"ids": (2, 17), "mask": (2, 16)})


def test_static_engine_uses_profile_zero():
    static = EngineIO(inputs=(("x", "FP32", (1, 4)),), outputs=(("y", "FP32", (1, 2)),), profiles=())
    assert choose_profile(static, {"x": (1, 4)}) == 0


def test_check_input_shape():
    rng = ProfileRange((1, 3), (4, 3), (8, 3))
    assert check_input_shape(rng, (5, 3)) is None
    assert check_input_shape(rng, (5,)) == "rank 1, the engine expects rank 2"
    assert check_input_shape(rng, (0, 3)) == "dimension 0 is 0, the profile allows 1..8"


def test_signature_of():
    assert trtb.signature_of(IO) == ModelSignature(
        (TensorSpec("ids", "INT64", (-1, 16)), TensorSpec("mask", "INT64", (-1, 16))),
        (TensorSpec("emb", "FP32", (-1, 384)),))


class _Mode(enum.Enum):
    INPUT = 1
    OUTPUT = 2


class _DType(enum.Enum):
    FLOAT = 0
    HALF = 1
    INT64 = 8
    FP8 = 9


class _FakeTrt:
    TensorIOMode = _Mode


class _FakeEngine:
    """TensorRT 10's ICudaEngine tensor API, as documented, over a fixed description."""

    tensors = [("x", _Mode.INPUT, _DType.HALF, (-1, 4)), ("len", _Mode.INPUT, _DType.INT64, (1,)),
               ("y", _Mode.OUTPUT, _DType.FLOAT, (-1, 2))]
    num_optimization_profiles = 2

    @property
    def num_io_tensors(self):
        return len(self.tensors)

    def get_tensor_name(self, i):
        return self.tensors[i][0]

    def _t(self, name):
        return next(t for t in self.tensors if t[0] == name)

    def get_tensor_mode(self, name):
        return self._t(name)[1]

    def get_tensor_dtype(self, name):
        return self._t(name)[2]

    def get_tensor_shape(self, name):
        return list(self._t(name)[3])

    def get_tensor_profile_shape(self, name, p):
        assert name == "x"
        return [[1, 4], [2 + p, 4], [4 * (p + 1), 4]]


def test_read_engine_io_from_the_tensor_api():
    io = trtb.read_engine_io(_FakeTrt, _FakeEngine())
    assert io.inputs == (("x", "FP16", (-1, 4)), ("len", "INT64", (1,)))
    assert io.outputs == (("y", "FP32", (-1, 2)),)
    assert io.profiles == ({"x": ProfileRange((1, 4), (2, 4), (4, 4))}, {"x": ProfileRange((1, 4), (3, 4), (8, 4))})
    assert choose_profile(io, {"x": (6, 4), "len": (1,)}) == 1


def test_unsupported_engine_dtype_is_named():
    eng = _FakeEngine()
    eng.tensors = [("x", _Mode.INPUT, _DType.FP8, (1,))]
    with pytest.raises(ValueError, match="TensorRT datatype FP8 has no protocol datatype"):
        trtb.read_engine_io(_FakeTrt, eng)


def test_load_without_a_gpu_is_refused_before_touching_tensorrt(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"not an engine")
    backend = trtb.TensorRTBackend(plan)
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        asyncio.run(backend.load())
    assert not backend.ready


def _trt_attributes_used(path: Path) -> set[str]:
    """Names read off the module bound to ``trt`` in ``path``: ``trt.X`` and ``trt.X.Y``."""
    tree = ast.parse(path.read_text())
    used = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "trt":
            used.add(node.attr)
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                and isinstance(node.value.value, ast.Name) and node.value.value.id == "trt"):
            used.add(f"{node.value.attr}.{node.attr}")
    return used


def test_runtime_api_list_covers_the_module():
    listed = set(trtb.RUNTIME_API)
    for name in _trt_attributes_used(Path(trtb.__file__)):
        assert name in listed or any(n.startswith(name + ".") for n in listed), name
    method_names = {n.split(".", 1)[1] for n in trtb.RUNTIME_API if n.startswith(("ICudaEngine.", "IExecutionContext."))}
    src = Path(trtb.__file__).read_text()
    for m in ("deserialize_cuda_engine", "create_execution_context", "set_optimization_profile_async",
              "set_input_shape", "set_tensor_address", "execute_async_v3", "get_tensor_profile_shape"):
        assert m in src and (m in method_names or f"Runtime.{m}" in trtb.RUNTIME_API)


_CHECK = """
import json, sys
import importlib
for mod in ("tensorrt_lean", "tensorrt_lean_bindings"):
    try:
        trt = importlib.import_module(mod)
        break
    except ImportError:
        continue
else:
    print(json.dumps({"skip": "tensorrt_lean not installed"})); sys.exit(0)
missing = []
for name in json.loads(sys.argv[1]):
    obj = trt
    for part in name.split("."):
        if not hasattr(obj, part):
            missing.append(name); break
        obj = getattr(obj, part)
print(json.dumps({"module": trt.__name__, "version": trt.__version__, "missing": missing,
                  "has_builder": hasattr(trt, "Builder")}))
"""


def test_runtime_api_names_exist_in_the_lean_bindings():
    """Attributes only (never calls Runtime(): without a GPU it wraps a bad pointer and crashes)."""
    proc = subprocess.run([sys.executable, "-c", _CHECK, json.dumps(list(trtb.RUNTIME_API))], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if "skip" in out:
        pytest.skip("install the `tensorrt-lean` extra (tensorrt-lean-cu12-bindings + -libs) to check the names")
    assert out["missing"] == [], out
    assert not out["has_builder"]  # the lean runtime: engines are built elsewhere


@pytest.mark.tensorrt
def test_backend_runs_a_built_engine(tmp_path):
    """Build a tiny engine with the full TensorRT and run it through the backend (skipped here)."""
    import numpy as np
    import torch

    from pyserve.export.tensorrt import TensorRTOptions, build_engine, profile_shapes
    from pyserve.export import onnx as onnx_export

    lin = torch.nn.Linear(4, 2).eval()
    sig = ModelSignature((TensorSpec("x", "FP32", (-1, 4)),), (TensorSpec("y", "FP32", (-1, 2)),))
    model = onnx_export.finalize(onnx_export.export_onnx_model(lin, (torch.randn(2, 4),), sig), sig)
    onnx_export.write_model(model, tmp_path / "m.onnx")
    opts = TensorRTOptions(1, 2, 8)
    build_engine(tmp_path / "m.onnx", tmp_path / "model.plan", profile_shapes(sig, opts), opts)
    backend = trtb.TensorRTBackend(tmp_path / "model.plan")
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)

    async def go():
        await backend.load()
        return await backend.infer([{"x": x}])

    (res,) = asyncio.run(go())
    with torch.no_grad():
        np.testing.assert_allclose(res["y"], lin(torch.from_numpy(x)).numpy(), atol=1e-3)
