"""The traffic controller in the request path: routes a ModelInfer on a route name to its variants.

The data plane hands a request whose ``model_name`` is a route to :class:`TrafficRouter`; a model
name with no route is served as before. The router asks the pure controller
(:class:`pyserve.traffic.TrafficController`) for a plan, runs the chosen variant through the data
plane (:meth:`DataPlane.infer_model`), adds the response parameter ``pyserve_variant`` (and
``pyserve_request_id``, the id to send feedback for), and puts shadow work on a bounded per-route
queue drained off the request path: the primary answer never waits for a shadow, and when the
queue is full the shadow copy is dropped and counted (as is a copy the shadow worker process cannot
take while it restarts); a copy mirrored under an earlier config of the route is discarded as stale
(counted); a shadow running past its ``timeout_s`` is an error of kind timeout. The request path only counts and queues the
copy; sending it on (to the worker process, or to the route's in-process shadow task) and handling
results run in short slices of the event loop when no routed request is running (see "shadows"
below: ``SHADOW_YIELDS``, ``SHADOW_SLICE_S``, ``SHADOW_MAX_DEFER_S``). With ``shadow_isolation="process"``
(the default) a shadow on a repository model runs in a worker process at the lowest CPU priority
(:mod:`pyserve.server._shadow_process`), so a CPU-heavy shadow takes only CPU time the primary does
not want; ``"inline"`` runs shadows in the server process (as before; also used for shadows on
routes and for backends the worker cannot import).

Routing key (sticky assignment), first found: the request parameter ``routing_key``, the gRPC
metadata ``x-routing-key``, the request ``id``; else none (a random draw per request).

Interleave routes run both variants on the request and answer two outputs instead of the
variants' own: ``interleaved`` (INT64 ``[N, L]``, item ids, best first; -1 pads short rows) and
``interleaved_team`` (INT8 ``[N, L]``: 0 = the route's first variant contributed the item, 1 = the
second, -1 pad). A variant's first output is its ranking: float scores ``[N, C]`` over candidates
0..C-1 (ranked by descending score) or integer ids ``[N, L]`` already ranked.

Hot reload: with a config file, :meth:`TrafficRouter.start` polls it every ``poll_s`` seconds
(mtime, size and inode, so a Kubernetes ConfigMap's symlink swap is seen); a changed file is parsed
and checked against the repository as a whole, then put in force in one step; an invalid one is
refused, logged and counted, and the previous config stays in force.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections import deque
from dataclasses import replace
from pathlib import Path
import numpy as np

from pyserve.protocol.errors import FailedPrecondition, InvalidArgument, NotFound, ServingError
from pyserve.protocol.types import InferRequest, InferResponse, Tensor
from pyserve.traffic import (
    Decision,
    Plan,
    TargetConfig,
    TrafficConfig,
    TrafficConfigError,
    TrafficController,
    divergence,
    load_traffic_config,
    output_arrays,
    team_draft,
)

__all__ = ["TrafficRouter", "ROUTING_KEY_PARAM", "ROUTING_KEY_METADATA", "VARIANT_PARAM", "REQUEST_ID_PARAM"]

log = logging.getLogger("pyserve.traffic")

ROUTING_KEY_PARAM = "routing_key"
ROUTING_KEY_METADATA = "x-routing-key"
VARIANT_PARAM = "pyserve_variant"
REQUEST_ID_PARAM = "pyserve_request_id"
#: Route references are followed at most this deep (the config refuses cycles; this is a backstop).
MAX_ROUTE_DEPTH = 8
#: Concurrent shadow executions per route.
SHADOW_WORKERS = 1
#: Event-loop turns let pass after the last routed request finished before shadow work runs (its
#: response is still being serialized and sent on this loop).
SHADOW_YIELDS = 3
#: Longest slice of shadow work on the event loop, seconds.
SHADOW_SLICE_S = 0.0002
#: Longest slice of an overdue slice (one that runs while routed requests do), seconds.
SHADOW_OVERDUE_SLICE_S = 0.002
#: Shadow work waits for a moment with no routed request running at most this long, seconds.
SHADOW_MAX_DEFER_S = 0.02
#: Where shadows run: ``process`` (a worker process at low CPU priority) or ``inline`` (this process).
SHADOW_ISOLATIONS = ("process", "inline")


def routing_key(request: InferRequest, metadata_key: str | None) -> str | None:
    """The request's routing key (see the module docstring), or None."""
    v = request.parameters.get(ROUTING_KEY_PARAM)
    if v is not None and not isinstance(v, bool) and str(v) != "":
        return str(v)
    if metadata_key:
        return metadata_key
    return request.id or None


