"""Shadowing: which requests to mirror, and how far a shadow's outputs drift from the primary's.

A shadow gets a request with probability ``fraction``: the decision hashes the routing key salted
with ``route/shadow`` (so it is sticky and the same on every replica) or, without a key, draws from
the injectable RNG. The primary answer never waits for a shadow (the server runs shadows off the
request path); this module only decides and measures.

Divergence of one shadow answer from the primary's, per output tensor present in both with the same
shape (outputs are numpy arrays, batch first; the first dimension is the row):

- ``top1_agreement``: for a classifier output ``[N, C]`` (C > 1, floating point), the fraction of rows
  whose argmax agrees; None for other outputs.
- ``max_abs_diff``: max |primary - shadow| over every element (regression, embeddings). Integer
  outputs are compared exactly (a Python ``int``; no float64 cast, so INT64 ids that differ above
  2**53 still differ); floating outputs in float64 (a NaN difference stays NaN).
- ``cosine``: the mean over rows of cos(primary_row, shadow_row) (a row of zeros against a row of
  zeros counts as 1), in float64.

Several outputs (the rule): each output is measured on its own and kept in
:attr:`Divergence.outputs` (name -> :class:`OutputDivergence`); the top-level figures of a
:class:`Divergence` are those of its *first* compared output, in the primary's output order (the
model's main output, as for interleaving). Outputs are never pooled: a 1-column score next to a
384-column embedding would otherwise mix cosines of different meanings. :class:`ShadowStats` keeps
the same aggregates per output (``outputs`` in :meth:`ShadowStats.as_dict`).

Pure: numpy and pyserve.traffic only.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from pyserve.dtypes import bf16_to_float32
from pyserve.traffic.hashing import bucket
from pyserve.traffic.stats import RequestStats

__all__ = ["Divergence", "OutputDivergence", "divergence", "should_mirror", "ShadowStats"]


@dataclass(frozen=True)
class OutputDivergence:
    """Divergence of one output tensor (see the module docstring). ``max_abs_diff`` is an ``int``
    for integer outputs (exact), else a float."""

    rows: int
    top1_agreement: float | None
    max_abs_diff: float | int
    cosine: float


@dataclass(frozen=True)
class Divergence:
    """Divergence of one shadow answer (see the module docstring). ``rows`` = the batch size compared;
    ``comparable`` False when no output matched in name and shape. The top-level figures are those
    of the first compared output; ``outputs`` holds every compared output by name (plain tuples
    ``(name, rows, top1_agreement, max_abs_diff, cosine)``, so a result crosses a process boundary
    as plain values)."""

    rows: int
    top1_agreement: float | None
    max_abs_diff: float | int
    cosine: float
    comparable: bool = True
    outputs: tuple = ()

    def per_output(self) -> dict[str, OutputDivergence]:
        """``{output name: OutputDivergence}`` of every compared output."""
        return {o[0]: OutputDivergence(*o[1:]) for o in self.outputs}


def should_mirror(route: str, shadow: str, fraction: float, key: str | None, rng: random.Random | None = None) -> bool:
    """True if the request with routing ``key`` goes to ``shadow`` (probability ``fraction``)."""
    if fraction >= 1.0:
        return True
    if fraction <= 0.0:
        return False
    u = bucket(f"{route}/{shadow}", key) if key else (rng or random).random()
    return u < fraction


def _rows(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if a.ndim == 0:
        return a.reshape(1, 1)
    if a.ndim == 1:
        return a.reshape(1, -1)
    return a.reshape(a.shape[0], int(np.prod(a.shape[1:])))  # not -1: a 0-row batch has no size to infer


def output_arrays(tensors) -> dict[str, np.ndarray]:
    """``{name: array}`` of response output tensors (``.name``, ``.datatype``, ``.data``) for
    :func:`divergence`: BF16, carried as its uint16 bit patterns, is widened to float32 so that
    differences and top-1 are of values, not of bits."""
    return {t.name: bf16_to_float32(t.data) if t.datatype == "BF16" else t.data for t in tensors}


def _max_abs_int(p: np.ndarray, s: np.ndarray) -> int:
    """max |p - s| of two integer arrays of one shape, exactly (a Python int; 0 for no elements)."""
    if p.size == 0:
        return 0
    big = 2**62
    if all(int(a.min()) > -big and int(a.max()) < big for a in (p, s)):
        return int(np.max(np.abs(p.astype(np.int64) - s.astype(np.int64))))  # no int64 overflow here
    return int(np.max(np.abs(p.astype(object) - s.astype(object))))  # uint64 / near int64's limits


def _one(p: np.ndarray, s: np.ndarray) -> OutputDivergence:
    pr, sr = _rows(p), _rows(s)
    if p.dtype.kind in "biu" and s.dtype.kind in "biu":
        max_abs: float | int = _max_abs_int(p.astype(np.int64) if p.dtype.kind == "b" else p,
                                            s.astype(np.int64) if s.dtype.kind == "b" else s)
    else:
        max_abs = float(np.max(np.abs(pr - sr))) if pr.size else 0.0  # NaN (a NaN or inf - inf) stays
    top1 = None
    if p.ndim == 2 and p.shape[1] > 1 and p.dtype.kind == "f":
        top1 = float(np.mean(np.argmax(p, axis=1) == np.argmax(s, axis=1)))
    num = np.sum(pr * sr, axis=1)
    npn, nsn = np.linalg.norm(pr, axis=1), np.linalg.norm(sr, axis=1)
    den = npn * nsn
    both_zero = (npn == 0) & (nsn == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(both_zero, 1.0, np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0))
    return OutputDivergence(pr.shape[0], top1, max_abs, float(np.mean(cos)))


def divergence(primary: Mapping[str, np.ndarray], shadow: Mapping[str, np.ndarray]) -> Divergence:
    """Compare the outputs present in both (same name and shape, numeric, at least one row), each on
    its own; the top-level figures are the first compared output's (see the module docstring).
    Not comparable (``comparable`` False, figures NaN) when no output qualifies."""
    outs = []
    for name, p in primary.items():
        s = shadow.get(name)
        if s is None:
            continue
        p, s = np.asarray(p), np.asarray(s)
        if p.shape != s.shape or p.dtype.kind not in "biuf" or s.dtype.kind not in "biuf":
            continue
        if _rows(p).shape[0] == 0:
            continue  # a 0-row batch: nothing to compare
        o = _one(p, s)
        outs.append((name, o.rows, o.top1_agreement, o.max_abs_diff, o.cosine))
    if not outs:
        return Divergence(0, None, math.nan, math.nan, comparable=False)
    _, rows, top1, max_abs, cos = outs[0]
    return Divergence(rows, top1, max_abs, cos, True, tuple(outs))


def _max_nan(a, b):
    """max(a, b) where a NaN wins (Python's max would hide it) and ints stay exact ints."""
    if isinstance(a, float) and math.isnan(a) or isinstance(b, float) and math.isnan(b):
        return math.nan
    return a if a >= b else b


class _Agg:
    """Divergence aggregates of one output (or of the top-level figures)."""

    __slots__ = ("compared", "agree_rows", "top1_rows", "max_abs_diff", "cosine_sum", "cosine_min")

    def __init__(self) -> None:
        self.compared = 0
        self.agree_rows = 0
        self.top1_rows = 0
        self.max_abs_diff: float | int = 0
        self.cosine_sum = 0.0
        self.cosine_min = math.inf

    def add(self, rows: int, top1: float | None, max_abs, cosine: float) -> None:
        self.compared += 1
        if top1 is not None:
            self.agree_rows += round(top1 * rows)
            self.top1_rows += rows
        self.max_abs_diff = _max_nan(self.max_abs_diff, max_abs)
        self.cosine_sum += cosine
        self.cosine_min = min(self.cosine_min, cosine)

    @property
    def top1_agreement(self) -> float | None:
        return self.agree_rows / self.top1_rows if self.top1_rows else None

    def as_dict(self) -> dict:
        return {"compared": self.compared, "top1_agreement": self.top1_agreement,
                "max_abs_diff": self.max_abs_diff if self.compared else math.nan,
                "cosine_mean": self.cosine_sum / self.compared if self.compared else math.nan,
                "cosine_min": self.cosine_min if self.compared else math.nan}


class ShadowStats:
    """Per shadow: mirrored requests (with errors and latency), drops, and divergence aggregates.

    ``top1_agreement`` is over all compared classifier rows; ``max_abs_diff`` the largest seen;
    ``cosine_mean`` the mean over compared answers and ``cosine_min`` the smallest -- of each
    answer's first compared output (the top-level rule of :class:`Divergence`); ``outputs`` has the
    same per output name.

    Counters besides ``requests`` (a copy lands in exactly one of them or in ``requests``):
    ``dropped``: copies not run (the route's queue was full, or the shadow worker process was down
    or restarting and could not take it); ``lost``: copies sent to the worker process that died
    before their result came back (not an error of the shadow model: the worker was killed, or a
    model crashed it); ``stale``: results of copies mirrored under an earlier config of the route,
    discarded (see :meth:`pyserve.traffic.TrafficController.record_shadow`). ``timeouts`` counts
    the errors (inside ``requests``) that were a shadow's ``timeout_s`` running out.
    """

    def __init__(self) -> None:
        self.requests = RequestStats()
        self.dropped = 0
        self.lost = 0
        self.stale = 0
        self.timeouts = 0
        self._top = _Agg()
        self.outputs: dict[str, _Agg] = {}

    def record(self, ok: bool, latency_s: float | None, div: Divergence | None, *, timeout: bool = False) -> None:
        """One finished copy. ``latency_s`` None: it failed before it ran (no latency to keep)."""
        self.requests.add(ok, latency_s)
        if timeout:
            self.timeouts += 1
        if ok and div is not None and div.comparable:
            self._top.add(div.rows, div.top1_agreement, div.max_abs_diff, div.cosine)
            for name, rows, top1, max_abs, cos in div.outputs:
                agg = self.outputs.get(name)
                if agg is None:
                    agg = self.outputs[name] = _Agg()
                agg.add(rows, top1, max_abs, cos)

    def drop(self) -> None:
        self.dropped += 1

    @property
    def compared(self) -> int:
        return self._top.compared

    @property
    def max_abs_diff(self):
        return self._top.max_abs_diff

    @property
    def cosine_sum(self) -> float:
        return self._top.cosine_sum

    @property
    def cosine_min(self) -> float:
        return self._top.cosine_min

    @property
    def top1_agreement(self) -> float | None:
        return self._top.top1_agreement

    def as_dict(self) -> dict:
        out = {**{f"requests_{k}": v for k, v in self.requests.as_dict().items()},
               "dropped": self.dropped, "lost": self.lost, "stale": self.stale, "timeouts": self.timeouts,
               **self._top.as_dict()}
        if self.outputs:
            out["outputs"] = {name: agg.as_dict() for name, agg in self.outputs.items()}
        return out
