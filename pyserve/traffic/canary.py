"""Weighted, sticky variant choice: the canary split (and the A/B arm assignment).

The variants' weights (percent, summing to 100) tile [0, 100) in the route's order; a request's
routing key is hashed (:func:`pyserve.traffic.hashing.bucket_percent`, salted by the route name) to a
point in [0, 100) and the variant whose interval holds it answers. So a key always gets the same
variant for the same weights, on every replica, with no shared state. When a weight grows, the
intervals move only at their edges: with the canary listed last, raising its weight from 5 to 25
keeps every key that was on the canary on it (monotone rollout).

A request without a key draws its point from the injectable ``rng`` (``random.Random``-like,
``rng.random() -> float in [0, 1)``). Pure: standard library only.
"""

from __future__ import annotations

import random
from typing import Sequence

from pyserve.traffic.hashing import bucket_percent

__all__ = ["WeightedSplit"]


class WeightedSplit:
    """Choose among ``variants`` = [(name, weight_percent)] (weights >= 0, summing to 100).

    Raises ValueError naming the argument for negative weights or a sum other than 100.
    """

    def __init__(self, salt: str, variants: Sequence[tuple[str, float]]) -> None:
        if not variants:
            raise ValueError("variants: need at least one (name, weight_percent)")
        total = 0.0
        edges = []
        for name, w in variants:
            if w < 0:
                raise ValueError(f"variants: weight of {name!r} must be >= 0, got {w}")
            total += w
            edges.append((total, name))
        if abs(total - 100.0) > 1e-6:
            raise ValueError(f"variants: weights must sum to 100, got {total:g}")
        self.salt = salt
        self.variants = tuple((n, float(w)) for n, w in variants)
        self._edges = edges
        self._last_positive = [n for n, w in variants if w > 0][-1]

    def point(self, key: str | None, rng: random.Random | None = None) -> float:
        """The request's point in [0, 100): hashed from ``key``, else drawn from ``rng``."""
        if key is not None and key != "":
            return bucket_percent(self.salt, key)
        return 100.0 * (rng or random).random()

    def choose(self, key: str | None, rng: random.Random | None = None) -> str:
        """The name of the variant for ``key`` (a zero-weight variant is never chosen)."""
        p = self.point(key, rng)
        for edge, name in self._edges:
            if p < edge and self.weight(name) > 0:
                return name
        return self._last_positive  # p within float rounding of 100

    def weight(self, name: str) -> float:
        for n, w in self.variants:
            if n == name:
                return w
        raise KeyError(name)
