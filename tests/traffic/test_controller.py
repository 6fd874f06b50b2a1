"""The controller: plans, weight changes, guard wiring, feedback and reports, with injected RNG and clock."""

from __future__ import annotations

import random
import textwrap

import numpy as np
import pytest

from pyserve.traffic import (
    FeedbackError,
    TrafficConfigError,
    TrafficController,
    UnknownRequest,
    UnknownRoute,
    divergence,
    parse_traffic_config,
)

CFG = textwrap.dedent("""
    version: 1
    revision: r1
    routes:
      canary:
        policy: canary
        variants:
          stable: {model: m1, weight_percent: 95}
          candidate: {model: m2, weight_percent: 5}
        shadows:
          mirror: {model: m2, fraction: 1.0}
        guard: {canary: candidate, steps_percent: [5, 50, 100], window_s: 10, min_requests: 20}
      ab:
        policy: ab
        variants:
          a: {model: m1, weight_percent: 50}
          b: {model: m2, weight_percent: 50}
      il:
        policy: interleave
        variants: {a: {model: m1}, b: {model: m2}}
""")


class Clock:
    t = 0.0

    def __call__(self):
        return self.t


@pytest.fixture()
def ctl():
    clock = Clock()
    c = TrafficController(parse_traffic_config(CFG), rng=random.Random(0), clock=clock, wall_clock=clock)
    c.test_clock = clock
    return c


def test_plan_is_sticky_and_weights_apply_from_the_next_request(ctl):
    keys = [f"u{i}" for i in range(2000)]
    first = [ctl.plan("canary", k).variant.name for k in keys]
    assert first == [ctl.plan("canary", k).variant.name for k in keys]
    assert 40 < first.count("candidate") < 170
    ctl.set_weights("canary", {"stable": 50, "candidate": 50})
    after = [ctl.plan("canary", k).variant.name for k in keys]
    assert all(a == "candidate" for f, a in zip(first, after) if f == "candidate")
    assert 850 < after.count("candidate") < 1150
    assert ctl.status()["routes"]["canary"]["weights"] == {"stable": 50.0, "candidate": 50.0}
    assert ctl.decisions[-1].action == "manual_weights"
    with pytest.raises(TrafficConfigError, match="sum to 100"):
        ctl.set_weights("canary", {"stable": 50, "candidate": 40})
    assert ctl.status()["routes"]["canary"]["weights"] == {"stable": 50.0, "candidate": 50.0}  # kept
    with pytest.raises(UnknownRoute):
        ctl.plan("nope", "k")


def test_guard_rolls_back_the_weights(ctl):
    for _ in range(20):
        ctl.record("canary", "stable", True, 0.01)
    decisions = [ctl.record("canary", "candidate", False, 0.01) for _ in range(20)]
    assert [d.action for d in decisions if d] == ["rollback"]
    assert ctl.routes["canary"].config.weights == {"stable": 100.0, "candidate": 0.0}
    assert {ctl.plan("canary", f"u{i}").variant.name for i in range(500)} == {"stable"}
    d = ctl.promote("canary")
    assert d.to_percent == 5 and ctl.routes["canary"].config.weights["candidate"] == 5.0


def test_guard_promotes_on_the_clock(ctl):
    for _ in range(25):
        ctl.record("canary", "stable", True, 0.01)
        ctl.record("canary", "candidate", True, 0.01)
    ctl.test_clock.t = 11
    assert [d.action for d in ctl.tick()] == ["promote"]
    assert ctl.routes["canary"].config.weights == {"stable": 50.0, "candidate": 50.0}


def test_shadow_agreement_feeds_the_guard(ctl):
    p = np.eye(10, dtype=np.float32)[:5]
    bad = np.roll(p, 1, axis=1)
    ctl.record_shadow("canary", "mirror", True, 0.01, divergence({"y": p}, {"y": p}))
    assert ctl.routes["canary"].guard.shadow_rows == 5
    rep = ctl.report("canary")["canary"]["shadows"]["mirror"]
    assert rep["top1_agreement"] == 1.0 and rep["compared"] == 1
    for _ in range(4):
        ctl.record_shadow("canary", "mirror", True, 0.01, divergence({"y": p}, {"y": bad}))
    ctl.drop_shadow("canary", "mirror")
    rep = ctl.report("canary")["canary"]["shadows"]["mirror"]
    assert rep["top1_agreement"] == pytest.approx(5 / 25) and rep["dropped"] == 1


def test_ab_feedback_and_unknown_ids_are_counted(ctl):
    for i in range(200):
        v = ctl.plan("ab", f"user{i}").variant.name
        ctl.record("ab", v, True, 0.002)
        ctl.remember(f"req{i}", "ab", v)
        ctl.feedback(f"req{i}", metric=1.0 if (v == "b" and i % 2 == 0) else 0.0)
    rep = ctl.report("ab")["ab"]["ab"]
    assert rep[0]["metric_mean"] == 0.0 and 0.3 < rep[1]["metric_mean"] < 0.7
    assert rep[1]["test"] == "two-proportion z" and rep[1]["p_value"] < 1e-6
    with pytest.raises(UnknownRequest):
        ctl.feedback("req0", metric=1.0)  # one feedback per request
    with pytest.raises(UnknownRequest):
        ctl.feedback("never-seen", metric=1.0)
    assert ctl.unknown_feedback == 2 and ctl.status()["unknown_feedback"] == 2


def test_interleave_feedback(ctl):
    from pyserve.traffic import team_draft

    il = team_draft([1, 2, 3], [3, 2, 1], random.Random(0))
    ctl.remember("q1", "il", "a,b", [il])
    with pytest.raises(FeedbackError, match="clicked items"):
        ctl.feedback("q1", metric=1.0)
    a_item = il.items[il.teams.index(0)]
    assert ctl.feedback("q1", clicked=[a_item])["outcome"] == "win"
    assert ctl.report("il")["il"]["interleave"]["wins"] == 1


def test_reload_keeps_unchanged_routes_and_resets_changed_ones(ctl):
    ctl.record("ab", "a", True, 0.001)
    ctl.set_weights("canary", {"stable": 50, "candidate": 50})
    cfg2 = parse_traffic_config(CFG.replace("revision: r1", "revision: r2").replace(
        "a: {model: m1, weight_percent: 50}", "a: {model: m1, weight_percent: 60}").replace(
        "b: {model: m2, weight_percent: 50}", "b: {model: m2, weight_percent: 40}"))
    ctl.apply(cfg2)
    assert ctl.status()["revision"] == "r2"
    assert ctl.routes["canary"].config.weights["candidate"] == 50.0  # unchanged route: state kept
    assert ctl.report("ab")["ab"]["variants"]["a"]["count"] == 0  # changed route: fresh
