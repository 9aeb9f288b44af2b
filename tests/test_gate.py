"""The gate's contract, on a deterministic fake source of rounds that injects bursts of load."""

import numpy as np
import pytest

from squeeze.measure.bench import InterleavedRun, Measurement
from squeeze.measure.gate import GateConfig, gate_rounds
from squeeze.measure.stats import LatencyStats, block_paired_ratio, paired_ratio
from squeeze.report.render import gate_view

ENV = {"runtime": "fake", "runtime_version": "0", "providers": ["CPU"], "cpu": "fake cpu", "load_avg_1m": 2.0}
PROTOCOL = {"threads": 2, "batch_size": 1, "warmup": 0, "min_repeat_ms": 20}


class LoadedMachine:
    """Rounds of OLD (10 ms) and NEW (10 ms x `ratio`) on a machine shared with bursty co-tenants.

    A fraction `load` of all samples is slowed 1.5x to 3x by another process: bursts of load span several
    consecutive rounds (mean `burst_rounds`) and, within one, each sample is hit or not independently, so a
    burst can hit one model of a pair and not the other. Every sample also gets `jitter` (sd, multiplicative).
    `ratio` may be a function of the round index, to change the regression during a run.
    """

    def __init__(self, ratio, load: float = 0.4, jitter: float = 0.03, burst_rounds: int = 8, seed: int = 0):
        self.ratio = ratio if callable(ratio) else (lambda i, r=ratio: r)
        self.jitter, self.burst_rounds = jitter, burst_rounds
        self.in_burst_p = min(1.0, 2 * load)  # half the samples inside a burst are hit
        self.rng = np.random.default_rng(seed)
        self.in_burst = False
        self.old_ms: list[float] = []
        self.new_ms: list[float] = []

    def _sample(self, ms: float) -> float:
        slowdown = self.rng.uniform(1.5, 3) if self.in_burst and self.rng.random() < 0.5 else 1.0
        return ms * slowdown * float(np.exp(self.rng.normal(0, self.jitter)))

    def _step_burst(self) -> None:
        """An on/off chain: on for a fraction `in_burst_p` of rounds, in runs of `burst_rounds` on average."""
        leave = 1 / self.burst_rounds
        enter = leave * self.in_burst_p / (1 - self.in_burst_p) if self.in_burst_p < 1 else 1.0
        self.in_burst = self.rng.random() >= leave if self.in_burst else self.rng.random() < enter

    def round(self) -> tuple[float, float]:
        self._step_burst()
        old, new = self._sample(10.0), self._sample(10.0 * self.ratio(len(self.old_ms)))
        self.old_ms.append(old)
        self.new_ms.append(new)
        return old, new

    def measurements(self) -> list[Measurement]:
        return [Measurement(name, "fake", PROTOCOL, list(s), 1, ENV, "fake-run")
                for name, s in (("old", self.old_ms), ("new", self.new_ms))]


CFG = GateConfig(max_regression=0.05, max_time_s=1e9)


def test_2x_regression_with_40_percent_of_samples_under_load_fails():
    r = gate_rounds(LoadedMachine(2.0, load=0.4), CFG)
    assert r.verdict == "fail" and r.failed and r.ratio.low > 1.05
    assert 1.6 < r.ratio.ratio < 2.5


@pytest.mark.parametrize("seed", range(20))
def test_identical_models_under_the_same_load_pass(seed):
    r = gate_rounds(LoadedMachine(1.0, load=0.4, seed=seed), CFG)
    assert r.verdict == "pass" and r.ratio.high <= 1.05 and r.rounds >= CFG.min_rounds


@pytest.mark.parametrize("seed", range(10))
def test_identical_models_with_heavy_jitter_never_fail(seed):
    r = gate_rounds(LoadedMachine(1.0, load=0.4, jitter=0.15, seed=seed), CFG)
    assert r.verdict in ("pass", "inconclusive") and r.ratio.low <= 1.05


@pytest.mark.parametrize("seed", range(10))
def test_a_12_percent_regression_under_heavy_jitter_never_passes(seed):
    r = gate_rounds(LoadedMachine(1.12, load=0.4, jitter=0.15, seed=seed), CFG)
    assert r.verdict in ("fail", "inconclusive") and r.ratio.high > 1.05


