"""The traffic controller: the routes in force, their policies and every experiment's statistics.

The server asks :meth:`TrafficController.plan` which variant answers a request (and which shadows
get a copy), reports back with :meth:`record` / :meth:`record_shadow`, and forwards the admin RPCs
(set weights, promote, rollback, feedback, report, status). Everything here runs on one thread (the
server's event loop); a weight change replaces a route's frozen config and its split in one
assignment, so it applies whole from the next request.

Pure: no grpc, no backends; the RNG and the clock are injectable.
"""

from __future__ import annotations

import math
import random
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Callable, Hashable, Sequence

from pyserve.traffic.ab import ABExperiment
from pyserve.traffic.canary import WeightedSplit
from pyserve.traffic.config import RouteConfig, ShadowConfig, TrafficConfig, TrafficConfigError, VariantConfig
from pyserve.traffic.guard import CanaryGuard, Decision
from pyserve.traffic.interleave import InterleaveStats, Interleaving, credit
from pyserve.traffic.shadow import Divergence, ShadowStats, should_mirror
from pyserve.traffic.stats import RequestStats

__all__ = ["Plan", "RouteState", "TrafficController", "UnknownRequest", "UnknownRoute", "FeedbackError"]

#: Requests remembered for feedback (A/B metric, interleaving clicks); the oldest are forgotten first.
DEFAULT_PENDING_CAPACITY = 100_000


class UnknownRoute(KeyError):
    """No route of that name."""

    def __str__(self) -> str:
        return str(self.args[0])


class UnknownRequest(KeyError):
    """Feedback for a request id the controller does not remember."""

    def __str__(self) -> str:
        return str(self.args[0])


class FeedbackError(ValueError):
    """Feedback that does not fit the request's route (a metric for an interleave route, ...)."""


@dataclass(frozen=True)
class Plan:
    """How to serve one request: the variant(s) and the shadows that get a copy.

    For an interleave route ``variants`` holds both rankers (A, B); otherwise the one variant.
    ``generation`` identifies the route's config in force when the plan was made (see
    :attr:`RouteState.generation`); shadow results are reported back with it.
    """

    route: RouteConfig
    variants: tuple[VariantConfig, ...]
    shadows: tuple[ShadowConfig, ...]
    key: str | None
    generation: int = 0

    @property
    def variant(self) -> VariantConfig:
        return self.variants[0]


@dataclass
class _Pending:
    route: str
    variant: str
    interleavings: tuple[Interleaving, ...] = ()


@dataclass
class RouteState:
    """A route in force: the config as the file gave it, the current config (weights after
    set-weights / the guard) with its split, and its statistics. ``generation``: a number unique
    within the controller, new each time the route's config is put in force afresh (a reload or
    set-route that changed it); weight changes keep it (they change no shadow)."""

    file_config: RouteConfig
    config: RouteConfig
    split: WeightedSplit | None
    variants: dict[str, RequestStats] = field(default_factory=dict)
    shadows: dict[str, ShadowStats] = field(default_factory=dict)
    ab: ABExperiment | None = None
    interleave: InterleaveStats | None = None
    guard: CanaryGuard | None = None
    weight_changes: int = 0
    generation: int = 0


def _split(cfg: RouteConfig) -> WeightedSplit | None:
    if cfg.policy == "interleave":
        return None
    return WeightedSplit(cfg.name, [(v.name, v.weight_percent) for v in cfg.variants])


