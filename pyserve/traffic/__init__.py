"""The traffic controller's pure part: config, policies (canary, A/B, shadow, interleaving), the SLO
guard and the controller that holds them. Imports neither grpc nor backends (STYLE.md rule 10); the
server wires it into the request path (:mod:`pyserve.server.traffic`)."""

from pyserve.traffic.ab import ABExperiment, ArmReport
from pyserve.traffic.canary import WeightedSplit
from pyserve.traffic.config import (
    FORMAT_VERSION,
    POLICIES,
    GuardConfig,
    RouteConfig,
    ShadowConfig,
    TargetConfig,
    TrafficConfig,
    TrafficConfigError,
    VariantConfig,
    load_traffic_config,
    parse_traffic_config,
)
from pyserve.traffic.controller import FeedbackError, Plan, TrafficController, UnknownRequest, UnknownRoute
from pyserve.traffic.guard import CanaryGuard, Decision
from pyserve.traffic.hashing import bucket, bucket_percent
from pyserve.traffic.interleave import InterleaveStats, Interleaving, credit, team_draft
from pyserve.traffic.shadow import Divergence, ShadowStats, divergence, output_arrays, should_mirror
from pyserve.traffic.stats import sign_test, two_proportion_z_test, welch_t_test

__all__ = [
    "FORMAT_VERSION", "POLICIES", "GuardConfig", "RouteConfig", "ShadowConfig", "TargetConfig", "TrafficConfig",
    "TrafficConfigError", "VariantConfig", "load_traffic_config", "parse_traffic_config",
    "WeightedSplit", "ABExperiment", "ArmReport", "CanaryGuard", "Decision", "bucket", "bucket_percent",
    "InterleaveStats", "Interleaving", "credit", "team_draft", "Divergence", "ShadowStats", "divergence", "output_arrays",
    "should_mirror", "sign_test", "two_proportion_z_test", "welch_t_test",
    "FeedbackError", "Plan", "TrafficController", "UnknownRequest", "UnknownRoute",
]
