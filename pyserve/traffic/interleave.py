"""Team-draft interleaving of two rankers (Radlinski, Kurup and Joachims, "How does clickthrough data
reflect retrieval quality?", CIKM 2008, section 4, algorithm 2) and credit by clicks.

Team draft: like captains picking players, the team that has contributed fewer items picks next
(a fair coin breaks ties); each picks its highest-ranked item not already in the list. Every item of
the result is credited to the team that picked it. A click on an item is a vote for its team; an
impression is a win for A if A's items got more clicks, a loss if B's did, a tie otherwise (no click,
or equal). Per experiment the wins and losses go to an exact sign test.

Pure: standard library only; the RNG is injectable (``random.Random``-like).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Hashable, Iterable, Sequence

from pyserve.traffic.stats import TestResult, sign_test

__all__ = ["Interleaving", "team_draft", "credit", "InterleaveStats", "TEAM_A", "TEAM_B"]

TEAM_A, TEAM_B = 0, 1


@dataclass(frozen=True)
class Interleaving:
    """The interleaved list and, per position, the team (TEAM_A = 0, TEAM_B = 1) that contributed it."""

    items: tuple
    teams: tuple[int, ...]


def team_draft(a: Sequence[Hashable], b: Sequence[Hashable], rng: random.Random | None = None,
               length: int | None = None) -> Interleaving:
    """Interleave rankings ``a`` and ``b`` (best first) by team draft.

    Stops when either ranking has no unused item left, or after ``length`` items. Duplicates within
    one ranking are skipped. ``rng.random() < 0.5`` gives A the pick when both teams are even.
    """
    rng = rng or random.Random()
    items: list = []
    teams: list[int] = []
    seen: set = set()
    ia = ib = 0
    size_a = size_b = 0
    limit = length if length is not None else len(a) + len(b)
    while len(items) < limit:
        while ia < len(a) and a[ia] in seen:
            ia += 1
        while ib < len(b) and b[ib] in seen:
            ib += 1
        if ia >= len(a) or ib >= len(b):
            break
        if size_a < size_b or (size_a == size_b and rng.random() < 0.5):
            item, team = a[ia], TEAM_A
            size_a += 1
        else:
            item, team = b[ib], TEAM_B
            size_b += 1
        items.append(item)
        teams.append(team)
        seen.add(item)
    return Interleaving(tuple(items), tuple(teams))


def credit(interleaving: Interleaving, clicked: Iterable[Hashable]) -> int:
    """+1 if team A's items got more clicks, -1 if team B's did, 0 for a tie (clicks on items not
    in the list are ignored)."""
    team_of = dict(zip(interleaving.items, interleaving.teams))
    ca = cb = 0
    for item in set(clicked):
        t = team_of.get(item)
        if t == TEAM_A:
            ca += 1
        elif t == TEAM_B:
            cb += 1
    return (ca > cb) - (ca < cb)


class InterleaveStats:
    """Wins (A better), ties and losses (B better) of one interleaving experiment, and the sign test."""

    def __init__(self) -> None:
        self.impressions = 0
        self.wins = self.ties = self.losses = 0

    def record(self, outcome: int) -> None:
        if outcome > 0:
            self.wins += 1
        elif outcome < 0:
            self.losses += 1
        else:
            self.ties += 1

    def test(self) -> TestResult:
        return sign_test(self.wins, self.losses)

    def as_dict(self) -> dict:
        t = self.test()
        return {"impressions": self.impressions, "wins": self.wins, "ties": self.ties, "losses": self.losses,
                "sign_test_p": t.p_value}
