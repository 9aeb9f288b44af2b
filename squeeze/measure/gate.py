"""The latency-regression gate for CI: is NEW slower than OLD by more than a threshold, with confidence?

Protocol: OLD and NEW are sampled in rounds; a round takes `samples_per_round` samples of each, in an order
drawn at random each time (so neither model always runs right after the other, nor in step with a periodic
load), and keeps each model's minimum, the sample least disturbed by other processes. A sample is one call
of the model (see `gate_protocol`); the CLI runs the gate on one intra-op thread unless told otherwise.

Sequential decision, every `check_every` rounds, on a moving block bootstrap interval of the median paired
ratio NEW/OLD (blocks of consecutive rounds, so a burst of load that spans several rounds widens the interval
instead of faking evidence):
- PASS as soon as the interval lies below 1 + threshold (after `min_rounds`);
- FAIL when the interval lies above it, after at least `min_fail_rounds`, and the most recent half of the
  rounds puts its own interval above it too (the machine's speed did not change under the run); on a noisy
  machine (either model's robust CV above `max_noise`) the interval at `noisy_confidence` must clear it as
  well. Noise only asks for more evidence: it never turns a FAIL into a pass.
- when `max_time_s` or `max_rounds` runs out first: PASS (inconclusive), saying which condition was missing.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Literal, Protocol as Interface

from squeeze.export.artifact import OnnxArtifact
from squeeze.measure.bench import InterleavedRun, Measurement
from squeeze.measure.protocol import Protocol
from squeeze.measure.stats import LatencyStats, RatioEstimate, block_paired_ratio, unpaired_ratio

__all__ = ["GateConfig", "GateResult", "RoundSampler", "gate_protocol", "run_gate", "gate_rounds",
           "gate_against_baseline"]

Verdict = Literal["pass", "fail", "inconclusive"]


class RoundSampler(Interface):
    """Where the gate's samples come from (an `InterleavedRun` of [OLD, NEW], or a fake in tests)."""

    def round(self) -> tuple[float, float]:
        """One round: (OLD ms, NEW ms), taken close together."""

    def measurements(self) -> list[Measurement]:
        """[OLD, NEW] with every round's sample, the protocol and the environment."""


@dataclass(frozen=True)
class GateConfig:
    max_regression: float = 0.05  # fraction: 0.05 = NEW may be up to 5% slower
    confidence: float = 0.99
    min_rounds: int = 20  # a bootstrap of the median on fewer rounds under load passed a 12% regression
    min_fail_rounds: int = 30
    check_every: int = 10
    max_rounds: int = 400
    max_time_s: float = 60.0
    max_noise: float = 0.10  # robust CV above which a FAIL must also clear the `noisy_confidence` interval
    noisy_confidence: float = 0.999
    samples_per_round: int = 3

    def declared_protocol(self) -> dict:
        """How the gate sampled and decided: recorded in the result so a verdict can be judged later."""
        return {
            **asdict(self),
            "order": "random within each round",
            "round_statistic": f"minimum of {self.samples_per_round} samples per model",
            "sample": "one call of the model",
            "interval": "moving block bootstrap of the median paired ratio NEW/OLD",
            "fail_rule": "interval above 1 + max_regression after min_fail_rounds, the recent half's interval too, "
                         "and the noisy_confidence interval too when either robust CV exceeds max_noise",
        }


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
    reason: str = ""  # why an inconclusive gate stopped, or what a FAIL on a noisy machine needed
    protocol: dict | None = None

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
            "gate_protocol": self.protocol,
            "new": self.new.to_json(),
            "old": self.old.to_json(),
        }


def _noisy(old_ms: list[float], new_ms: list[float], cfg: GateConfig) -> str:
    """"the machine is noisy (...)" when either model's robust CV exceeds `max_noise`, else ""."""
    noise = max(LatencyStats.from_samples(old_ms).robust_cv, LatencyStats.from_samples(new_ms).robust_cv)
    if noise <= cfg.max_noise:
        return ""
    return f"the machine is noisy (robust CV {100 * noise:.0f}% > {100 * cfg.max_noise:.0f}%)"


