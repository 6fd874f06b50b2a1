"""Team-draft interleaving and the progressive canary guard, with an injected RNG and clock."""

from __future__ import annotations

import random

import pytest

from pyserve.traffic import CanaryGuard, GuardConfig, InterleaveStats, credit, team_draft
from pyserve.traffic.guard import COMPLETE, ROLLED_BACK, ROLLING
from pyserve.traffic.interleave import TEAM_A, TEAM_B


class FixedCoin:
    """rng.random() returns the given values in turn."""

    def __init__(self, *values):
        self.values = list(values)

    def random(self):
        return self.values.pop(0)


def test_team_draft_follows_the_paper():
    # Radlinski et al. 2008, algorithm 2, by hand: A = (a b c d), B = (b e a f)
    a, b = ["a", "b", "c", "d"], ["b", "e", "a", "f"]
    # round 1: coin says A first -> A picks a, B picks b; round 2: coin says B -> B picks e, A picks c
    # round 3: coin A -> A picks d; now every item of A is in the list, so the draft stops
    il = team_draft(a, b, FixedCoin(0.1, 0.9, 0.1))
    assert il.items == ("a", "b", "e", "c", "d")
    assert il.teams == (TEAM_A, TEAM_B, TEAM_B, TEAM_A, TEAM_A)


@pytest.mark.parametrize("seed", range(20))
def test_team_draft_invariants(seed):
    rng = random.Random(seed)
    items = list(range(30))
    a = rng.sample(items, 12)
    b = rng.sample(items, 12)
    il = team_draft(a, b, random.Random(seed))
    assert len(set(il.items)) == len(il.items)
    na, nb = il.teams.count(TEAM_A), il.teams.count(TEAM_B)
    assert abs(na - nb) <= 1
    # each team's picks appear in the order of its own ranking, and each pick was that ranking's
    # best item not yet shown
    shown = []
    for item, team in zip(il.items, il.teams):
        ranking = a if team == TEAM_A else b
        assert item == next(x for x in ranking if x not in shown)
        shown.append(item)


def test_team_draft_identical_lists_keeps_the_order():
    il = team_draft([3, 1, 2], [3, 1, 2], random.Random(0))
    assert il.items == (3, 1, 2)


def test_credit_and_stats():
    il = team_draft(["a", "b", "c"], ["x", "y", "z"], FixedCoin(0.1, 0.1, 0.1))  # a x b y c, then A is used up
    assert il.items == ("a", "x", "b", "y", "c")
    assert credit(il, ["a", "b", "y"]) == 1
    assert credit(il, ["x"]) == -1
    assert credit(il, []) == 0 and credit(il, ["a", "x"]) == 0 and credit(il, ["nope"]) == 0
    s = InterleaveStats()
    for o in (1, 1, 1, 0, -1):
        s.record(o)
    assert (s.wins, s.ties, s.losses) == (3, 1, 1)
    assert s.test().p_value == pytest.approx(0.625)  # 2 * P(X <= 1 | n=4) = 2 * 5/16


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def guard(clock, **kw):
    cfg = GuardConfig(canary="candidate", steps_percent=(1, 5, 25, 50, 100), window_s=60, min_requests=100,
                      max_error_rate_increase=0.01, max_p99_latency_ratio=1.2, **kw)
    return CanaryGuard("mnist", cfg, clock, wall_clock=clock)


def feed(g, n, *, canary_ok=True, canary_latency=0.010, baseline_latency=0.010):
    out = []
    for i in range(n):
        for d in (g.observe(False, True, baseline_latency), g.observe(True, canary_ok, canary_latency)):
            if d is not None:
                out.append(d)
    return out


def test_guard_promotes_through_every_step_when_healthy():
    clock = Clock()
    g = guard(clock)
    assert g.percent == 1 and g.state == ROLLING and g.decisions[0].action == "start"
    seen = []
    for _ in range(4):
        feed(g, 150)
        clock.t += 60
        d = g.evaluate()
        seen.append((d.action, d.from_percent, d.to_percent))
    assert seen == [("promote", 1, 5), ("promote", 5, 25), ("promote", 25, 50), ("promote", 50, 100)]
    assert g.state == COMPLETE


def test_guard_holds_a_window_without_enough_requests():
    clock = Clock()
    g = guard(clock)
    feed(g, 50)
    clock.t += 61
    d = g.evaluate()
    assert d.action == "hold" and g.percent == 1 and g.canary.count == 0  # a new window
    assert g.evaluate() is None


def test_guard_rolls_back_at_once_on_errors():
    clock = Clock()
    g = guard(clock)
    feed(g, 150)
    clock.t += 60
    g.evaluate()  # -> 5%
    clock.t += 10  # well inside the next window
    ds = feed(g, 100, canary_ok=False)
    assert [d.action for d in ds] == ["rollback"]
    assert g.state == ROLLED_BACK and g.percent == 0 and ds[0].from_percent == 5
    assert "error rate" in ds[0].reason
    # the decision came at the min_requests-th canary request of the window, no later
    assert g.canary.count == 100
    assert feed(g, 10) == []  # stays rolled back
    d = g.promote()
    assert d.action == "manual_promote" and g.percent == 1 and g.state == ROLLING


def test_guard_rolls_back_on_p99_and_shadow_disagreement():
    clock = Clock()
    g = guard(clock)
    ds = feed(g, 100, canary_latency=0.013, baseline_latency=0.010)
    assert ds and ds[0].action == "rollback" and "p99" in ds[0].reason
    g2 = guard(Clock(), max_shadow_disagreement=0.02)
    assert g2.observe_shadow(97, 100).action == "rollback"
    g3 = guard(Clock(), max_shadow_disagreement=0.02)
    assert g3.observe_shadow(99, 100) is None


def test_guard_starts_at_the_configured_step_and_manual_rollback():
    cfg = GuardConfig(canary="c", steps_percent=(1, 5, 25), window_s=1, min_requests=1)
    g = CanaryGuard("r", cfg, Clock(), start_percent=5)
    assert g.step == 1 and g.percent == 5
    d = g.rollback()
    assert (d.action, d.from_percent, d.to_percent) == ("manual_rollback", 5, 0)
