"""The one place where ``pyserve.v1.TrafficControl`` protobuf messages meet pyserve's own values.

Server side: service registration (:func:`add_traffic_servicer`) and the ``encode_*`` helpers the
admin servicer answers with. Client side (``pyserve traffic``): :func:`traffic_stub` and the request
builders. Report and status travel as JSON text (their fields are listed in docs/traffic.md).
"""

from __future__ import annotations

import json
import math
from typing import Mapping, Sequence

from pyserve.protocol._generated import traffic_pb2 as pb
from pyserve.protocol._generated import traffic_pb2_grpc as pb_grpc

__all__ = [
    "SERVICE_NAME",
    "pb",
    "add_traffic_servicer",
    "traffic_stub",
    "encode_route",
    "encode_decision",
    "decision_to_dict",
    "weights_to_dict",
    "encode_feedback",
    "encode_json",
    "feedback_request",
    "dumps",
]

SERVICE_NAME = "pyserve.v1.TrafficControl"


def add_traffic_servicer(servicer, server) -> None:
    pb_grpc.add_TrafficControlServicer_to_server(servicer, server)


def traffic_stub(channel):
    return pb_grpc.TrafficControlStub(channel)


def encode_route(name: str, policy: str, weights: Mapping[str, float], yaml_text: str) -> pb.RouteResponse:
    return pb.RouteResponse(route=name, policy=policy, yaml=yaml_text, weights=_weights(weights))


def _weights(weights: Mapping[str, float]) -> list:
    return [pb.VariantWeight(variant=k, weight_percent=float(v)) for k, v in weights.items()]


def weights_to_dict(repeated) -> dict[str, float]:
    """``{variant: weight_percent}`` in the route's variant order, from a RouteResponse/DecisionResponse."""
    return {w.variant: w.weight_percent for w in repeated}


def encode_decision(d: Mapping, weights: Mapping[str, float]) -> pb.DecisionResponse:
    return pb.DecisionResponse(decision=pb.Decision(**{k: d[k] for k in (
        "time_s", "route", "action", "from_percent", "to_percent", "reason")}), weights=_weights(weights))


def decision_to_dict(msg: pb.DecisionResponse) -> dict:
    d = msg.decision
    return {"time_s": d.time_s, "route": d.route, "action": d.action, "from_percent": d.from_percent,
            "to_percent": d.to_percent, "reason": d.reason, "weights": weights_to_dict(msg.weights)}


def encode_feedback(route: str, variant: str, outcome: str = "") -> pb.FeedbackResponse:
    return pb.FeedbackResponse(route=route, variant=variant, outcome=outcome)


def _clean(x):
    """JSON has no NaN/inf: they become null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def dumps(obj) -> str:
    return json.dumps(_clean(obj), sort_keys=False)


def encode_json(kind: str, obj, revision: str = ""):
    if kind == "report":
        return pb.ReportResponse(json=dumps(obj))
    return pb.StatusResponse(revision=revision, json=dumps(obj))


def feedback_request(request_id: str, metric: float | None = None, clicked: Sequence[int] = (),
                     row: int = 0) -> pb.FeedbackRequest:
    msg = pb.FeedbackRequest(request_id=request_id, clicked=list(clicked), row=row)
    if metric is not None:
        msg.metric = float(metric)
    return msg
