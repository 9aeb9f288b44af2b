"""Robust statistics of latency samples and bootstrap intervals on latency ratios."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["LatencyStats", "RatioEstimate", "paired_ratio", "block_paired_ratio", "unpaired_ratio", "NOISY_ROBUST_CV"]

# Above this robust coefficient of variation (1.4826 * MAD / median) a run is flagged as noisy.
NOISY_ROBUST_CV = 0.05
_BOOTSTRAP = 2000


@dataclass(frozen=True)
class LatencyStats:
    n: int
    median_ms: float
    p90_ms: float
    min_ms: float
    mean_ms: float
    mad_ms: float  # median absolute deviation
    cv: float  # std / mean

    @classmethod
    def from_samples(cls, samples_ms: list[float]) -> "LatencyStats":
        a = np.asarray(samples_ms, dtype=float)
        med = float(np.median(a))
        return cls(
            n=int(a.size),
            median_ms=med,
            p90_ms=float(np.percentile(a, 90)),
            min_ms=float(a.min()),
            mean_ms=float(a.mean()),
            mad_ms=float(np.median(np.abs(a - med))),
            cv=float(a.std(ddof=1) / a.mean()) if a.size > 1 else 0.0,
        )

    @property
    def robust_cv(self) -> float:
        return 1.4826 * self.mad_ms / self.median_ms if self.median_ms > 0 else 0.0

    @property
    def noisy(self) -> bool:
        return self.robust_cv > NOISY_ROBUST_CV

    def to_json(self) -> dict:
        return {**asdict(self), "robust_cv": self.robust_cv, "noisy": self.noisy}


@dataclass(frozen=True)
class RatioEstimate:
    """Latency of B over latency of A: > 1 means B is slower. [low, high] is a bootstrap interval."""

    ratio: float
    low: float
    high: float
    confidence: float
    n: int
    method: str

    def to_json(self) -> dict:
        return asdict(self)


def _percentile_interval(boot: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = (1 - confidence) / 2
    return float(np.quantile(boot, alpha)), float(np.quantile(boot, 1 - alpha))


def paired_ratio(a_ms: list[float], b_ms: list[float], confidence: float = 0.95, seed: int = 0) -> RatioEstimate:
    """Interleaved samples: the i-th of A and of B were taken back to back, so their ratio cancels slow drift."""
    r = np.asarray(b_ms, float) / np.asarray(a_ms, float)
    rng = np.random.default_rng(seed)
    boot = np.median(r[rng.integers(0, r.size, size=(_BOOTSTRAP, r.size))], axis=1)
    low, high = _percentile_interval(boot, confidence)
    return RatioEstimate(float(np.median(r)), low, high, confidence, int(r.size), "paired bootstrap of the median ratio")


def block_length(n: int) -> int:
    """Rounds per bootstrap block: about n^(1/3) (the usual rate for a moving block bootstrap), at least 2."""
    return max(2, round(n ** (1 / 3)))


def block_paired_ratio(a_ms: list[float], b_ms: list[float], confidence: float = 0.95, seed: int = 0) -> RatioEstimate:
    """Paired samples taken in order: a moving block bootstrap of the median ratio.

    A burst of load from another process spans several consecutive rounds and moves their ratios together;
    resampling single rounds would treat them as independent and give too narrow an interval. Resampling
    runs of consecutive rounds keeps that correlation in the interval.
    """
    r = np.asarray(b_ms, float) / np.asarray(a_ms, float)
    block = min(block_length(r.size), r.size)
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, r.size - block + 1, size=(_BOOTSTRAP, -(-r.size // block)))
    rows = (starts[:, :, None] + np.arange(block)).reshape(_BOOTSTRAP, -1)[:, :r.size]  # (boot, n) round indices
    low, high = _percentile_interval(np.median(r[rows], axis=1), confidence)
    return RatioEstimate(float(np.median(r)), low, high, confidence, int(r.size),
                         f"moving block bootstrap of the median paired ratio (blocks of {block} rounds)")


def unpaired_ratio(a_ms: list[float], b_ms: list[float], confidence: float = 0.95, seed: int = 0) -> RatioEstimate:
    """Samples from different runs (a stored baseline): ratio of medians, each side resampled on its own."""
    a, b = np.asarray(a_ms, float), np.asarray(b_ms, float)
    rng = np.random.default_rng(seed)
    boot = (np.median(b[rng.integers(0, b.size, size=(_BOOTSTRAP, b.size))], axis=1)
            / np.median(a[rng.integers(0, a.size, size=(_BOOTSTRAP, a.size))], axis=1))
    low, high = _percentile_interval(boot, confidence)
    return RatioEstimate(float(np.median(b) / np.median(a)), low, high, confidence, int(min(a.size, b.size)),
                         "bootstrap of the ratio of medians (unpaired)")
