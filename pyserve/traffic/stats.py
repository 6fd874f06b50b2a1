"""Small statistics shared by the policies: request counters with a latency window, running moments,
and the significance tests (two-proportion z-test, Welch's t-test, the sign test).

Pure: standard library, plus scipy.stats for Student's t distribution when it is installed (the
``traffic`` extra); without scipy, Welch's test falls back to the normal approximation and says so.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

__all__ = [
    "RequestStats",
    "Moments",
    "TestResult",
    "percentile",
    "two_proportion_z_test",
    "welch_t_test",
    "sign_test",
    "normal_sf",
    "LATENCY_WINDOW",
]

#: Latencies kept per counter for percentiles (the most recent ones).
LATENCY_WINDOW = 10_000


def percentile(values, q: float) -> float:
    """The ``q``-th percentile (0..100) by linear interpolation (numpy's default); nan when empty."""
    xs = sorted(values)
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


class RequestStats:
    """Requests, errors and the latencies (seconds) of the last ``window`` requests."""

    __slots__ = ("count", "errors", "latencies_s", "latency_sum_s", "timed")

    def __init__(self, window: int = LATENCY_WINDOW) -> None:
        self.count = 0
        self.errors = 0
        self.latency_sum_s = 0.0
        self.timed = 0  # requests with a latency (in latency_sum_s)
        self.latencies_s: deque[float] = deque(maxlen=window)

    def add(self, ok: bool, latency_s: float | None) -> None:
        """One request. ``latency_s`` None: a request that failed before it ran (counted, but no
        latency enters the window or the mean)."""
        self.count += 1
        if not ok:
            self.errors += 1
        if latency_s is None:
            return
        self.timed += 1
        self.latency_sum_s += latency_s
        self.latencies_s.append(latency_s)

    @property
    def error_rate(self) -> float:
        return self.errors / self.count if self.count else 0.0

    def p(self, q: float) -> float:
        """Latency percentile ``q`` in seconds over the window (nan without requests)."""
        return percentile(self.latencies_s, q)

    def as_dict(self) -> dict:
        return {"count": self.count, "errors": self.errors, "error_rate": self.error_rate,
                "p50_s": self.p(50), "p99_s": self.p(99),
                "mean_s": self.latency_sum_s / self.timed if self.timed else math.nan}


class Moments:
    """Count, mean and variance of a stream (Welford's algorithm); ``binary`` while every value is 0/1."""

    __slots__ = ("n", "mean", "_m2", "binary")

    def __init__(self) -> None:
        self.n = 0
        self.mean = 0.0
        self._m2 = 0.0
        self.binary = True

    def add(self, x: float) -> None:
        x = float(x)
        self.n += 1
        d = x - self.mean
        self.mean += d / self.n
        self._m2 += d * (x - self.mean)
        if x not in (0.0, 1.0):
            self.binary = False

    @property
    def var(self) -> float:
        """Sample variance (n - 1 in the denominator); nan for n < 2."""
        return self._m2 / (self.n - 1) if self.n > 1 else math.nan

    def ci(self, z: float = 1.959963984540054) -> tuple[float, float]:
        """Confidence interval of the mean: Wilson score for a 0/1 metric, normal (mean +- z s/sqrt n) otherwise."""
        if self.n == 0:
            return (math.nan, math.nan)
        if self.binary:
            n, p = self.n, self.mean
            centre = (p + z * z / (2 * n)) / (1 + z * z / n)
            half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
            return (centre - half, centre + half)
        if self.n < 2:
            return (math.nan, math.nan)
        half = z * math.sqrt(self.var / self.n)
        return (self.mean - half, self.mean + half)


@dataclass(frozen=True)
class TestResult:
    """A two-sided test: its name, statistic and p-value (nan when there is too little data)."""

    test: str
    statistic: float
    p_value: float
    note: str = ""


def normal_sf(z: float) -> float:
    """P(Z > z) for a standard normal Z."""
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def two_proportion_z_test(successes_a: int, n_a: int, successes_b: int, n_b: int) -> TestResult:
    """Pooled two-proportion z-test of p_a = p_b (two-sided); z = (p_b - p_a) / se."""
    if n_a == 0 or n_b == 0:
        return TestResult("two-proportion z", math.nan, math.nan, "needs data in both arms")
    pa, pb = successes_a / n_a, successes_b / n_b
    pool = (successes_a + successes_b) / (n_a + n_b)
    se = math.sqrt(pool * (1 - pool) * (1 / n_a + 1 / n_b))
    if se == 0:
        return TestResult("two-proportion z", 0.0 if pa == pb else math.inf, 1.0 if pa == pb else 0.0)
    z = (pb - pa) / se
    return TestResult("two-proportion z", z, 2 * normal_sf(abs(z)))


def welch_t_test(mean_a: float, var_a: float, n_a: int, mean_b: float, var_b: float, n_b: int) -> TestResult:
    """Welch's unequal-variances t-test of mean_a = mean_b (two-sided); t = (mean_b - mean_a) / se.

    Degrees of freedom by the Welch-Satterthwaite equation; p from Student's t (scipy.stats) or, if
    scipy is missing, from the normal distribution (``note`` says so).
    """
    if n_a < 2 or n_b < 2:
        return TestResult("Welch t", math.nan, math.nan, "needs at least 2 values per arm")
    va, vb = var_a / n_a, var_b / n_b
    se = math.sqrt(va + vb)
    if se == 0:
        same = mean_a == mean_b
        return TestResult("Welch t", 0.0 if same else math.inf, 1.0 if same else 0.0)
    t = (mean_b - mean_a) / se
    df = (va + vb) ** 2 / (va * va / (n_a - 1) + vb * vb / (n_b - 1))
    try:
        from scipy import stats as _st
    except ImportError:
        return TestResult("Welch t", t, 2 * normal_sf(abs(t)), "scipy missing: normal approximation")
    return TestResult("Welch t", t, float(2 * _st.t.sf(abs(t), df)))


def sign_test(wins: int, losses: int) -> TestResult:
    """Exact two-sided sign test of wins vs losses (ties dropped): binomial(n = wins + losses, 1/2).

    p = min(1, 2 P(X <= min(wins, losses))); the statistic is wins - losses.
    """
    n = wins + losses
    if n == 0:
        return TestResult("sign", 0.0, 1.0, "no decided comparisons")
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n
    return TestResult("sign", float(wins - losses), min(1.0, 2 * tail))
