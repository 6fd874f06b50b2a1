"""The shadow defects a break-it pass found, each pinned by a test that failed before its fix:

(1) results of copies mirrored before a reload that retargeted (or removed and re-added) a shadow
    are stale: counted, discarded, never fed to the guard;
(2) a per-shadow ``timeout_s`` (config field, validated) -- the worker side is in test_shadow_grpc.py;
(3) under steady load (no idle moment) the overdue slice sends every waiting copy, so copies are not
    dropped while the shadow is idle;
(4) shadows on an interleave route are refused with the field named;
(5) a dead worker's jobs are ``lost`` (not shadow errors), copies it cannot take are drops, and no
    0 s latency enters the window;
(6) several outputs are measured each on its own (the top-level figures are the first output's),
    integers exactly (INT64 beyond 2**53).

Pure modules with an injected RNG and clock, or the router with a stand-in data plane; references
are computed another way (numpy per output, Python ints, counted calls)."""

from __future__ import annotations

import asyncio
import math
import random
import textwrap
from types import SimpleNamespace

import numpy as np
import pytest

from pyserve.protocol.types import InferRequest, InferResponse, Tensor
from pyserve.server import _shadow_process
from pyserve.server import traffic as traffic_mod
from pyserve.server._shadow_process import ShadowProcess, ShadowResult
from pyserve.server.traffic import TrafficRouter, _ResultTo
from pyserve.traffic import (
    TrafficConfigError,
    TrafficController,
    divergence,
    parse_traffic_config,
)
from pyserve.traffic.config import DEFAULT_SHADOW_TIMEOUT_S, parse_route, route_to_dict
from pyserve.traffic.shadow import ShadowStats

GUARDED = textwrap.dedent("""
    version: 1
    routes:
      r:
        policy: canary
        variants:
          stable: {model: m1, weight_percent: 95}
          candidate: {model: m2, weight_percent: 5}
        shadows:
          mirror: {model: m2, fraction: 1.0}
        guard: {canary: candidate, steps_percent: [5, 50, 100], window_s: 100, min_requests: 4,
                max_shadow_disagreement: 0.1}
""")


class Clock:
    t = 0.0

    def __call__(self):
        return self.t


def _ctl(text=GUARDED):
    clock = Clock()
    return TrafficController(parse_traffic_config(text), rng=random.Random(0), clock=clock, wall_clock=clock)


def _disagreeing():
    p = np.eye(4, dtype=np.float32)
    return divergence({"y": p}, {"y": np.roll(p, 1, axis=1)})  # top-1 agreement 0


# --- (1) stale results after a reload ----------------------------------------------------------------


@pytest.mark.parametrize("change", ["retarget", "remove_and_readd"])
def test_results_mirrored_before_a_reload_are_stale_and_never_reach_the_guard(change):
    ctl = _ctl()
    plan = ctl.plan("r", "k1")
    assert [s.name for s in plan.shadows] == ["mirror"] and plan.generation
    old_gen = plan.generation
    if change == "retarget":  # the shadow now names the stable model: not the canary any more...
        ctl.apply(parse_traffic_config(GUARDED.replace("mirror: {model: m2", "mirror: {model: m1")))
    else:  # ...or the shadow is removed, then re-added with the very same target
        ctl.apply(parse_traffic_config(GUARDED.replace("    shadows:\n      mirror: {model: m2, fraction: 1.0}\n",
                                                       "")))
        assert "mirror" not in ctl.routes["r"].shadows
        ctl.apply(parse_traffic_config(GUARDED))
    st = ctl.routes["r"]
    assert st.generation != old_gen
    # four disagreeing answers of the OLD target: before the fix they were recorded under the new
    # config and (remove_and_readd: same target as the canary) breached max_shadow_disagreement
    for _ in range(4):
        assert ctl.record_shadow("r", "mirror", True, 0.01, _disagreeing(), old_gen) is None
    ctl.lose_shadow("r", "mirror", old_gen)
    ctl.drop_shadow("r", "mirror", old_gen)
    assert st.guard.state == "rolling" and st.guard.shadow_rows == 0
    s = st.shadows["mirror"]
    assert s.requests.count == 0 and s.compared == 0 and s.lost == 0 and s.dropped == 0
    assert s.stale == 6 and ctl.stale_shadow_results == {"r": 6}
    rep = ctl.report("r")["r"]
    assert rep["shadow_stale"] == 6 and rep["shadows"]["mirror"]["stale"] == 6
    assert ctl.status()["stale_shadow_results"] == {"r": 6}
    # a copy of the current generation counts, and feeds the guard (same target as the canary)
    if change == "remove_and_readd":
        new_gen = ctl.plan("r", "k2").generation
        d = ctl.record_shadow("r", "mirror", True, 0.01, _disagreeing(), new_gen)  # 4 rows = min_requests
        assert d is not None and d.action == "rollback" and "shadow disagreement" in d.reason
        assert st.shadows["mirror"].requests.count == 1


