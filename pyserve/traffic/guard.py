"""The SLO guard of a progressive canary: promote step by step, roll back at once on a breach.

The canary's weight climbs through ``steps_percent`` (e.g. 1 -> 5 -> 25 -> 50 -> 100), each held for
``window_s`` seconds. Within a window the guard compares the canary with the baseline (the route's
other variant) on the requests of that window:

- error rate: canary minus baseline must stay <= ``max_error_rate_increase`` (absolute);
- p99 latency: canary / baseline must stay <= ``max_p99_latency_ratio``;
- shadow disagreement (if the canary's model was shadowed): 1 - top-1 agreement <= ``max_shadow_disagreement``.

A limit is judged once the canary has ``min_requests`` requests in the window; a breach rolls the
canary back to 0% at once (state ``rolled_back``; it stays there until an operator promotes it again).
At the end of a window with enough canary requests and no breach the guard promotes to the next
step; with too few requests it holds and opens a new window. After the last step the state is
``complete``. Every decision is kept (:attr:`CanaryGuard.decisions`) with its time and reason.

Pure: the clock is injectable (``clock() -> seconds``, monotonic).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from pyserve.traffic.config import GuardConfig
from pyserve.traffic.stats import RequestStats

__all__ = ["Decision", "CanaryGuard", "ROLLING", "ROLLED_BACK", "COMPLETE"]

ROLLING, ROLLED_BACK, COMPLETE = "rolling", "rolled_back", "complete"


@dataclass(frozen=True)
class Decision:
    """One guard decision. ``action``: start, promote, hold, rollback, complete (automatic) or
    manual_promote, manual_rollback, manual_weights (an operator). Percents are the canary's weight."""

    time_s: float
    route: str
    action: str
    from_percent: float
    to_percent: float
    reason: str

    def as_dict(self) -> dict:
        return {"time_s": self.time_s, "route": self.route, "action": self.action,
                "from_percent": self.from_percent, "to_percent": self.to_percent, "reason": self.reason}


