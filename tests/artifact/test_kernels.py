"""pyserve.artifact.kernels: an artifact's Linear layers on int8 / CSR / codebook kernels, checked
against the NumPy references of pyserve.ops and against the fp32 graph."""

import re

import numpy as np
import pytest
import torch
from torch import nn

from pyserve import artifact
from pyserve.artifact.kernels import native_module
from pyserve.ops import quantize_per_channel
from pyserve.ops.reference import int8_linear_reference


def test_int8_layer_matches_numpy_reference(saved):
    path, net = saved
    art = artifact.load_artifact(path)
    module, choices = native_module(art, kernels="int8")
    assert choices == {"a.weight": "int8", "b.weight": "dense", "c.weight": "dense"}
    from pyserve.ops import quant

    pinned = [b for b in module.buffers() if b.dtype == torch.int8]
    assert len(pinned) == 1 and quant._cached_pack(pinned[0]) is not None  # the packed kernel runs
    x = torch.randn(3, 7, 48)
    parts = art.int8["a.weight"]
    h = int8_linear_reference(x.reshape(-1, 48).numpy(), parts.values, parts.scale, net.a.bias.detach().numpy())
    h = np.maximum(h, 0) @ net.b.weight.detach().numpy().T + net.b.bias.detach().numpy()
    expected = np.maximum(h, 0) @ net.c.weight.detach().numpy().T
    with torch.inference_mode():
        got = module(x).numpy()
        fp32 = net(x).numpy()
    assert got.shape == (3, 7, 16)
    np.testing.assert_allclose(got.reshape(-1, 16), expected, rtol=1e-4, atol=1e-5)
    # activation rounding only: within a few percent of the fp32 graph
    assert np.linalg.norm(got - fp32) / np.linalg.norm(fp32) < 0.03


