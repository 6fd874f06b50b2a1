"""Canary split and stickiness, shadow sampling and divergence, A/B statistics, the significance tests."""

from __future__ import annotations

import hashlib
import math
import random

import numpy as np
import pytest

from pyserve.traffic import (
    ABExperiment,
    WeightedSplit,
    bucket,
    ShadowStats,
    divergence,
    output_arrays,
    should_mirror,
    sign_test,
    two_proportion_z_test,
    welch_t_test,
)
from pyserve.traffic.stats import Moments, percentile

scipy_stats = pytest.importorskip("scipy.stats")


def test_bucket_is_blake2b_of_salt_and_key():
    ref = int(hashlib.blake2b(b"mnist\x00user-42", digest_size=8).hexdigest(), 16) / 2**64
    assert bucket("mnist", "user-42") == ref
    assert bucket("mnist", "user-42") != bucket("other", "user-42")


def test_canary_split_inside_99pct_binomial_interval_and_sticky():
    split = WeightedSplit("mnist", [("stable", 95), ("candidate", 5)])
    n = 10_000
    picks = [split.choose(f"user-{i}") for i in range(n)]
    k = picks.count("candidate")
    lo, hi = scipy_stats.binom.interval(0.99, n, 0.05)
    assert lo <= k <= hi, (k, lo, hi)
    # sticky: the same key, again and in a fresh object (another replica), gets the same variant
    other = WeightedSplit("mnist", [("stable", 95), ("candidate", 5)])
    assert [other.choose(f"user-{i}") for i in range(n)] == picks


def test_raising_the_canary_keeps_its_users():
    before = WeightedSplit("r", [("stable", 95), ("candidate", 5)])
    after = WeightedSplit("r", [("stable", 75), ("candidate", 25)])
    keys = [f"k{i}" for i in range(5000)]
    on_canary = [k for k in keys if before.choose(k) == "candidate"]
    assert on_canary and all(after.choose(k) == "candidate" for k in on_canary)


def test_zero_weight_never_chosen_and_keyless_uses_the_rng():
    split = WeightedSplit("r", [("a", 0), ("b", 100), ("c", 0)])
    assert {split.choose(f"k{i}") for i in range(1000)} == {"b"}
    s2 = WeightedSplit("r", [("a", 50), ("b", 50)])
    seq1 = [s2.choose(None, random.Random(7)) for _ in range(1)] + [s2.choose("", random.Random(7))]
    assert seq1[0] == seq1[1]
    rng = random.Random(3)
    expect = ["a" if 100 * random.Random(3).random() < 50 else "b"]
    assert [s2.choose(None, rng)] == expect


def test_split_rejects_bad_weights():
    with pytest.raises(ValueError, match="variants: weight of 'a' must be >= 0"):
        WeightedSplit("r", [("a", -1), ("b", 101)])
    with pytest.raises(ValueError, match="sum to 100, got 90"):
        WeightedSplit("r", [("a", 40), ("b", 50)])


def test_should_mirror_fraction_and_stickiness():
    keys = [f"k{i}" for i in range(20_000)]
    got = sum(should_mirror("r", "s", 0.25, k) for k in keys)
    lo, hi = scipy_stats.binom.interval(0.99, len(keys), 0.25)
    assert lo <= got <= hi
    assert all(should_mirror("r", "s", 0.25, k) == should_mirror("r", "s", 0.25, k) for k in keys[:100])
    assert not any(should_mirror("r", "s", 0.0, k) for k in keys[:100])
    assert all(should_mirror("r", "s", 1.0, k) for k in keys[:100])


def test_divergence_against_numpy():
    rng = np.random.default_rng(0)
    p = rng.normal(size=(64, 10)).astype(np.float32)
    s = p + rng.normal(scale=0.5, size=p.shape).astype(np.float32)
    d = divergence({"logits": p, "extra": np.ones(3)}, {"logits": s})
    assert d.rows == 64
    assert d.top1_agreement == pytest.approx(np.mean(p.argmax(1) == s.argmax(1)))
    assert d.max_abs_diff == pytest.approx(float(np.abs(p.astype(np.float64) - s).max()))
    cos = [float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b))) for a, b in zip(p.astype(np.float64), s.astype(np.float64))]
    assert d.cosine == pytest.approx(np.mean(cos), rel=1e-9)
    # embeddings (integers, 1 column): no top-1, still max abs diff and cosine
    e = divergence({"y": np.arange(6.0).reshape(6, 1)}, {"y": np.arange(6.0).reshape(6, 1)})
    assert e.top1_agreement is None and e.max_abs_diff == 0 and e.cosine == pytest.approx(1.0)
    assert not divergence({"y": np.ones((2, 3))}, {"y": np.ones((3, 3))}).comparable