class CanaryGuard:
    """Guard of one route's canary variant (see the module docstring).

    Parameters
    ----------
    route : the route's name (for the decisions).
    config : the route's GuardConfig.
    clock : ``() -> seconds``; default ``time.monotonic``.
    wall_clock : ``() -> seconds since the epoch`` stamped on decisions; default ``time.time``.
    start_percent : start at the step with this percent (default: the first step).
    """

    def __init__(self, route: str, config: GuardConfig, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time, start_percent: float | None = None) -> None:
        self.route = route
        self.config = config
        self._clock = clock
        self._wall = wall_clock
        self.step = 0
        if start_percent is not None:
            diffs = [abs(s - start_percent) for s in config.steps_percent]
            self.step = diffs.index(min(diffs))
        self.percent = config.steps_percent[self.step]
        self.state = ROLLING
        self.decisions: list[Decision] = []
        self._new_window()
        self._decide("start", 0.0, self.percent, f"start at step {self.step + 1} of {len(config.steps_percent)}")
        if self.step + 1 == len(config.steps_percent) and self.percent >= 100.0:
            self.state = COMPLETE

    # --- observations --------------------------------------------------------------------------

    def _new_window(self) -> None:
        self.window_start = self._clock()
        self.canary = RequestStats()
        self.baseline = RequestStats()
        self.shadow_rows = 0
        self.shadow_agree_rows = 0

    def observe(self, is_canary: bool, ok: bool, latency_s: float) -> Decision | None:
        """Record one request of the route; returns a decision if this request triggered one."""
        if self.state != ROLLING:
            return None
        (self.canary if is_canary else self.baseline).add(ok, latency_s)
        return self.evaluate()

    def observe_shadow(self, agree_rows: int, rows: int) -> Decision | None:
        """Record the top-1 agreement of the canary's model running as a shadow (``agree_rows`` of ``rows``)."""
        if self.state != ROLLING:
            return None
        self.shadow_agree_rows += agree_rows
        self.shadow_rows += rows
        return self.evaluate()

    # --- decisions ----------------------------------------------------------------------------------

    def breach(self) -> str | None:
        """The first limit the current window breaches (a reason), or None."""
        c, b, cfg = self.canary, self.baseline, self.config
        if c.count >= cfg.min_requests:
            increase = c.error_rate - (b.error_rate if b.count else 0.0)
            if increase > cfg.max_error_rate_increase:
                return (f"error rate {c.error_rate:.4f} vs baseline {b.error_rate:.4f}: increase {increase:.4f} "
                        f"> max_error_rate_increase {cfg.max_error_rate_increase:g}")
            if b.count:
                cp99, bp99 = c.p(99), b.p(99)
                if bp99 > 0 and cp99 / bp99 > cfg.max_p99_latency_ratio:
                    return (f"p99 latency {cp99 * 1e3:.3f} ms vs baseline {bp99 * 1e3:.3f} ms: ratio "
                            f"{cp99 / bp99:.3f} > max_p99_latency_ratio {cfg.max_p99_latency_ratio:g}")
        if cfg.max_shadow_disagreement is not None and self.shadow_rows >= cfg.min_requests:
            dis = 1.0 - self.shadow_agree_rows / self.shadow_rows
            if dis > cfg.max_shadow_disagreement:
                return (f"shadow disagreement {dis:.4f} > max_shadow_disagreement {cfg.max_shadow_disagreement:g}")
        return None

    def evaluate(self) -> Decision | None:
        """Roll back on a breach; at the end of a window promote (enough requests) or hold."""
        if self.state != ROLLING:
            return None
        reason = self.breach()
        if reason is not None:
            return self._rollback("rollback", reason)
        if self._clock() - self.window_start < self.config.window_s:
            return None
        if self.canary.count < self.config.min_requests:
            d = self._decide("hold", self.percent, self.percent,
                             f"{self.canary.count} canary requests in the window, min_requests "
                             f"{self.config.min_requests}")
            self._new_window()
            return d
        return self._advance("promote", "window passed: " + self._summary())

    def promote(self) -> Decision:
        """An operator's promotion: the next step (from rolled_back: back to the first step)."""
        if self.state == ROLLED_BACK:
            self.state, self.step = ROLLING, 0
            old, self.percent = self.percent, self.config.steps_percent[0]
            self._new_window()
            return self._decide("manual_promote", old, self.percent, "restarted by an operator")
        if self.state == COMPLETE:
            return self._decide("manual_promote", self.percent, self.percent, "already complete")
        return self._advance("manual_promote", "promoted by an operator")

    def rollback(self, reason: str = "rolled back by an operator") -> Decision:
        return self._rollback("manual_rollback", reason)

    def _advance(self, action: str, reason: str) -> Decision:
        old = self.percent
        if self.step + 1 >= len(self.config.steps_percent):
            self.state = COMPLETE
            return self._decide("complete", old, old, reason)
        self.step += 1
        self.percent = self.config.steps_percent[self.step]
        self._new_window()
        d = self._decide(action, old, self.percent, reason)
        if self.step + 1 == len(self.config.steps_percent) and self.percent >= 100.0:
            self.state = COMPLETE
        return d

    def _rollback(self, action: str, reason: str) -> Decision:
        old = self.percent
        self.percent = 0.0
        self.state = ROLLED_BACK
        return self._decide(action, old, 0.0, reason)

    def _decide(self, action: str, old: float, new: float, reason: str) -> Decision:
        d = Decision(self._wall(), self.route, action, old, new, reason)
        self.decisions.append(d)
        return d

    def _summary(self) -> str:
        c, b = self.canary, self.baseline
        return (f"canary {c.count} requests, error rate {c.error_rate:.4f}, p99 {c.p(99) * 1e3:.3f} ms; "
                f"baseline {b.count} requests, error rate {b.error_rate:.4f}, p99 {b.p(99) * 1e3:.3f} ms")

    def as_dict(self) -> dict:
        return {"state": self.state, "step": self.step + 1, "steps": len(self.config.steps_percent),
                "canary": self.config.canary, "canary_percent": self.percent,
                "window_elapsed_s": self._clock() - self.window_start, "window_s": self.config.window_s,
                "window_canary": self.canary.as_dict(), "window_baseline": self.baseline.as_dict()}
