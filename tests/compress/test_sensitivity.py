"""Sensitivity analysis: one layer pruned at a time, against a NumPy reference."""

import numpy as np
import pytest
import torch
from torch import nn

from pyserve.compress import sensitivity, suggest_sparsity
from pyserve.compress._train import Task


def _task_and_model():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 20, generator=g)
    y = (x[:, :4].sum(1) > 0).long() + (x[:, 4] > 0.5).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 3))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[:400]), y[:400]).backward()
        opt.step()
    return Task(x[:400], y[:400], x[400:], y[400:], eval_batch_size=64, verbose=False), model.eval()


def _numpy_accuracy(model, task, layer_index, sparsity):
    """Forward pass in NumPy with layer ``layer_index`` (0 or 2) pruned by |w| rank."""
    ws = [model[i].weight.detach().numpy().copy() for i in (0, 2)]
    bs = [model[i].bias.detach().numpy() for i in (0, 2)]
    w = ws[layer_index // 2]
    keep = int(round((1 - sparsity) * w.size))
    order = np.argsort(-np.abs(w).ravel(), kind="stable")
    pruned = np.zeros(w.size, dtype=w.dtype)
    pruned[order[:keep]] = w.ravel()[order[:keep]]
    ws[layer_index // 2] = pruned.reshape(w.shape)
    h = np.maximum(task.test_x.numpy() @ ws[0].T + bs[0], 0)
    logits = h @ ws[1].T + bs[1]
    return float((logits.argmax(1) == task.test_y.numpy()).mean())


def test_sensitivity_matches_numpy_and_restores_weights():
    task, model = _task_and_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sparsities = (0.0, 0.5, 0.8, 0.95)
    curves = sensitivity(model, task, sparsities=sparsities)
    assert list(curves) == ["0", "2"]
    for name, idx in (("0", 0), ("2", 2)):
        assert list(curves[name]) == list(sparsities)
        for s in sparsities:
            assert curves[name][s] == pytest.approx(_numpy_accuracy(model, task, idx, s), abs=1.5 / len(task.test_y))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    base = curves["0"][0.0]
    assert curves["0"][0.95] < base  # pruning 95% of the first layer alone hurts
    suggested = suggest_sparsity(curves, base, 0.02)
    for name, s in suggested.items():
        if s:
            assert curves[name][s] >= base - 0.02
        assert all(a < base - 0.02 for t, a in curves[name].items() if t > s)


@pytest.mark.parametrize("kwargs,expect", [
    ({"sparsities": (0.5, 1.0)}, "sparsities: each must be in [0, 1), got 1.0"),
    ({"sparsities": ()}, "sparsities: give at least one"),
    ({"layers": ["nope"]}, "'nope' is not a Linear/Conv layer"),
])
def test_sensitivity_bad_arguments(kwargs, expect):
    task, model = _task_and_model()
    with pytest.raises(ValueError, match=expect.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        sensitivity(model, task, **kwargs)
