import numpy as np
import pytest

from squeeze.measure.stats import LatencyStats, paired_ratio, unpaired_ratio


def test_latency_stats_numbers():
    s = LatencyStats.from_samples([1.0, 2.0, 3.0, 4.0, 100.0])
    assert s.n == 5 and s.median_ms == 3.0 and s.min_ms == 1.0
    assert s.mad_ms == 1.0  # |x - 3| = 2,1,0,1,97 -> median 1
    assert s.p90_ms == pytest.approx(61.6)
    assert s.robust_cv == pytest.approx(1.4826 / 3) and s.noisy


def test_quiet_samples_are_not_noisy():
    assert not LatencyStats.from_samples([10.0, 10.1, 9.9, 10.05, 9.95]).noisy


def test_paired_ratio_recovers_slowdown_under_drift():
    rng = np.random.default_rng(1)
    drift = np.linspace(1.0, 3.0, 60)  # the machine gets 3x slower during the run
    a = 10 * drift * rng.normal(1, 0.01, 60)
    b = 11 * drift * rng.normal(1, 0.01, 60)
    r = paired_ratio(list(a), list(b))
    assert r.low < 1.1 < r.high and r.high - r.low < 0.02
    u = unpaired_ratio(list(a), list(b))
    assert u.high - u.low > 5 * (r.high - r.low)  # without pairing, drift swamps the estimate


def test_identical_samples_give_ratio_one():
    a = [5.0, 5.1, 4.9, 5.05] * 5
    r = paired_ratio(a, a)
    assert r.ratio == 1.0 and r.low == 1.0 and r.high == 1.0
