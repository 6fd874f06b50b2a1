"""Method int8: per-channel weights, include/exclude, calibration (minmax, percentile, entropy/KL),
the artifact's int8 encoding, and the errors raised before any work."""

import numpy as np
import pytest
import torch
from torch import nn

from pyserve.compress.int8 import Int8Config, calibrate_scale, entropy_threshold, int8, select_linears
from pyserve.compress.methods import CompressionState
from pyserve.compress.recipe import RecipeError, recipe_from_mapping
from pyserve.ops.reference import quantize_rows_reference


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(20, 16)
        self.fc2 = nn.Linear(16, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class FakeTask:
    def __init__(self, x):
        self.x = x

    def calibration_batches(self, n, batch_size=8):
        x = self.x[:n]
        return [(x[i:i + batch_size],) for i in range(0, len(x), batch_size)]


def entropy_threshold_loops(hist, bin_width, levels=128):
    """Plain-loop transcription of Migacz 2017's KL calibration, for comparison."""
    hist = np.asarray(hist, dtype=np.float64)
    n = hist.size
    best_i, best_kl = n, np.inf
    for i in range(levels, n + 1):
        p = list(hist[:i])
        p[-1] += hist[i:].sum()
        q = [0.0] * i
        for g in range(levels):
            a, b = (g * i + levels - 1) // levels, ((g + 1) * i + levels - 1) // levels
            members = [j for j in range(a, b) if p[j] > 0]
            for j in members:
                q[j] = sum(p[a:b]) / len(members)
        ps, qs = sum(p), sum(q)
        kl = sum((p[j] / ps) * np.log((p[j] / ps) / (q[j] / qs)) for j in range(i) if p[j] > 0)
        if kl < best_kl:
            best_i, best_kl = i, kl
    return (best_i + 0.5) * bin_width


def test_entropy_threshold_matches_loop_reference():
    rng = np.random.default_rng(0)
    x = np.abs(rng.standard_t(3, size=20000))
    hist, _ = np.histogram(x, bins=300, range=(0, x.max()))
    w = x.max() / 300
    assert entropy_threshold(hist, w) == pytest.approx(entropy_threshold_loops(hist, w))
    # heavy tails are clipped: the threshold is well below the maximum
    assert entropy_threshold(hist, w) < 0.8 * x.max()


def test_calibrate_scale_methods():
    rng = np.random.default_rng(1)
    s = np.abs(rng.normal(size=50000)).astype(np.float32)
    amax = float(s.max())
    assert calibrate_scale(s, amax, "minmax") == pytest.approx(amax / 127)
    assert calibrate_scale(s, amax, "percentile", percentile=99.0) == pytest.approx(np.percentile(s, 99.0) / 127)
    ent = calibrate_scale(s, amax, "entropy", bins=512)
    assert 0 < ent <= amax / 127
    assert calibrate_scale(np.zeros(4, np.float32), 0.0, "minmax") == 1.0


def test_weights_quantized_per_channel_like_the_reference():
    torch.manual_seed(0)
    model = MLP()
    before = {n: m.weight.detach().numpy().copy() for n, m in model.named_children()}
    state = CompressionState(model)
    rep = int8(state, Int8Config(exclude=("head",)), None)
    assert set(rep) == {"fc1", "fc2"} and set(state.int8) == {"fc1.weight", "fc2.weight"}
    for name in ("fc1", "fc2"):
        q_ref, s_ref = quantize_rows_reference(before[name])
        q, s, in_scale = state.int8[f"{name}.weight"]
        np.testing.assert_array_equal(q, q_ref)
        np.testing.assert_array_equal(s, s_ref)
        assert in_scale is None
        np.testing.assert_array_equal(getattr(model, name).weight.detach().numpy(), q.astype(np.float32) * s[:, None])
    np.testing.assert_array_equal(model.head.weight.detach().numpy(), before["head"])


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy"])
def test_static_input_scales_from_calibration(method):
    torch.manual_seed(0)
    model = MLP().eval()
    x = torch.randn(64, 20)
    state = CompressionState(model)
    int8(state, Int8Config(include=("fc1",), calibration=method, calibration_samples=64, percentile=99.9), FakeTask(x))
    scale = state.int8["fc1.weight"][2]
    amax = float(x.abs().max())
    if method == "minmax":
        assert scale == pytest.approx(amax / 127)
    elif method == "percentile":
        assert scale == pytest.approx(np.percentile(x.abs().numpy().ravel(), 99.9) / 127, rel=1e-5)
    else:
        assert 0 < scale <= amax / 127


def test_errors_before_any_work():
    conv = nn.Sequential(nn.Conv2d(1, 2, 3))
    with pytest.raises(ValueError, match="no nn.Linear"):
        int8(CompressionState(conv), Int8Config(), None)
    with pytest.raises(ValueError, match="select none"):
        select_linears(MLP(), include=("decoder.*",))
    model = MLP()
    before = model.fc1.weight.detach().clone()
    with pytest.raises(ValueError, match="calibration set is empty"):
        int8(CompressionState(model), Int8Config(calibration="minmax"), FakeTask(torch.zeros(0, 20)))
    assert torch.equal(model.fc1.weight, before)
    with pytest.raises(ValueError, match="calibration"):
        Int8Config(calibration="kl")


def test_recipe_stage_loads_into_config():
    r = recipe_from_mapping({"name": "x", "model": {"factory": "m.py:M", "inputs": [{"name": "x"}],
                                                    "outputs": [{"name": "y"}]},
                             "stages": [{"method": "int8", "include": ["fc*"], "calibration": "entropy"}]})
    assert r.stages[0] == Int8Config(include=("fc*",), calibration="entropy")
    with pytest.raises(RecipeError, match=r"stages\[0\]"):
        recipe_from_mapping({"name": "x", "model": {"factory": "m.py:M", "inputs": [{"name": "x"}],
                                                    "outputs": [{"name": "y"}]},
                             "stages": [{"method": "int8", "bins": 10}]})


def test_embedding_tables_per_row():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 12), nn.Linear(12, 4))
    before = model[0].weight.detach().numpy().copy()
    state = CompressionState(model)
    rep = int8(state, Int8Config(embeddings=True), None)
    q_ref, s_ref = quantize_rows_reference(before)
    q, s, _ = state.int8["0.weight"]
    np.testing.assert_array_equal(q, q_ref)
    np.testing.assert_array_equal(model[0].weight.detach().numpy(), q.astype(np.float32) * s[:, None])
    assert rep["0"]["embedding"] and "1.weight" in state.int8


def test_config_checks_run_before_any_work():
    """The pipeline's preflight calls each config's check(model, task)."""
    from pyserve.compress.distill import DistillConfig
    from pyserve.compress.lowrank import LowRankConfig

    with pytest.raises(ValueError, match="calibration set is empty"):
        Int8Config(calibration="entropy").check(MLP(), FakeTask(torch.zeros(0, 20)))
    with pytest.raises(ValueError, match="no nn.Linear"):
        Int8Config().check(nn.Sequential(nn.Conv2d(1, 1, 1)), None)
    Int8Config(calibration="minmax").check(MLP(), FakeTask(torch.ones(4, 20)))
    with pytest.raises(ValueError, match="above min"):
        LowRankConfig(rank=9).check(MLP(), None)
    with pytest.raises(ValueError, match="repeated blocks"):
        DistillConfig().check(MLP(), None)
