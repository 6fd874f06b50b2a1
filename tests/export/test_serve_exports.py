"""`pyserve export --repository` writes a model the server loads; tritonclient gets the source
model's answers back from the onnxruntime (fp32, fp16, int8) and torch (.pt2, TorchScript) backends."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")
tc = pytest.importorskip("tritonclient.grpc")

from pyserve.export import ExportRequest, Source, load_source, run_export  # noqa: E402

EXPORTS = [  # (model name, source attr, format, precision, tolerance vs the source's own module)
    ("lenet_onnx", "fp32", "onnx", "fp32", 1e-5),
    ("lenet_onnx_fp16", "fp32", "onnx", "fp16", 5e-2),
    ("lenet_onnx_int8", "int8", "onnx", "int8", 1e-4),
    ("lenet_pt2", "fp32", "torch", "fp32", 1e-5),
]


class ShapeBranch(torch.nn.Module):
    """A model torch.export cannot capture (a branch on a tensor's value): exported as TorchScript."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)

    def forward(self, x):
        if float(x.sum()) > -1e9:  # data-dependent Python branch
            return self.lin(x) * 2
        return self.lin(x)


@pytest.fixture(scope="module")
def served(lenet, tmp_path_factory):
    from pyserve.backends.base import ModelSignature, TensorSpec
    from pyserve.server import ServerThread

    repo = tmp_path_factory.mktemp("exported_repo")
    sources = {"fp32": load_source(lenet.fp32), "int8": load_source(lenet.int8)}
    written = {}
    for name, src, fmt, precision, _ in EXPORTS:
        res = run_export(ExportRequest(source=getattr(lenet, src), to=fmt, repository=repo, model=name, version=3,
                                       precision=precision, dynamic_batch=True, max_batch_size=16),
                         source=sources[src])
        written[name] = res
    torch.manual_seed(0)
    branch = ShapeBranch().eval()
    sig = ModelSignature((TensorSpec("x", "FP32", (-1, 4)),), (TensorSpec("y", "FP32", (-1, 3)),))
    src = Source("pt2", lenet.fp32, "branch", branch, sig)
    with warnings.catch_warnings():  # the TracerWarning about the frozen branch is the point here
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        written["branch"] = run_export(ExportRequest(source=lenet.fp32, to="torch", repository=repo, model="branch",
                                                     dynamic_batch=True, max_batch_size=8), source=src)
    srv = ServerThread(repo, host="127.0.0.1", grpc_port=0, exit_timeout_s=2)
    srv.start()
    yield srv, written, branch
    srv.stop()


def _infer(client, model, name, x, out):
    inp = tc.InferInput(name, list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return client.infer(model, [inp], outputs=[tc.InferRequestedOutput(out)]).as_numpy(out)


@pytest.mark.parametrize("name,src,fmt,precision,tol", EXPORTS)
def test_server_serves_the_export(served, lenet, name, src, fmt, precision, tol):
    srv, written, _ = served
    res = written[name]
    assert res.config_path == res.path.parents[1] / "config.pbtxt"
    assert res.path.parent.name == "3"
    client = tc.InferenceServerClient(srv.url)
    try:
        assert client.is_model_ready(name)
        md = client.get_model_metadata(name)
        assert md.platform == {"onnx": "onnxruntime_onnx", "torch": "pytorch_libtorch"}[fmt]
        assert [i.name for i in md.inputs] == ["images"] and list(md.inputs[0].shape) == [-1, 784]
        assert md.versions == ["3"]
        cfg = client.get_model_config(name).config
        assert cfg.max_batch_size == 16
        x = lenet.test_images[:6]
        got = _infer(client, name, "images", x, "logits")
        module = lenet.module if src == "fp32" else lenet.int8_module
        with torch.no_grad():
            ref = module(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(got, ref, atol=tol * max(1.0, float(np.abs(ref).max())), rtol=tol)
    finally:
        client.close()


def test_torchscript_fallback_is_served(served):
    srv, written, branch = served
    res = written["branch"]
    assert res.format == "torchscript" and res.path.name == "model.pt"
    assert any("torch.export failed" in n for n in res.notes)
    assert 'platform: "pytorch_libtorch"' in res.config_path.read_text()
    client = tc.InferenceServerClient(srv.url)
    try:
        x = np.arange(12, dtype=np.float32).reshape(3, 4) / 10
        got = _infer(client, "branch", "x", x, "y")
        with torch.no_grad():
            np.testing.assert_allclose(got, branch(torch.from_numpy(x)).numpy(), atol=1e-6)
    finally:
        client.close()
