"""Symbol streams shared by the tests of pyserve.ops."""

from __future__ import annotations

import numpy as np
import pytest

def _make_symbols(dtype, distribution: str, size: int, seed: int = 0) -> np.ndarray:
    """``[size]`` symbols of ``dtype`` drawn from a named distribution.

    laplace32:   k-means codebook indices of a pruned layer (a Laplacian over 32 centroids)
    uniform:     uniform over the dtype's whole range
    geometric:   very skewed with a long tail (counts span several orders of magnitude)
    two_values:  0 with probability 0.9, else the dtype's maximum
    sparse_wide: ten symbols spread over the dtype's range (the encoder picks the sparse table)
    shifted:     laplace32 moved up to symbols 200..231 (uint8) or 40000..40031 (uint16)
    """
    rng = np.random.default_rng(seed)
    top = np.iinfo(dtype).max
    if distribution == "laplace32":
        x = np.clip(np.round(rng.laplace(0.0, 2.5, size)), -16, 15) + 16
    elif distribution == "uniform":
        x = rng.integers(0, top + 1, size)
    elif distribution == "geometric":
        x = np.minimum(rng.geometric(0.3, size) - 1, top)
    elif distribution == "two_values":
        x = np.where(rng.random(size) < 0.9, 0, top)
    elif distribution == "sparse_wide":
        values = np.linspace(0, top, 10).astype(np.int64)
        x = values[rng.integers(0, 10, size)]
    elif distribution == "shifted":
        x = np.clip(np.round(rng.laplace(0.0, 2.5, size)), -16, 15) + 16 + (200 if top == 255 else 40_000)
    else:
        raise ValueError(distribution)
    return np.asarray(x).astype(dtype)


@pytest.fixture(scope="session")
def make_symbols():
    """``make_symbols(dtype, distribution, size, seed=0) -> np.ndarray`` (see _make_symbols)."""
    return _make_symbols
