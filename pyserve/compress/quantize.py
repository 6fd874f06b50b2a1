"""Trained quantization: per-layer k-means weight sharing with centroid fine-tuning
(Han, Mao, Dally, ICLR 2016, "Deep Compression", arXiv 1510.00149, section 3).

The surviving (non-pruned) weights of each layer are clustered by 1-D k-means into
``2**bits - 1`` centroids; codebook index 0 is reserved for the pruned zeros, so a layer's codebook
has ``2**bits`` entries. Centroids start linearly spaced between the smallest and largest weight
(``init: linear``, the paper's recommendation, section 3.2), at the quantiles of the weight
distribution (``density``) or at randomly chosen weights (``random``, Forgy). During fine-tuning
(section 3.3) each weight is ``codebook[index]``; autograd's gather backward sums the gradients of
all weights sharing a centroid, and that sum updates the centroid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from pyserve.compress._train import fit, is_linear_weight, weight_key, weight_layers
from pyserve.compress.methods import CompressionState, register
from pyserve.compress.prune import apply_masks

INITS = ("linear", "density", "random")


@dataclass(frozen=True)
class QuantizeConfig:
    """``bits``: codebook bits, one number or a mapping layer name -> bits, 2..8 (default 5 for
    fully connected, 8 for conv, as in the paper)."""

    bits: int | dict[str, int] | None = None
    init: str = "linear"
    iterations: int = 100
    finetune_epochs: int = 1
    lr: float | None = None
    layers: tuple[str, ...] | None = None

    def __post_init__(self):
        values = self.bits.values() if isinstance(self.bits, dict) else [self.bits]
        for b in values:
            if b is not None and not 2 <= b <= 8:
                raise ValueError(f"bits: must be in 2..8, got {b}")
        if self.init not in INITS:
            raise ValueError(f"init: must be one of {INITS}, got {self.init!r}")
        if self.iterations < 1:
            raise ValueError(f"iterations: must be >= 1, got {self.iterations}")
        if self.finetune_epochs < 0:
            raise ValueError(f"finetune_epochs: must be >= 0, got {self.finetune_epochs}")


def kmeans_1d(values: np.ndarray, k: int, *, init: str = "linear", iterations: int = 100,
              rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means on 1-D data.

    Parameters
    ----------
    values : float [n]
    k : number of clusters (>= 1)

    Returns
    -------
    centroids : float32 [k], sorted ascending
    labels : int64 [n], index of each value's nearest centroid
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        return np.zeros(k, dtype=np.float32), np.zeros(0, dtype=np.int64)
    if init == "linear":
        c = np.linspace(v.min(), v.max(), k)
    elif init == "density":
        c = np.quantile(v, np.linspace(0.0, 1.0, k))
    elif init == "random":
        rng = rng or np.random.default_rng(0)
        c = rng.choice(v, size=k, replace=v.size < k)
    else:
        raise ValueError(f"kmeans_1d: init must be one of {INITS}, got {init!r}")
    c = np.sort(c)
    labels = np.zeros(v.size, dtype=np.int64)
    for _ in range(iterations):
        labels = np.searchsorted((c[1:] + c[:-1]) / 2.0, v)
        sums = np.bincount(labels, weights=v, minlength=k)
        counts = np.bincount(labels, minlength=k)
        new = np.where(counts > 0, sums / np.maximum(counts, 1), c)  # empty clusters stay put
        new = np.sort(new)
        if np.allclose(new, c, rtol=0, atol=1e-12):
            c = new
            break
        c = new
    labels = np.searchsorted((c[1:] + c[:-1]) / 2.0, v)
    return c.astype(np.float32), labels


class _SharedWeight(nn.Module):
    """Parametrization ``weight = [0, centroids...][index]`` used during centroid fine-tuning."""

    def __init__(self, index: torch.Tensor, centroids: torch.Tensor):
        super().__init__()
        self.register_buffer("index", index)
        self.centroids = nn.Parameter(centroids)

    def forward(self, _original: torch.Tensor) -> torch.Tensor:
        codebook = torch.cat([self.centroids.new_zeros(1), self.centroids])
        return codebook[self.index]


def _bits(cfg: QuantizeConfig, name: str, module: nn.Module) -> int:
    if isinstance(cfg.bits, dict):
        return cfg.bits[name]
    if cfg.bits is not None:
        return cfg.bits
    return 5 if is_linear_weight(module) else 8


@register("quantize", QuantizeConfig)
def quantize(state: CompressionState, cfg: QuantizeConfig, task) -> dict:
    names = cfg.layers or (tuple(cfg.bits) if isinstance(cfg.bits, dict) else None)
    layers = weight_layers(state.model, names) if names or not state.layers else dict(state.layers)
    state.layers.update(layers)
    rng = np.random.default_rng(task.seed)
    report = {}
    for name, m in layers.items():
        key = weight_key(name)
        bits = _bits(cfg, name, m)
        w = m.weight.detach()
        mask = state.masks.get(key, torch.ones_like(w, dtype=torch.bool)) & (w != 0)
        centroids, labels = kmeans_1d(w[mask].numpy(), (1 << bits) - 1, init=cfg.init,
                                      iterations=cfg.iterations, rng=rng)
        index = torch.zeros(w.shape, dtype=torch.long)
        index[mask] = torch.from_numpy(labels) + 1
        parametrize.register_parametrization(m, "weight", _SharedWeight(index, torch.from_numpy(centroids)),
                                             unsafe=True)
        report[name] = {"bits": bits, "centroids": int(centroids.size)}
        state.index_bits.setdefault(key, 5 if is_linear_weight(m) else 8)
    if cfg.finetune_epochs:
        fit(state.model, task, cfg.finetune_epochs, lr=cfg.lr, after_step=lambda: apply_masks(state),
            desc="centroid fine-tuning")
    for name, m in layers.items():
        shared = m.parametrizations.weight[0]
        codebook = torch.cat([shared.centroids.detach().new_zeros(1), shared.centroids.detach()]).numpy().copy()
        parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
        m.weight.requires_grad_(True)
        state.codebooks[weight_key(name)] = codebook.astype(np.float32)
    return report