class TrafficMetrics:
    """The traffic series on the server's Prometheus registry (docs/traffic.md lists them)."""

    def __init__(self, registry) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        from pyserve.server.metrics import DURATION_BUCKETS_S

        r = registry
        self.requests = Counter("pyserve_traffic_requests", "Routed requests by route, variant and outcome",
                                ("route", "variant", "outcome"), registry=r)
        self.duration = Histogram("pyserve_traffic_request_duration_seconds", "Routed request duration",
                                  ("route", "variant"), buckets=DURATION_BUCKETS_S, registry=r)
        self.weight = Gauge("pyserve_traffic_variant_weight_percent", "Current weight of a variant",
                            ("route", "variant"), registry=r)
        self.shadow_requests = Counter("pyserve_traffic_shadow_requests",
                                       "Mirrored requests that ran, by outcome (ok, error, timeout)",
                                       ("route", "shadow", "outcome"), registry=r)
        self.shadow_dropped = Counter("pyserve_traffic_shadow_dropped",
                                      "Shadow copies not run (queue full, or the shadow worker process down)",
                                      ("route", "shadow"), registry=r)
        self.shadow_lost = Counter("pyserve_traffic_shadow_lost",
                                   "Shadow copies whose result was lost when the shadow worker process died",
                                   ("route", "shadow"), registry=r)
        self.shadow_stale = Counter("pyserve_traffic_shadow_stale",
                                    "Shadow results discarded: mirrored under an earlier config of the route",
                                    ("route",), registry=r)
        self.shadow_duration = Histogram("pyserve_traffic_shadow_duration_seconds", "Shadow request duration",
                                         ("route", "shadow"), buckets=DURATION_BUCKETS_S, registry=r)
        self.shadow_top1 = Gauge("pyserve_traffic_shadow_top1_agreement",
                                 "Top-1 agreement of a shadow with the primary (all compared rows)",
                                 ("route", "shadow"), registry=r)
        self.shadow_max_abs = Gauge("pyserve_traffic_shadow_max_abs_diff", "Largest |primary - shadow| seen",
                                    ("route", "shadow"), registry=r)
        self.shadow_cosine = Gauge("pyserve_traffic_shadow_cosine_mean", "Mean cosine similarity to the primary",
                                   ("route", "shadow"), registry=r)
        self.decisions = Counter("pyserve_traffic_guard_decisions", "SLO guard decisions by action",
                                 ("route", "action"), registry=r)
        self.reloads = Counter("pyserve_traffic_config_reloads", "Traffic config loads by result (applied, refused)",
                               ("result",), registry=r)
        self.feedback = Counter("pyserve_traffic_feedback", "Feedback calls by result (ok, unknown_id, invalid)",
                                ("result",), registry=r)
        self.interleave = Counter("pyserve_traffic_interleave_outcomes", "Interleaving outcomes (win = first variant)",
                                  ("route", "outcome"), registry=r)


