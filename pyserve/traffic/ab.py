"""A/B experiments: per-arm request counts, errors, latency and a business metric, and the report.

Arms are the route's variants, assigned stickily by the routing key (:class:`pyserve.traffic.canary.
WeightedSplit`). The business metric arrives later through feedback (one value per request: 0/1
for a conversion, any number for e.g. revenue). The report compares every arm with the first one
(the control): a two-proportion z-test when every value of both arms is 0 or 1, else Welch's t-test;
each arm's mean has a 95% confidence interval (Wilson score for 0/1, normal otherwise).
Pure: no grpc, no backends.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from pyserve.traffic.stats import Moments, RequestStats, TestResult, two_proportion_z_test, welch_t_test

__all__ = ["ArmReport", "ABExperiment"]


@dataclass(frozen=True)
class ArmReport:
    """One arm: requests/errors/latency (seconds) and the metric's n, mean and 95% CI; ``test``
    compares it with the control (None for the control itself)."""

    arm: str
    requests: dict
    metric_n: int
    metric_mean: float
    metric_ci95: tuple[float, float]
    test: TestResult | None

    def as_dict(self) -> dict:
        d = {"arm": self.arm, **{f"requests_{k}": v for k, v in self.requests.items()},
             "metric_n": self.metric_n, "metric_mean": self.metric_mean,
             "metric_ci95_low": self.metric_ci95[0], "metric_ci95_high": self.metric_ci95[1]}
        if self.test is not None:
            d.update(test=self.test.test, statistic=self.test.statistic, p_value=self.test.p_value,
                     test_note=self.test.note)
        return d


class ABExperiment:
    """Statistics of one A/B route, one entry per arm (in the route's order; the first is the control)."""

    def __init__(self, arms: Sequence[str]) -> None:
        if not arms:
            raise ValueError("arms: need at least one arm")
        self.arms = tuple(arms)
        self.requests = {a: RequestStats() for a in self.arms}
        self.metric = {a: Moments() for a in self.arms}

    def record_request(self, arm: str, ok: bool, latency_s: float) -> None:
        self.requests[arm].add(ok, latency_s)

    def record_metric(self, arm: str, value: float) -> None:
        """The business metric of one request answered by ``arm``; KeyError for an unknown arm."""
        self.metric[arm].add(value)

    def report(self) -> list[ArmReport]:
        control = self.metric[self.arms[0]]
        out = []
        for i, arm in enumerate(self.arms):
            m = self.metric[arm]
            test = None
            if i > 0:
                if control.binary and m.binary:
                    sa, sb = round(control.mean * control.n), round(m.mean * m.n)
                    test = two_proportion_z_test(sa, control.n, sb, m.n)
                else:
                    test = welch_t_test(control.mean, control.var, control.n, m.mean, m.var, m.n)
            out.append(ArmReport(arm, self.requests[arm].as_dict(), m.n, m.mean if m.n else float("nan"),
                                 m.ci(), test))
        return out