class TrafficController:
    """Routes, policies and statistics (see the module docstring).

    Parameters
    ----------
    config : the traffic config in force (None: no routes).
    rng : ``random.Random``-like; used for requests without a routing key. Default: a new Random.
    clock : monotonic seconds for the guards' windows (default ``time.monotonic``).
    wall_clock : epoch seconds stamped on decisions (default ``time.time``).
    pending_capacity : how many requests are remembered for feedback.
    on_decision : called with every guard decision (logging, metrics).
    """

    def __init__(self, config: TrafficConfig | None = None, *, rng: random.Random | None = None,
                 clock: Callable[[], float] = time.monotonic, wall_clock: Callable[[], float] = time.time,
                 pending_capacity: int = DEFAULT_PENDING_CAPACITY,
                 on_decision: Callable[[Decision], None] | None = None) -> None:
        if pending_capacity < 1:
            raise ValueError(f"pending_capacity must be >= 1, got {pending_capacity}")
        self.rng = rng or random.Random()
        self.clock, self.wall_clock = clock, wall_clock
        self.on_decision = on_decision
        self.pending_capacity = pending_capacity
        self._pending: OrderedDict[str, _Pending] = OrderedDict()
        self.routes: dict[str, RouteState] = {}
        self.config = TrafficConfig()
        self.unknown_feedback = 0
        #: shadow results discarded because the route's config changed after they were mirrored
        #: (per route name; also counted in the new config's ShadowStats.stale when it has the shadow)
        self.stale_shadow_results: dict[str, int] = {}
        self._generations = 0
        self.decisions: list[Decision] = []
        if config is not None:
            self.apply(config)

    # --- config ------------------------------------------------------------------------------------

    def apply(self, config: TrafficConfig) -> None:
        """Put ``config`` in force (already checked). A route whose file config did not change keeps
        its state (weights set since, guard, statistics); other routes start afresh."""
        routes: dict[str, RouteState] = {}
        for name, rc in config.routes.items():
            old = self.routes.get(name)
            routes[name] = old if old is not None and old.file_config == rc else self._new_state(rc)
        self.routes = routes  # one assignment: a request sees the old routes or the new ones
        self.config = config

    def _new_state(self, rc: RouteConfig) -> RouteState:
        self._generations += 1
        st = RouteState(rc, rc, _split(rc), generation=self._generations)
        st.variants = {v.name: RequestStats() for v in rc.variants}
        st.shadows = {s.name: ShadowStats() for s in rc.shadows}
        if rc.policy == "ab":
            st.ab = ABExperiment([v.name for v in rc.variants])
        if rc.policy == "interleave":
            st.interleave = InterleaveStats()
        if rc.guard is not None:
            st.guard = CanaryGuard(rc.name, rc.guard, self.clock, self.wall_clock,
                                   start_percent=rc.variant(rc.guard.canary).weight_percent)
            self._note(st.guard.decisions[-1])
        return st

    def state(self, route: str) -> RouteState:
        st = self.routes.get(route)
        if st is None:
            known = ", ".join(self.routes) or "none"
            raise UnknownRoute(f"unknown route {route!r}; routes: {known}")
        return st

    def has_route(self, name: str) -> bool:
        return name in self.routes

    def set_route(self, rc: RouteConfig, source: str = "set-route") -> None:
        """Add or replace one route (an admin RPC); the rest of the config stays. ``rc`` must have
        been parsed (checked) already; route references are checked again here."""
        routes = dict(self.config.routes)
        routes[rc.name] = rc
        from pyserve.traffic.config import _check_route_refs

        _check_route_refs(source, routes)
        self.apply(replace(self.config, routes=routes))

    # --- the request path --------------------------------------------------------------------------

    def plan(self, route: str, key: str | None) -> Plan:
        """The variant(s) and shadows for one request with routing ``key`` (None: random)."""
        st = self.state(route)
        cfg, split = st.config, st.split
        if split is None:
            variants = cfg.variants
        else:
            variants = (cfg.variant(split.choose(key, self.rng)),)
        shadows = tuple(s for s in cfg.shadows if should_mirror(cfg.name, s.name, s.fraction, key, self.rng))
        return Plan(cfg, variants, shadows, key, st.generation)

    def record(self, route: str, variant: str, ok: bool, latency_s: float) -> Decision | None:
        """A routed request finished on ``variant``; returns a guard decision it triggered, if any."""
        st = self.routes.get(route)
        if st is None or variant not in st.variants:
            return None  # the route changed while the request ran
        st.variants[variant].add(ok, latency_s)
        if st.ab is not None:
            st.ab.record_request(variant, ok, latency_s)
        if st.guard is not None:
            return self._guarded(st, st.guard.observe(variant == st.guard.config.canary, ok, latency_s))
        return None

    def shadow_current(self, route: str, shadow: str, generation: int | None) -> bool:
        """Whether a copy mirrored under ``generation`` of ``route`` to ``shadow`` still belongs to the
        config in force (None: not checked, always True while the route has the shadow)."""
        st = self.routes.get(route)
        if st is None or shadow not in st.shadows:
            return False
        return generation is None or generation == st.generation

    def stale_shadow(self, route: str, shadow: str) -> None:
        """Count one shadow result discarded because the route's config changed since it was mirrored."""
        self.stale_shadow_results[route] = self.stale_shadow_results.get(route, 0) + 1
        st = self.routes.get(route)
        if st is not None and shadow in st.shadows:
            st.shadows[shadow].stale += 1

    def record_shadow(self, route: str, shadow: str, ok: bool, latency_s: float | None, div: Divergence | None,
                      generation: int | None = None, *, timeout: bool = False) -> Decision | None:
        """A mirrored copy finished. ``generation``: the :attr:`Plan.generation` it was mirrored under;
        when the route's config has changed since (a reload or set-route that retargeted, removed or
        re-added the shadow, or changed the route otherwise), the result is stale: it is counted
        (:meth:`stale_shadow`) and discarded -- never recorded under the new config, never shown to
        its guard. ``latency_s`` None: failed before it ran. ``timeout``: the error was the shadow's
        ``timeout_s`` running out. Returns a guard decision it triggered, if any."""
        st = self.routes.get(route)
        if not self.shadow_current(route, shadow, generation):
            self.stale_shadow(route, shadow)
            return None
        st.shadows[shadow].record(ok, latency_s, div, timeout=timeout)
        g = st.guard
        if g is not None and ok and div is not None and div.top1_agreement is not None:
            canary_target = st.config.variant(g.config.canary).target
            shadow_target = next(s.target for s in st.config.shadows if s.name == shadow)
            if shadow_target == canary_target:
                agree = round(div.top1_agreement * div.rows)
                return self._guarded(st, g.observe_shadow(agree, div.rows))
        return None

    def lose_shadow(self, route: str, shadow: str, generation: int | None = None) -> None:
        """A copy sent to the shadow worker process whose result was lost (the worker died)."""
        if not self.shadow_current(route, shadow, generation):
            self.stale_shadow(route, shadow)
            return
        self.routes[route].shadows[shadow].lost += 1

    def drop_shadow(self, route: str, shadow: str, generation: int | None = None) -> None:
        """A copy not run (queue full, or the shadow worker could not take it)."""
        if not self.shadow_current(route, shadow, generation):
            self.stale_shadow(route, shadow)
            return
        self.routes[route].shadows[shadow].drop()

    def record_interleaving(self, route: str) -> None:
        st = self.routes.get(route)
        if st is not None and st.interleave is not None:
            st.interleave.impressions += 1

    def tick(self) -> list[Decision]:
        """Evaluate every guard on the clock (closes windows when no request arrives)."""
        out = []
        for st in self.routes.values():
            if st.guard is not None:
                d = self._guarded(st, st.guard.evaluate())
                if d is not None:
                    out.append(d)
        return out

    def _guarded(self, st: RouteState, d: Decision | None) -> Decision | None:
        if d is None:
            return None
        self._note(d)
        if d.from_percent != d.to_percent:
            self._set_canary_percent(st, d.to_percent)
        return d

    def _note(self, d: Decision) -> None:
        self.decisions.append(d)
        if len(self.decisions) > 10_000:
            del self.decisions[:1000]
        if self.on_decision is not None:
            self.on_decision(d)

    def _set_canary_percent(self, st: RouteState, percent: float) -> None:
        canary = st.guard.config.canary
        weights = {v.name: (percent if v.name == canary else 100.0 - percent) for v in st.config.variants}
        self._set_weights(st, weights)

    def _set_weights(self, st: RouteState, weights: dict[str, float]) -> None:
        cfg = st.config.with_weights(weights)
        st.config, st.split = cfg, _split(cfg)  # the next request uses the new split
        st.weight_changes += 1

    # --- feedback ------------------------------------------------------------------------------------

    def remember(self, request_id: str, route: str, variant: str,
                 interleavings: Sequence[Interleaving] = ()) -> None:
        """Keep a routed request for feedback (the oldest is forgotten beyond ``pending_capacity``)."""
        self._pending[request_id] = _Pending(route, variant, tuple(interleavings))
        self._pending.move_to_end(request_id)
        while len(self._pending) > self.pending_capacity:
            self._pending.popitem(last=False)

    def feedback(self, request_id: str, *, metric: float | None = None,
                 clicked: Sequence[Hashable] = (), row: int = 0) -> dict:
        """Feedback on one earlier request: the business ``metric`` (A/B) or the ``clicked`` items
        (interleaving, of batch row ``row``). Each request takes one feedback.

        Raises UnknownRequest (counted in :attr:`unknown_feedback`) for an id not remembered, and
        FeedbackError for feedback that does not fit the route.
        """
        p = self._pending.get(request_id)
        st = self.routes.get(p.route) if p is not None else None
        if p is None or st is None:
            self.unknown_feedback += 1
            raise UnknownRequest(f"no routed request with id {request_id!r} is awaiting feedback "
                                 "(unknown, already answered, or forgotten)")
        if st.interleave is not None:
            if metric is not None:
                raise FeedbackError(f"route {p.route!r} interleaves: send the clicked items, not a metric")
            if not 0 <= row < len(p.interleavings):
                raise FeedbackError(f"row {row} out of range: request {request_id!r} had {len(p.interleavings)} row(s)")
            outcome = credit(p.interleavings[row], clicked)
            st.interleave.record(outcome)
            del self._pending[request_id]
            return {"route": p.route, "variant": p.variant, "outcome": {1: "win", 0: "tie", -1: "loss"}[outcome]}
        if metric is None or (isinstance(metric, float) and not math.isfinite(metric)):
            raise FeedbackError(f"route {p.route!r}: feedback needs a finite metric value, got {metric!r}")
        if clicked:
            raise FeedbackError(f"route {p.route!r} does not interleave: clicks are not accepted")
        if st.ab is None:
            raise FeedbackError(f"route {p.route!r} has policy {st.config.policy!r}: metrics are for A/B routes")
        st.ab.record_metric(p.variant, float(metric))
        del self._pending[request_id]
        return {"route": p.route, "variant": p.variant}

    # --- admin ------------------------------------------------------------------------------------

    def set_weights(self, route: str, weights: dict[str, float]) -> RouteConfig:
        """Set a route's weights (every variant, summing to 100); TrafficConfigError naming the field.
        A guarded route logs it as a manual decision and the guard follows the new canary weight."""
        st = self.state(route)
        old = st.config.weights
        self._set_weights(st, weights)
        if st.guard is not None:
            g = st.guard
            new_pct = st.config.variant(g.config.canary).weight_percent
            d = Decision(self.wall_clock(), route, "manual_weights", old[g.config.canary], new_pct,
                         "weights set by an operator")
            g.percent = new_pct
            g.decisions.append(d)
            self._note(d)
        return st.config

    def promote(self, route: str) -> Decision:
        """Guarded route: the next step. Unguarded canary with two variants: all traffic to the
        second variant. Raises TrafficConfigError for other routes."""
        st = self.state(route)
        if st.guard is not None:
            return self._guarded(st, st.guard.promote())
        cfg = st.config
        if cfg.policy == "interleave" or len(cfg.variants) != 2:
            raise TrafficConfigError("promote", f"routes.{route}", "promote needs a guard, or a route with two "
                                     "weighted variants (the second is promoted to 100%)")
        old = cfg.variants[1].weight_percent
        self._set_weights(st, {cfg.variants[0].name: 0.0, cfg.variants[1].name: 100.0})
        d = Decision(self.wall_clock(), route, "manual_promote", old, 100.0, f"{cfg.variants[1].name} to 100%")
        self._note(d)
        return d

    def rollback(self, route: str, reason: str = "rolled back by an operator") -> Decision:
        """Guarded route: canary to 0% (state rolled_back). Unguarded two-variant route: all to the first."""
        st = self.state(route)
        if st.guard is not None:
            return self._guarded(st, st.guard.rollback(reason))
        cfg = st.config
        if cfg.policy == "interleave" or len(cfg.variants) != 2:
            raise TrafficConfigError("rollback", f"routes.{route}", "rollback needs a guard, or a route with two "
                                     "weighted variants (the first gets 100%)")
        old = cfg.variants[1].weight_percent
        self._set_weights(st, {cfg.variants[0].name: 100.0, cfg.variants[1].name: 0.0})
        d = Decision(self.wall_clock(), route, "manual_rollback", old, 0.0, reason)
        self._note(d)
        return d

    def report(self, route: str | None = None) -> dict:
        """Per route: variants (weight, target, requests), A/B arms with CIs and tests, shadows with
        divergence, interleaving wins/ties/losses with the sign test, guard state."""
        names = [route] if route else list(self.routes)
        out = {}
        for name in names:
            st = self.state(name)
            cfg = st.config
            r: dict = {"policy": cfg.policy,
                       "variants": {v.name: {"target": v.target.label, "weight_percent": v.weight_percent,
                                             **st.variants[v.name].as_dict()} for v in cfg.variants}}
            if st.ab is not None:
                r["ab"] = [a.as_dict() for a in st.ab.report()]
            if st.shadows:
                r["shadows"] = {s.name: {"target": s.target.label, "fraction": s.fraction, "timeout_s": s.timeout_s,
                                         **st.shadows[s.name].as_dict()} for s in cfg.shadows}
                r["shadow_stale"] = self.stale_shadow_results.get(name, 0)
            if st.interleave is not None:
                r["interleave"] = {"a": cfg.variants[0].name, "b": cfg.variants[1].name, **st.interleave.as_dict()}
            if st.guard is not None:
                r["guard"] = st.guard.as_dict()
            out[name] = r
        return out

    def status(self) -> dict:
        """Revision, routes with their current weights and guard state, recent decisions."""
        return {
            "revision": self.config.revision,
            "source": self.config.source,
            "unknown_feedback": self.unknown_feedback,
            "stale_shadow_results": dict(self.stale_shadow_results),
            "routes": {n: {"policy": st.config.policy, "weights": st.config.weights,
                           "shadows": {s.name: s.fraction for s in st.config.shadows},
                           "guard": st.guard.as_dict() if st.guard is not None else None}
                       for n, st in self.routes.items()},
            "decisions": [d.as_dict() for d in self.decisions[-50:]],
        }
