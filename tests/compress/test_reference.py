"""Each Deep Compression stage against an independent reference: k-means against scikit-learn's
KMeans from the same initialization, pruned weights exactly zero after retraining (Linear and Conv),
and the artifact decoded by ``pyserve.load`` computing exactly what the compressed model computes."""

import numpy as np
import pytest
import torch
from torch import nn

import pyserve
from pyserve import artifact
from pyserve.compress import PruneConfig, QuantizeConfig, kmeans_1d
from pyserve.compress._train import Task
from pyserve.compress.huffman import HuffmanConfig, huffman
from pyserve.compress.methods import CompressionState
from pyserve.compress.pipeline import _encodings
from pyserve.compress.prune import prune
from pyserve.compress.quantize import quantize

sklearn_cluster = pytest.importorskip("sklearn.cluster")


@pytest.mark.parametrize("k", [7, 31])
@pytest.mark.parametrize("init", ["linear", "density"])
def test_kmeans_matches_sklearn_from_same_init(k, init):
    # pruned-layer-like data: a Laplace distribution with its small-magnitude middle removed
    rng = np.random.default_rng(k)
    v = rng.laplace(scale=0.05, size=6000)
    v = v[np.abs(v) > 0.02]
    start = (np.linspace(v.min(), v.max(), k) if init == "linear" else np.quantile(v, np.linspace(0, 1, k)))
    centroids, labels = kmeans_1d(v, k, init=init, iterations=1000)
    ref = sklearn_cluster.KMeans(n_clusters=k, init=start.reshape(-1, 1), n_init=1, max_iter=1000, tol=0.0,
                                 algorithm="lloyd").fit(v.reshape(-1, 1))
    assert np.bincount(ref.labels_, minlength=k).min() > 0  # no empty cluster (the two differ there)
    order = np.argsort(ref.cluster_centers_.ravel())
    np.testing.assert_allclose(centroids, ref.cluster_centers_.ravel()[order], rtol=0, atol=1e-6)
    rank = np.empty(k, dtype=np.int64)
    rank[order] = np.arange(k)
    np.testing.assert_array_equal(labels, rank[ref.labels_])


