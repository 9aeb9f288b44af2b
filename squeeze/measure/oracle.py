"""The latency oracle: the only way searches and quantization see latency.

Given a model (or an exported artifact), return its latency on the oracle's target. `MeasuredOracle`
exports and measures the whole model (cached by content), or several models interleaved in one run with
their paired speedups over a reference; lookup-table oracles implement the same interface, and price their
entries through `interleaved` (one uncached run, the table stores it).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterator, TypeVar

import numpy as np

from squeeze.export.artifact import OnnxArtifact
from squeeze.export.onnx import export_onnx
from squeeze.measure.bench import InterleavedRun, Measurement, measure
from squeeze.measure.protocol import CONTENDED, CONTENTION_TRIES, Protocol
from squeeze.measure.stats import RatioEstimate, paired_ratio
from squeeze.measure.worker import WorkerClient
from squeeze.model.loading import LoadedModel
from squeeze.target import Target

__all__ = ["LatencyOracle", "FixedOracle", "MeasuredOracle", "Quietest", "Reading", "RelativeOracle", "WorkerRuns",
           "interleaved"]

Timed = LoadedModel | OnnxArtifact
_log = logging.getLogger("squeeze.measure")


@dataclass(frozen=True)
class Reading:
    """A latency and the interval it is known to: [low_ms, high_ms] (zero width for a prediction)."""

    ms: float
    low_ms: float
    high_ms: float


class LatencyOracle(ABC):
    target: Target
    # The smallest difference the caller needs told apart (a search sets its step): oracles that measure
    # sample until a reading's interval is narrower. None: the protocol's sample count.
    resolution_ms: float | None = None
    # The value the caller compares readings with (a search's target): a reading whose interval lies wholly
    # on one side of it is settled early; only readings near it need the full resolution.
    threshold_ms: float | None = None

    @abstractmethod
    def latency_ms(self, model: Timed) -> float:
        """Median latency in milliseconds."""

    def reading(self, model: Timed) -> Reading:
        ms = self.latency_ms(model)
        return Reading(ms, ms, ms)


class FixedOracle(LatencyOracle):
    """A latency measured once elsewhere (e.g. interleaved with other models), for code that takes an oracle."""

    def __init__(self, ms: float) -> None:
        self.ms = ms

    def latency_ms(self, model: Timed) -> float:
        return self.ms


class MeasuredOracle(LatencyOracle):
    def __init__(self, target: Target, protocol: Protocol | None = None, use_cache: bool = True) -> None:
        self.target = target
        self.protocol = protocol or Protocol.for_target(target)
        self.use_cache = use_cache

    def measurement(self, model: Timed) -> Measurement:
        return self.measurements([model])[0]

    def measurements(self, models: list[Timed], fresh: bool = False) -> list[Measurement]:
        """All `models` in one interleaved run, so that ratios between them come from one run; `fresh`: a new
        run even when the cache holds one (a confirmation must be independent)."""
        artifacts = [m if isinstance(m, OnnxArtifact) else export_onnx(m, use_cache=self.use_cache) for m in models]
        return measure(artifacts, self.target, self.protocol, use_cache=self.use_cache and not fresh)

    def speedups(self, reference: Timed, candidates: list[Timed], fresh: bool = False
                 ) -> tuple[Measurement, list[RatioEstimate]]:
        """One interleaved run: the reference's measurement and each candidate's speedup over it
        (reference / candidate, from paired samples)."""
        ref, *rest = self.measurements([reference, *candidates], fresh)
        return ref, [paired_ratio(m.samples_ms, ref.samples_ms) for m in rest]

    def latency_ms(self, model: Timed) -> float:
        return self.measurement(model).stats.median_ms


def interleaved(artifacts: list[OnnxArtifact], target: Target, protocol: Protocol) -> list[Measurement]:
    """`protocol.repeat` rounds of the artifacts interleaved in one fresh worker, not cached: lookup tables
    store what they measure themselves."""
    with InterleavedRun(artifacts, target, protocol) as run:
        for _ in range(protocol.repeat):
            run.round()
    return run.measurements()


class WorkerRuns:
    """Interleaved runs (InterleavedRun) of exported models in one worker process, restarted if one killed it."""

    def __init__(self, target: Target, protocol: Protocol, exporter: str) -> None:
        self.target, self.protocol, self.exporter = target, protocol, exporter
        self._worker: WorkerClient | None = None

    @property
    def worker(self) -> WorkerClient:
        if self._worker is None or not self._worker.alive:
            self._worker = WorkerClient(self.target, self.protocol)
        return self._worker

    def __call__(self, models: list[Timed]) -> InterleavedRun:
        artifacts = [m if isinstance(m, OnnxArtifact) else export_onnx(m, exporter=self.exporter) for m in models]
        return InterleavedRun(artifacts, self.target, self.protocol, worker=self.worker)


# Opens an interleaved run of some models: `.round()` appends one sample (ms per call) of each to
# `.samples[i]`; `.calls[i]` is how many calls one sample of model i loops.
RunFactory = Callable[[list[Timed]], ContextManager[Any]]

# A run whose calibration was hit by a burst of load loops a model too few times per sample. On a loaded
# machine such short samples read several times faster than long ones (the scheduler favours a process that
# has just woken), which skews a ratio 4x (seen here: calls [2, 67], ratio 1.9 instead of 0.47). Such a run
# is opened again, this many times at most.
CALIBRATION_TRIES = 3

R = TypeVar("R")


class Quietest:
    """A probe's fastest run so far (the machine at its quietest), and runs taken again while contended.

    Contention comes in bursts and in spells: a burst passes between two runs, a spell lasts minutes (a
    co-tenant's job). Once every try of a call was contended, the machine is in a spell: later calls take one
    run each, which retrying would only triple, until a run reads uncontended again."""

    def __init__(self, ms: float = float("inf")) -> None:
        self.ms = ms
        self.in_spell = False  # the last call found every try contended

    def least_contended(self, take: Callable[[], R], probe_ms: Callable[[R], float]) -> tuple[R, float]:
        """`take()`, again while its probe ran over CONTENDED x the fastest (CONTENTION_TRIES runs at most, one
        in a spell): the least contended run, and its probe's time."""
        tries = []
        for _ in range(1 if self.in_spell else CONTENTION_TRIES):
            result = take()
            ms = probe_ms(result)
            self.ms = min(self.ms, ms)
            tries.append((ms, result))
            if ms <= CONTENDED * self.ms:
                break
        ms, result = min(tries, key=lambda t: t[0])
        self.in_spell = ms > CONTENDED * self.ms
        return result, ms


def _identity(model: Timed) -> str:
    return model.sha256 if isinstance(model, OnnxArtifact) else model.fingerprint


class RelativeOracle(LatencyOracle):
    """Latency as reference_ms x (model / reference), the ratio from samples taken interleaved in one run.

    Absolute figures drift with machine load between runs; the ratio of two models timed back to back
    does not. Searches that compare candidates against a budget set relative to the original use this.
    With `resolution_ms` set, rounds are added in batches of `repeat` until the ratio's 95% interval,
    in milliseconds, is narrower than it or lies wholly on one side of `threshold_ms` (at most `max_rounds`):
    a busy machine costs samples, not decisions. A contended run (CONTENDED) costs another run.
    """

    def __init__(self, reference: LoadedModel, target: Target, protocol: Protocol | None = None,
                 exporter: str = "torchscript", runs: RunFactory | None = None, max_rounds: int | None = None) -> None:
        self.target = target
        self.protocol = protocol or Protocol.for_target(target)
        # The faster exporter: candidates only need the same graph, not the shipped file.
        self.runs = runs or WorkerRuns(target, self.protocol, exporter)
        self.max_rounds = max_rounds or 8 * self.protocol.repeat
        self.reference, self._reference_id = reference, _identity(reference)
        with self._run([reference]) as run:
            self.reference_ms = float(np.median(run.samples[0]))
        self.quietest = Quietest(self.reference_ms)  # the reference's fastest run so far
        self.run_reference_ms = self.reference_ms  # the reference's time in the run the last ratio came from

    @property
    def worker(self) -> WorkerClient:
        """The worker process that serves all of this oracle's measurements (with the default runs)."""
        return self.runs.worker

    def _sample(self, run) -> None:
        for _ in range(self.protocol.repeat):
            run.round()

    def _long_enough(self, run) -> bool:
        """Every model's samples last at least half of min_repeat_ms."""
        return all(np.median(s) * calls >= 0.5 * self.protocol.min_repeat_ms for s, calls in zip(run.samples, run.calls))

    @contextmanager
    def _run(self, models: list[Timed]) -> Iterator[Any]:
        """An interleaved run with its first batch taken: opened again when its samples are too short."""
        for attempt in range(1, CALIBRATION_TRIES + 1):
            with self.runs(models) as run:
                self._sample(run)
                if self._long_enough(run) or attempt == CALIBRATION_TRIES:
                    yield run
                    return

    def _settled(self, est: RatioEstimate) -> bool:
        if self.resolution_ms is None or est.n >= self.max_rounds:
            return True
        low_ms, high_ms = est.low * self.reference_ms, est.high * self.reference_ms
        if self.threshold_ms is not None and (low_ms > self.threshold_ms or high_ms <= self.threshold_ms):
            return True
        return high_ms - low_ms < self.resolution_ms

    def _settled_ratio(self, model: Timed) -> tuple[RatioEstimate, float]:
        """One run's ratio, sampled until settled, and the reference's median time in that run."""
        with self._run([self.reference, model]) as run:
            while not self._settled(est := paired_ratio(run.samples[0], run.samples[1])):
                self._sample(run)
            return est, float(np.median(run.samples[0]))

    def ratio(self, model: Timed) -> RatioEstimate:
        """Model / reference, from interleaved samples: enough of them for `resolution_ms`, from an uncontended
        run where one of CONTENTION_TRIES was (else the least contended)."""
        spell = self.quietest.in_spell
        (est, _), self.run_reference_ms = self.quietest.least_contended(lambda: self._settled_ratio(model),
                                                                        lambda r: r[1])
        if self.quietest.in_spell and not spell:
            _log.warning(f"the machine ran {self.contention:.2f}x slower than at its quietest in this session in each "
                         f"of {CONTENTION_TRIES} runs (the original took {self.run_reference_ms:.3f} ms, at best "
                         f"{self.fastest_ms:.3f}): this ratio, {est.ratio:.3f}, is a busier machine's (a busy machine "
                         "slows small models more than large ones), and so are the next ones, one run each, until "
                         "a run is quiet again.")
        return est

    @property
    def fastest_ms(self) -> float:
        return self.quietest.ms

    @property
    def contention(self) -> float:
        """The last ratio's run: its reference's time over the fastest run's (1: the quietest seen)."""
        return self.run_reference_ms / self.fastest_ms

    def reading(self, model: Timed) -> Reading:
        if _identity(model) == self._reference_id:
            return Reading(self.reference_ms, self.reference_ms, self.reference_ms)
        est = self.ratio(model)
        return Reading(self.reference_ms * est.ratio, self.reference_ms * est.low, self.reference_ms * est.high)

    def latency_ms(self, model: Timed) -> float:
        return self.reading(model).ms