def test_weight_changes_keep_the_generation_and_an_unchanged_reload_keeps_it_too():
    ctl = _ctl()
    gen = ctl.plan("r", "k").generation
    ctl.set_weights("r", {"stable": 50, "candidate": 50})
    ctl.apply(parse_traffic_config(GUARDED))  # the same file again: the route keeps its state
    assert ctl.plan("r", "k").generation == gen
    ctl.record_shadow("r", "mirror", True, 0.01, _disagreeing(), gen)
    assert ctl.routes["r"].shadows["mirror"].requests.count == 1 and ctl.stale_shadow_results == {}


SHADOW_CFG = textwrap.dedent("""
    version: 1
    routes:
      r:
        policy: shadow
        variants: {primary: {model: p}}
        shadows: {s: {model: sh, fraction: 1.0}}
        shadow_queue_size: 64
""")
P_OUT = np.array([[0.1, 0.7, 0.2]], dtype=np.float32)


class Plane:
    """Answers every model with P_OUT; ``gate`` holds ``p`` while unset; ``delay_s`` per primary."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.delay_s = 0.0
        self.repository = SimpleNamespace(root="/nonexistent")

    async def infer_model(self, request: InferRequest) -> InferResponse:
        self.calls.append(request.model_name)
        if request.model_name == "p":
            await self.gate.wait()
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
        return InferResponse(request.model_name, "1", (Tensor("y", "FP32", P_OUT),))


def _router(text=SHADOW_CFG):
    plane = Plane()
    ctl = TrafficController()
    ctl.apply(parse_traffic_config(text))
    return TrafficRouter(plane, ctl, shadow_isolation="inline"), plane


def _req(i: int) -> InferRequest:
    return InferRequest("r", (Tensor("x", "FP32", np.full((1, 2), i, np.float32)),),
                        parameters={"routing_key": f"k{i}"})


def test_a_copy_queued_before_a_reload_is_discarded_as_stale_by_the_router():
    async def go():
        router, plane = _router()
        await router.infer(_req(0))  # queued, not dispatched yet
        router.apply(parse_traffic_config(SHADOW_CFG.replace("model: sh", "model: sh2")))
        await router.drain_shadows(timeout_s=10)
        assert plane.calls == ["p"]  # the stale copy did not even run
        st = router.controller.routes["r"].shadows["s"]
        assert st.requests.count == 0 and st.stale == 1 and router.controller.stale_shadow_results == {"r": 1}
        await router.infer(_req(1))
        await router.drain_shadows(timeout_s=10)
        assert plane.calls == ["p", "p", "sh2"] and st.requests.count == 1
        await router.stop()

    asyncio.run(go())


def test_a_worker_result_for_an_earlier_generation_is_stale():
    """_ResultTo carries the generation (before the fix it carried only route and shadow names)."""
    router, _ = _router()
    gen = router.controller.plan("r", "k").generation
    cb = _ResultTo(router, "r", "s", gen)
    router._outstanding["r"] = 2
    router.apply(parse_traffic_config(SHADOW_CFG.replace("model: sh", "model: sh2")))
    cb(ShadowResult(True, 0.002, divergence({"y": P_OUT}, {"y": P_OUT})))
    st = router.controller.routes["r"].shadows["s"]
    assert st.requests.count == 0 and st.stale == 1 and router._outstanding["r"] == 1
    _ResultTo(router, "r", "s", router.controller.plan("r", "k").generation)(ShadowResult(True, 0.002, None))
    assert st.requests.count == 1 and router._outstanding["r"] == 0


# --- (2) timeout_s in the config -----------------------------------------------------------------------


def test_shadow_timeout_is_a_validated_config_field():
    cfg = parse_traffic_config(SHADOW_CFG)
    assert cfg.routes["r"].shadows[0].timeout_s == DEFAULT_SHADOW_TIMEOUT_S == 10.0
    cfg = parse_traffic_config(SHADOW_CFG.replace("fraction: 1.0}", "fraction: 1.0, timeout_s: 0.25}"))
    s = cfg.routes["r"].shadows[0]
    assert s.timeout_s == 0.25
    body = route_to_dict(cfg.routes["r"])
    assert body["shadows"]["s"]["timeout_s"] == 0.25
    import yaml

    assert parse_route("r", yaml.safe_dump(body)).shadows[0].timeout_s == 0.25  # get-route / set-route
    for bad in ("0", "-1", "'x'", ".nan", "true"):
        with pytest.raises(TrafficConfigError, match=r"^<string>: routes\.r\.shadows\.s\.timeout_s: must be"):
            parse_traffic_config(SHADOW_CFG.replace("fraction: 1.0}", f"fraction: 1.0, timeout_s: {bad}}}"))


def test_inline_shadow_past_its_timeout_is_a_timeout_error(monkeypatch):
    async def go():
        router, plane = _router(SHADOW_CFG.replace("fraction: 1.0}", "fraction: 1.0, timeout_s: 0.05}"))
        hang = asyncio.Event()
        orig = plane.infer_model

        async def infer_model(request):
            if request.model_name == "sh":
                await hang.wait()  # never set: a hung shadow model
            return await orig(request)

        plane.infer_model = infer_model
        await router.infer(_req(0))
        await router.drain_shadows(timeout_s=5)
        st = router.controller.routes["r"].shadows["s"]
        assert st.requests.count == 1 and st.requests.errors == 1 and st.timeouts == 1
        assert 0.05 <= st.requests.latencies_s[0] < 2.0
        assert router.controller.report("r")["r"]["shadows"]["s"]["timeouts"] == 1
        await router.stop()

    asyncio.run(go())


# --- (3) steady load: copies reach an idle shadow ---------------------------------------------------------


def test_steady_load_does_not_drop_copies_while_the_shadow_is_idle(monkeypatch):
    """Overlapping requests keep one routed request running at every moment, so only the overdue
    slices run; each costs more than the slice budget here (SHADOW_SLICE_S = 0). Before the fix
    an overdue slice sent no copy past its budget: they waited, filled the queue (8) and were
    dropped although the shadow had nothing to do."""
    monkeypatch.setattr(traffic_mod, "SHADOW_SLICE_S", 0.0)
    monkeypatch.setattr(traffic_mod, "SHADOW_MAX_DEFER_S", 0.01)

    async def go():
        router, plane = _router(SHADOW_CFG.replace("shadow_queue_size: 64", "shadow_queue_size: 8"))
        plane.delay_s = 0.004
        n = 120
        tasks = []
        for i in range(n):  # a new request every 2 ms, each takes 4 ms: never a quiet moment
            tasks.append(asyncio.create_task(router.infer(_req(i))))
            await asyncio.sleep(0.002)
        await asyncio.gather(*tasks)
        await router.drain_shadows(timeout_s=10)
        st = router.controller.routes["r"].shadows["s"]
        assert st.dropped == 0, st.as_dict()
        assert st.requests.count == n and plane.calls.count("sh") == n
        await router.stop()

    asyncio.run(go())


# --- (4) interleave routes take no shadows -------------------------------------------------------------


def test_shadows_on_an_interleave_route_are_refused_with_the_field_named():
    text = textwrap.dedent("""
        version: 1
        routes:
          rank:
            policy: interleave
            variants: {a: {model: m1}, b: {model: m2}}
            shadows: {s: {model: m3}}
    """)
    with pytest.raises(TrafficConfigError, match=r"^<string>: routes\.rank\.shadows: an interleave route cannot "
                                                 r"have shadows"):
        parse_traffic_config(text)
    with pytest.raises(TrafficConfigError, match=r"routes\.rank\.shadows: an interleave route"):
        parse_route("rank", "policy: interleave\nvariants: {a: {model: m1}, b: {model: m2}}\n"
                            "shadows: {s: {model: m3}}\n")
    # an empty mapping is no shadow: still accepted
    parse_traffic_config(text.replace("shadows: {s: {model: m3}}", "shadows: {}"))
    # nor can a shadow target another route, an interleave one included (break-it finding 3)
    other = text.replace("shadows: {s: {model: m3}}", "") + textwrap.indent(textwrap.dedent("""
        r:
          policy: canary
          variants: {a: {model: m1}}
          shadows: {s: {route: rank}}
    """), "  ")
    with pytest.raises(TrafficConfigError, match=r"routes\.r\.shadows\.s\.route: a shadow must name a model, not a route"):
        parse_traffic_config(other)


# --- (5) worker death: lost and dropped, not errors with 0 s -------------------------------------------


def test_jobs_of_a_dead_worker_are_lost_and_copies_it_cannot_take_are_drops():
    async def go():
        router, _ = _router()
        proc = ShadowProcess("/nonexistent", on_data=lambda: None)
        gen = router.controller.plan("r", "k").generation
        pipes = SimpleNamespace(transport=SimpleNamespace(get_returncode=lambda: -9))
        proc._pipes, proc._stdin = pipes, object()  # a stand-in for a running worker
        router._outstanding["r"] = 4
        for _ in range(3):
            proc._pending[len(proc._pending) + 1] = _ResultTo(router, "r", "s", gen)
        proc._lost(pipes)  # it died (SIGKILL): the three results it owed are lost
        st = router.controller.routes["r"].shadows["s"]
        assert st.lost == 3 and st.requests.count == 0 and st.requests.errors == 0
        assert len(st.requests.latencies_s) == 0
        # restarting (back-off): a copy it cannot take is a drop, answered at once
        proc.submit("sh", "1", ("f", {}), _req(0), {"y": P_OUT}, _ResultTo(router, "r", "s", gen))
        assert st.dropped == 1 and st.requests.count == 0 and len(st.requests.latencies_s) == 0
        assert router._outstanding["r"] == 0
        rep = router.controller.report("r")["r"]["shadows"]["s"]
        assert (rep["lost"], rep["dropped"], rep["requests_errors"]) == (3, 1, 0)
        assert math.isnan(rep["requests_mean_s"]) and math.isnan(rep["requests_p99_s"])

    asyncio.run(go())


def test_a_shadow_error_before_it_ran_enters_no_latency():
    s = ShadowStats()
    s.record(False, None, None)
    s.record(True, 0.004, None)
    d = s.as_dict()
    assert (d["requests_count"], d["requests_errors"]) == (2, 1)
    assert d["requests_mean_s"] == pytest.approx(0.004) and d["requests_p50_s"] == pytest.approx(0.004)


def test_result_kinds_default_from_ok():
    assert ShadowResult(True, 0.1).kind == "ok" and ShadowResult(False, 0.1).kind == "error"
    assert ShadowResult(False, None, None, "x", "lost").kind == "lost"
    assert set(_shadow_process.KINDS) == {"ok", "error", "timeout", "lost", "unavailable"}


# --- (6) several outputs, exact integers -------------------------------------------------------------------


def test_several_outputs_are_measured_each_on_its_own():
    rng = np.random.default_rng(3)
    emb = rng.normal(size=(5, 16))
    emb_s = emb + rng.normal(scale=0.3, size=emb.shape)
    score = rng.normal(size=(5, 1))
    score_s = -score  # a 1-column output: cosine -1 on every row
    d = divergence({"embedding": emb, "score": score}, {"embedding": emb_s, "score": score_s})

    def cos(a, b):
        return float(np.mean([np.dot(x, y) / (np.linalg.norm(x) * np.linalg.norm(y)) for x, y in zip(a, b)]))

    per = d.per_output()
    assert per["embedding"].cosine == pytest.approx(cos(emb, emb_s), rel=1e-12)
    assert per["score"].cosine == pytest.approx(-1.0)
    assert per["score"].max_abs_diff == pytest.approx(float(np.abs(2 * score).max()))
    # the top-level figures are the first output's, not a pool of both outputs' rows (which gave
    # the mean of the two cosines before the fix)
    assert d.cosine == per["embedding"].cosine and d.max_abs_diff == per["embedding"].max_abs_diff
    stats = ShadowStats()
    stats.record(True, 0.001, d)
    stats.record(True, 0.001, divergence({"embedding": emb, "score": score}, {"embedding": emb, "score": score}))
    rep = stats.as_dict()
    assert rep["outputs"]["score"]["cosine_mean"] == pytest.approx(0.0)  # (-1 + 1) / 2
    assert rep["outputs"]["score"]["cosine_min"] == pytest.approx(-1.0)
    assert rep["outputs"]["embedding"]["cosine_mean"] == pytest.approx((cos(emb, emb_s) + 1) / 2)
    assert rep["cosine_mean"] == rep["outputs"]["embedding"]["cosine_mean"]


def test_integer_outputs_compare_exactly_beyond_2_53():
    big = 2**53
    p = np.array([[big, 7]], dtype=np.int64)
    s = np.array([[big + 1, 7]], dtype=np.int64)
    assert float(big) == float(big + 1)  # why the float64 cast lost it
    d = divergence({"ids": p}, {"ids": s})
    assert d.max_abs_diff == 1 and isinstance(d.max_abs_diff, int)
    extreme = divergence({"ids": np.array([[-2**63]], np.int64)}, {"ids": np.array([[2**63 - 1]], np.int64)})
    assert extreme.max_abs_diff == 2**64 - 1  # no int64 overflow
    u = divergence({"ids": np.array([[2**64 - 1]], np.uint64)}, {"ids": np.array([[0]], np.uint64)})
    assert u.max_abs_diff == 2**64 - 1
    assert divergence({"ids": p}, {"ids": p}).max_abs_diff == 0
    stats = ShadowStats()
    stats.record(True, 0.001, d)
    stats.record(True, 0.001, divergence({"ids": p}, {"ids": p}))
    assert stats.as_dict()["max_abs_diff"] == 1 and stats.as_dict()["outputs"]["ids"]["max_abs_diff"] == 1


# --- (2) the watchdog tells a hung worker from one starved of CPU --------------------------------------


@pytest.mark.parametrize("state, cpu_per_s, hung", [("S", 0.0, True), ("R", 0.9, True), ("R", 0.01, False)])
def test_the_watchdog_times_out_a_hung_job_but_not_a_worker_waiting_for_cpu(monkeypatch, state, cpu_per_s, hung):
    """Asleep (waiting on what never comes) or spinning on CPU past the timeout: hung, timed out.
    Runnable but getting (almost) no CPU -- SCHED_IDLE on a busy machine: starved, its clock restarts."""
    monkeypatch.setattr(_shadow_process, "STARVED_PROBE_S", 0.05)
    t0 = [None]

    def fake_stat(pid):
        import time

        if t0[0] is None:
            t0[0] = time.monotonic()
        return state, 100.0 + cpu_per_s * (time.monotonic() - t0[0])

    monkeypatch.setattr(_shadow_process, "_proc_stat", fake_stat)

    async def go():
        proc = ShadowProcess("/nonexistent", on_data=lambda: None)
        transport = SimpleNamespace(get_pid=lambda: 12345, get_returncode=lambda: None)
        proc._pipes, proc._stdin, proc._ready = SimpleNamespace(transport=transport), object(), True
        timed_out = []
        monkeypatch.setattr(proc, "_timed_out", lambda job, ran: timed_out.append((job, ran)))
        proc._pending[1] = lambda r: None
        proc._jobs[1] = ("m", "1", None, None, None, 0.1)
        import time

        proc._watch(time.monotonic())  # job 1 runs from now, timeout 0.1 s
        await asyncio.sleep(0.4)
        if hung:
            assert [j for j, _ in timed_out] == [1] and timed_out[0][1] >= 0.1 and proc.starved == 0
        else:
            assert timed_out == [] and proc.starved >= 1  # the clock restarted (each probe)
        if proc._watch_handle is not None:
            proc._watch_handle.cancel()

    asyncio.run(go())


def test_every_copy_is_accounted_for_once_under_load_and_reloads(monkeypatch):
    """Adversarial: 300 overlapping requests while the config flips the shadow's target every few
    requests; once drained, every mirrored copy was counted exactly once: ran, dropped or stale
    (summed over every generation's statistics), and only copies of the generation in force ran
    under it (the stand-in shadows answer with their own name's output, so a copy recorded under
    the wrong target would show a divergence)."""
    monkeypatch.setattr(traffic_mod, "SHADOW_MAX_DEFER_S", 0.005)

    async def go():
        router, plane = _router(SHADOW_CFG.replace("shadow_queue_size: 64", "shadow_queue_size: 8"))
        plane.delay_s = 0.001
        orig = plane.infer_model

        async def infer_model(request):
            resp = await orig(request)
            if request.model_name == "sh2":  # the other target answers differently
                return InferResponse(resp.model_name, "1", (Tensor("y", "FP32", np.roll(P_OUT, 1, axis=1)),))
            return resp

        plane.infer_model = infer_model
        states = {}
        tasks = []
        for i in range(300):
            if i % 25 == 0:
                target = "sh2" if (i // 25) % 2 else "sh"
                router.apply(parse_traffic_config(SHADOW_CFG.replace("shadow_queue_size: 64", "shadow_queue_size: 8")
                                                  .replace("model: sh", f"model: {target}")))
                st = router.controller.routes["r"]
                states[st.generation] = (st, target)
            tasks.append(asyncio.create_task(router.infer(_req(i))))
            if i % 3 == 0:
                await asyncio.sleep(0.0005)
        await asyncio.gather(*tasks)
        await router.drain_shadows(timeout_s=20)
        ran = dropped = lost = 0
        for st, target in states.values():
            s = st.shadows["s"]
            ran += s.requests.count
            dropped += s.dropped
            lost += s.lost
            if s.compared:  # the target in force answered: sh agrees with P_OUT, sh2 does not
                assert s.top1_agreement == (1.0 if target == "sh" else 0.0), (target, s.as_dict())
        stale = router.controller.stale_shadow_results.get("r", 0)
        assert ran + dropped + lost + stale == 300, (ran, dropped, lost, stale)
        assert lost == 0 and ran > 0 and router.shadows_outstanding == 0
        await router.stop()

    asyncio.run(go())
