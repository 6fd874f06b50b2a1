import gzip
import pickle

import numpy as np
import pytest

from pyserve import datasets


def test_mnist_splits_are_the_real_data():
    data = datasets.mnist()
    assert (len(data.train), len(data.valid), len(data.test)) == (50000, 10000, 10000)
    for split in (data.train, data.valid, data.test):
        assert split.images.dtype == np.float32 and split.images.shape[1] == 784
        assert split.labels.dtype == np.int64
        assert 0.0 <= split.images.min() and split.images.max() < 1.0
        assert set(np.unique(split.labels)) == set(range(10))
    # The first labels of the standard MNIST test set (LeCun et al.).
    assert data.test.labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]


def test_restricted_unpickler_refuses_other_globals(tmp_path, monkeypatch):
    evil = tmp_path / "mnist.pkl.gz"
    with gzip.open(evil, "wb") as fh:
        pickle.dump((eval, eval, eval), fh)  # references builtins.eval
    monkeypatch.setattr(datasets, "mnist_path", lambda: evil)
    datasets._CACHE.clear()
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        datasets.mnist()
    datasets._CACHE.clear()


def test_unknown_dataset_named():
    with pytest.raises(ValueError, match="unknown dataset 'cifar'"):
        datasets.load("cifar")
