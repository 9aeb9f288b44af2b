"""The latency-regression gate for CI: is NEW slower than OLD by more than a threshold, with confidence?

Sequential design: NEW and OLD are sampled interleaved in rounds; every `check_every` rounds a bootstrap
interval of the paired median ratio NEW/OLD is computed. The gate passes as soon as the interval lies
below 1 + threshold. Failing needs more evidence, because a burst of load from another process makes
neighbouring pairs err together (the interval assumes they do not): at least `min_fail_rounds`, and both
the whole run and its most recent half must lie above the threshold on their own. When the time budget
runs out first, the gate passes as "inconclusive": a regression must be shown, not suspected. On an
overloaded machine (either model's robust CV above `max_noise`) no latency is trustworthy, so a FAIL
becomes "inconclusive" with that reason.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

from squeeze.export.artifact import OnnxArtifact
from squeeze.measure.bench import InterleavedRun, Measurement
from squeeze.measure.protocol import Protocol
from squeeze.measure.stats import RatioEstimate, paired_ratio, unpaired_ratio

__all__ = ["GateConfig", "GateResult", "run_gate", "gate_against_baseline"]

Verdict = Literal["pass", "fail", "inconclusive"]


@dataclass(frozen=True)
class GateConfig:
    max_regression: float = 0.05  # fraction: 0.05 = NEW may be up to 5% slower
    confidence: float = 0.99
    min_rounds: int = 10
    min_fail_rounds: int = 30
    check_every: int = 10
    max_rounds: int = 400
    max_time_s: float = 60.0
    max_noise: float = 0.10  # robust CV above which a FAIL is not trusted


@dataclass(frozen=True)
class GateResult:
    verdict: Verdict
    ratio: RatioEstimate
    threshold: float
    rounds: int
    elapsed_s: float
    new: Measurement
    old: Measurement
    mode: str
    reason: str = ""

    @property
    def failed(self) -> bool:
        return self.verdict == "fail"

    def to_json(self) -> dict:
        return {
            "verdict": self.verdict,
            "ratio": self.ratio.to_json(),
            "max_regression": self.threshold,
            "rounds": self.rounds,
            "elapsed_s": self.elapsed_s,
            "mode": self.mode,
            "reason": self.reason,
            "new": self.new.to_json(),
            "old": self.old.to_json(),
        }


def _decide(old_ms: list[float], new_ms: list[float], cfg: GateConfig) -> tuple[Verdict | None, RatioEstimate]:
    limit = 1.0 + cfg.max_regression
    est = paired_ratio(old_ms, new_ms, cfg.confidence)
    n = len(old_ms)
    if n >= cfg.min_rounds and est.high <= limit:
        return "pass", est
    if n >= cfg.min_fail_rounds and est.low > limit:
        recent = paired_ratio(old_ms[n // 2:], new_ms[n // 2:], cfg.confidence)
        if recent.low > limit:
            return "fail", est
    return None, est


def _noise_guard(verdict: Verdict, new: Measurement, old: Measurement, cfg: GateConfig) -> tuple[Verdict, str]:
    noise = max(new.stats.robust_cv, old.stats.robust_cv)
    if verdict == "fail" and noise > cfg.max_noise:
        return "inconclusive", (f"the machine was too noisy to trust a FAIL (robust CV {100 * noise:.0f}% > "
                                f"{100 * cfg.max_noise:.0f}%); re-run on a quiet machine")
    return verdict, ""


def run_gate(new: OnnxArtifact, old: OnnxArtifact, target, protocol: Protocol, cfg: GateConfig) -> GateResult:
    t0 = time.perf_counter()
    verdict: Verdict | None = None
    with InterleavedRun([old, new], target, protocol) as run:
        while verdict is None:
            for _ in range(cfg.check_every):
                run.round()
            rounds = len(run.samples[0])
            verdict, est = _decide(run.samples[0], run.samples[1], cfg)
            if verdict is None and (rounds >= cfg.max_rounds or time.perf_counter() - t0 > cfg.max_time_s):
                verdict = "inconclusive"
    old_m, new_m = run.measurements()
    verdict, reason = _noise_guard(verdict, new_m, old_m, cfg)
    return GateResult(verdict, est, cfg.max_regression, rounds, time.perf_counter() - t0, new_m, old_m, "interleaved",
                      reason)


def gate_against_baseline(new: OnnxArtifact, baseline: Measurement, target, protocol: Protocol,
                          cfg: GateConfig) -> GateResult:
    """Compare a fresh run of NEW with samples stored earlier on this machine (less robust: no pairing)."""
    t0 = time.perf_counter()
    with InterleavedRun([new], target, protocol) as run:
        for _ in range(max(protocol.repeat, cfg.min_rounds)):
            run.round()
    (new_m,) = run.measurements()
    est = unpaired_ratio(baseline.samples_ms, new_m.samples_ms, cfg.confidence)
    limit = 1.0 + cfg.max_regression
    verdict: Verdict = "fail" if est.low > limit else "pass" if est.high <= limit else "inconclusive"
    verdict, reason = _noise_guard(verdict, new_m, baseline, cfg)
    return GateResult(verdict, est, cfg.max_regression, len(new_m.samples_ms), time.perf_counter() - t0, new_m,
                      baseline, "baseline", reason)
