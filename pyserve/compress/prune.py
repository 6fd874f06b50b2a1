"""Magnitude pruning with retraining (Han, Pool, Tran, Dally, NeurIPS 2015, "Learning both Weights
and Connections for Efficient Neural Networks", section 3; Deep Compression section 2).

Per layer, the weights of smallest magnitude are set to zero, either to a target sparsity or below
a threshold of ``quality`` times the standard deviation of the layer's weights (Han et al. 2015,
section 4). The network is then retrained with the masks held, so pruned weights stay exactly zero.
Several prune -> retrain rounds raise the sparsity step by step (``schedule: linear``) or along the
cubic automated gradual pruning schedule (``schedule: gradual``; Zhu & Gupta 2017,
arXiv 1710.01878, eq. 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from pyserve.compress._train import fit, is_linear_weight, weight_key, weight_layers
from pyserve.compress.methods import CompressionState, register

SCHEDULES = ("linear", "gradual")
SUGGESTED = "suggested"  # sparsity from the sensitivity analysis


@dataclass(frozen=True)
class PruneConfig:
    """``sparsity``: fraction of weights removed, one number for every layer or a mapping
    layer name -> fraction, or ``suggested``: per layer, the target the recipe's sensitivity
    analysis suggests (``report.sensitivity`` sparsities, ``report.sensitivity_max_drop``; the
    pipeline fills it in before the stage runs, restricted to ``layers`` when given); or
    ``quality``: threshold = quality x std of the layer's weights.
    ``index_bits``: relative-index bits in the stored form, 1..8, one number or a mapping layer name
    -> bits (paper: 5 for fully connected, 8 for conv; the default, by layer type). A sparser layer
    wants wider indices: with density ``d`` a gap exceeds ``2**index_bits`` with probability about
    ``(1 - d)**(2**index_bits)``, and each such gap costs a filler entry."""

    sparsity: float | dict[str, float] | str | None = None
    quality: float | None = None
    rounds: int = 1
    schedule: str = "linear"
    retrain_epochs: int = 2
    lr: float | None = None
    index_bits: int | dict[str, int] | None = None
    layers: tuple[str, ...] | None = None

    def __post_init__(self):
        if (self.sparsity is None) == (self.quality is None):
            raise ValueError("sparsity: give exactly one of sparsity or quality")
        if isinstance(self.sparsity, str) and self.sparsity != SUGGESTED:
            raise ValueError(f"sparsity: a fraction in [0, 1), a mapping layer -> fraction or {SUGGESTED!r}, "
                             f"got {self.sparsity!r}")
        values = (self.sparsity.values() if isinstance(self.sparsity, dict)
                  else [] if self.sparsity == SUGGESTED else [self.sparsity])
        for v in values:
            if v is not None and not 0.0 <= v < 1.0:
                raise ValueError(f"sparsity: must be in [0, 1), got {v}")
        if self.quality is not None and self.quality < 0:
            raise ValueError(f"quality: must be >= 0, got {self.quality}")
        if self.rounds < 1:
            raise ValueError(f"rounds: must be >= 1, got {self.rounds}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule: must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.retrain_epochs < 0:
            raise ValueError(f"retrain_epochs: must be >= 0, got {self.retrain_epochs}")
        bits = self.index_bits.values() if isinstance(self.index_bits, dict) else [self.index_bits]
        for b in bits:
            if b is not None and not 1 <= b <= 8:
                raise ValueError(f"index_bits: must be in 1..8, got {b}")


def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Bool mask keeping the ``round((1 - sparsity) * numel)`` largest-magnitude weights."""
    keep = int(round((1.0 - sparsity) * weight.numel()))
    mask = torch.zeros(weight.numel(), dtype=torch.bool)
    if keep > 0:
        mask[torch.topk(weight.detach().abs().flatten(), keep, sorted=False).indices] = True
    return mask.view_as(weight)


