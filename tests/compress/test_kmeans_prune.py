"""k-means weight sharing and magnitude pruning against brute-force references."""

import numpy as np
import pytest
import torch

from pyserve.compress import kmeans_1d
from pyserve.compress.prune import magnitude_mask


def brute_force_lloyd(v, c, iterations):
    """Lloyd's algorithm with full distance matrices (argmin over all centroids)."""
    c = np.sort(c.astype(np.float64))
    for _ in range(iterations):
        labels = np.abs(v[:, None] - c[None, :]).argmin(1)
        new = np.array([v[labels == j].mean() if (labels == j).any() else c[j] for j in range(c.size)])
        new = np.sort(new)
        if np.allclose(new, c, rtol=0, atol=1e-12):
            break
        c = new
    return c


@pytest.mark.parametrize("k", [3, 15, 63])
@pytest.mark.parametrize("dist", ["normal", "laplace", "bimodal"])
def test_kmeans_linear_init_matches_brute_force(k, dist):
    rng = np.random.default_rng(k)
    v = {"normal": rng.normal(size=4000), "laplace": rng.laplace(size=4000),
         "bimodal": np.concatenate([rng.normal(-2, 0.3, 2000), rng.normal(2, 0.3, 2000)])}[dist]
    centroids, labels = kmeans_1d(v, k, init="linear", iterations=300)
    ref = brute_force_lloyd(v, np.linspace(v.min(), v.max(), k), 300)
    np.testing.assert_allclose(centroids, ref, rtol=0, atol=1e-5)
    # every value is assigned to its nearest centroid
    np.testing.assert_array_equal(np.abs(v[:, None] - centroids[None, :].astype(np.float64)).min(1),
                                  np.abs(v - centroids[labels].astype(np.float64)))


@pytest.mark.parametrize("init", ["linear", "density", "random"])
def test_kmeans_reduces_error_below_uniform_grid(init):
    v = np.random.default_rng(3).laplace(size=5000)
    centroids, labels = kmeans_1d(v, 15, init=init)
    grid = np.linspace(v.min(), v.max(), 15)
    grid_err = np.abs(v[:, None] - grid[None, :]).min(1).__pow__(2).mean()
    assert ((v - centroids[labels]) ** 2).mean() < grid_err


def test_kmeans_rejects_unknown_init():
    with pytest.raises(ValueError, match="init"):
        kmeans_1d(np.ones(4), 2, init="kmeans++")


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.92, 0.999])
def test_magnitude_mask_keeps_largest(sparsity):
    w = torch.randn(300, 100)
    mask = magnitude_mask(w, sparsity)
    keep = int(round((1 - sparsity) * w.numel()))
    assert int(mask.sum()) == keep
    if 0 < keep < w.numel():
        assert w.abs()[mask].min() >= w.abs()[~mask].max()


@pytest.mark.parametrize("shape", [(6, 5), (4, 3, 3, 3)])
def test_dead_units_against_a_loop(shape):
    from pyserve.compress.prune import dead_units

    rng = np.random.default_rng(3)
    w = rng.standard_normal(shape).astype(np.float32)
    w[1] = 0.0                 # output unit 1 has no input weights
    w[:, 2] = 0.0              # input unit 2 is read by no weight
    w[3, 0] = 0.0              # partial zeros are not dead
    got = dead_units(torch.from_numpy(w))
    no_input = [o for o in range(shape[0]) if np.count_nonzero(w[o]) == 0]
    no_output = [i for i in range(shape[1]) if np.count_nonzero(w[:, i]) == 0]
    assert got == {"no_input": no_input, "no_output": no_output}
    assert 1 in got["no_input"] and 2 in got["no_output"] and 3 not in got["no_input"]
