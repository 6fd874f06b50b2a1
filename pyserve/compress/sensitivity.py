"""Pruning sensitivity analysis (Han, Pool, Tran, Dally, NeurIPS 2015, "Learning both Weights and
Connections for Efficient Neural Networks", section 4 and figure 5).

Each Linear/Conv layer is pruned alone, by weight magnitude, to each of several sparsities, without
retraining, and the model's top-1 accuracy is measured; the layer's weights are restored before the
next measurement. Layers whose accuracy holds up at high sparsity can be pruned harder;
:func:`suggest_sparsity` turns the curves into per-layer targets.
"""

from __future__ import annotations

import torch
from torch import nn

from pyserve.compress._train import Task, accuracy, weight_layers
from pyserve.compress.prune import magnitude_mask

__all__ = ["sensitivity", "suggest_sparsity"]


def _check_sparsities(sparsities) -> tuple[float, ...]:
    values = tuple(float(s) for s in sparsities)
    if not values:
        raise ValueError("sparsities: give at least one sparsity")
    for s in values:
        if not 0.0 <= s < 1.0:
            raise ValueError(f"sparsities: each must be in [0, 1), got {s}")
    return values


def sensitivity(model: nn.Module, task: Task, layers=None,
                sparsities=(0.5, 0.6, 0.7, 0.8, 0.9, 0.95)) -> dict[str, dict[float, float]]:
    """Top-1 test accuracy with one layer at a time magnitude-pruned (no retraining).

    Parameters
    ----------
    model : torch.nn.Module, left unchanged (each layer's weight is restored bit for bit).
    task : the task whose ``test_x`` [N, ...] float32 / ``test_y`` [N] int64 split is scored.
    layers : Linear/Conv module names (default: all of them).
    sparsities : fractions of the layer's weights removed, each in [0, 1).

    Returns
    -------
    dict
        layer name -> {sparsity -> accuracy (fraction)}, sparsities in the given order.

    Raises
    ------
    ValueError
        A sparsity outside [0, 1), no sparsity, or a layer that is not a Linear/Conv module.
    """
    values = _check_sparsities(sparsities)
    modules = weight_layers(model, layers)
    if not modules:
        raise ValueError("layers: the model has no Linear or Conv layer")
    out: dict[str, dict[float, float]] = {}
    for name, m in modules.items():
        original = m.weight.detach().clone()
        curve = {}
        try:
            for s in values:
                with torch.no_grad():
                    m.weight.copy_(original * magnitude_mask(original, s))
                curve[s] = accuracy(model, task.test_x, task.test_y, task.eval_batch_size)
        finally:
            with torch.no_grad():
                m.weight.copy_(original)
        out[name] = curve
    return out


def suggest_sparsity(curves: dict[str, dict[float, float]], baseline: float, max_drop: float) -> dict[str, float]:
    """Per layer, the highest measured sparsity whose accuracy is at least ``baseline - max_drop``
    (0.0 where none is); ``baseline`` and ``max_drop`` are accuracy fractions.

    Raises ValueError for a negative ``max_drop``."""
    if max_drop < 0:
        raise ValueError(f"max_drop: must be >= 0, got {max_drop}")
    return {name: max((s for s, a in curve.items() if a >= baseline - max_drop), default=0.0)
            for name, curve in curves.items()}