def test_3_9x_regression_on_a_noisy_machine_fails():
    r = gate_rounds(LoadedMachine(3.9, load=0.4, jitter=0.15), CFG)
    assert max(r.new.stats.robust_cv, r.old.stats.robust_cv) > 0.10  # what used to downgrade the FAIL
    assert r.verdict == "fail" and r.ratio.low > 2
    assert "noisy" in r.reason and "99.9%" in r.reason
    assert gate_view(r).title.startswith("FAIL")


def test_noise_only_asks_for_more_evidence():
    always_noisy = GateConfig(max_regression=0.05, max_time_s=1e9, max_noise=0.0)
    clear = gate_rounds(LoadedMachine(3.9, load=0.4, jitter=0.15), always_noisy)
    assert clear.verdict == "fail"
    # A small regression: the stricter interval needs more rounds than the ordinary one.
    quiet_cfg = GateConfig(max_regression=0.05, max_time_s=1e9, max_noise=10.0)
    ordinary = gate_rounds(LoadedMachine(1.2, load=0.4, jitter=0.15, seed=4), quiet_cfg)
    strict = gate_rounds(LoadedMachine(1.2, load=0.4, jitter=0.15, seed=4), always_noisy)
    assert ordinary.verdict == strict.verdict == "fail" and strict.rounds > ordinary.rounds


def test_an_interval_across_the_threshold_is_inconclusive_and_says_so():
    r = gate_rounds(LoadedMachine(1.05, load=0.3), GateConfig(max_regression=0.05, max_rounds=40, max_time_s=1e9))
    assert r.verdict == "inconclusive" and r.ratio.low <= 1.05 < r.ratio.high and not r.failed
    assert "straddles" in r.reason and "straddles" in gate_view(r).title


def test_running_out_of_rounds_above_the_threshold_does_not_claim_a_straddle():
    cfg = GateConfig(max_regression=0.05, min_fail_rounds=100, max_rounds=40, max_time_s=1e9)
    r = gate_rounds(LoadedMachine(1.5, load=0.1), cfg)
    assert r.verdict == "inconclusive" and r.ratio.low > 1.05
    title = gate_view(r).title
    assert "straddles" not in title and "above the threshold" in title and "40 rounds of the 100" in title


def test_a_regression_that_vanishes_in_the_recent_half_does_not_fail():
    # 1.5x for the first 60 rounds, then none: the whole run looks slow, the recent half does not.
    cfg = GateConfig(max_regression=0.05, min_fail_rounds=80, max_rounds=80, max_time_s=1e9)
    r = gate_rounds(LoadedMachine(lambda i: 1.5 if i < 60 else 1.0, load=0.0), cfg)
    assert r.verdict == "inconclusive" and r.ratio.low > 1.05 and "recent half" in r.reason


def test_the_result_declares_its_protocol():
    d = gate_rounds(LoadedMachine(2.0), CFG).to_json()
    p = d["gate_protocol"]
    assert p["samples_per_round"] == 3 and p["order"] == "random within each round"
    assert "block bootstrap" in p["interval"] and d["ratio"]["method"].startswith("moving block bootstrap")
    assert len(d["new"]["samples_ms"]) == d["rounds"]


def test_block_interval_is_wider_than_an_iid_one_under_bursts():
    m = LoadedMachine(1.0, load=0.3, burst_rounds=10, seed=1)
    for _ in range(200):
        m.round()
    block, iid = block_paired_ratio(m.old_ms, m.new_ms, 0.99), paired_ratio(m.old_ms, m.new_ms, 0.99)
    assert block.ratio == iid.ratio and block.high - block.low > iid.high - iid.low
    same = block_paired_ratio(m.old_ms, m.old_ms, 0.99)
    assert same.ratio == same.low == same.high == 1.0


def test_interleaved_run_keeps_each_models_minimum_per_round():
    import testnets
    from squeeze.export.onnx import export_onnx
    from squeeze.measure.protocol import Protocol
    from squeeze.model.loading import LoadedModel
    from squeeze.target import load_target

    host = load_target("host-cpu")
    protocol = Protocol.for_target(host, repeat=3, warmup=1, min_repeat_ms=1)
    small, big = (export_onnx(LoadedModel(f"stack{n}", "factory", (1, 3, 24, 24), testnets.conv_stack(n)))
                  for n in (1, 8))
    with InterleavedRun([small, big], host, protocol, samples_per_round=3, shuffle=True) as run:
        rounds = [run.round() for _ in range(4)]
    assert [list(r) for r in zip(*rounds)] == run.samples
    assert all(b > a for a, b in rounds)
    assert LatencyStats.from_samples(run.samples[1]).median_ms > 2 * LatencyStats.from_samples(run.samples[0]).median_ms
