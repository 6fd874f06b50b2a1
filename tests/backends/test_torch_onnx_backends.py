"""The torch and onnxruntime backends on their own (no server): signatures, results against the
torch module they came from, one bad request failing alone, clear load errors; registry and config
names (Triton's platforms) resolve to them."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from pyserve.backends import create_backend, get_backend  # noqa: E402
from pyserve.backends._common import SIGNATURE_KEY, signature_to_json  # noqa: E402
from pyserve.backends.base import ModelSignature, TensorSpec  # noqa: E402

SIG = ModelSignature((TensorSpec("x", "FP32", (-1, 5)), TensorSpec("n", "INT64", (-1, 1))),
                     (TensorSpec("y", "FP32", (-1, 3)), TensorSpec("k", "INT64", (-1,))))


class TwoInTwoOut(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(5, 3)

    def forward(self, x, n):
        y = self.lin(x) * n.to(torch.float32)
        return y, y.argmax(dim=1)


@pytest.fixture(scope="module")
def module():
    torch.manual_seed(0)
    return TwoInTwoOut().eval()


def _example():
    return torch.randn(2, 5), torch.ones(2, 1, dtype=torch.int64)


def _run(backend, batch):
    async def go():
        await backend.load()
        try:
            return backend.signature, await backend.infer(batch)
        finally:
            await backend.unload()
    return asyncio.run(go())


def _request(seed, rows=4):
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((rows, 5)).astype(np.float32), "n": rng.integers(1, 4, (rows, 1))}


def _reference(module, req):
    with torch.no_grad():
        y, k = module(torch.from_numpy(req["x"]), torch.from_numpy(req["n"]))
    return y.numpy(), k.numpy()


@pytest.mark.parametrize("name,filename", [("torch", "model.pt2"), ("pytorch_libtorch", "model.pt"),
                                           ("pytorch", "model.pt"), ("onnxruntime", "model.onnx"),
                                           ("onnxruntime_onnx", "model.onnx"), ("tensorrt", "model.plan"),
                                           ("tensorrt_plan", "model.plan")])
def test_registry_names_and_files(name, filename):
    assert get_backend(name).artifact_filename == filename


def test_pt2_with_embedded_signature(module, tmp_path):
    from pyserve.export.torch_export import save_pt2

    path = tmp_path / "model.pt2"
    save_pt2(module, _example(), SIG, path, dynamic_batch=True)
    reqs = [_request(1), _request(2, rows=1)]
    sig, results = _run(create_backend("torch", path), reqs)
    assert sig == SIG
    for req, res in zip(reqs, results):
        y, k = _reference(module, req)
        np.testing.assert_array_equal(res["y"], y)
        np.testing.assert_array_equal(res["k"], k)
        assert res["y"].dtype == np.float32 and res["k"].dtype == np.int64


def test_pt2_without_signature_gets_default_names_from_the_graph(module, tmp_path):
    path = tmp_path / "model.pt2"
    batch = torch.export.Dim("batch", min=1, max=1024)
    ep = torch.export.export(module, _example(), dynamic_shapes=({0: batch}, {0: batch}))
    torch.export.save(ep, str(path))
    sig, results = _run(create_backend("torch", path), [{"input__0": _request(3)["x"],
                                                         "input__1": _request(3)["n"]}])
    assert sig == ModelSignature((TensorSpec("input__0", "FP32", (-1, 5)), TensorSpec("input__1", "INT64", (-1, 1))),
                                 (TensorSpec("output__0", "FP32", (-1, 3)), TensorSpec("output__1", "INT64", (-1,))))
    np.testing.assert_array_equal(results[0]["output__0"], _reference(module, _request(3))[0])


def test_pt2_in_bfloat16_serves_bf16_bit_patterns(tmp_path):
    """A bfloat16 model's BF16 inputs and outputs travel as uint16 bit patterns (numpy has no
    bfloat16): in, reinterpreted as torch.bfloat16; out, the result's bits, equal to torch's."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 4).to(torch.bfloat16).eval()
    path = tmp_path / "model.pt2"
    batch = torch.export.Dim("batch", min=1, max=1024)
    x = torch.randn(2, 16).bfloat16()
    torch.export.save(torch.export.export(lin, (x,), dynamic_shapes=({0: batch},)), str(path))
    bits = x.view(torch.int16).numpy().view(np.uint16)
    sig, results = _run(create_backend("torch", path), [{"input__0": bits}])
    assert sig.outputs[0].datatype == "BF16" and sig.inputs[0].datatype == "BF16"
    out = results[0]["output__0"]
    assert out.dtype == np.uint16
    with torch.no_grad():
        expected = lin(x).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(out, expected)