@pytest.mark.parametrize("kernel,layers", [("csr", ("b.weight", "c.weight")), ("codebook", ("b.weight",))])
def test_sparse_kernels_match_the_dense_graph(saved, kernel, layers, monkeypatch):
    path, net = saved
    art = artifact.load_artifact(path)
    module, choices = native_module(art, kernels=kernel)
    assert {k for k, v in choices.items() if v == kernel} == set(layers)
    if kernel == "csr":  # the CSR layers were packed at load: the packed kernel runs
        from pyserve.ops import sparse

        packed = [b for b in module.buffers() if b.dtype == torch.float32 and sparse._CSR_CACHE.get(id(b))]
        assert len(packed) == 2
        from pyserve import _C

        calls = []
        real = _C.csr_linear_packed
        monkeypatch.setattr(_C, "csr_linear_packed", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(4, 3, 48)
    with torch.inference_mode():
        np.testing.assert_allclose(module(x).numpy(), net(x).numpy(), rtol=1e-5, atol=1e-5)
    if kernel == "csr":
        assert len(calls) == 2


def test_auto_measures_and_picks_an_allowed_kernel(saved):
    path, net = saved
    module, choices = native_module(artifact.load_artifact(path), kernels="auto", sample_rows=(1, 8), repeats=2)
    assert choices["a.weight"] in ("dense", "int8")
    assert choices["b.weight"] in ("dense", "csr", "codebook")
    assert choices["c.weight"] in ("dense", "csr")
    x = torch.randn(2, 4, 48)
    with torch.inference_mode():
        got, fp32 = module(x).numpy(), net(x).numpy()
    assert np.linalg.norm(got - fp32) / np.linalg.norm(fp32) < 0.03


def test_dense_leaves_the_graph_and_bad_kernel_name_is_refused(saved):
    path, net = saved
    art = artifact.load_artifact(path)
    module, choices = native_module(art, kernels="dense")
    assert choices == {} and module is art.module
    with pytest.raises(ValueError, match="kernels"):
        native_module(art, kernels="fp16")


def test_dynamic_axes_in_the_manifest(saved):
    path, _ = saved
    m = artifact.read_manifest(path)
    assert m.inputs[0].shape == (-1, -1, 48)
    assert m.tensors["a.weight"]["encoding"] == "int8"


def test_rewritten_graph_drops_dead_weight_fetches_and_checks_each_input_shape_once(saved, monkeypatch):
    """native_module erases the get_attr nodes its rewrites left unread, and memoizes torch.export's
    input check by shape: a shape seen before is not re-checked, a new one is, and a bad input still
    gets torch's own error every time (never remembered)."""
    import torch.export._unlift as unlift

    path, net = saved
    module, _ = native_module(artifact.load_artifact(path), kernels="int8")
    assert not [n for n in module.graph.nodes if n.op == "get_attr" and not n.users]
    assert "a.weight" not in {n.target for n in module.graph.nodes if n.op == "get_attr"}
    hooks = list(module._forward_pre_hooks.values())
    assert unlift._check_input_constraints_pre_hook not in hooks

    calls = []
    real = unlift._check_input_constraints_for_module
    monkeypatch.setattr(unlift, "_check_input_constraints_for_module",
                        lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    reference = artifact.load_artifact(path).module  # torch's own, unwrapped check
    with torch.inference_mode():
        for shape in [(3, 7, 48), (3, 7, 48), (2, 5, 48), (3, 7, 48), (2, 5, 48)]:
            x = torch.randn(*shape)
            np.testing.assert_allclose(module(x).numpy(), net(x).numpy(), rtol=0.05, atol=0.05)
        checked = len(calls)
        for bad in [torch.randn(3, 48), torch.randn(3, 7, 40)]:
            with pytest.raises(Exception) as expected:
                reference(bad)
            for _ in range(2):
                with pytest.raises(type(expected.value), match=re.escape(str(expected.value).splitlines()[0])):
                    module(bad)
    assert checked == 2  # one check per new valid shape: (3, 7, 48), (2, 5, 48)
    assert len(calls) == checked + 2 * 3  # a bad input is checked every time (the reference once, the module twice)


class FFN(nn.Module):
    """Linear -> GELU -> Linear, plus a GELU whose input has a second reader and a tanh GELU."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(48, 64)
        self.b = nn.Linear(64, 16)
        self.c = nn.Linear(48, 16)
        self.d = nn.Linear(48, 16)

    def forward(self, x):
        h = self.c(x + 1)  # distinct inputs: no Q/K/V-style merging of a, c and d
        return (self.b(nn.functional.gelu(self.a(x))) + nn.functional.gelu(h) + h
                + nn.functional.gelu(self.d(x * 2), approximate="tanh"))


def test_gelu_reading_only_an_int8_layer_is_folded_into_it(tmp_path):
    torch.manual_seed(1)
    net = FFN().eval()
    enc = {}
    with torch.no_grad():
        for name in ("a", "b", "c", "d"):
            lin = getattr(net, name)
            q, s = quantize_per_channel(lin.weight.numpy())
            lin.weight.copy_(torch.from_numpy(q.astype(np.float32) * s[:, None]))
            enc[f"{name}.weight"] = artifact.encode_int8(q, s)
    path = tmp_path / "ffn.pyserve"
    artifact.save(path, net, (torch.randn(2, 5, 48),), model_name="ffn", encodings=enc, dynamic_axes=((0, 1),))
    folded, _ = native_module(artifact.load_artifact(path), kernels="int8")
    apart, _ = native_module(artifact.load_artifact(path), kernels="int8", fuse=False)
    names = [getattr(n.target, "__name__", "") for n in folded.graph.nodes if n.op == "call_function"]
    gelus = [n for n in folded.graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.gelu.default]
    assert names.count("int8_linear_packed_gelu") == 1  # a's: c's output has a second reader, d's GELU is tanh
    assert len(gelus) == 2
    x = torch.randn(3, 7, 48)
    with torch.inference_mode():
        got, ref = folded(x).numpy(), apart(x).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    assert not np.array_equal(got, net(x).detach().numpy())  # int8 activations: not the fp32 graph