class SmallConvNet(nn.Module):
    """A LeNet-5-shaped net, narrower: conv 4@5x5, pool, conv 8@5x5, pool, fc 128-32, fc 32-10."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 5)
        self.conv2 = nn.Conv2d(4, 8, 5)
        self.fc1 = nn.Linear(128, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = x.reshape(-1, 1, 28, 28)
        x = nn.functional.max_pool2d(self.conv1(x), 2)
        x = nn.functional.max_pool2d(self.conv2(x), 2)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


@pytest.fixture(scope="module")
def small_task():
    t = Task.from_dataset("mnist", batch_size=100, seed=0, verbose=False)
    return Task(t.train_x[:2000], t.train_y[:2000], t.test_x[:500], t.test_y[:500], batch_size=100, seed=0,
                verbose=False)


@pytest.fixture(scope="module")
def compressed_conv(small_task):
    """SmallConvNet pruned (2 rounds with retraining), quantized (8-bit conv, 5-bit fc, fine-tuned)."""
    torch.manual_seed(0)
    model = SmallConvNet()
    state = CompressionState(model)
    initial = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    prune(state, PruneConfig(sparsity={"conv1": 0.3, "conv2": 0.8, "fc1": 0.9, "fc2": 0.7}, rounds=2,
                             retrain_epochs=1), small_task)
    after_prune = {n: m.weight.detach().clone() for n, m in state.layers.items()}
    quantize(state, QuantizeConfig(finetune_epochs=1, lr=1e-3), small_task)
    huffman(state, HuffmanConfig(), small_task)
    return model, state, initial, after_prune


def test_pruned_weights_exactly_zero_after_retraining(compressed_conv):
    model, state, initial, after_prune = compressed_conv
    for name, m in state.layers.items():
        mask = state.masks[f"{name}.weight"]
        expect = {"conv1": 0.3, "conv2": 0.8, "fc1": 0.9, "fc2": 0.7}[name]
        assert abs(1 - mask.float().mean().item() - expect) < 1.0 / mask.numel() + 1e-9
        # retraining moved the kept weights, and left every pruned one at exactly 0.0
        assert not torch.equal(after_prune[name][mask], initial[name][mask])
        assert torch.count_nonzero(after_prune[name][~mask]) == 0
        # so did centroid fine-tuning (a weight-shared layer holds codebook values only)
        w = m.weight.detach()
        assert torch.count_nonzero(w[~mask]) == 0
        codebook = torch.from_numpy(state.codebooks[f"{name}.weight"])
        assert codebook.numel() == (256 if isinstance(m, nn.Conv2d) else 32)
        assert torch.isin(w, codebook).all()


def test_centroid_finetuning_sums_gradients_per_centroid():
    # d loss / d centroid j  ==  sum of d loss / d w over the weights sharing centroid j (section 3.3)
    torch.manual_seed(1)
    lin = nn.Linear(6, 4)
    w0 = lin.weight.detach().clone()
    from pyserve.compress.quantize import _SharedWeight
    from torch.nn.utils import parametrize

    centroids, labels = kmeans_1d(w0.numpy().ravel(), 3)
    index = torch.from_numpy(labels).reshape(w0.shape) + 1
    parametrize.register_parametrization(lin, "weight", _SharedWeight(index, torch.from_numpy(centroids)), unsafe=True)
    x = torch.randn(5, 6)
    lin(x).pow(2).sum().backward()
    got = lin.parametrizations.weight[0].centroids.grad
    # reference: the plain layer with the shared weights, gradient wrt each weight, summed per cluster
    ref_lin = nn.Linear(6, 4)
    with torch.no_grad():
        ref_lin.weight.copy_(torch.from_numpy(centroids)[index - 1])
        ref_lin.bias.copy_(lin.bias)
    ref_lin(x).pow(2).sum().backward()
    ref = torch.zeros(3).index_add_(0, (index - 1).ravel(), ref_lin.weight.grad.ravel())
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_load_equals_compressed_model_conv(compressed_conv, small_task, tmp_path):
    model, state, _, _ = compressed_conv
    encodings = _encodings(state)
    for name in ("conv1.weight", "conv2.weight"):
        meta = encodings[name].meta
        assert meta["encoding"] == "sparse" and meta["index_bits"] == 8 and meta["codebook_size"] == 256
    path = tmp_path / "conv.pyserve"
    artifact.save(path, model, small_task.example_inputs(), model_name="smallconv", encodings=encodings)
    loaded = pyserve.load(path)
    for name, t in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name  # bit-exact weights
    x = small_task.test_x
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))  # the same function, bit for bit


def test_load_equals_compressed_model_pipeline(tmp_path):
    """The whole pipeline in-process (LeNet-300-100, 1 training epoch): the artifact computes exactly
    what the compressed in-memory model computes, and its stated sizes are the file's."""
    import os
    import textwrap
    from pathlib import Path

    from pyserve.compress import compress, load_recipe

    root = Path(__file__).resolve().parents[2]
    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent(f"""
        format_version: 1
        name: tinylenet
        model:
          factory: {root / 'examples/lenet300/model.py'}:LeNet300
          inputs: [{{name: images, datatype: FP32, shape: [-1, 784]}}]
          outputs: [{{name: logits, datatype: FP32, shape: [-1, 10]}}]
        train: {{epochs: 1, batch_size: 256}}
        stages:
          - {{method: prune, sparsity: {{fc1: 0.9, fc2: 0.9, fc3: 0.7}}, retrain_epochs: 0, index_bits: {{fc1: 8}}}}
          - {{method: quantize, bits: 5, finetune_epochs: 0}}
          - {{method: huffman}}
    """))
    out = tmp_path / "tiny.pyserve"
    result = compress(load_recipe(path), out, verbose=False)
    assert result.artifact_bytes == os.path.getsize(out)
    assert result.manifest.tensors["fc1.weight"]["index_bits"] == 8
    assert result.manifest.tensors["fc2.weight"]["index_bits"] == 5
    assert [s["method"] for s in result.stages] == ["prune", "quantize", "huffman"]
    loaded = pyserve.load(out)
    x = Task.from_dataset("mnist", verbose=False).test_x
    with torch.no_grad():
        assert torch.equal(loaded(x), result.model.eval()(x))
    assert result.accuracy_loaded == result.accuracy_after