def _targets(cfg: PruneConfig, layers: dict[str, nn.Module]) -> dict[str, float]:
    """Final sparsity per layer."""
    if cfg.quality is not None:
        out = {}
        for name, m in layers.items():
            w = m.weight.detach()
            out[name] = float((w.abs() < cfg.quality * w.std()).float().mean())
        return out
    if isinstance(cfg.sparsity, dict):
        return {name: cfg.sparsity[name] for name in layers}
    return {name: float(cfg.sparsity) for name in layers}


def _round_sparsity(final: float, r: int, rounds: int, schedule: str) -> float:
    frac = r / rounds
    return final * (frac if schedule == "linear" else 1.0 - (1.0 - frac) ** 3)


def dead_units(weight: torch.Tensor) -> dict[str, list[int]]:
    """Units a pruned layer no longer connects (Han et al. 2015, section 3.4, "pruning neurons").

    ``weight`` is a Linear ``[out, in]`` or Conv ``[out, in/groups, *kernel]`` weight. Returns

    * ``no_input``: output units (Linear rows, Conv filters) whose every weight is zero: they only
      add their bias, so the next layer sees a constant there;
    * ``no_output``: input units (Linear columns, Conv input channels of a non-grouped conv) that
      no weight reads: the previous layer's unit of that index feeds nothing through this layer.

    Dead units are reported, not removed: removing them changes the layer shapes of the user's
    model, which the exported graph and its signature keep.
    """
    w = weight.detach()
    flat_out = w.reshape(w.shape[0], -1)
    no_input = torch.nonzero(~flat_out.ne(0).any(dim=1)).flatten().tolist()
    per_in = w.transpose(0, 1).reshape(w.shape[1], -1)
    no_output = torch.nonzero(~per_in.ne(0).any(dim=1)).flatten().tolist()
    return {"no_input": no_input, "no_output": no_output}


@register("prune", PruneConfig)
def prune(state: CompressionState, cfg: PruneConfig, task) -> dict:
    if cfg.sparsity == SUGGESTED:
        raise ValueError("sparsity: 'suggested' is filled in by pyserve.compress.compress from the recipe's "
                         "sensitivity analysis (report.sensitivity); give per-layer sparsities to call prune directly")
    names = cfg.layers or (tuple(cfg.sparsity) if isinstance(cfg.sparsity, dict) else None)
    layers = weight_layers(state.model, names)
    if isinstance(cfg.index_bits, dict):
        unknown = sorted(set(cfg.index_bits) - set(layers))
        if unknown:
            raise ValueError(f"index_bits: {unknown[0]!r} is not one of the pruned layers {', '.join(layers)}")
    targets = _targets(cfg, layers)
    state.layers.update(layers)
    for r in range(1, cfg.rounds + 1):
        for name, m in layers.items():
            s = _round_sparsity(targets[name], r, cfg.rounds, cfg.schedule)
            mask = magnitude_mask(m.weight, s)
            old = state.masks.get(weight_key(name))
            if old is not None:
                mask &= old  # weights pruned earlier stay pruned
            state.masks[weight_key(name)] = mask
        apply_masks(state)
        fit(state.model, task, cfg.retrain_epochs, lr=cfg.lr, after_step=lambda: apply_masks(state),
            desc=f"prune round {r}/{cfg.rounds} retrain")
    for name, m in layers.items():
        default_bits = 5 if is_linear_weight(m) else 8
        if isinstance(cfg.index_bits, dict):
            bits = cfg.index_bits.get(name, default_bits)
        else:
            bits = cfg.index_bits or default_bits
        state.index_bits[weight_key(name)] = bits
    report = {}
    for name, m in layers.items():
        dead = dead_units(m.weight)
        report[name] = {"sparsity": 1.0 - float(state.masks[weight_key(name)].float().mean()),
                        "dead_no_input": dead["no_input"], "dead_no_output": dead["no_output"]}
    return report


def apply_masks(state: CompressionState) -> None:
    """Zero every pruned weight (in place); weight-shared layers keep their zeros by construction."""
    with torch.no_grad():
        for name, m in state.layers.items():
            mask = state.masks.get(weight_key(name))
            if mask is not None and not parametrize.is_parametrized(m, "weight"):
                m.weight.mul_(mask)