def test_torchscript_needs_and_uses_the_signature(module, tmp_path):
    from pyserve.export.torch_export import save_torchscript

    path = tmp_path / "model.pt"
    save_torchscript(module, _example(), SIG, path)
    sig, results = _run(create_backend("pytorch_libtorch", path), [_request(4)])
    assert sig == SIG
    np.testing.assert_allclose(results[0]["y"], _reference(module, _request(4))[0], atol=1e-6)
    bare = tmp_path / "bare.pt"
    torch.jit.save(torch.jit.trace(module, _example()), str(bare))
    with pytest.raises(ValueError, match="no embedded pyserve_signature.json"):
        _run(create_backend("pytorch_libtorch", bare), [])


def test_one_bad_request_fails_alone(module, tmp_path):
    from pyserve.export.torch_export import save_pt2

    path = tmp_path / "model.pt2"
    save_pt2(module, _example(), SIG, path, dynamic_batch=True)
    bad = {"x": np.zeros((2, 7), np.float32), "n": np.ones((2, 1), np.int64)}
    _, results = _run(create_backend("torch", path), [_request(5), bad, _request(6)])
    assert isinstance(results[1], Exception)
    assert isinstance(results[0], dict) and isinstance(results[2], dict)


@pytest.mark.parametrize("content,suffix,match", [(b"garbage", ".pt2", "not a torch.export program"),
                                                  (b"garbage", ".pt", "not a TorchScript module"),
                                                  (b"garbage", ".bin", "loads .pt2")])
def test_torch_load_errors_are_clear(tmp_path, content, suffix, match):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=match):
        _run(create_backend("torch", path), [])


# ---- onnxruntime


@pytest.fixture(scope="module")
def onnx_path(module, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    from pyserve.export import onnx as onnx_export

    model = onnx_export.export_onnx_model(module, _example(), SIG, dynamic_batch=True)
    model = onnx_export.finalize(model, SIG)
    path = tmp_path_factory.mktemp("ort") / "model.onnx"
    onnx_export.write_model(model, path)
    return path


def test_onnxruntime_runs_and_reports_cpu_provider(module, onnx_path):
    from pyserve.backends.onnxruntime_backend import OnnxRuntimeBackend

    backend = OnnxRuntimeBackend(onnx_path)
    reqs = [_request(7), _request(8, rows=1)]
    sig, results = _run(backend, reqs)
    assert sig == SIG
    assert "CPUExecutionProvider" in backend.providers
    for req, res in zip(reqs, results):
        y, k = _reference(module, req)
        np.testing.assert_allclose(res["y"], y, atol=1e-5)
        np.testing.assert_array_equal(res["k"], k)


def test_onnxruntime_signature_from_the_session_without_metadata(onnx_path, tmp_path):
    import onnx

    model = onnx.load(str(onnx_path))
    del model.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(model, str(bare))
    sig, _ = _run(create_backend("onnxruntime", bare), [])
    assert sig == SIG  # same names; symbolic batch -> -1


def test_onnxruntime_bad_request_fails_alone_and_bad_file_is_refused(onnx_path, tmp_path):
    _, results = _run(create_backend("onnxruntime", onnx_path),
                      [{"x": np.zeros((1, 6), np.float32), "n": np.ones((1, 1), np.int64)}, _request(9)])
    assert isinstance(results[0], Exception) and isinstance(results[1], dict)
    broken = tmp_path / "model.onnx"
    broken.write_bytes(b"\x08\x07garbage")
    with pytest.raises(ValueError, match="onnxruntime cannot load this model"):
        _run(create_backend("onnxruntime", broken), [])


def test_onnxruntime_embedded_signature_must_match_the_graph(onnx_path, tmp_path):
    import onnx

    model = onnx.load(str(onnx_path))
    for p in model.metadata_props:
        if p.key == SIGNATURE_KEY:
            wrong = json.loads(p.value)
            wrong["inputs"][0]["name"] = "other"
            p.value = json.dumps(wrong)
    path = tmp_path / "wrong.onnx"
    onnx.save(model, str(path))
    with pytest.raises(ValueError, match="embedded pyserve_signature.json names inputs"):
        _run(create_backend("onnxruntime", path), [])


def test_choose_providers():
    from pyserve.backends.onnxruntime_backend import choose_providers

    assert choose_providers(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert choose_providers(["CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"]) == \
        ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers(["CPUExecutionProvider", "CUDAExecutionProvider"], "CPUExecutionProvider") == \
        ["CPUExecutionProvider"]
    with pytest.raises(ValueError, match="not available"):
        choose_providers(["CPUExecutionProvider"], "CUDAExecutionProvider")


def test_signature_json_round_trip_and_errors():
    from pyserve.backends._common import signature_from_json

    assert signature_from_json(signature_to_json(SIG), "x") == SIG
    for bad in ("{}", '{"inputs": [], "outputs": []}', '{"inputs": [{"name": "a", "datatype": "FP99", "shape": []}],'
                ' "outputs": [{"name": "b", "datatype": "FP32", "shape": []}]}', "not json"):
        with pytest.raises(ValueError, match="embedded"):
            signature_from_json(bad, "model.onnx")
