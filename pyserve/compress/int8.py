"""int8 post-training quantization of Linear layers (method ``int8``).

Weights: symmetric, one scale per output channel (Jacob et al. 2018, "Quantization and Training of
Neural Networks for Efficient Integer-Arithmetic-Only Inference", section 2, zero point 0), computed
by :func:`pyserve.ops.quantize_per_channel`: ``scale[n] = max|W[n, :]| / 127``,
``q = clamp(rint(W / scale), -127, 127)``. The model keeps the dequantized fp32 weight
``q * scale`` (so the graph and every fp32 reader see exactly what the int8 kernel multiplies); the
artifact stores ``q`` and ``scale`` in the ``int8`` encoding (docs/artifact.md), and the ``pyserve``
backend runs those layers through :func:`pyserve.ops.int8_linear`, which quantizes activations per
row at every call ("dynamic" quantization).

Optional static activation scales (``calibration``) are measured on a calibration set (the task's
calibration inputs) and stored as ``input_scale`` of each weight, for runtimes that quantize
activations with a fixed scale (Q/DQ graphs for TensorRT, ONNX):

* ``minmax``: ``max |x|`` over the calibration set / 127;
* ``percentile``: the ``percentile``-th percentile of ``|x|`` / 127 (clips rare outliers);
* ``entropy``: the clipping threshold that minimises the KL divergence between the histogram of
  ``|x|`` and its 128-level quantized version (Migacz 2017, "8-bit Inference with TensorRT",
  GTC; the algorithm TensorRT's entropy calibrator uses).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pyserve.compress._train import weight_key
from pyserve.compress.methods import CompressionState, register, select_by_name

__all__ = ["Int8Config", "CALIBRATIONS", "select_linears", "calibrate_scale", "entropy_threshold"]

CALIBRATIONS = ("none", "minmax", "percentile", "entropy")


@dataclass(frozen=True)
class Int8Config:
    """``include`` / ``exclude``: fnmatch patterns on module names (``encoder.layer.*.output.dense``);
    a Linear is quantized when it matches an include pattern and no exclude pattern.
    ``calibration``: one of :data:`CALIBRATIONS`; ``calibration_samples``: how many calibration
    examples are run; ``percentile`` (in (0, 100]) for ``percentile``; ``bins`` of the ``|x|``
    histogram for ``entropy`` (>= 256). ``embeddings``: also store every ``nn.Embedding`` table in
    int8, one scale per row (token) — a lookup table, so it shrinks the file 4x and the lookup stays
    fp32 on the dequantized rows."""

    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    calibration: str = "none"
    calibration_samples: int = 128
    percentile: float = 99.99
    bins: int = 2048
    embeddings: bool = False

    def __post_init__(self):
        if self.calibration not in CALIBRATIONS:
            raise ValueError(f"calibration: must be one of {CALIBRATIONS}, got {self.calibration!r}")
        if self.calibration_samples < 1:
            raise ValueError(f"calibration_samples: must be >= 1, got {self.calibration_samples}")
        if not 0.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile: must be in (0, 100], got {self.percentile}")
        if self.bins < 256:
            raise ValueError(f"bins: must be >= 256, got {self.bins}")
        if not self.include:
            raise ValueError("include: needs at least one pattern")

    def check(self, model: nn.Module, task) -> None:
        """Raise ValueError, before any work, if this stage cannot run on ``model`` and ``task``."""
        select_linears(model, self.include, self.exclude)
        if self.calibration != "none":
            batches = list(task.calibration_batches(min(self.calibration_samples, 1)))
            if not batches or sum(int(b[0].shape[0]) for b in batches) == 0:
                raise ValueError("calibration: the calibration set is empty")


def select_linears(model: nn.Module, include=("*",), exclude=()) -> dict[str, nn.Linear]:
    """The model's ``nn.Linear`` modules whose name matches an ``include`` pattern and no ``exclude``
    pattern (fnmatch), by name.

    Raises ValueError when the model has no Linear layer, or when the patterns leave none."""
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    if not linears:
        raise ValueError(f"int8: the model ({type(model).__name__}) has no nn.Linear layer to quantize")
    chosen = select_by_name(linears, include, exclude)
    if not chosen:
        raise ValueError(f"include/exclude: the patterns select none of the {len(linears)} Linear layers "
                         f"(first: {', '.join(list(linears)[:3])})")
    return chosen


def entropy_threshold(hist: np.ndarray, bin_width: float, levels: int = 128) -> float:
    """KL-optimal clipping threshold of a histogram of ``|x|`` (Migacz 2017, slides 29-31).

    ``hist``: counts of ``|x|`` in ``len(hist)`` equal bins of width ``bin_width`` starting at 0.
    For each candidate ``i`` in ``levels..len(hist)``, P is ``hist[:i]`` with the outliers
    ``hist[i:]`` added to its last bin, Q is P merged into ``levels`` bins and expanded back over
    the non-empty bins of P; returns ``(i_best + 0.5) * bin_width`` for the ``i`` of least
    ``KL(P || Q)``. A histogram with fewer than ``levels`` bins returns its full range."""
    hist = np.asarray(hist, dtype=np.float64)
    n = hist.size
    if n <= levels or hist.sum() == 0:
        return n * bin_width
    best_i, best_kl = n, np.inf
    for i in range(levels, n + 1):
        p = hist[:i].copy()
        p[-1] += hist[i:].sum()
        nonzero = p > 0
        # split the i bins into `levels` groups (as equal as possible) and spread each group's mass
        # uniformly over its non-empty bins
        group = (np.arange(i) * levels) // i
        sums = np.bincount(group, weights=p, minlength=levels)
        cnts = np.bincount(group, weights=nonzero, minlength=levels)
        q = np.where(nonzero, sums[group] / np.maximum(cnts[group], 1), 0.0)
        ps, qs = p[nonzero] / p.sum(), q[nonzero] / q.sum()
        kl = float(np.sum(ps * np.log(ps / qs)))
        if kl < best_kl:
            best_i, best_kl = i, kl
    return (best_i + 0.5) * bin_width


def calibrate_scale(samples: np.ndarray, amax: float, method: str, *, percentile: float = 99.99,
                    bins: int = 2048) -> float:
    """Static activation scale (float > 0) from ``samples`` (|x| values, float [n]) and the exact
    ``amax = max |x|`` seen: threshold / 127, the threshold chosen by ``method``
    (``minmax``, ``percentile``, ``entropy``). An all-zero input gives 1.0 (like a zero weight row)."""
    if amax <= 0 or not np.isfinite(amax):
        return 1.0
    if method == "minmax":
        threshold = amax
    elif method == "percentile":
        threshold = float(np.percentile(samples, percentile)) if samples.size else amax
    elif method == "entropy":
        hist, _ = np.histogram(samples, bins=bins, range=(0.0, amax))
        threshold = min(entropy_threshold(hist, amax / bins), amax)
    else:
        raise ValueError(f"calibration: unknown method {method!r}; expected one of {CALIBRATIONS[1:]}")
    return float(threshold) / 127.0 if threshold > 0 else 1.0


def _calibrate(model: nn.Module, layers: dict[str, nn.Linear], inputs, cfg: Int8Config,
               max_samples: int = 1 << 20) -> dict[str, float]:
    """Run the calibration batches through ``model``; per layer, the static input scale."""
    gen = torch.Generator().manual_seed(0)
    amax = {n: 0.0 for n in layers}
    kept: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    counts = {n: 0 for n in layers}

    def hook(name):
        def fn(_module, args):
            x = args[0].detach().abs().reshape(-1).float()
            amax[name] = max(amax[name], float(x.max())) if x.numel() else amax[name]
            room = max_samples - counts[name]
            if room > 0 and x.numel():
                # all of a small batch; a random subset (without replacement) of a large one
                if x.numel() > room:
                    x = x[torch.randperm(x.numel(), generator=gen)[:room]]
                kept[name].append(x.clone())
                counts[name] += x.numel()
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    try:
        model.eval()
        with torch.no_grad():
            for batch in inputs:
                model(*batch)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for n in layers:
        samples = torch.cat(kept[n]).numpy() if kept[n] else np.zeros(0, np.float32)
        out[n] = calibrate_scale(samples, amax[n], cfg.calibration, percentile=cfg.percentile, bins=cfg.bins)
    return out


@register("int8", Int8Config)
def int8(state: CompressionState, cfg: Int8Config, task) -> dict:
    """Quantize the selected Linear layers' weights to int8 (see the module docstring).

    ``task`` must offer ``calibration_batches(n)`` (tuples of model inputs) when ``calibration`` is
    not ``none``. Raises ValueError before changing anything: no Linear layer, patterns selecting
    none, an empty calibration set."""
    from pyserve.ops import quantize_per_channel

    model = state.model
    layers = select_linears(model, cfg.include, cfg.exclude)
    scales: dict[str, float] = {}
    if cfg.calibration != "none":
        batches = list(task.calibration_batches(cfg.calibration_samples))
        if not batches or sum(int(b[0].shape[0]) for b in batches) == 0:
            raise ValueError("calibration: the calibration set is empty")
        scales = _calibrate(model, layers, batches, cfg)
    report = {}
    with torch.no_grad():
        for name, m in layers.items():
            w = m.weight.detach().float().contiguous()
            q, s = quantize_per_channel(w.cpu().numpy())
            deq = torch.from_numpy(q.astype(np.float32) * s[:, None])
            err = float((deq - w).norm() / w.norm().clamp_min(1e-30))
            m.weight.copy_(deq.to(m.weight.dtype))
            key = weight_key(name)
            state.int8[key] = (q, s, scales.get(name))
            report[name] = {"shape": list(w.shape), "bits": 8, "weight_rel_error": err,
                            **({"input_scale": scales[name]} if name in scales else {})}
        if cfg.embeddings:
            for name, m in model.named_modules():
                if isinstance(m, nn.Embedding):
                    w = m.weight.detach().float().contiguous()
                    q, s = quantize_per_channel(w.cpu().numpy())
                    m.weight.copy_(torch.from_numpy(q.astype(np.float32) * s[:, None]).to(m.weight.dtype))
                    state.int8[weight_key(name)] = (q, s, None)
                    report[name] = {"shape": list(w.shape), "bits": 8, "embedding": True}
    return report
