"""The latency oracle: the only way searches see latency.

Given a model (or an exported artifact), return its latency on the oracle's target. `MeasuredOracle`
exports and measures the whole model (cached by content); lookup-table oracles implement the same interface.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from squeeze.export.artifact import OnnxArtifact
from squeeze.export.onnx import export_onnx
from squeeze.measure.bench import Measurement, measure
from squeeze.measure.protocol import Protocol
from squeeze.measure.stats import paired_ratio
from squeeze.measure.worker import WorkerClient
from squeeze.model import LoadedModel
from squeeze.target import Target

__all__ = ["LatencyOracle", "MeasuredOracle", "RelativeOracle"]


class LatencyOracle(ABC):
    target: Target

    @abstractmethod
    def latency_ms(self, model: LoadedModel | OnnxArtifact) -> float:
        """Median latency in milliseconds."""


class MeasuredOracle(LatencyOracle):
    def __init__(self, target: Target, protocol: Protocol | None = None, use_cache: bool = True) -> None:
        self.target = target
        self.protocol = protocol or Protocol.for_target(target)
        self.use_cache = use_cache

    def measurement(self, model: LoadedModel | OnnxArtifact) -> Measurement:
        artifact = model if isinstance(model, OnnxArtifact) else export_onnx(model, use_cache=self.use_cache)
        return measure([artifact], self.target, self.protocol, use_cache=self.use_cache)[0]

    def latency_ms(self, model: LoadedModel | OnnxArtifact) -> float:
        return self.measurement(model).stats.median_ms


class RelativeOracle(LatencyOracle):
    """Latency as reference_ms x (model / reference), both measured interleaved in one run.

    Absolute figures drift with machine load between runs; the ratio of two models timed back to back
    does not. Searches that compare candidates against a budget set relative to the original use this.
    """

    def __init__(self, reference: LoadedModel, target: Target, protocol: Protocol | None = None,
                 exporter: str = "torchscript") -> None:
        self.target = target
        self.protocol = protocol or Protocol.for_target(target)
        self.exporter = exporter  # the faster exporter: candidates only need the same graph, not the shipped file
        self._worker: WorkerClient | None = None
        self.reference = export_onnx(reference, exporter=exporter)
        (m,) = measure([self.reference], target, self.protocol, use_cache=False, worker=self.worker)
        self.reference_ms = m.stats.median_ms

    @property
    def worker(self) -> WorkerClient:
        """One worker process for all of this oracle's measurements (restarted if a measurement killed it)."""
        if self._worker is None or not self._worker.alive:
            self._worker = WorkerClient(self.target, self.protocol)
        return self._worker

    def latency_ms(self, model: LoadedModel | OnnxArtifact) -> float:
        artifact = model if isinstance(model, OnnxArtifact) else export_onnx(model, exporter=self.exporter)
        if artifact.sha256 == self.reference.sha256:
            return self.reference_ms
        ref, new = measure([self.reference, artifact], self.target, self.protocol, use_cache=False, worker=self.worker)
        return self.reference_ms * paired_ratio(ref.samples_ms, new.samples_ms).ratio