def _fail_missing(old_ms: list[float], new_ms: list[float], cfg: GateConfig) -> str:
    """What a FAIL still lacks once the whole run's interval lies above the threshold ("" when nothing)."""
    limit, n = 1.0 + cfg.max_regression, len(old_ms)
    if n < cfg.min_fail_rounds:
        return f"after {n} rounds of the {cfg.min_fail_rounds} a FAIL needs"
    recent = block_paired_ratio(old_ms[n // 2:], new_ms[n // 2:], cfg.confidence)
    if recent.low <= limit:
        return (f"the most recent half of the rounds does not agree on its own ([{recent.low:.3f}, "
                f"{recent.high:.3f}]): the machine's speed changed during the run")
    noisy = _noisy(old_ms, new_ms, cfg)
    strict = block_paired_ratio(old_ms, new_ms, cfg.noisy_confidence) if noisy else None
    if strict is not None and strict.low <= limit:
        return (f"{noisy} and the {100 * cfg.noisy_confidence:.1f}% interval [{strict.low:.3f}, {strict.high:.3f}] "
                "does not clear it")
    return ""


def _decide(old_ms: list[float], new_ms: list[float], cfg: GateConfig) -> tuple[Verdict | None, RatioEstimate, str]:
    """A verdict, or None with what is still missing (the reason given if time runs out now)."""
    limit = 1.0 + cfg.max_regression
    est = block_paired_ratio(old_ms, new_ms, cfg.confidence)
    if est.high <= limit:
        if len(old_ms) >= cfg.min_rounds:
            return "pass", est, ""
        return None, est, f"the interval lies below the threshold, but after fewer than {cfg.min_rounds} rounds"
    if est.low <= limit:
        return None, est, "the interval straddles the threshold"
    missing = _fail_missing(old_ms, new_ms, cfg)
    if missing:
        return None, est, f"the interval lies above the threshold, but {missing}"
    noisy = _noisy(old_ms, new_ms, cfg)
    return "fail", est, f"{noisy}: the FAIL also holds at {100 * cfg.noisy_confidence:.1f}% confidence" if noisy else ""


def gate_rounds(sampler: RoundSampler, cfg: GateConfig, mode: str = "interleaved") -> GateResult:
    """Run the sequential gate on any source of rounds."""
    t0 = time.perf_counter()
    old_ms: list[float] = []
    new_ms: list[float] = []
    verdict: Verdict | None = None
    while verdict is None:
        for _ in range(cfg.check_every):
            old, new = sampler.round()
            old_ms.append(old)
            new_ms.append(new)
        verdict, est, reason = _decide(old_ms, new_ms, cfg)
        if verdict is None and (len(old_ms) >= cfg.max_rounds or time.perf_counter() - t0 > cfg.max_time_s):
            verdict = "inconclusive"
    old_m, new_m = sampler.measurements()
    return GateResult(verdict, est, cfg.max_regression, len(old_ms), time.perf_counter() - t0, new_m, old_m, mode,
                      reason, cfg.declared_protocol())


def gate_protocol(protocol: Protocol) -> Protocol:
    """Every sample is one call of the model, for OLD and NEW alike.

    A sample count calibrated to last `min_repeat_ms` differs between the models when the calibration hits a
    burst of load (9 calls for one, 2 for its identical twin), and the minimum of long samples sits higher
    than that of short ones: identical models read 0.69x to 1.17x, with a false FAIL, at load 6 on 2 cores.
    """
    return protocol.model_copy(update={"min_repeat_ms": 0.0})


def run_gate(new: OnnxArtifact, old: OnnxArtifact, target, protocol: Protocol, cfg: GateConfig) -> GateResult:
    with InterleavedRun([old, new], target, gate_protocol(protocol), samples_per_round=cfg.samples_per_round,
                        shuffle=True) as run:
        return gate_rounds(run, cfg)


def _baseline_verdict(est: RatioEstimate, strict: RatioEstimate, noisy: str, cfg: GateConfig) -> tuple[Verdict, str]:
    limit = 1.0 + cfg.max_regression
    if est.high <= limit:
        return "pass", ""
    if est.low <= limit:
        return "inconclusive", "the interval straddles the threshold"
    if noisy and strict.low <= limit:
        return "inconclusive", (f"the interval lies above the threshold, but {noisy} and the "
                                f"{100 * cfg.noisy_confidence:.1f}% interval does not clear it")
    return "fail", ""


def gate_against_baseline(new: OnnxArtifact, baseline: Measurement, target, protocol: Protocol,
                          cfg: GateConfig) -> GateResult:
    """Compare a fresh run of NEW with samples stored earlier on this machine (less robust: no pairing).

    NEW is sampled as `squeeze bench` sampled the baseline (one sample per round), so both sides are alike.
    """
    t0 = time.perf_counter()
    with InterleavedRun([new], target, protocol) as run:
        for _ in range(max(protocol.repeat, cfg.min_rounds)):
            run.round()
    (new_m,) = run.measurements()
    est = unpaired_ratio(baseline.samples_ms, new_m.samples_ms, cfg.confidence)
    strict = unpaired_ratio(baseline.samples_ms, new_m.samples_ms, cfg.noisy_confidence)
    verdict, reason = _baseline_verdict(est, strict, _noisy(baseline.samples_ms, new_m.samples_ms, cfg), cfg)
    return GateResult(verdict, est, cfg.max_regression, len(new_m.samples_ms), time.perf_counter() - t0, new_m,
                      baseline, "baseline", reason,
                      {**asdict(cfg), "samples_per_round": 1,  # sampled as `bench` sampled the baseline
                       "interval": "bootstrap of the ratio of medians (unpaired)"})