class TrafficRouter:
    """Routes requests on route names (see the module docstring).

    Parameters
    ----------
    dataplane : the server's :class:`~pyserve.server.dataplane.DataPlane` (runs the variants).
    controller : the pure controller holding routes and statistics (default: an empty one).
    config_path : the traffic config file to watch (None: routes only through the admin RPCs).
    poll_s : seconds between checks of the file.
    registry : a prometheus_client registry to add the traffic series to, or None.
    shadow_isolation : ``"process"`` (default) or ``"inline"``: where shadows on repository models run
        (see the module docstring and docs/traffic.md).
    shadow_priority : the worker process's CPU priority, ``"idle"`` (SCHED_IDLE, default), ``"nice"``
        (nice 19) or ``"normal"``; only with ``shadow_isolation="process"``.

    Raises ValueError naming the argument for a bad ``poll_s``, ``shadow_isolation`` or ``shadow_priority``.
    """

    def __init__(self, dataplane, controller: TrafficController | None = None, *,
                 config_path: str | os.PathLike | None = None, poll_s: float = 2.0, registry=None,
                 shadow_isolation: str = "process", shadow_priority: str = "idle") -> None:
        from pyserve.server._shadow_process import PRIORITIES, ShadowProcess

        if poll_s <= 0:
            raise ValueError(f"poll_s must be > 0, got {poll_s}")
        if shadow_isolation not in SHADOW_ISOLATIONS:
            raise ValueError(f"shadow_isolation must be one of {', '.join(SHADOW_ISOLATIONS)}, "
                             f"got {shadow_isolation!r}")
        if shadow_priority not in PRIORITIES:
            raise ValueError(f"shadow_priority must be one of {', '.join(PRIORITIES)}, got {shadow_priority!r}")
        self.shadow_isolation = shadow_isolation
        self.shadow_process = (ShadowProcess(dataplane.repository.root, priority=shadow_priority,
                                             on_data=self._on_shadow_data)
                               if shadow_isolation == "process" else None)
        self._inline_backends: set[str] = set()
        self._missing: dict[tuple[str, str, str], str] = {}
        self.dataplane = dataplane
        self.controller = controller or TrafficController()
        self.controller.on_decision = self._on_decision
        self.config_path = Path(config_path) if config_path is not None else None
        self.poll_s = float(poll_s)
        self.metrics = TrafficMetrics(registry) if registry is not None else None
        self.reloads_applied = 0
        self.reloads_refused = 0
        self.last_reload_error = ""
        self._file_sig: tuple | None = None
        self._empty_sig: tuple | None = None  # an empty file seen once (maybe mid-write)
        self._inflight = 0  # routed requests running now
        self._mirrors: deque = deque()  # mirrored copies not dispatched yet
        self._outstanding: dict[str, int] = {}  # route -> mirrored copies accepted and not finished
        self._slice_handle: asyncio.Handle | None = None
        self._overdue_handle: asyncio.TimerHandle | None = None
        self._inline_queues: dict[str, asyncio.Queue] = {}
        self._drained: asyncio.Event | None = None  # set when no copy is outstanding (drain_shadows)
        self._route_workers: dict[str, list[asyncio.Task]] = {}
        self._tasks: list[asyncio.Task] = []
        self._running = False

    # --- config ------------------------------------------------------------------------------------

    def model_exists(self, model: str, version: str) -> str | None:
        """None if the repository has ``model`` (and serves ``version``, once it has loaded), else why not."""
        repo = self.dataplane.repository
        try:
            repo.discover()
        except ValueError as exc:
            return str(exc)
        try:
            repo.get(model, version)  # NotFound for an unknown model, or a version it does not serve
        except NotFound as exc:
            return str(exc)
        # A model that failed to load exists here; check_config refuses it as a variant (load_failure)
        # and only warns for a shadow.
        return None

    def load_failure(self, model: str, version: str) -> str | None:
        """Why ``model``'s last load failed (it serves nothing), or None: it serves, is loading, or
        was never asked to load (explicit mode) or unloaded on purpose."""
        m = self.dataplane.repository._models.get(model)  # noqa: SLF001 - read-only look at the state
        if m is None or m.versions or m.state.value != "UNAVAILABLE":
            return None
        if m.reason in ("", "not loaded", "unloaded", "removed from the repository"):
            return None
        return m.reason

    def inputs_of(self, model: str, version: str) -> list[tuple[str, str, tuple]] | None:
        """``model``'s inputs as ``(name, datatype, shape)``, or None when it does not serve."""
        m = self.dataplane.repository._models.get(model)  # noqa: SLF001
        if m is None or not m.ready:
            return None
        try:
            sig = m.pick(version).backend.signature
        except ServingError:
            return None
        return [(t.name, t.datatype, tuple(t.shape)) for t in sig.inputs]

    def check_config(self, cfg: TrafficConfig) -> None:
        """Check a parsed config against the repository: every model target exists (and serves the
        named version), no variant's model failed to load, and a route's variants take the same
        inputs (TrafficConfigError naming the field); shadows with a failed model or other inputs
        are only logged (WARNING)."""
        cfg.check_targets(self.model_exists)
        cfg.check_loaded(self.load_failure, warn=log.warning)
        cfg.check_inputs(self.inputs_of, warn=log.warning)

    def load_file(self) -> TrafficConfig:
        """Read and check the config file (TrafficConfigError naming the file and field)."""
        if self.config_path is None:
            raise ValueError("no traffic config file")
        self._file_sig = self._signature()
        cfg = load_traffic_config(self.config_path)
        self.check_config(cfg)
        return cfg

    def apply(self, cfg: TrafficConfig) -> None:
        self.controller.apply(cfg)
        self._publish_weights()
        self.drop_stale_shadows()
        log.info("traffic config %s revision %r in force: %d route(s)", cfg.source, cfg.revision, len(cfg.routes))

    def drop_stale_shadows(self) -> None:
        """After a config change (reload or SetRoute): copies queued for the shadow worker whose route
        config changed end unrun, counted stale; a stale copy the worker is running is cut short (the
        worker restarts), so that a removed or retargeted shadow -- a hung one, say -- frees it at once."""
        if self.shadow_process is not None:
            self.shadow_process.drop_stale()

    def _signature(self) -> tuple | None:
        try:
            st = os.stat(self.config_path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def poll_once(self) -> bool | None:
        """Reload if the file changed: True applied, False refused (previous kept), None unchanged
        (or caught in the middle of a write: see below).

        A file being rewritten in place (truncated, then written) can be read half-written. So an
        empty file is taken only when a second poll finds it still empty, and an invalid one is not
        refused when the file changed while it was read: the next poll reads it again. (A
        Kubernetes ConfigMap swaps a symlink: it is never seen half-written.)"""
        if self.config_path is None:
            return None
        sig = self._signature()
        if sig == self._file_sig:
            return None
        if sig is not None and sig[1] == 0 and sig != self._empty_sig:
            self._empty_sig = sig  # empty: maybe truncated by a writer; judged at the next poll
            return None
        self._empty_sig = None
        try:
            cfg = self.load_file()
        except TrafficConfigError as exc:
            if self._signature() != self._file_sig:
                self._file_sig = None  # changed while it was read: read it again at the next poll
                log.info("traffic config changed while it was read; reading it again: %s", exc)
                return None
            self.reloads_refused += 1
            self.last_reload_error = str(exc)
            if self.metrics:
                self.metrics.reloads.labels("refused").inc()
            log.error("traffic config refused, the previous one stays in force: %s", exc)
            return False
        self.apply(cfg)
        self.reloads_applied += 1
        self.last_reload_error = ""
        if self.metrics:
            self.metrics.reloads.labels("applied").inc()
        return True

    # --- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        self._running = True
        loop = asyncio.get_running_loop()
        if self.config_path is not None:
            self._tasks.append(loop.create_task(self._watch(), name="pyserve-traffic-watch"))
        self._tasks.append(loop.create_task(self._tick(), name="pyserve-traffic-guard"))

    async def stop(self) -> None:
        self._running = False
        workers = [w for ws in self._route_workers.values() for w in ws]
        for t in self._tasks + workers:
            t.cancel()
        await asyncio.gather(*self._tasks, *workers, return_exceptions=True)
        self._tasks, self._route_workers = [], {}
        self._inline_queues.clear()
        for h in (self._slice_handle, self._overdue_handle):
            if h is not None:
                h.cancel()
        self._slice_handle = self._overdue_handle = None
        if self.shadow_process is not None:
            await self.shadow_process.stop()

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                self.poll_once()
            except Exception:
                log.exception("traffic config watch failed")

    async def _tick(self) -> None:
        n = 0
        while True:
            await asyncio.sleep(0.25)
            try:
                self.controller.tick()
            except Exception:
                log.exception("traffic guard evaluation failed")
            n += 1
            if n % 4 == 0:
                try:
                    self.check_models()
                except Exception:
                    log.exception("traffic model check failed")

    def check_models(self) -> list[str]:
        """Log (WARNING) each route target whose model has left the repository (poll mode deletes a
        model directory; explicit mode unloads it) or stopped serving, once per change, and (INFO)
        when it serves again. Returns the messages logged now (tests). Runs every second."""
        repo = self.dataplane.repository
        now: dict[tuple[str, str, str], str] = {}
        for name, st in self.controller.routes.items():
            for kind, items in (("variants", st.config.variants), ("shadows", st.config.shadows)):
                for item in items:
                    t = item.target
                    if t.model is None:
                        continue
                    m = repo._models.get(t.model)  # noqa: SLF001 - read-only look at the state
                    if m is None:
                        why = "is no longer in the repository (its directory was removed)"
                    elif not m.ready and repo.loaded and m.state.value == "UNAVAILABLE":
                        why = f"does not serve: {m.reason or 'unavailable'}"
                    else:
                        continue
                    now[(name, kind, item.name)] = f"model {t.model!r} {why}"
        out = []
        for (route, kind, item), why in now.items():
            if self._missing.get((route, kind, item)) != why:
                effect = ("its share of the route's requests fails" if kind == "variants"
                          else "every mirrored request to it fails (counted)")
                msg = f"traffic route {route!r}: routes.{route}.{kind}.{item}.model: {why}; {effect}"
                log.warning("%s", msg)
                out.append(msg)
        for key in self._missing.keys() - now.keys():
            route, kind, item = key
            if route in self.controller.routes:
                msg = f"traffic route {route!r}: routes.{route}.{kind}.{item}.model serves again"
                log.info("%s", msg)
                out.append(msg)
        self._missing = now
        return out

    def _on_decision(self, d: Decision) -> None:
        (log.warning if "rollback" in d.action else log.info)(
            "traffic route %r: %s %g%% -> %g%%: %s", d.route, d.action, d.from_percent, d.to_percent, d.reason)
        if self.metrics:
            self.metrics.decisions.labels(d.route, d.action).inc()
        self._publish_weights()

    def _publish_weights(self) -> None:
        if not self.metrics:
            return
        for name, st in self.controller.routes.items():
            for v in st.config.variants:
                self.metrics.weight.labels(name, v.name).set(v.weight_percent)

    # --- the request path --------------------------------------------------------------------------

    def has_route(self, name: str) -> bool:
        return self.controller.has_route(name)

    def resolve_model(self, name: str, depth: int = 0) -> str:
        """The repository model behind a route's first variant (ModelMetadata/ModelReady on a route)."""
        if not self.has_route(name) or depth > MAX_ROUTE_DEPTH:
            return name
        t = self.controller.routes[name].config.variants[0].target
        return self.resolve_model(t.route, depth + 1) if t.route is not None else t.model

    async def infer(self, request: InferRequest, metadata_key: str | None = None) -> InferResponse:
        if request.model_version:
            raise InvalidArgument(f"{request.model_name!r} is a traffic route: it picks the model version itself; "
                                  f"send no model_version (got {request.model_version!r})")
        key = routing_key(request, metadata_key)
        self._inflight += 1
        try:
            return await self._route(request.model_name, request, key, 0)
        finally:
            self._inflight -= 1
            if self._inflight == 0 and (self._mirrors or self._overdue_handle is not None):
                self._shadow_work()

    async def _route(self, route: str, request: InferRequest, key: str | None, depth: int) -> InferResponse:
        if depth > MAX_ROUTE_DEPTH:
            raise FailedPrecondition(f"route {route!r}: route references nest deeper than {MAX_ROUTE_DEPTH}")
        plan = self.controller.plan(route, key)
        if plan.route.policy == "interleave":
            return await self._interleave(plan, request, key, depth)
        v = plan.variant
        t0 = time.perf_counter()
        ok = False
        try:
            resp = await self._call(v.target, request, key, depth)
            ok = True
        finally:
            self._record(route, v.name, ok, time.perf_counter() - t0)
        if plan.shadows:
            self._mirror(plan, request, resp)
        params = dict(resp.parameters)
        params[VARIANT_PARAM] = v.name if depth == 0 else params.get(VARIANT_PARAM, v.name)
        if depth == 0 and plan.route.policy == "ab":
            rid = request.id or uuid.uuid4().hex
            self.controller.remember(rid, route, v.name)
            params[REQUEST_ID_PARAM] = rid
        return replace(resp, parameters=params)

    async def _call(self, target: TargetConfig, request: InferRequest, key: str | None, depth: int) -> InferResponse:
        if target.route is not None:
            return await self._route(target.route, replace(request, model_name=target.route), key, depth + 1)
        return await self.dataplane.infer_model(replace(request, model_name=target.model,
                                                        model_version=target.version))

    def _record(self, route: str, variant: str, ok: bool, latency_s: float) -> None:
        self.controller.record(route, variant, ok, latency_s)
        if self.metrics:
            self.metrics.requests.labels(route, variant, "ok" if ok else "error").inc()
            self.metrics.duration.labels(route, variant).observe(latency_s)

    # --- shadows -----------------------------------------------------------------------------------
    #
    # The request path only counts and appends: _mirror puts (route, shadow, request, primary outputs,
    # key) on a deque (or drops and counts the copy when the route has shadow_queue_size +
    # SHADOW_WORKERS copies outstanding). Everything else -- choosing where a shadow runs, encoding
    # jobs for the worker process, writing them, handling the worker's batched results, statistics
    # and metrics -- runs in short slices of the event loop (at most SHADOW_SLICE_S each) when no
    # routed request is running and SHADOW_YIELDS loop turns have passed since the last one finished
    # (its response is on its way), or at the latest SHADOW_MAX_DEFER_S after work arrived; that
    # overdue slice has a larger budget (SHADOW_OVERDUE_SLICE_S, ~200 copies), so under steady load
    # copies reach an idle worker instead of waiting for quiet moments that do not come.
    #
    # Every copy carries the generation of the route config it was mirrored under
    # (Plan.generation); a result for an earlier generation is stale: counted, discarded, never
    # recorded under the new config nor shown to its guard. A copy ends in exactly one of: ran
    # (ok / error / timeout), dropped (queue full, or the worker process down), lost (the worker
    # died before its result came back), stale.

    def _mirror(self, plan: Plan, request: InferRequest, resp: InferResponse) -> None:
        route = plan.route
        name = route.name
        n = self._outstanding.get(name, 0)
        limit = route.shadow_queue_size + SHADOW_WORKERS
        primary = None
        for s in plan.shadows:
            if n >= limit:
                self._drop(name, s.name, plan.generation)
                continue
            if primary is None:
                primary = output_arrays(self._signature_order(resp))
            n += 1
            self._mirrors.append((name, s, request, primary, plan.key, plan.generation))
        self._outstanding[name] = n
        if primary is not None:
            self._shadow_work()

    def _drop(self, route: str, shadow: str, generation: int | None = None) -> None:
        if not self.controller.shadow_current(route, shadow, generation):
            self._stale(route, shadow)
            return
        self.controller.drop_shadow(route, shadow, generation)
        if self.metrics:
            self.metrics.shadow_dropped.labels(route, shadow).inc()

    def _stale(self, route: str, shadow: str) -> None:
        self.controller.stale_shadow(route, shadow)
        if self.metrics:
            self.metrics.shadow_stale.labels(route).inc()

    def _shadow_work(self) -> None:
        """There is shadow work (mirrored copies or results): run a slice when the loop is quiet."""
        if self._slice_handle is not None:
            return
        loop = asyncio.get_running_loop()
        if self._inflight == 0:
            self._slice_handle = loop.call_soon(self._slice, SHADOW_YIELDS)
        elif self._overdue_handle is None:
            self._overdue_handle = loop.call_later(SHADOW_MAX_DEFER_S, self._slice, 0, True)

    def _slice(self, hops: int = 0, overdue: bool = False) -> None:
        loop = asyncio.get_running_loop()
        if hops and not overdue:
            self._slice_handle = loop.call_soon(self._slice, hops - 1)
            return
        if overdue:
            self._overdue_handle = None
        else:
            self._slice_handle = None
        if self._inflight and not overdue:
            # a routed request started meanwhile: wait for it (infer's end) or for the deadline
            if self._overdue_handle is None:
                self._overdue_handle = loop.call_later(SHADOW_MAX_DEFER_S, self._slice, 0, True)
            return
        # An overdue slice (requests kept the loop busy for SHADOW_MAX_DEFER_S) gets a larger budget
        # (SHADOW_OVERDUE_SLICE_S): under steady load it is the only slice, and the idle slices'
        # 0.2 ms left copies waiting (and then dropped) while the worker was idle. ~10 us per copy.
        deadline = time.perf_counter() + (SHADOW_OVERDUE_SLICE_S if overdue else SHADOW_SLICE_S)
        proc = self.shadow_process
        if proc is not None:
            proc.process_results(deadline)
        mirrors = self._mirrors
        while mirrors and time.perf_counter() < deadline:
            self._dispatch(*mirrors.popleft())
        if proc is not None:
            proc.flush()
        if mirrors or (proc is not None and proc.has_results):
            if self._slice_handle is None:
                self._slice_handle = loop.call_soon(self._slice, 0 if self._inflight == 0 else SHADOW_YIELDS)
        elif self._overdue_handle is not None:
            self._overdue_handle.cancel()
            self._overdue_handle = None

    def _signature_order(self, resp: InferResponse):
        """The primary's output tensors in its model's signature order (the dataplane answers them in
        the order the client asked for): the top-level divergence is the first compared output's, so
        it must not depend on that order (break-it finding 4)."""
        outs = resp.outputs
        if len(outs) < 2:
            return outs
        try:
            sig = self.dataplane.repository.get_ready(resp.model_name, resp.model_version) \
                .pick(resp.model_version).backend.signature
        except Exception:  # noqa: BLE001 - unloaded meanwhile: keep the response's order
            return outs
        rank = {spec.name: i for i, spec in enumerate(sig.outputs)}
        return sorted(outs, key=lambda t: rank.get(t.name, len(rank)))

    def _dispatch(self, route: str, shadow, request: InferRequest, primary: dict, key, generation: int) -> None:
        """Send one mirrored copy on its way: to the worker process, or to the route's in-process queue.
        A copy whose route config changed since it was mirrored is discarded (stale) instead."""
        if not self.controller.shadow_current(route, shadow.name, generation):
            self._shadow_done(route, shadow.name, generation, "stale", None, None)
            return
        try:
            where = self._isolated(shadow.target)
        except ServingError as exc:
            log.debug("shadow %r of route %r: %s", shadow.name, route, exc)
            self._shadow_done(route, shadow.name, generation, "error", None, None)
            return
        except Exception:
            log.exception("shadow %r of route %r: internal error", shadow.name, route)
            self._shadow_done(route, shadow.name, generation, "error", None, None)
            return
        if where is not None:
            model, version, token = where
            # the job names model and version itself; the request's own model_name is not sent
            self.shadow_process.submit(model, version, token, request, primary,
                                       _ResultTo(self, route, shadow.name, generation), shadow.timeout_s)
            return
        q = self._inline_queues.get(route)
        if q is None:
            q = self._inline_queues[route] = asyncio.Queue()
            loop = asyncio.get_running_loop()
            self._route_workers[route] = [loop.create_task(self._inline_worker(q), name=f"pyserve-shadow-{route}")
                                          for _ in range(SHADOW_WORKERS)]
        q.put_nowait((route, shadow, request, primary, key, generation))

    async def _inline_worker(self, q: asyncio.Queue) -> None:
        while True:
            route, shadow, request, primary, key, generation = await q.get()
            if not self.controller.shadow_current(route, shadow.name, generation):
                q.task_done()
                self._shadow_done(route, shadow.name, generation, "stale", None, None)
                continue
            # let the primary's response leave first
            for _ in range(SHADOW_YIELDS):
                await asyncio.sleep(0)
            t0 = time.perf_counter()
            kind, div = "error", None
            try:
                resp = await asyncio.wait_for(
                    self._call(shadow.target, replace(request, model_name=shadow.target.route or shadow.target.model),
                               key, 1), shadow.timeout_s)
                kind = "ok"
                div = divergence(primary, output_arrays(resp.outputs))
            except ServingError as exc:
                log.debug("shadow %r of route %r: %s", shadow.name, route, exc)
            except asyncio.TimeoutError:
                kind = "timeout"
                log.warning("shadow %r of route %r ran past its timeout_s %g", shadow.name, route, shadow.timeout_s)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("shadow %r of route %r: internal error", shadow.name, route)
            finally:
                q.task_done()
            self._shadow_done(route, shadow.name, generation, kind, time.perf_counter() - t0, div)

    def _isolated(self, target: TargetConfig) -> tuple[str, str, tuple] | None:
        """``(model, version, token)`` when ``target`` runs in the shadow worker process, else None.
        Raises the ServingError inference on the target would (unknown or unavailable model)."""
        if self.shadow_process is None or target.route is not None:
            return None
        model = self.dataplane.repository.get_ready(target.model, target.version)
        mv = model.pick(target.version)
        backend = mv.config.backend
        if backend in self._inline_backends:
            return None
        if not self.shadow_process.portable(backend):
            self._inline_backends.add(backend)
            log.warning("backend %r cannot be imported by the shadow worker process (registered as a callable "
                        "it cannot find); shadows on its models run in the server process", backend)
            return None
        return mv.name, mv.version, (mv.fingerprint, mv.config)

    def _shadow_done(self, route: str, shadow: str, generation: int | None, kind: str, latency_s: float | None,
                     div) -> None:
        """One mirrored copy finished: statistics, metrics, and its slot in the route's queue.

        ``kind``: ``ok``, ``error`` or ``timeout`` (it ran; ``latency_s`` None for an error before it
        ran), ``lost`` (its result died with the worker process), ``unavailable`` (the worker could
        not take it: counted as a drop), ``stale`` (mirrored under an earlier config of the route:
        counted and discarded). A result for an earlier config is stale whatever its kind."""
        n = self._outstanding.get(route, 0)
        if n > 0:
            self._outstanding[route] = n - 1
        if self._drained is not None and not any(self._outstanding.values()):
            self._drained.set()
        ctl = self.controller
        if kind == "stale" or not ctl.shadow_current(route, shadow, generation):
            self._stale(route, shadow)
            return
        m = self.metrics
        if kind == "unavailable":
            self._drop(route, shadow, generation)
            return
        if kind == "lost":
            ctl.lose_shadow(route, shadow, generation)
            if m:
                m.shadow_lost.labels(route, shadow).inc()
            return
        ok = kind == "ok"
        ctl.record_shadow(route, shadow, ok, latency_s, div, generation, timeout=kind == "timeout")
        if m:
            m.shadow_requests.labels(route, shadow, kind).inc()
            if latency_s is not None:
                m.shadow_duration.labels(route, shadow).observe(latency_s)
            st = ctl.routes.get(route)
            s = st.shadows.get(shadow) if st is not None else None
            if s is not None and ok and div is not None and div.comparable:
                # from the running aggregates (ShadowStats.as_dict would sort the latency window)
                top1 = s.top1_agreement
                if top1 is not None:
                    m.shadow_top1.labels(route, shadow).set(top1)
                m.shadow_max_abs.labels(route, shadow).set(float(s.max_abs_diff))
                m.shadow_cosine.labels(route, shadow).set(s.cosine_sum / s.compared)

    def _on_shadow_data(self) -> None:
        self._shadow_work()

    @property
    def shadows_outstanding(self) -> int:
        """Mirrored copies accepted and not finished yet, over all routes."""
        return sum(self._outstanding.values())

    async def drain_shadows(self, timeout_s: float | None = None) -> None:
        """Wait until every mirrored copy has run (tests, benchmarks); TimeoutError after ``timeout_s``.
        Waits on an event that the last finishing copy sets (no polling: a benchmark that measures
        the loop's CPU time over a shadow backlog is not charged for the wait)."""
        loop = asyncio.get_running_loop()
        end = None if timeout_s is None else loop.time() + timeout_s
        while self.shadows_outstanding:
            ev = self._drained = asyncio.Event()
            self._shadow_work()
            try:
                await asyncio.wait_for(ev.wait(), None if end is None else max(0.0, end - loop.time()))
            except asyncio.TimeoutError:
                raise TimeoutError(f"{self.shadows_outstanding} shadow copies still outstanding") from None
            finally:
                self._drained = None

    # --- interleaving ------------------------------------------------------------------------------

    async def _interleave(self, plan: Plan, request: InferRequest, key: str | None, depth: int) -> InferResponse:
        import random

        route = plan.route
        a, b = plan.variants
        plain = replace(request, outputs=())
        t0 = time.perf_counter()
        results = await asyncio.gather(self._call(a.target, plain, key, depth), self._call(b.target, plain, key, depth),
                                       return_exceptions=True)
        latency = time.perf_counter() - t0
        for v, r in zip((a, b), results):
            self._record(route.name, v.name, not isinstance(r, BaseException), latency)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        ra, rb = (_ranking(r, v.name) for r, v in zip(results, (a, b)))
        if ra.shape[0] != rb.shape[0]:
            raise InvalidArgument(f"route {route.name!r}: the variants answered {ra.shape[0]} and {rb.shape[0]} rows")
        rows = []
        for i in range(ra.shape[0]):
            rng = random.Random(f"{route.name}/{key}/{i}") if key else self.controller.rng
            rows.append(team_draft([int(x) for x in ra[i]], [int(x) for x in rb[i]], rng))
        width = max((len(il.items) for il in rows), default=0)
        ids = np.full((len(rows), width), -1, dtype=np.int64)
        teams = np.full((len(rows), width), -1, dtype=np.int8)
        for i, il in enumerate(rows):
            ids[i, : len(il.items)] = il.items
            teams[i, : len(il.teams)] = il.teams
        self.controller.record_interleaving(route.name)
        rid = request.id or uuid.uuid4().hex
        self.controller.remember(rid, route.name, f"{a.name},{b.name}", rows)
        return InferResponse(model_name=route.name, model_version="", id=request.id,
                             outputs=(Tensor("interleaved", "INT64", ids), Tensor("interleaved_team", "INT8", teams)),
                             parameters={VARIANT_PARAM: f"{a.name},{b.name}", REQUEST_ID_PARAM: rid})


class _ResultTo:
    """The done callback of one job in the shadow worker process (cheaper than a closure per job).
    Carries the route config generation the copy was mirrored under (a result for an earlier config
    is stale: counted and discarded, never recorded under the new one)."""

    __slots__ = ("generation", "route", "router", "shadow")

    def __init__(self, router: TrafficRouter, route: str, shadow: str, generation: int | None = None) -> None:
        self.router, self.route, self.shadow, self.generation = router, route, shadow, generation

    def __call__(self, res) -> None:
        if not res.ok:
            log.debug("shadow %r of route %r: %s", self.shadow, self.route, res.error)
        self.router._shadow_done(self.route, self.shadow, self.generation, res.kind, res.latency_s, res.divergence)

    def current(self) -> bool:
        """Whether the copy still belongs to the route's config in force (else the worker drops it unrun)."""
        return self.router.controller.shadow_current(self.route, self.shadow, self.generation)


def _ranking(resp: InferResponse, variant: str) -> np.ndarray:
    """Ranked item ids ``[N, L]`` from a variant's first output (scores -> ids by descending score)."""
    if not resp.outputs:
        raise InvalidArgument(f"variant {variant!r} answered no output to rank")
    data = np.asarray(resp.outputs[0].data)
    if data.ndim == 1:
        data = data.reshape(1, -1)
    if data.ndim != 2 or data.dtype.kind not in "biuf":
        raise InvalidArgument(f"variant {variant!r}: a ranking output must be numeric [N, C] scores or [N, L] ids, "
                              f"got {data.dtype} {list(data.shape)}")
    if data.dtype.kind == "f":
        return np.argsort(-data, axis=1, kind="stable")
    return data.astype(np.int64)
