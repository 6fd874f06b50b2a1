"""pyserve.artifact.plan: the straight-line NumPy plan of Linear/ReLU graphs, checked against torch's
eager module (an independent computation) and against the GraphModule on native kernel layers; and
the pyserve backend choosing it (or not) at load."""

import asyncio
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from pyserve import artifact
from pyserve.artifact import plan as plan_mod
from pyserve.artifact.kernels import native_module
from pyserve.artifact.plan import compile_plan
from pyserve.backends.pyserve_backend import PyserveBackend


class MLP(nn.Module):
    def __init__(self, bias_last=True):
        super().__init__()
        self.a = nn.Linear(48, 32)
        self.b = nn.Linear(32, 24)
        self.c = nn.Linear(24, 16, bias=bias_last)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def _save(tmp_path, net, name="net", encodings=None, example=(2, 5, 48), dynamic_axes=((0, 1),)):
    path = tmp_path / f"{name}.pyserve"
    artifact.save(path, net, (torch.randn(*example),), model_name=name, encodings=encodings or {},
                  dynamic_axes=dynamic_axes)
    return path


@pytest.mark.parametrize("bias_last", [True, False])
def test_plan_matches_eager_torch(tmp_path, bias_last):
    torch.manual_seed(1)
    net = MLP(bias_last).eval()
    art = artifact.load_artifact(_save(tmp_path, net))
    module, _ = native_module(art, kernels="dense")
    plan = compile_plan(module)
    assert plan is not None and plan.steps == 5  # 3 linear + 2 relu
    gen = np.random.default_rng(0)
    for shape in [(1, 1, 48), (4, 3, 48), (2, 17, 48)]:
        x = gen.standard_normal(shape).astype(np.float32)
        (got,) = plan(x)
        with torch.inference_mode():
            expected = net(torch.from_numpy(x)).numpy()
        assert got.dtype == np.float32 and got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_relu_keeps_nan_like_torch(tmp_path):
    torch.manual_seed(2)
    net = MLP().eval()
    module, _ = native_module(artifact.load_artifact(_save(tmp_path, net)), kernels="dense")
    plan = compile_plan(module)
    x = np.zeros((1, 2, 48), np.float32)
    x[0, 1, 3] = np.nan
    (got,) = plan(x)
    with torch.inference_mode():
        expected = net(torch.from_numpy(x)).numpy()
    assert np.array_equal(np.isnan(got), np.isnan(expected)) and np.isnan(got[0, 1]).all()
    np.testing.assert_allclose(got[0, 0], expected[0, 0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kernels", ["int8", "csr", "codebook"])
def test_plan_runs_native_kernel_layers(saved, kernels):
    path, net = saved  # conftest: a int8, b codebook, c csr
    module, choices = native_module(artifact.load_artifact(path), kernels=kernels)
    assert kernels in choices.values()
    plan = compile_plan(module)
    assert plan is not None
    x = np.random.default_rng(3).standard_normal((3, 7, 48)).astype(np.float32)
    (got,) = plan(x)
    with torch.inference_mode():
        graph = module(torch.from_numpy(x)).numpy()
        fp32 = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, graph, rtol=1e-5, atol=1e-6)  # the same kernel calls
    assert np.linalg.norm(got - fp32) / np.linalg.norm(fp32) < 0.03  # int8 activation rounding at most


def test_read_only_input_to_a_kernel_layer(saved):
    path, _ = saved
    module, _ = native_module(artifact.load_artifact(path), kernels="int8")  # layer a (the first) is int8
    plan = compile_plan(module)
    x = np.random.default_rng(4).standard_normal((2, 48)).astype(np.float32)
    ro = np.frombuffer(x.tobytes(), np.float32).reshape(2, 48)  # as the codec decodes raw contents
    assert not ro.flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch.from_numpy warns on a read-only array
        (got,) = plan(ro)
    np.testing.assert_array_equal(got, plan(x)[0])


class _Conv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4 * 6 * 6, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


class _Sigmoid(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 4)

    def forward(self, x):
        return torch.sigmoid(self.a(x))


def test_no_plan_for_other_ops(tmp_path):
    torch.manual_seed(5)
    conv = artifact.load_artifact(_save(tmp_path, _Conv().eval(), "conv", example=(2, 1, 8, 8),
                                        dynamic_axes=((0,),)))
    assert compile_plan(native_module(conv, kernels="dense")[0]) is None
    sig = artifact.load_artifact(_save(tmp_path, _Sigmoid().eval(), "sig", example=(2, 8), dynamic_axes=((0,),)))
    assert compile_plan(native_module(sig, kernels="dense")[0]) is None


def test_plan_refused_when_it_disagrees_with_the_graph(tmp_path, monkeypatch):
    torch.manual_seed(6)
    module, _ = native_module(artifact.load_artifact(_save(tmp_path, MLP().eval())), kernels="dense")
    sample = (np.random.default_rng(6).standard_normal((2, 3, 48)).astype(np.float32),)
    assert compile_plan(module, sample) is not None
    monkeypatch.setattr(plan_mod, "_relu", lambda x: np.abs(x))  # a wrong step
    assert compile_plan(module) is not None  # unchecked: built
    assert compile_plan(module, sample) is None  # checked: refused, the graph keeps serving


def _load(backend):
    asyncio.run(backend.load())
    return backend


def test_backend_serves_the_plan_and_can_keep_the_graph(tmp_path, monkeypatch):
    torch.manual_seed(7)
    net = MLP().eval()
    path = _save(tmp_path, net)
    x = np.random.default_rng(7).standard_normal((2, 5, 48)).astype(np.float32)
    with torch.inference_mode():
        expected = net(torch.from_numpy(x)).numpy()
    planned = _load(PyserveBackend(path))
    assert planned.graph_executor == "plan"
    graph = _load(PyserveBackend(path, graph_executor="graph"))
    assert graph.graph_executor == "graph"
    monkeypatch.setenv("PYSERVE_GRAPH_EXECUTOR", "graph")
    assert _load(PyserveBackend(path)).graph_executor == "graph"
    out_name = planned.signature.outputs[0].name
    in_name = planned.signature.inputs[0].name
    for be in (planned, graph):
        (res,) = be.infer_sync([{in_name: x}])
        np.testing.assert_allclose(res[out_name], expected, rtol=1e-5, atol=1e-6)
    # one bad request in a batch fails alone
    bad, good = planned.infer_sync([{in_name: x[..., :40]}, {in_name: x}])
    assert isinstance(bad, Exception)
    np.testing.assert_allclose(good[out_name], expected, rtol=1e-5, atol=1e-6)


def test_backend_rejects_an_unknown_executor(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="graph_executor"):
        PyserveBackend(tmp_path / "x.pyserve", graph_executor="fast")
    monkeypatch.setenv("PYSERVE_GRAPH_EXECUTOR", "jit")
    with pytest.raises(ValueError, match="PYSERVE_GRAPH_EXECUTOR"):
        PyserveBackend(tmp_path / "x.pyserve")


def test_backend_settings_empty_means_unset_and_bad_kernels_refused_at_once(tmp_path, monkeypatch):
    """An empty PYSERVE_* variable is the default (as PYSERVE_ATTENTION); an unknown PYSERVE_KERNELS is
    refused when the backend is made, naming the variable, not later by native_module at load."""
    for var in ("PYSERVE_KERNELS", "PYSERVE_INPUTS", "PYSERVE_GRAPH_EXECUTOR", "PYSERVE_ATTENTION"):
        monkeypatch.setenv(var, "")
    backend = PyserveBackend(tmp_path / "x.pyserve")
    assert (backend._kernels, backend._inputs, backend._graph_mode, backend._attention) == ("auto", "auto", "auto",
                                                                                            "fp32")
    monkeypatch.setenv("PYSERVE_KERNELS", "fast")
    with pytest.raises(ValueError, match=r"argument 'kernels' \(or PYSERVE_KERNELS\): expected one of .*'fast'"):
        PyserveBackend(tmp_path / "x.pyserve")


class _Heads(nn.Module):
    """Two outputs, softmax and log_softmax over different dims (the server tests' classifier shape)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))

    def forward(self, x):
        logits = self.body(x)
        return logits, torch.softmax(logits, dim=-1), torch.log_softmax(logits, dim=1)


def test_plan_softmax_heads_match_torch(tmp_path):
    torch.manual_seed(8)
    net = _Heads().eval()
    module, _ = native_module(artifact.load_artifact(_save(tmp_path, net, "heads", example=(2, 8),
                                                           dynamic_axes=((0,),))), kernels="dense")
    plan = compile_plan(module)
    assert plan is not None
    x = (np.random.default_rng(8).standard_normal((5, 8)) * 30).astype(np.float32)  # large logits: shifted exp
    got = plan(x)
    with torch.inference_mode():
        expected = [t.numpy() for t in net(torch.from_numpy(x))]
    assert len(got) == 3
    for g, e in zip(got, expected):
        assert g.dtype == np.float32 and np.isfinite(g).all()
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)


class _SeqSoftmax(nn.Module):
    def forward(self, x):
        return torch.softmax(x, dim=1), torch.log_softmax(x, dim=1)


def test_softmax_over_an_empty_dim_is_empty_as_in_torch(tmp_path):
    module, _ = native_module(artifact.load_artifact(_save(tmp_path, _SeqSoftmax().eval(), "seq", example=(2, 5, 16))),
                              kernels="dense")
    plan = compile_plan(module)
    assert plan is not None
    for length in (0, 3):
        x = np.random.default_rng(length).standard_normal((2, length, 16)).astype(np.float32)
        got = plan(x)
        with torch.inference_mode():
            expected = [t.numpy() for t in module(torch.from_numpy(x))]
        for g, e in zip(got, expected):
            assert g.shape == e.shape == (2, length, 16)
            np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)


def test_plan_releases_intermediates_as_it_goes(tmp_path):
    """A value is dropped once its last reader has run (not kept to the end of the call): on a chain
    of eight 1024-wide layers at 512 rows (2 MiB per activation) the call's peak traced memory
    stays near two activations, where keeping all would take eight; the result is unchanged."""
    import tracemalloc

    torch.manual_seed(3)
    net = nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(1024, 1024), nn.ReLU())]).eval()
    path = _save(tmp_path, net, name="chain", example=(2, 1024), dynamic_axes=((0,),))
    module, _ = native_module(artifact.load_artifact(path), kernels="dense")
    plan = compile_plan(module)
    assert plan is not None and plan.steps == 8
    x = np.random.default_rng(3).standard_normal((512, 1024)).astype(np.float32)
    plan(x)  # warm (BLAS buffers)
    act = x.nbytes
    tracemalloc.start()
    try:
        (got,) = plan(x)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3.5 * act, f"peak {peak / act:.1f} activations"
    with torch.inference_mode():
        expected = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_no_plan_when_a_stored_tensor_or_the_sample_fails(tmp_path):
    """compile_plan returns None (the caller keeps the graph) instead of raising when a stored tensor
    has no NumPy dtype (bfloat16) or when the graph fails on the sample input."""
    from pyserve.artifact.kernels import getattr_path

    torch.manual_seed(5)
    path = _save(tmp_path, MLP().eval())
    module, _ = native_module(artifact.load_artifact(path), kernels="dense")
    name = next(n.target for n in module.graph.nodes if n.op == "get_attr")
    owner, _, leaf = name.rpartition(".")
    target = getattr_path(module, owner) if owner else module
    weight = getattr(target, leaf)
    setattr(target, leaf, torch.nn.Parameter(weight.detach().to(torch.bfloat16), requires_grad=False))
    assert compile_plan(module) is None
    assert compile_plan(module, (np.ones((2, 5, 48), np.float32),)) is None
