"""``pyserve.v1.TrafficControl``: the traffic controller's admin RPCs (docs/traffic.md).

Validation lives in the pure controller; this servicer decodes, calls it and encodes. Errors:
an unknown route or request id -> NOT_FOUND (feedback for an unknown id is also counted); an
invalid route, weights or feedback -> INVALID_ARGUMENT naming the field; promote/rollback on a
route that cannot -> FAILED_PRECONDITION.
"""

from __future__ import annotations

import yaml

from pyserve.protocol import traffic_codec as codec
from pyserve.protocol.errors import FailedPrecondition, InvalidArgument, NotFound
from pyserve.traffic import FeedbackError, TrafficConfig, TrafficConfigError, UnknownRequest, UnknownRoute
from pyserve.traffic.config import parse_route, route_to_dict

__all__ = ["TrafficControlServicer"]


class TrafficControlServicer:
    def __init__(self, router) -> None:
        self._router = router
        self._ctl = router.controller

    def add_to_server(self, server) -> None:
        codec.add_traffic_servicer(self, server)

    def _state(self, route: str):
        try:
            return self._ctl.state(route)
        except UnknownRoute as exc:
            raise NotFound(str(exc)) from None

    def _route_response(self, route: str):
        cfg = self._state(route).config
        return codec.encode_route(route, cfg.policy, cfg.weights,
                                  yaml.safe_dump(route_to_dict(cfg), sort_keys=False))

    async def GetRoute(self, request, context):
        return self._route_response(request.route)

    async def SetRoute(self, request, context):
        try:
            rc = parse_route(request.route, request.yaml)
            self._router.check_config(TrafficConfig(routes={rc.name: rc}, source="set-route"))
            self._ctl.set_route(rc)  # checks route references against the other routes; all or nothing
        except TrafficConfigError as exc:
            raise InvalidArgument(str(exc)) from None
        self._router._publish_weights()
        self._router.drop_stale_shadows()
        return self._route_response(request.route)

    async def SetWeights(self, request, context):
        self._state(request.route)
        try:
            self._ctl.set_weights(request.route, dict(request.weights))
        except TrafficConfigError as exc:
            raise InvalidArgument(str(exc)) from None
        self._router._publish_weights()
        return self._route_response(request.route)

    async def Promote(self, request, context):
        return self._decide(request.route, lambda: self._ctl.promote(request.route))

    async def Rollback(self, request, context):
        reason = request.reason or "rolled back by an operator"
        return self._decide(request.route, lambda: self._ctl.rollback(request.route, reason))

    def _decide(self, route, action):
        self._state(route)
        try:
            d = action()
        except TrafficConfigError as exc:
            raise FailedPrecondition(str(exc)) from None
        self._router._publish_weights()
        return codec.encode_decision(d.as_dict(), self._ctl.state(route).config.weights)

    async def Feedback(self, request, context):
        m = self._router.metrics
        metric = request.metric if request.HasField("metric") else None
        try:
            out = self._ctl.feedback(request.request_id, metric=metric, clicked=list(request.clicked),
                                     row=request.row)
        except UnknownRequest as exc:
            if m:
                m.feedback.labels("unknown_id").inc()
            raise NotFound(str(exc)) from None
        except FeedbackError as exc:
            if m:
                m.feedback.labels("invalid").inc()
            raise InvalidArgument(str(exc)) from None
        if m:
            m.feedback.labels("ok").inc()
            if out.get("outcome"):
                m.interleave.labels(out["route"], out["outcome"]).inc()
        return codec.encode_feedback(out["route"], out["variant"], out.get("outcome", ""))

    async def Report(self, request, context):
        if request.route:
            self._state(request.route)
        return codec.encode_json("report", self._ctl.report(request.route or None))

    async def Status(self, request, context):
        st = self._ctl.status()
        st["reloads_applied"] = self._router.reloads_applied
        st["reloads_refused"] = self._router.reloads_refused
        st["last_reload_error"] = self._router.last_reload_error
        st["config_path"] = str(self._router.config_path) if self._router.config_path else None
        return codec.encode_json("status", st, revision=st["revision"])
