"""Timing artifacts on a target: several models interleaved in one run (A B B A ...), cached by content."""

from __future__ import annotations

import json
import random
import uuid
from dataclasses import dataclass, field

from squeeze.export.artifact import OnnxArtifact
from squeeze.measure.cache import MeasurementCache, measurement_key
from squeeze.measure.protocol import Protocol
from squeeze.measure.runtimes import get_runtime
from squeeze.measure.stats import LatencyStats
from squeeze.measure.worker import WorkerClient

__all__ = ["Measurement", "InterleavedRun", "measure"]


@dataclass
class Measurement:
    artifact_sha: str
    target: str
    protocol: dict
    samples_ms: list[float]
    calls_per_sample: int
    environment: dict
    run_id: str
    cached: bool = False
    stats: LatencyStats = field(init=False)

    def __post_init__(self) -> None:
        self.stats = LatencyStats.from_samples(self.samples_ms)

    def to_json(self) -> dict:
        return {
            "artifact_sha256": self.artifact_sha,
            "target": self.target,
            "protocol": self.protocol,
            "stats": self.stats.to_json(),
            "samples_ms": self.samples_ms,
            "calls_per_sample": self.calls_per_sample,
            "environment": self.environment,
            "run_id": self.run_id,
            "cached": self.cached,
        }

    @classmethod
    def from_json(cls, d: dict) -> "Measurement":
        return cls(d["artifact_sha256"], d["target"], d["protocol"], d["samples_ms"], d["calls_per_sample"],
                   d["environment"], d["run_id"], d.get("cached", False))


class InterleavedRun:
    """Times several artifacts in one measurement worker, one sample of each per round.

    By default rounds alternate the order (A B, then B A) so that neither model always runs right after the
    other. `shuffle` draws the order at random instead, so it cannot fall in step with a periodic load;
    `samples_per_round` > 1 takes that many samples of each model per round (each in its own order) and keeps
    each model's minimum, the sample least disturbed by other processes.
    A sample loops the model `calls_per_sample` times so that it lasts at least `min_repeat_ms`.
    Use as a context manager: it closes its own worker, or drops its artifacts from a shared one.
    """

    def __init__(self, artifacts: list[OnnxArtifact], target, protocol: Protocol,
                 worker: WorkerClient | None = None, *, samples_per_round: int = 1, shuffle: bool = False) -> None:
        if worker is not None and worker.protocol != protocol:
            raise ValueError("a shared measurement worker serves one protocol")
        self.artifacts, self.target, self.protocol = artifacts, target, protocol
        self.samples_per_round, self._rng = samples_per_round, random.Random() if shuffle else None
        self._own = worker is None
        self.worker = worker or WorkerClient(target, protocol)
        self.ids, self.calls = self.worker.open(artifacts)
        self.env: dict = self.worker.environment
        self.samples: list[list[float]] = [[] for _ in artifacts]
        self.run_id = uuid.uuid4().hex[:12]

    def __enter__(self) -> "InterleavedRun":
        return self

    def __exit__(self, *exc) -> None:
        if self._own:
            self.worker.close()
        elif self.worker.alive:
            self.worker.drop(self.ids)

    def _order(self) -> list[int]:
        order = list(range(len(self.artifacts)))
        if self._rng is not None:
            self._rng.shuffle(order)
        elif len(self.samples[0]) % 2:
            order.reverse()
        return order

    def round(self) -> tuple[float, ...]:
        """Sample every artifact; returns this round's milliseconds per call, in artifact order."""
        best = [float("inf")] * len(self.artifacts)
        for _ in range(self.samples_per_round):
            order = self._order()
            got = self.worker.sample([self.ids[i] for i in order])
            best = [min(b, got[self.ids[i]]) for i, b in enumerate(best)]
        for s, ms in zip(self.samples, best):
            s.append(ms)
        return tuple(best)

    def measurements(self) -> list[Measurement]:
        return [
            Measurement(a.sha256, self.target.name, self.protocol.model_dump(), list(s), c, self.env, self.run_id)
            for a, s, c in zip(self.artifacts, self.samples, self.calls)
        ]


def _key(artifact: OnnxArtifact, target, runtime_version: str, protocol: Protocol) -> str:
    return measurement_key(artifact.sha256, target.model_dump_json(), runtime_version, json.dumps(protocol.model_dump()))


def measure(artifacts: list[OnnxArtifact], target, protocol: Protocol, use_cache: bool = True,
            worker: WorkerClient | None = None) -> list[Measurement]:
    """Measure all artifacts in one interleaved run (in `worker` when given, else in a fresh one).

    Cached results are used only when every artifact has one from the same run, so ratios between the
    returned measurements always come from one run.
    """
    cache = MeasurementCache()
    runtime = get_runtime(target)
    runtime.providers(target)  # fail on a missing device before any work
    keys = [_key(a, target, runtime.version(), protocol) for a in artifacts]
    if use_cache:
        hits = [cache.get(k) for k in keys]
        if all(hits) and len({h["run_id"] for h in hits}) == 1:
            return [Measurement.from_json({**h, "cached": True}) for h in hits]
    with InterleavedRun(artifacts, target, protocol, worker) as run:
        for _ in range(protocol.repeat):
            run.round()
    results = run.measurements()
    for k, m in zip(keys, results):
        cache.put(k, m.to_json())
    return results
