"""Shadowing: which requests to mirror, and how far a shadow's outputs drift from the primary's.

A shadow gets a request with probability ``fraction``: the decision hashes the routing key salted
with ``route/shadow`` (so it is sticky and the same on every replica) or, without a key, draws from
the injectable RNG. The primary answer never waits for a shadow (the server runs shadows off the
request path); this module only decides and measures.

Divergence of one shadow answer from the primary's, per output tensor present in both with the same
shape (outputs are numpy arrays, batch first):

- ``top1_agreement``: for a classifier output ``[N, C]`` (C > 1, floating point), the fraction of rows
  whose argmax agrees; None for other outputs.
- ``max_abs_diff``: max |primary - shadow| over every element (regression, embeddings).
- ``cosine``: the mean over rows of cos(primary_row, shadow_row) (a row of zeros against a row of
  zeros counts as 1).

Pure: numpy and pyserve.traffic only.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from pyserve.traffic.hashing import bucket
from pyserve.traffic.stats import RequestStats

__all__ = ["Divergence", "divergence", "should_mirror", "ShadowStats"]


@dataclass(frozen=True)
class Divergence:
    """Divergence of one shadow answer (see the module docstring). ``rows`` = the batch size compared;
    ``comparable`` False when no output matched in name and shape."""

    rows: int
    top1_agreement: float | None
    max_abs_diff: float
    cosine: float
    comparable: bool = True


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
    return {t.name: (t.data.astype(np.uint32) << 16).view(np.float32) if t.datatype == "BF16" else t.data
            for t in tensors}


def divergence(primary: Mapping[str, np.ndarray], shadow: Mapping[str, np.ndarray]) -> Divergence:
    """Compare the outputs present in both (same name and shape); numeric outputs only."""
    agree_n = agree_rows = 0
    max_abs = 0.0
    cos_sum = 0.0
    cos_n = 0
    rows = 0
    for name, p in primary.items():
        s = shadow.get(name)
        if s is None:
            continue
        p, s = np.asarray(p), np.asarray(s)
        if p.shape != s.shape or p.dtype.kind not in "biuf" or s.dtype.kind not in "biuf":
            continue
        pr, sr = _rows(p), _rows(s)
        rows = max(rows, pr.shape[0])
        if pr.size:
            max_abs = float(np.maximum(max_abs, np.max(np.abs(pr - sr))))  # NaN (a NaN or inf - inf) stays
        if p.ndim == 2 and p.shape[1] > 1 and p.dtype.kind == "f":
            agree_rows += int(np.sum(np.argmax(p, axis=1) == np.argmax(s, axis=1)))
            agree_n += p.shape[0]
        num = np.sum(pr * sr, axis=1)
        den = np.linalg.norm(pr, axis=1) * np.linalg.norm(sr, axis=1)
        both_zero = (np.linalg.norm(pr, axis=1) == 0) & (np.linalg.norm(sr, axis=1) == 0)
        with np.errstate(invalid="ignore", divide="ignore"):
            cos = np.where(both_zero, 1.0, np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0))
        cos_sum += float(np.sum(cos))
        cos_n += cos.shape[0]
    if cos_n == 0:
        return Divergence(0, None, math.nan, math.nan, comparable=False)
    return Divergence(rows, agree_rows / agree_n if agree_n else None, max_abs, cos_sum / cos_n)


class ShadowStats:
    """Per shadow: mirrored requests (with errors and latency), drops, and divergence aggregates.

    ``top1_agreement`` is over all compared classifier rows; ``max_abs_diff`` the largest seen;
    ``cosine_mean`` the mean over compared answers and ``cosine_min`` the smallest.
    """

    def __init__(self) -> None:
        self.requests = RequestStats()
        self.dropped = 0
        self.compared = 0
        self.agree_rows = 0
        self.top1_rows = 0
        self.max_abs_diff = 0.0
        self.cosine_sum = 0.0
        self.cosine_min = math.inf

    def record(self, ok: bool, latency_s: float, div: Divergence | None) -> None:
        self.requests.add(ok, latency_s)
        if ok and div is not None and div.comparable:
            self.compared += 1
            if div.top1_agreement is not None:
                self.agree_rows += round(div.top1_agreement * div.rows)
                self.top1_rows += div.rows
            self.max_abs_diff = float(np.maximum(self.max_abs_diff, div.max_abs_diff))  # NaN stays NaN
            self.cosine_sum += div.cosine
            self.cosine_min = min(self.cosine_min, div.cosine)

    def drop(self) -> None:
        self.dropped += 1

    @property
    def top1_agreement(self) -> float | None:
        return self.agree_rows / self.top1_rows if self.top1_rows else None

    def as_dict(self) -> dict:
        return {**{f"requests_{k}": v for k, v in self.requests.as_dict().items()},
                "dropped": self.dropped, "compared": self.compared,
                "top1_agreement": self.top1_agreement,
                "max_abs_diff": self.max_abs_diff if self.compared else math.nan,
                "cosine_mean": self.cosine_sum / self.compared if self.compared else math.nan,
                "cosine_min": self.cosine_min if self.compared else math.nan}
