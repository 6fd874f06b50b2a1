"""The walking skeleton through the interfaces users use: an MNIST model compressed by
`pyserve compress`, served in-process on port 0, queried with tritonclient.grpc (raw inputs) and
compared with `pyserve.load(...)` run directly; plus the corrupt-artifact case next to it."""

import shutil

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

import pyserve
from pyserve.datasets import mnist
from pyserve.server import ServerThread


@pytest.fixture(scope="module")
def served(compressed, tmp_path_factory):
    _, artifact, _ = compressed
    repo = tmp_path_factory.mktemp("repo")
    (repo / "lenet" / "3").mkdir(parents=True)
    shutil.copy(artifact, repo / "lenet" / "3" / "model.pyserve")
    data = bytearray(artifact.read_bytes())
    data[len(data) // 2] ^= 0x10  # one flipped bit inside the blob region
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "1" / "model.pyserve").write_bytes(bytes(data))
    with ServerThread(repo, host="127.0.0.1", grpc_port=0) as srv:
        client = grpcclient.InferenceServerClient(srv.url)
        yield client, artifact
        client.close()


def test_served_predictions_equal_pyserve_load(served):
    client, artifact = served
    test = mnist().test
    module = pyserve.load(artifact)
    agree = 0
    for i in range(0, len(test), 2500):
        batch = test.images[i:i + 2500]
        x = grpcclient.InferInput("images", list(batch.shape), "FP32")
        x.set_data_from_numpy(batch)  # binary: raw_input_contents
        logits = client.infer("lenet", [x]).as_numpy("logits")
        with torch.inference_mode():
            expected = module(torch.from_numpy(batch)).numpy()
        np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
        agree += int((logits.argmax(1) == expected.argmax(1)).sum())
    assert agree == len(test)


def test_metadata_and_readiness(served):
    client, _ = served
    meta = client.get_model_metadata("lenet")
    assert meta.versions == ["3"]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("images", "FP32", [-1, 784])]
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("lenet") and not client.is_model_ready("broken")


def test_bad_requests(served):
    client, _ = served
    good = np.zeros((2, 784), dtype=np.float32)

    def infer(model, name="images", datatype="FP32", data=good, shape=None):
        x = grpcclient.InferInput(name, list(data.shape), datatype)
        x.set_data_from_numpy(data)
        if shape is not None:
            x.set_shape(shape)  # the data no longer fills the declared shape
        return client.infer(model, [x])

    with pytest.raises(InferenceServerException) as e:
        infer("nope")
    assert e.value.status() == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as e:
        infer("broken")
    assert e.value.status() == "StatusCode.UNAVAILABLE" and "checksum" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        infer("lenet", name="pixels")
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT" and "images" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        infer("lenet", datatype="FP64", data=good.astype(np.float64))
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "FP32" in e.value.message() and "FP64" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        infer("lenet", data=good[:, :700], shape=[2, 784])
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert str(2 * 784 * 4) in e.value.message() and str(2 * 700 * 4) in e.value.message()