def test_divergence_of_bf16_outputs_is_of_values_not_bits():
    from pyserve.protocol.types import Tensor

    x = np.array([[1.5, -2.0, 0.25, 3.0], [0.0, 4.0, -0.5, 1.0]], dtype=np.float32)  # exact in bf16

    def bf16(a):  # the protocol's BF16: the top 16 bits of each float32
        return Tensor("y", "BF16", (np.ascontiguousarray(a).view(np.uint32) >> 16).astype(np.uint16))

    p, s = output_arrays([bf16(x)]), output_arrays([bf16(-x)])
    assert p["y"].dtype == np.float32 and np.array_equal(p["y"], x)
    d = divergence(p, s)
    assert d.max_abs_diff == pytest.approx(2 * float(np.abs(x).max()))  # 8.0; the bit patterns differ by 32768
    assert d.cosine == pytest.approx(-1.0)
    assert d.top1_agreement == pytest.approx(np.mean(x.argmax(1) == (-x).argmax(1)))
    # other datatypes pass through unchanged
    f = Tensor("z", "FP32", x)
    assert output_arrays([f])["z"] is x


def test_divergence_keeps_nan_and_takes_empty_batches():
    p = np.ones((3, 4), dtype=np.float32)
    s = p.copy()
    s[1, 2] = np.nan
    d = divergence({"y": p}, {"y": s})
    assert math.isnan(d.max_abs_diff)  # not 0.0: max(0.0, nan) in Python would hide it
    stats = ShadowStats()
    stats.record(True, 0.001, divergence({"y": p}, {"y": p + 1}))
    stats.record(True, 0.001, d)
    assert math.isnan(stats.max_abs_diff)
    # a batch of 0 rows: nothing to compare, no exception
    e = divergence({"y": np.zeros((0, 4), np.float32)}, {"y": np.zeros((0, 4), np.float32)})
    assert not e.comparable


def test_welch_matches_scipy_on_samples():
    rng = np.random.default_rng(1)
    a, b = rng.normal(1.0, 1.0, 200), rng.normal(1.3, 2.0, 150)
    ma, mb = Moments(), Moments()
    for x in a:
        ma.add(x)
    for x in b:
        mb.add(x)
    assert ma.var == pytest.approx(np.var(a, ddof=1))
    ref = scipy_stats.ttest_ind(b, a, equal_var=False)
    got = welch_t_test(ma.mean, ma.var, ma.n, mb.mean, mb.var, mb.n)
    assert got.statistic == pytest.approx(ref.statistic) and got.p_value == pytest.approx(ref.pvalue)


def test_two_proportion_z_matches_a_hand_computation():
    # 120/1000 vs 150/1000: pooled p = 0.135
    se = math.sqrt(0.135 * 0.865 * (2 / 1000))
    z = (0.15 - 0.12) / se
    got = two_proportion_z_test(120, 1000, 150, 1000)
    assert got.statistic == pytest.approx(z)
    assert got.p_value == pytest.approx(2 * scipy_stats.norm.sf(z))


def test_sign_test_matches_scipy_binomtest():
    for w, l in ((10, 3), (3, 10), (50, 50), (0, 7), (1, 0)):
        assert sign_test(w, l).p_value == pytest.approx(scipy_stats.binomtest(w, w + l, 0.5).pvalue)


def test_ab_report_uses_z_for_binary_and_welch_otherwise():
    ab = ABExperiment(["control", "treatment"])
    rng = random.Random(0)
    for _ in range(400):
        ab.record_metric("control", 1.0 if rng.random() < 0.10 else 0.0)
        ab.record_metric("treatment", 1.0 if rng.random() < 0.20 else 0.0)
        ab.record_request("control", True, 0.001)
    rep = ab.report()
    assert rep[0].test is None and rep[1].test.test == "two-proportion z"
    c, t = ab.metric["control"], ab.metric["treatment"]
    ref = two_proportion_z_test(round(c.mean * c.n), c.n, round(t.mean * t.n), t.n)
    assert rep[1].test.p_value == ref.p_value and rep[1].test.p_value < 0.01
    lo, hi = rep[0].metric_ci95
    assert lo < c.mean < hi
    assert rep[0].requests["count"] == 400 and rep[1].requests["count"] == 0
    ab.record_metric("treatment", 2.5)
    assert ab.report()[1].test.test == "Welch t"


def test_percentile_matches_numpy():
    xs = [random.Random(i).random() for i in range(101)]
    for q in (0, 50, 99, 100):
        assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))


def test_the_traffic_package_is_pure():
    """pyserve.traffic imports neither grpc nor the server, backends or protocol stubs (STYLE.md rule 10)."""
    import subprocess
    import sys

    code = ("import sys, pyserve.traffic; bad = sorted(m for m in sys.modules if m.split('.')[0] == 'grpc' or "
            "m.startswith(('pyserve.server', 'pyserve.backends', 'pyserve.protocol', 'torch'))); print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
